"""LoHa: the Hadamard product of two low-rank products, on Linear, Conv1d and Conv2d layers, and its merge.

Parameter names, shapes, initialisation and the update formula follow HF peft's LoHa layer, so adapter
files carry over key for key (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, `hada_t1`, `hada_t2`).
"""

from __future__ import annotations

import torch
from torch import nn

from .specs import LoHa
from .weight_update import add_update, apply_update, kaiming_uniform, kernel_core, tucker, zeros

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
PARAMETERS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


class LoHaAdapter(nn.Module):
    """Update (alpha / r) (W1a W1b) * (W2a W2b); W2b starts at zero, so the layer is unchanged at first."""

    kind = "delta"
    mergeable = True

    def __init__(self, base: nn.Module, spec: LoHa, name: str):
        super().__init__()
        if not isinstance(base, SUPPORTED):
            raise ValueError(
                f"LoHa cannot adapt {name!r} ({type(base).__name__}); it supports Linear, Conv1d and "
                "Conv2d layers."
            )
        self.scaling, self.merged = spec.scaling, False
        out_channels, r = base.weight.shape[0], spec.r
        # A 1x1 (or size-1) kernel is a matrix product; peft keeps the flat form there.
        self.effective = spec.use_effective_conv2d and base.weight[0, 0].numel() > 1
        if self.effective:
            in_channels, core = base.weight.shape[1], kernel_core(base)
            self.hada_t1, self.hada_t2 = kaiming_uniform(r, r, *core), kaiming_uniform(r, r, *core)
            self.hada_w1_a, self.hada_w1_b = kaiming_uniform(r, out_channels), kaiming_uniform(r, in_channels)
            self.hada_w2_a, self.hada_w2_b = kaiming_uniform(r, out_channels), zeros(r, in_channels)
        else:
            fan_in = base.weight[0].numel()  # in_channels / groups x kernel
            self.hada_w1_a, self.hada_w1_b = kaiming_uniform(out_channels, r), kaiming_uniform(r, fan_in)
            self.hada_w2_a, self.hada_w2_b = kaiming_uniform(out_channels, r), zeros(r, fan_in)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The float32 update to the base weight, scale included, in the base weight's shape."""
        if self.effective:
            first = tucker(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            second = tucker(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
            update = first * second * self.scaling
        else:
            update = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling
        return update.reshape(base.weight.shape)

    def delta(self, base: nn.Module, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return apply_update(base, x, self.delta_weight(base), base_out.dtype)

    def merge_into(self, base: nn.Module) -> None:
        add_update(base, self.delta_weight(base), 1)

    def unmerge_from(self, base: nn.Module) -> None:
        add_update(base, self.delta_weight(base), -1)
