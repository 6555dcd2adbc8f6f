"""Helpers of the PEFT tests: perturbing adapters, comparing outputs, snapshots of base weights."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn


def perturb_adapters(model: nn.Module, scale: float = 0.2, seed: int = 1) -> None:
    """Adds noise to every adapter parameter, so merges and round trips test non-trivial weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if is_adapter_name(name):
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(noise.to(parameter.device, parameter.dtype) * scale)


def is_adapter_name(name: str) -> bool:
    return ".adapters." in f".{name}"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """|actual - expected| / |expected| in float64."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def main_output(out) -> torch.Tensor:
    """The main tensor of a model output: a tensor, a tuple's first element, or the logits."""
    if isinstance(out, dict):
        return out["logits"]
    if isinstance(out, tuple):
        return out[0]
    return getattr(out, "logits", out)


def base_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every parameter and buffer that is not part of an adapter."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not is_adapter_name(k)}


def weighted_loss(out: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """A loss with random weights, so no gradient vanishes by symmetry (a plain sum would, after a norm)."""
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return (out.float() * weights).sum()


def tiny_llama() -> nn.Module:
    """A 2-layer random LlamaForCausalLM: hidden 32, 4 heads, 2 key-value heads, vocabulary 64."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def refused(message: str, error: type[Exception] = ValueError):
    """pytest.raises for exactly this message."""
    return pytest.raises(error, match=f"^{re.escape(message)}$")
