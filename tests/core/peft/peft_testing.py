"""Helpers of the PEFT tests: tiny models, perturbing adapters, comparing outputs and HF peft's layers."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from pipelines.core.peft import add_adapter, compose, remove_adapter, wrappers


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


def refused(message: str, error: type[Exception] = ValueError):
    """pytest.raises for exactly this message."""
    return pytest.raises(error, match=f"^{re.escape(message)}$")


def only_adapter(model: nn.Module, name: str) -> nn.Module:
    """A copy of the model with the named adapter alone, outside any composition."""
    alone = copy.deepcopy(model)
    compose(alone, None)
    for other in [n for n in list(alone._peft_adapter_specs) if n != name]:
        remove_adapter(alone, other)
    return alone


class Block(nn.Module):
    """A Linear q_proj, a LayerNorm and a Linear head, 8 channels wide; bias and norm affine optional."""

    def __init__(self, bias: bool = True, affine: bool = True):
        super().__init__()
        self.q_proj = nn.Linear(8, 8, bias=bias)
        self.norm = nn.LayerNorm(8, elementwise_affine=affine)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.q_proj(x)))


# The tiny LLaMA and its inputs; conftest.py serves them as the fixtures tiny_llama and input_ids.
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]  # 32 -> 32, 32 -> 16 and 64 -> 32, in each of 2 layers


def make_tiny_llama() -> nn.Module:
    """A 2-layer random LlamaForCausalLM: hidden 32, 4 heads, 2 key-value heads, vocabulary 64."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def llama_input_ids() -> torch.Tensor:
    """Two sequences of 7 token ids for the tiny LLaMA, always the same."""
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's logits on input_ids, without gradients."""
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# HF peft as the oracle: the same adapter on both sides, tensor by tensor.


def import_hf_peft():
    """HF peft, for a test module to call at import: skips the module without peft or transformers."""
    peft = pytest.importorskip("peft", reason="HF peft is the oracle of these tests; pip install peft")
    pytest.importorskip("transformers")
    return peft


def ours_and_peft(base: nn.Module, spec, config, seed: int | None = None) -> tuple[nn.Module, nn.Module]:
    """Our adapter and HF peft's (from its config), each on its own copy of base; a seed seeds both inits."""
    import peft

    if seed is not None:
        torch.manual_seed(seed)
    ours = add_adapter(copy.deepcopy(base), spec)
    if seed is not None:
        torch.manual_seed(seed)
    return ours, peft.get_peft_model(copy.deepcopy(base), config)


def peft_layers(ours: nn.Module, theirs: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(our adapted layer, HF peft's layer at the same path) for every adapted layer of ours."""
    named = dict(theirs.named_modules())
    return [(wrapper, named[f"base_model.model.{path}"]) for path, wrapper in wrappers(ours)]


def copy_adapter_to_peft(ours: nn.Module, theirs: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """Copies our 'default' adapter's tensors into HF peft's trainable ones, after asserting the same layout.

    Returns (name, ours, theirs) per tensor, the name without the adapter's name or peft's prefix.
    """
    mine = {n.replace(".adapters.default", ""): p for n, p in ours.named_parameters() if is_adapter_name(n)}
    named = {
        n.removeprefix("base_model.model.").replace(".default", ""): p
        for n, p in theirs.named_parameters()
        if p.requires_grad
    }
    assert sorted(named) == sorted(mine)  # the very same tensors, by name
    with torch.no_grad():
        for key, parameter in named.items():
            assert parameter.shape == mine[key].shape, key
            parameter.copy_(mine[key])
    return [(key, mine[key], parameter) for key, parameter in named.items()]


def perturb_peft(theirs: nn.Module, scale: float = 0.3, seed: int = 5) -> None:
    """Adds seeded noise to HF peft's trainable tensors, so its files carry non-trivial adapters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in (p for p in theirs.parameters() if p.requires_grad):
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def assert_same_base_weights(ours: nn.Module, plain: nn.Module, atol: float = 1e-6) -> None:
    """Our weights outside the adapters equal a plain model's (HF peft's merge_and_unload), by name."""
    base = {n.replace(".base_layer", ""): p for n, p in ours.named_parameters() if not is_adapter_name(n)}
    expected = dict(plain.named_parameters())
    assert base.keys() == expected.keys()
    for name, parameter in expected.items():
        torch.testing.assert_close(base[name], parameter, atol=atol, rtol=0, msg=name)
