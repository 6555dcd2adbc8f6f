"""NormTuning on norm subclasses: those it reproduces exactly, and those it must refuse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.core.peft import NormTuning, add_adapter, disable_adapters

timm_layers = pytest.importorskip("timm.layers")


def test_batchnorm_act_keeps_its_activation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), timm_layers.BatchNormAct2d(8, act_layer=nn.ReLU)).eval()
    x = torch.randn(2, 3, 6, 6)
    base = model(x)
    add_adapter(model, NormTuning())
    assert torch.equal(model(x), base)
    assert (model(x) >= 0).all()  # the ReLU after the norm is still applied
    with torch.no_grad():
        model[1].adapters["default"].bias_offset.fill_(-10.0)
    assert torch.equal(model(x), torch.zeros_like(base))
    with disable_adapters(model):
        assert torch.equal(model(x), base)


def test_timm_channels_last_layernorm_is_plain():
    model = nn.Sequential(nn.Linear(4, 4), timm_layers.LayerNorm(4))
    x = torch.randn(3, 4)
    base = model(x)
    add_adapter(model, NormTuning())
    assert torch.equal(model(x), base)


def test_a_norm_with_its_own_forward_is_refused_or_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), timm_layers.LayerNorm2d(4), nn.BatchNorm2d(4))
    with pytest.raises(
        ValueError, match="NormTuning cannot adapt '1': its class LayerNorm2d overrides forward"
    ):
        add_adapter(model, NormTuning(targets=["1"]))
    add_adapter(model, NormTuning())  # no targets: only the norms it reproduces
    adapted = [n for n, _ in model.named_modules() if n.endswith("adapters.default")]
    assert adapted == ["2.adapters.default"]
