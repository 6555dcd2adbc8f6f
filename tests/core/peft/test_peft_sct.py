"""Salient channel tuning: analytic channel choices, the paper's update, calibration, merges, files."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import pytest
import torch
import yaml
from peft_testing import make_tiny_llama, perturb_adapters, refused, relative_error, weighted_loss
from torch import nn

from pipelines.core.peft import (
    SCT,
    PrefixTuning,
    PTuning,
    add_adapter,
    load_adapter,
    merge,
    merge_and_unload,
    save_adapter,
    select_salient_channels,
)


def diagonal_layer(scales: list[float]) -> nn.Module:
    """A Linear whose output channel i is scales[i] times input channel i."""
    layer = nn.Linear(len(scales), len(scales))
    with torch.no_grad():
        layer.weight.copy_(torch.diag(torch.tensor(scales)))
        layer.bias.zero_()
    return nn.Sequential(OrderedDict(layer=layer)).eval()


def adapter_of(model: nn.Module, name: str = "default"):
    return model.layer.adapters[name]


def test_selection_keeps_the_channels_of_largest_norm():
    model = diagonal_layer([1.0, 5.0, 2.0, 7.0, 3.0, 0.5])
    batches = [torch.ones(4, 3, 6), torch.full((2, 3, 6), -2.0)]  # every channel's norm is |scale| x constant
    spec = select_salient_channels(model, SCT(top_k=2, targets=["layer"]), batches)
    assert spec.selected == {"layer": [1, 3]}
    spec = select_salient_channels(model, SCT(fraction=0.5, targets=["layer"]), batches)
    assert spec.selected == {"layer": [1, 3, 4]} and spec.fraction == 0.5
    assert not model.training and all(not m._forward_hooks for m in model.modules())


def test_class_aware_selection_averages_each_class_norm():
    model = diagonal_layer([1.0, 1.0])
    batch, labels = torch.tensor([[8.0, 12.0], [8.0, 0.0]]), torch.tensor([0, 1])
    spec = SCT(top_k=1, targets=["layer"])
    # over all samples channel 1 is larger (12 > sqrt(8^2 + 8^2)); per class, channel 0 ((8 + 8) / 2 > 12 / 2)
    assert select_salient_channels(model, spec, [batch]).selected == {"layer": [1]}
    assert select_salient_channels(model, spec, [batch], labels=[labels]).selected == {"layer": [0]}


def test_the_update_is_the_papers_on_the_selected_channels_only():
    base = nn.Sequential(OrderedDict(layer=nn.Linear(5, 6))).eval()
    spec = SCT(top_k=3, scale=0.5, targets=["layer"], selected={"layer": [4, 0, 2]})
    model = add_adapter(copy.deepcopy(base), spec)
    x = torch.randn(2, 3, 5)
    assert torch.equal(model(x), base(x))  # W and b start at zero
    perturb_adapters(model)
    adapter = adapter_of(model)
    expected = base(x).detach().clone()
    chosen = [0, 2, 4]
    expected[..., chosen] += 0.5 * (expected[..., chosen] @ adapter.sct_weight.T + adapter.sct_bias)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
    assert torch.equal(model(x)[..., [1, 3, 5]], base(x)[..., [1, 3, 5]])
    model.train()
    weighted_loss(model(x)).backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == [
        "layer.adapters.default.sct_weight", "layer.adapters.default.sct_bias"
    ]  # fmt: skip


def test_training_batches_choose_the_channels_when_none_are_given(tmp_path):
    spec = SCT(top_k=2, targets=["layer"], calibration_batches=2)
    model = add_adapter(diagonal_layer([1.0, 5.0, 2.0, 7.0]), spec)
    with refused(
        "SCT adapter 'default' on 'layer' has not chosen its channels yet; run 2 training batches or "
        "select_salient_channels first."
    ):
        save_adapter(model, tmp_path)
    x = torch.ones(3, 4)
    model(x)  # eval-mode calls (validation, test) never choose
    assert not adapter_of(model).calibrated
    model.train()
    assert torch.equal(model(x), model.layer.base_layer(x))  # unchanged while measuring
    model(x)
    assert adapter_of(model).channel_index.tolist() == [1, 3]
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["spec"]["selected"] == {"layer": [1, 3]}


def test_a_whole_block_with_its_width():
    class Block(nn.Module):  # a residual block of (batch, tokens, channels), as a ViT's
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.fc(x)

    base = nn.Sequential(OrderedDict(layer=Block())).eval()
    x = torch.randn(2, 3, 4) * torch.tensor([1.0, 10.0, 0.1, 5.0])
    expected = base(x).pow(2).sum(dim=(0, 1)).topk(2).indices.sort().values.tolist()
    spec = select_salient_channels(base, SCT(top_k=2, channels=4, targets=["layer"]), [x])
    assert spec.selected == {"layer": expected}
    model = add_adapter(copy.deepcopy(base), spec)
    assert torch.equal(model(x), base(x)) and not adapter_of(model).mergeable


def test_save_load_keeps_the_chosen_channels(tmp_path):
    base = diagonal_layer([1.0, 5.0, 2.0, 7.0, 3.0, 0.5])
    spec = select_salient_channels(base, SCT(top_k=2, targets=["layer"]), [torch.ones(2, 6)])
    model = add_adapter(copy.deepcopy(base), spec, name="task")
    perturb_adapters(model)
    save_adapter(model, tmp_path)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    assert adapter_of(fresh, "task").channel_index.tolist() == [1, 3]
    x = torch.randn(4, 6)
    assert torch.equal(fresh(x), model(x))


def test_merges_into_a_llama_projection():
    torch.manual_seed(0)
    base = make_tiny_llama()
    batches = [{"input_ids": torch.randint(0, 64, (2, 7))} for _ in range(2)]
    spec = select_salient_channels(base, SCT(fraction=0.25, bias=False, targets=["down_proj"]), batches)
    assert sorted(spec.selected) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert all(len(channels) == 8 for channels in spec.selected.values())  # a quarter of 32
    model = add_adapter(copy.deepcopy(base), spec)
    perturb_adapters(model, scale=0.3)
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert not torch.allclose(expected, base(input_ids=ids).logits, atol=1e-3)
        merged = merge_and_unload(model)
        assert relative_error(merged(input_ids=ids).logits, expected) < 1e-5
    assert type(merged.model.layers[0].mlp.down_proj) is nn.Linear


def test_refusals():
    with refused("SCT takes top_k or fraction, not both; drop one of them."):
        SCT(top_k=2, fraction=0.5)
    with refused("SCT top_k 9 exceeds the 6 output channels of 'layer'; choose a smaller top_k."):
        add_adapter(diagonal_layer([1.0] * 6), SCT(top_k=9, targets=["layer"]))
    with refused(
        "The SCT spec's selected channels name no 'layer'; run select_salient_channels(model, spec, batches) "
        "for these targets."
    ):
        add_adapter(diagonal_layer([1.0] * 6), SCT(top_k=2, targets=["layer"], selected={"other": [0, 1]}))
    with refused("The SCT selected channels of 'layer' must be 2 distinct indices below 6; got [0, 0]."):
        add_adapter(diagonal_layer([1.0] * 6), SCT(top_k=2, targets=["layer"], selected={"layer": [0, 0]}))
    model = nn.Sequential(OrderedDict(layer=nn.Linear(4, 4, bias=False)))
    add_adapter(model, SCT(top_k=2, targets=["layer"], selected={"layer": [0, 1]}))
    perturb_adapters(model)
    with refused("Cannot merge SCT's offset into 'layer': the layer has no bias (use SCT bias: false)."):
        merge(model)
    norm = nn.Sequential(OrderedDict(layer=nn.LayerNorm(4)))
    add_adapter(norm, SCT(top_k=2, targets=["layer"], selected={"layer": [0, 1]}))
    with pytest.raises(ValueError, match="SCTAdapter is not a linear change of the layer's weights"):
        merge(norm)


def test_recipes_accept_the_new_methods():
    from pipelines.core.recipe import Recipe

    text = """
    name: toy
    pipeline: toy/classify
    backbone: {name: tiny}
    data: {dataset: toy, task: binary}
    stages:
      - {name: a, objective: classification, adapter: {method: ptuning, num_tokens: 4, encoder: lstm}}
      - {name: b, objective: classification, adapter: {method: prefix, prefix_projection: true}}
      - {name: c, objective: classification, adapter: {method: sct, top_k: 4, targets: [fc2]}}
    """
    recipe = Recipe.model_validate(yaml.safe_load(text))
    assert [stage.adapter for stage in recipe.stages] == [
        PTuning(num_tokens=4, encoder="lstm"), PrefixTuning(prefix_projection=True),
        SCT(top_k=4, targets=["fc2"]),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="SCT takes top_k or fraction, not both"):
        Recipe.model_validate(yaml.safe_load(text.replace("top_k: 4,", "top_k: 4, fraction: 0.5,")))
