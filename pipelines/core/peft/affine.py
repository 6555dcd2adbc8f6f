"""Per-channel scale and shift of a layer's output: IA3 (scale), SSF (scale and shift), BitFit (shift).

All three start at the identity and merge exactly into the layer's weight and bias (a shift needs a bias).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import broadcast, output_channels, weight_output_axis

# method -> (scale parameter name or None, shift parameter name or None)
PARAMETER_NAMES = {"ia3": ("ia3_l", None), "ssf": ("ssf_scale", "ssf_shift"), "bitfit": (None, "bias_offset")}


class ChannelAffine(nn.Module):
    """out * scale + shift along the layer's channel dimension."""

    kind = "transform"
    mergeable = True

    def __init__(self, base: nn.Module, method: str, name: str):
        super().__init__()
        self.merged = False
        self.scale_name, self.shift_name = PARAMETER_NAMES[method]
        channels, self.channel_dim = output_channels(base, name)
        if method == "bitfit" and getattr(base, "bias", None) is None:
            raise ValueError(
                f"BitFit target {name!r} ({type(base).__name__}) has no bias; choose layers with one."
            )
        if self.scale_name:
            self.register_parameter(self.scale_name, nn.Parameter(torch.ones(channels)))
        if self.shift_name:
            self.register_parameter(self.shift_name, nn.Parameter(torch.zeros(channels)))
        self.name = name

    def _factors(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        scale = getattr(self, self.scale_name) if self.scale_name else None
        shift = getattr(self, self.shift_name) if self.shift_name else None
        return scale, shift

    def transform(self, out: torch.Tensor) -> torch.Tensor:
        scale, shift = self._factors()
        dim = self.channel_dim % out.ndim
        if scale is not None:
            out = out * broadcast(scale.to(out.dtype), out.ndim, dim)
        if shift is not None:
            out = out + broadcast(shift.to(out.dtype), out.ndim, dim)
        return out

    def check_mergeable(self, base: nn.Module) -> None:
        if getattr(base, "weight", None) is None:
            raise ValueError(
                f"Cannot merge into {self.name!r}: the layer has no weight (no affine parameters)."
            )
        if self.shift_name and getattr(base, "bias", None) is None:
            raise ValueError(f"Cannot merge a shift into {self.name!r}: the layer has no bias.")
        scale = self._factors()[0]
        if scale is not None and bool((scale == 0).any()):
            raise ValueError(f"Cannot merge into {self.name!r}: a zero scale could not be unmerged.")

    def merge_into(self, base: nn.Module) -> None:
        self.check_mergeable(base)
        scale, shift = self._factors()
        with torch.no_grad():
            if scale is not None:
                axis = weight_output_axis(base)
                base.weight.mul_(broadcast(scale, base.weight.ndim, axis).to(base.weight.dtype))
                if base.bias is not None:
                    base.bias.mul_(scale.to(base.bias.dtype))
            if shift is not None:
                base.bias.add_(shift.to(base.bias.dtype))

    def unmerge_from(self, base: nn.Module) -> None:
        scale, shift = self._factors()
        with torch.no_grad():
            if shift is not None:
                base.bias.sub_(shift.to(base.bias.dtype))
            if scale is not None:
                axis = weight_output_axis(base)
                base.weight.div_(broadcast(scale, base.weight.ndim, axis).to(base.weight.dtype))
                if base.bias is not None:
                    base.bias.div_(scale.to(base.bias.dtype))
