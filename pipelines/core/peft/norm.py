"""Norm tuning: offsets to a norm layer's affine parameters, and BatchNorm statistics of the adapter's own.

The base layer's parameters and running statistics are never written while the adapter is active, so
disabling the adapter gives the base model back exactly; the adapter's statistics are saved with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import is_rms_norm

_BATCH_NORM = nn.modules.batchnorm._BatchNorm
NORM_TYPES = (_BATCH_NORM, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
# The forwards this adapter recomputes exactly; a subclass with its own forward (timm's LayerNorm2d, say)
# would silently lose what its forward adds, so it is refused.
_PLAIN_FORWARDS = {
    cls.forward
    for cls in (_BATCH_NORM, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
} | {nn.RMSNorm.forward}


# Subclasses whose forward is the plain norm (timm's channels-last LayerNorm and GroupNorm).
_SAME_AS_PLAIN = {"timm.layers.norm.LayerNorm", "timm.layers.norm.GroupNorm", "timm.layers.norm.GroupNorm1"}


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or is_rms_norm(module)


def _with_activation(module: nn.Module) -> bool:
    """timm's BatchNormAct layers: batch norm, then `drop`, then `act`."""
    return isinstance(module, _BATCH_NORM) and "BatchNormAct" in type(module).__name__


def unsupported_norm(module: nn.Module) -> str | None:
    """Why NormTuning cannot adapt this norm layer, or None when it can."""
    if not is_norm(module):
        return "not a norm layer"
    cls = type(module)
    plain = cls.forward in _PLAIN_FORWARDS or f"{cls.__module__}.{cls.__qualname__}" in _SAME_AS_PLAIN
    if plain or is_rms_norm(module) or _with_activation(module):
        if getattr(module, "weight", None) is None and getattr(module, "running_mean", None) is None:
            return "it has no affine parameters or statistics to tune"
        return None
    return f"its class {type(module).__name__} overrides forward, which norm tuning would not reproduce"


class NormAdapter(nn.Module):
    """Recomputes the norm with weight + offset, bias + offset and, for BatchNorm, its own statistics."""

    kind = "forward"
    mergeable = True

    def __init__(self, base: nn.Module, name: str):
        super().__init__()
        if not is_norm(base):
            raise ValueError(f"NormTuning target {name!r} is a {type(base).__name__}, not a norm layer.")
        reason = unsupported_norm(base)
        if reason and "affine" not in reason:
            raise ValueError(f"NormTuning cannot adapt {name!r}: {reason}.")
        self.name, self.merged = name, False
        if getattr(base, "weight", None) is not None:
            self.weight_offset = nn.Parameter(torch.zeros_like(base.weight, dtype=torch.float32))
        if getattr(base, "bias", None) is not None:
            self.bias_offset = nn.Parameter(torch.zeros_like(base.bias, dtype=torch.float32))
        self.batch_statistics = isinstance(base, _BATCH_NORM) and base.track_running_stats
        if self.batch_statistics:
            self.register_buffer("running_mean", base.running_mean.detach().clone())
            self.register_buffer("running_var", base.running_var.detach().clone())
            self.register_buffer("num_batches_tracked", base.num_batches_tracked.detach().clone())
        if not list(self.parameters()) and not self.batch_statistics:
            raise ValueError(f"NormTuning target {name!r} has no affine parameters or statistics to tune.")

    def _affine(self, base: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        weight, bias = getattr(base, "weight", None), getattr(base, "bias", None)
        if weight is not None:
            weight = (weight + self.weight_offset).to(dtype)
        if bias is not None:
            bias = (bias + self.bias_offset).to(dtype)
        return weight, bias

    def forward_with(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._affine(base, x.dtype)
        if isinstance(base, _BATCH_NORM):
            out = self._batch_norm(base, x, weight, bias)
            return base.act(base.drop(out)) if _with_activation(base) else out
        if isinstance(base, nn.LayerNorm):
            return F.layer_norm(x, base.normalized_shape, weight, bias, base.eps)
        if isinstance(base, nn.GroupNorm):
            return F.group_norm(x, base.num_groups, weight, bias, base.eps)
        if isinstance(base, nn.RMSNorm):
            return F.rms_norm(x, base.normalized_shape, weight, base.eps)
        hidden = x.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + base.variance_epsilon)
        return weight * hidden.to(x.dtype)

    def _batch_norm(self, base, x, weight, bias) -> torch.Tensor:
        use_batch = self.training or not self.batch_statistics
        momentum = 0.0 if base.momentum is None else base.momentum
        if self.training and self.batch_statistics:
            self.num_batches_tracked.add_(1)
            if base.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        mean = self.running_mean if self.batch_statistics else None
        var = self.running_var if self.batch_statistics else None
        return F.batch_norm(x, mean, var, weight, bias, use_batch, momentum, base.eps)

    def merge_into(self, base: nn.Module) -> None:
        with torch.no_grad():
            if hasattr(self, "weight_offset"):
                base.weight.add_(self.weight_offset.to(base.weight.dtype))
            if hasattr(self, "bias_offset"):
                base.bias.add_(self.bias_offset.to(base.bias.dtype))
            if self.batch_statistics:
                self._stash = [
                    base.running_mean.clone(),
                    base.running_var.clone(),
                    base.num_batches_tracked.clone(),
                ]
                base.running_mean.copy_(self.running_mean)
                base.running_var.copy_(self.running_var)
                base.num_batches_tracked.copy_(self.num_batches_tracked)

    def unmerge_from(self, base: nn.Module) -> None:
        with torch.no_grad():
            if hasattr(self, "weight_offset"):
                base.weight.sub_(self.weight_offset.to(base.weight.dtype))
            if hasattr(self, "bias_offset"):
                base.bias.sub_(self.bias_offset.to(base.bias.dtype))
            if self.batch_statistics:
                mean, var, count = self._stash
                base.running_mean.copy_(mean)
                base.running_var.copy_(var)
                base.num_batches_tracked.copy_(count)
                del self._stash
