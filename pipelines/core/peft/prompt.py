"""Prompt tuning: learned tokens inserted into a (batch, tokens, channels) activation."""

from __future__ import annotations

import torch
from torch import nn

from .layers import output_channels
from .specs import PromptTuning


class PromptAdapter(nn.Module):
    """Inserts `num_tokens` learned vectors at position `insert_at` of the layer's output."""

    kind = "transform"
    mergeable = False

    def __init__(self, base: nn.Module, spec: PromptTuning, name: str):
        super().__init__()
        self.merged = False
        channels = spec.channels or output_channels(base, name)[0]
        self.insert_at = spec.insert_at
        self.prompt = nn.Parameter(torch.randn(spec.num_tokens, channels) * 0.02)

    def transform(self, out: torch.Tensor) -> torch.Tensor:
        prompt = self.prompt.to(out.dtype).expand(out.shape[0], -1, -1)
        at = self.insert_at
        return torch.cat([out[:, :at], prompt, out[:, at:]], dim=1)


def extend_attention_mask(mask: torch.Tensor, num_tokens: int, insert_at: int = 0) -> torch.Tensor:
    """Inserts `num_tokens` ones into a (batch, tokens) attention mask where the prompt goes."""
    ones = mask.new_ones(mask.shape[0], num_tokens)
    return torch.cat([mask[:, :insert_at], ones, mask[:, insert_at:]], dim=1)
