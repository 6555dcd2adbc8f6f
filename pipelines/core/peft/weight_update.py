"""What LoHa, LoKr and VeRA share: an update to a layer's weight, applied to its input and merged exactly.

Their factors live in float32; the update is built in float32 and cast to the activation dtype, so
activations are never upcast (as LoRA does).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def kaiming_uniform(*shape: int) -> nn.Parameter:
    """A float32 parameter drawn as nn.Linear draws its weight (what HF peft uses for these factors)."""
    parameter = nn.Parameter(torch.empty(shape))
    nn.init.kaiming_uniform_(parameter, a=math.sqrt(5))
    return parameter


def zeros(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape))


def tucker(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """The (out, in, k1, k2) kernel of an (r, r, k1, k2) core and (r, out), (r, in) factors (LyCORIS's CP)."""
    return torch.einsum("ijkl,ip,jr->prkl", core, out_factor, in_factor)


def kernel_core(base: nn.Module) -> tuple[int, int]:
    """The spatial shape of a convolution's core: (k1, k2) for Conv2d, (k, 1) for Conv1d, as HF peft."""
    kernel = tuple(base.kernel_size)
    return kernel if len(kernel) == 2 else (kernel[0], 1)


def apply_update(base: nn.Module, x: torch.Tensor, update: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The layer's operation on x with `update` as its weight and no bias, in `dtype`."""
    weight = update.to(dtype)
    if isinstance(base, nn.Linear):
        return nn.functional.linear(x.to(dtype), weight)
    return base._conv_forward(x.to(dtype), weight, None)  # keeps stride, padding (mode), dilation, groups


def add_update(base: nn.Module, update: torch.Tensor, sign: int) -> None:
    """Adds (sign 1) or subtracts (sign -1) the float32 update from the layer's weight, in its dtype."""
    with torch.no_grad():
        base.weight.add_(update.to(base.weight.dtype), alpha=sign)
