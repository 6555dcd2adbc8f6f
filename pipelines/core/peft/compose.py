"""Parallel and Fuse: compositions of a model's named adapters, in place of the default stack.

By default a layer applies its adapters one after another in the order added (a stack: a serial bottleneck
added second sees the first one's output). `compose(model, composition)` replaces that on every adapted
layer; adapters the composition does not name are off meanwhile. At each layer, with base output h and
c_i the change adapter i alone makes to it (see layer_outputs.py), over the named adapters present there:

- `Parallel(adapters, reduce="sum")`: h + sum_i c_i; every adapter sees the same input and base output.
  For additive methods (LoRA, LoHa, LoKr, VeRA, parallel bottleneck) that is the stack itself; output
  transforms (IA3, SSF, serial bottleneck) differ: none sees another's output. `reduce="mean"` averages
  the changes instead. (AdapterHub's Parallel is another thing: it runs the batch once per adapter, as
  separate branches with one output each.)
- `Fuse(adapters)` (AdapterFusion, Pfeiffer et al. 2021): h + sum_i a_i V c_i, with attention weights
  a = softmax_i((Q h + q) . (K c_i + k) / temperature) along the layer's channel dimension. Q starts
  small and random, K, k and q at zero and V at the identity, so at first it equals Parallel(mean)
  while K gets gradients; `compose` freezes everything but the fusion's Q, q, K, k and V.

Adapters added after `compose` are not seen by it; call `compose` again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .inject import _NAME, adapter_names, wrappers
from .layer_outputs import change, first, rewrites_call, shape_changing, with_first
from .layers import AdaptedLayer, output_channels


@dataclass(frozen=True)
class Parallel:
    """The named adapters applied side by side to each layer's input, their changes summed or averaged."""

    adapters: list[str] = field(default_factory=list)
    reduce: Literal["sum", "mean"] = "sum"


@dataclass(frozen=True)
class Fuse:
    """AdapterFusion: trainable attention over the named (frozen) adapters' changes at each layer."""

    adapters: list[str] = field(default_factory=list)
    temperature: float = 1.0


Composition = Parallel | Fuse


def fusions(model: nn.Module) -> dict[str, Fuse]:
    """The model's fusions, by name, in the order they were built."""
    return model.__dict__.setdefault("_peft_fusions", {})


def active_composition(model: nn.Module) -> Composition | None:
    """The composition the model computes with, or None for the default stack."""
    return model.__dict__.get("_peft_composition")


def active_fusion(model: nn.Module) -> str | None:
    """The name of the fusion the model computes with, or None."""
    return model.__dict__.get("_peft_active_fusion")


class FusionLayer(nn.Module):
    """The query, key and value of one layer's fusion, along its channel dimension (float32 masters)."""

    def __init__(self, channels: int, channel_dim: int, temperature: float):
        super().__init__()
        self.channel_dim, self.temperature = channel_dim, temperature
        self.query_weight = nn.Parameter(torch.randn(channels, channels) * 0.02)  # BERT's initialiser
        self.query_bias = nn.Parameter(torch.zeros(channels))
        self.key_weight = nn.Parameter(torch.zeros(channels, channels))
        self.key_bias = nn.Parameter(torch.zeros(channels))
        self.value_weight = nn.Parameter(torch.eye(channels))

    def forward(self, base_out: torch.Tensor, changes: list[torch.Tensor]) -> torch.Tensor:
        dim = self.channel_dim % base_out.ndim
        h = base_out.movedim(dim, -1)
        dtype = h.dtype
        stacked = torch.stack([c.movedim(dim, -1) for c in changes], dim=-2)  # (..., adapters, channels)
        query = F.linear(h, self.query_weight.to(dtype), self.query_bias.to(dtype))
        keys = F.linear(stacked, self.key_weight.to(dtype), self.key_bias.to(dtype))
        values = F.linear(stacked, self.value_weight.to(dtype))
        scores = (keys @ query.unsqueeze(-1)).squeeze(-1) / self.temperature
        attention = scores.float().softmax(dim=-1).to(dtype)
        fused = (attention.unsqueeze(-2) @ values).squeeze(-2)
        return (h + fused).movedim(-1, dim)


@dataclass(frozen=True)
class ComposedForward:
    """One layer's computation under a composition (AdaptedLayer calls it in place of the stack)."""

    composition: Composition
    layer: str
    fusion: str | None = None

    def __call__(self, wrapper: AdaptedLayer, x, *args, **kwargs):
        base = wrapper.base_layer
        named = self.composition.adapters
        refusal = _merged_refusal(wrapper, self.layer, self.composition)
        if refusal:
            raise ValueError(refusal)
        present = [wrapper.adapters[n] for n in named if n in wrapper.adapters]
        if present and isinstance(self.composition, Fuse) and self.fusion is None:
            raise ValueError(
                f"The fusion has no layer at {self.layer!r}, whose adapters were added after it was built; "
                "remove_fusion(model, name) and compose it again."
            )
        out = base(x, *args, **kwargs)
        if not present:
            return out
        h = first(out)
        # Under Parallel(sum) a merged additive adapter is already in the base weights.
        changes = [change(adapter, base, x, h) for adapter in present if not adapter.merged]
        if self.fusion is not None:
            return with_first(out, wrapper.fusions[self.fusion](h, changes))
        if not changes:
            return out
        total = torch.stack(changes).sum(dim=0) if len(changes) > 1 else changes[0]
        if self.composition.reduce == "mean":
            total = total / len(present)
        return with_first(out, h + total)


def _merged_refusal(wrapper: AdaptedLayer, layer: str, composition: Composition) -> str | None:
    """Why a merged adapter on this layer breaks the composition, or None.

    Only under Parallel(sum) of additive adapters is a merged one the same as computing it apart.
    """
    named = composition.adapters
    additive = (
        isinstance(composition, Parallel)
        and composition.reduce == "sum"
        and all(wrapper.adapters[n].kind == "delta" for n in named if n in wrapper.adapters)
    )
    for name, adapter in wrapper.adapters.items():
        if adapter.merged and not (additive and name in named):
            what = type(composition).__name__
            if isinstance(composition, Parallel):
                what += f"(reduce={composition.reduce!r})"
            return (
                f"Adapter {name!r} is merged into {layer!r}, so {what} cannot compute it apart from the base "
                "weights; unmerge(model) first (only Parallel(reduce='sum') of additive adapters keeps "
                "merged ones)."
            )
    return None


def _check(model: nn.Module, composition: Composition) -> None:
    if not isinstance(composition, Parallel | Fuse):
        raise TypeError(
            "compose takes Parallel(...), Fuse(...), a fusion's name or None, not "
            f"{type(composition).__name__}."
        )
    known = adapter_names(model)
    what = type(composition).__name__
    if not composition.adapters:
        raise ValueError(f"{what} names no adapters; pass the adapters to compose, e.g. {what}(['a', 'b']).")
    for name in composition.adapters:
        if name not in known:
            raise ValueError(f"{what} names adapter {name!r}, which the model does not have; it has {known}.")
    if len(set(composition.adapters)) != len(composition.adapters):
        raise ValueError(f"{what} names an adapter twice ({composition.adapters}); name each once.")
    if isinstance(composition, Parallel) and composition.reduce not in ("sum", "mean"):
        raise ValueError(f"Parallel reduce {composition.reduce!r} is not 'sum' or 'mean'.")
    if isinstance(composition, Fuse) and not composition.temperature > 0:
        raise ValueError(f"Fuse temperature must be positive, not {composition.temperature}.")
    for layer, wrapper in wrappers(model):
        for name, adapter in wrapper.adapters.items():
            if rewrites_call(adapter) and not adapter.merged:
                raise ValueError(
                    f"Adapter {name!r} changes the whole model's call (P-tuning or prefix tuning: its "
                    f"inputs, cache and mask), so {what} can neither combine it nor switch it off; "
                    f"remove_adapter(model, {name!r}) first."
                )
        for name in composition.adapters:
            adapter = wrapper.adapters[name] if name in wrapper.adapters else None
            if adapter is not None and shape_changing(adapter):
                raise ValueError(
                    f"Adapter {name!r} on {layer!r} is prompt tuning, which inserts tokens, so its output "
                    f"cannot be added to other adapters' in {what}; leave it out of the composition."
                )
        refusal = _merged_refusal(wrapper, layer, composition)
        if refusal:
            raise ValueError(refusal)


def _build_fusion(model: nn.Module, fuse: Fuse, name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(
            f"Fusion name {name!r} must be letters, digits, '_' or '-', starting with a letter or '_'."
        )
    if name in fusions(model) or name in adapter_names(model):
        raise ValueError(
            f"The model already has an adapter or fusion named {name!r}; choose another name, or "
            f"compose(model, {name!r}) to switch a built fusion on."
        )
    built = []
    for layer, wrapper in wrappers(model):
        if any(n in wrapper.adapters for n in fuse.adapters):
            channels, dim = output_channels(wrapper.base_layer, layer)
            built.append((wrapper, FusionLayer(channels, dim, fuse.temperature)))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for wrapper, layer in built:
        reference = next(wrapper.base_layer.parameters(), None)
        layer.to(device=reference.device if reference is not None else None)
        layer.train(model.training)
        if "fusions" not in wrapper._modules:
            wrapper.fusions = nn.ModuleDict()
        wrapper.fusions[name] = layer
    fusions(model)[name] = fuse


def compose(model: nn.Module, composition: Composition | str | None, name: str = "fusion") -> nn.Module:
    """Sets how the model's adapters combine: Parallel(...), Fuse(...), a built fusion's name, or None.

    A Fuse is built the first time, under `name`, with only its own parameters trainable; passing that
    name later switches it back on. None returns to the default stack of every adapter. Returns the model.
    """
    fusion = None
    if composition is None:
        for _, wrapper in wrappers(model):
            wrapper.__dict__.pop("composed", None)
        model.__dict__.pop("_peft_composition", None)
        model.__dict__.pop("_peft_active_fusion", None)
        return model
    if isinstance(composition, str):
        if composition not in fusions(model):
            raise ValueError(
                f"The model has no fusion named {composition!r}; it has {list(fusions(model))}; "
                "build one with compose(model, Fuse([...]), name=...)."
            )
        fusion, composition = composition, fusions(model)[composition]
    _check(model, composition)
    if isinstance(composition, Fuse) and fusion is None:
        _build_fusion(model, composition, name)
        fusion = name
    for layer, wrapper in wrappers(model):
        has_fusion = fusion is not None and "fusions" in wrapper._modules and fusion in wrapper.fusions
        wrapper.composed = ComposedForward(composition, layer, fusion if has_fusion else None)
    model.__dict__["_peft_composition"] = composition
    model.__dict__["_peft_active_fusion"] = fusion
    return model
