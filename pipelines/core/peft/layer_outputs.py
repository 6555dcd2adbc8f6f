"""What one adapter alone makes of a layer's output: the piece compositions and per-example routing share.

A layer's output with adapter `a` alone is base + delta for an additive adapter ("delta": LoRA, LoHa, LoKr,
VeRA, parallel bottleneck), transform(base) for an output transform ("transform": IA3, SSF, BitFit, serial
bottleneck) and the adapter's own computation for one that replaces the layer ("forward": norm tuning).
Its change is that output minus the base output (the delta itself for additive adapters).
"""

from __future__ import annotations

import torch
from torch import nn

from .prompt import PromptAdapter


def first(out) -> torch.Tensor:
    """A module output's main tensor: the output, or the first element of a tuple output."""
    return out[0] if isinstance(out, tuple) else out


def with_first(out, tensor: torch.Tensor):
    """The module output `out` with its main tensor replaced by `tensor`."""
    return (tensor, *out[1:]) if isinstance(out, tuple) else tensor


def alone(adapter: nn.Module, base: nn.Module, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    """The layer's main output with only `adapter` active, given the base layer's main output on x."""
    if adapter.kind == "delta":
        return base_out + adapter.delta(base, x, base_out)
    if adapter.kind == "transform":
        return adapter.transform(base_out)
    return adapter.forward_with(base, x)


def change(adapter: nn.Module, base: nn.Module, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    """What `adapter` alone adds to the layer's main output (its delta, for an additive adapter)."""
    if adapter.kind == "delta":
        return adapter.delta(base, x, base_out)
    return alone(adapter, base, x, base_out) - base_out


def shape_changing(adapter: nn.Module) -> bool:
    """Whether the adapter changes the shape of the layer's output (prompt tuning inserts tokens)."""
    return isinstance(adapter, PromptAdapter)


def rewrites_call(adapter: nn.Module) -> bool:
    """Whether the adapter acts on the whole model's call rather than its layer (P-tuning, prefix tuning)."""
    return hasattr(adapter, "rewrite_call")
