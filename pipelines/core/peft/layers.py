"""The wrapper that holds a layer's adapters, and the channel facts every method needs about a layer.

An adapted layer keeps its original module as `base_layer` and its adapters in `adapters[name]`. Each adapter
declares how it composes: "forward" replaces the base computation (norm tuning), "delta" adds a term computed
from the layer's input (LoRA, parallel bottleneck), "transform" maps the output (SSF, IA3, BitFit, serial
bottleneck, prompts). They apply in the order they were added.
"""

from __future__ import annotations

import torch
from torch import nn

_LAST = (nn.Linear, nn.Embedding, nn.LayerNorm)
_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)


def is_rms_norm(module: nn.Module) -> bool:
    """nn.RMSNorm, or a LLaMA-style RMSNorm (weight times x / rms(x), computed in float32)."""
    name = type(module).__name__
    if isinstance(module, nn.RMSNorm):
        return True
    return name.endswith("RMSNorm") and "Gemma" not in name and hasattr(module, "variance_epsilon")


def output_channels(module: nn.Module, name: str) -> tuple[int, int]:
    """(number of output channels, the dimension that holds them) of a layer's output."""
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, -1
    if isinstance(module, nn.LayerNorm) or isinstance(module, nn.RMSNorm):
        return module.normalized_shape[-1], -1
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels, 1
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features, 1
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, 1
    if is_rms_norm(module):
        return module.weight.numel(), -1
    raise ValueError(
        f"Cannot tell the output channels of module {name!r} ({type(module).__name__}); target a Linear, "
        "Embedding, convolution or norm layer instead."
    )


def input_channels(module: nn.Module, name: str) -> tuple[int, int]:
    """(number of input channels, the dimension that holds them) of a layer's input."""
    if isinstance(module, nn.Linear):
        return module.in_features, -1
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, 1
    return output_channels(module, name)  # norms keep their channel count


def weight_output_axis(module: nn.Module) -> int:
    """The axis of a layer's weight that indexes output channels."""
    if isinstance(module, (nn.Embedding, nn.modules.conv._ConvTransposeNd)):
        return 1
    return 0


def broadcast(vector: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    """Reshapes a per-channel vector to broadcast along `dim` of an `ndim`-dimensional tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return vector.view(shape)


def _map_first(out, fn):
    """Applies fn to a module output, or to the first element of a tuple output."""
    if isinstance(out, tuple):
        return (fn(out[0]), *out[1:])
    return fn(out)


class AdaptedLayer(nn.Module):
    """A layer and its named adapters, applied in the order added; `disabled` gives the base layer back."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.disabled = False

    def __getattr__(self, name: str):
        # Code that reads a layer's attributes (`embed.weight`, `proj.in_features`) keeps working on the
        # wrapper, as with HF peft's layers; the wrapper's own modules come first.
        try:
            return super().__getattr__(name)
        except AttributeError as error:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if name.startswith("__") or base is None or not hasattr(base, name):
                raise error from None
            return getattr(base, name)

    def active(self) -> list[nn.Module]:
        if self.disabled:
            return []
        return [adapter for adapter in self.adapters.values() if not adapter.merged]

    def forward(self, x, *args, **kwargs):
        # A composition (compose.py) or per-example routing (routing.py) computes the layer instead.
        composed = self.__dict__.get("composed")
        if composed is not None and not self.disabled:
            return composed(self, x, *args, **kwargs)
        active = self.active()
        base = self.base_layer
        if not active:
            return base(x, *args, **kwargs)
        if all(a.kind == "delta" and hasattr(a, "fusable") and a.fusable(base, x) for a in active):
            return active[0].fused_forward(base, x, tuple(active[1:]))  # LoRA stacks: one Function
        replacing = [adapter for adapter in active if adapter.kind == "forward"]
        out = replacing[-1].forward_with(base, x) if replacing else base(x, *args, **kwargs)
        for adapter in active:
            if adapter.kind == "delta":
                out = _map_first(out, lambda o, a=adapter: o + a.delta(base, x, o))
            elif adapter.kind == "transform":
                out = _map_first(out, adapter.transform)
        return out
