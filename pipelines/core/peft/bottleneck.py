"""Bottleneck adapters: down-projection, activation, zero-initialised up-projection, on the channel dimension.

They work on token tensors (batch, tokens, channels) and on conv feature maps (batch, channels, ...), since
the projection is applied along the layer's channel dimension. Serial adapters read the layer's output,
parallel ones its input; both add their result to the output, so the model is unchanged at initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import input_channels, output_channels
from .specs import Bottleneck

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}


class BottleneckAdapter(nn.Module):
    """One bottleneck adapter on one layer."""

    mergeable = False

    def __init__(self, base: nn.Module, spec: Bottleneck, name: str):
        super().__init__()
        self.merged = False
        self.kind = "transform" if spec.placement == "serial" else "delta"
        if spec.channels:  # a block of known width: channels last on both sides
            out_channels = in_channels = spec.channels
            self.channel_dim = -1
        else:
            out_channels, self.channel_dim = output_channels(base, name)
            in_channels = out_channels if spec.placement == "serial" else input_channels(base, name)[0]
        hidden = spec.hidden or max(1, in_channels // spec.reduction)
        self.down = nn.Linear(in_channels, hidden)
        self.up = nn.Linear(hidden, out_channels)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.activation = ACTIVATIONS[spec.activation]
        self.scale = spec.scale

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        dim = self.channel_dim % h.ndim
        h = h.movedim(dim, -1)
        dtype = h.dtype
        h = F.linear(h, self.down.weight.to(dtype), self.down.bias.to(dtype))
        h = F.linear(self.activation(h), self.up.weight.to(dtype), self.up.bias.to(dtype))
        return (h * self.scale).movedim(-1, dim)

    def transform(self, out: torch.Tensor) -> torch.Tensor:
        return out + self._project(out)

    def delta(self, base: nn.Module, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return self._project(x.to(base_out.dtype))
