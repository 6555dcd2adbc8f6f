"""Bottleneck adapters around whole blocks (AdaptFormer) when the block's width is given."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.core.peft import Bottleneck, add_adapter, disable_adapters, wrappers


class Mlp(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_parallel_bottleneck_beside_a_whole_block():
    torch.manual_seed(0)
    model = nn.Sequential(Mlp())
    x = torch.randn(2, 5, 8)
    base = model(x)
    add_adapter(model, Bottleneck(targets=["0"], hidden=4, placement="parallel", scale=0.1, channels=8))
    assert [name for name, _ in wrappers(model)] == ["0"]
    assert torch.equal(model(x), base)
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        adapter.up.weight.normal_()
    expected = base + 0.1 * adapter.up(torch.nn.functional.gelu(adapter.down(x)))
    torch.testing.assert_close(model(x), expected)
    with disable_adapters(model):
        assert torch.equal(model(x), base)


def test_a_block_without_channels_is_refused():
    with pytest.raises(ValueError, match=r"Cannot tell the output channels of module '0' \(Mlp\)"):
        add_adapter(nn.Sequential(Mlp()), Bottleneck(targets=["0"], placement="parallel"))
