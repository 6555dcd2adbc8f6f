"""How inject.py builds LoHa, LoKr, VeRA, P-tuning, prefix, SCT and AdaLoRA layers, and what they share.

VeRA's layers share projections; P-tuning and prefix adapters attach to the model that owns their embedding;
PiSSA and OLoRA LoRA layers take their factors out of their base weights once all are built.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adalora import AdaLoRAAdapter
from .loha import LoHaAdapter
from .lokr import LoKrAdapter
from .lora_init import initialise, is_residual_init
from .prefix import PrefixAdapter
from .ptuning import PTuningAdapter
from .sct import SCTAdapter
from .specs import AdapterSpec, LoRA
from .vera import PROJECTIONS, VeRAAdapter, load_projections, projection_tensors, share_projections

# method -> the adapter class, built as cls(layer, spec, layer name)
BUILDERS: dict[str, type[nn.Module]] = {
    "loha": LoHaAdapter, "lokr": LoKrAdapter, "vera": VeRAAdapter, "ptuning": PTuningAdapter,
    "prefix": PrefixAdapter, "sct": SCTAdapter, "adalora": AdaLoRAAdapter,
}  # fmt: skip
PROMPT_METHODS = ("ptuning", "prefix")  # they change the owning model's call (model_call.py)


def finish_build(spec: AdapterSpec, built: list[tuple[Any, nn.Module]], model: nn.Module) -> None:
    """Runs once all of one adapter's layers are built ((LogicalModule, adapter) pairs), before any is added.

    VeRA's layers get their shared projections; P-tuning and prefix adapters find and hook their owning model;
    PiSSA and OLoRA layers take their initial product out of their base weights (last: nothing after fails).
    """
    adapters = [adapter for _, adapter in built]
    if isinstance(spec, LoRA) and is_residual_init(spec.init):
        initialise(spec, built)
    if spec.method == "vera":
        share_projections(spec, adapters)
    if spec.method in PROMPT_METHODS:
        for item, adapter in built:
            adapter.attach(model, item.name)


def shared_keys(spec: AdapterSpec) -> tuple[str, ...]:
    """The file keys of tensors one adapter's layers share (VeRA's projections), saved or not."""
    return PROJECTIONS if spec.method == "vera" else ()


def shared_tensors(spec: AdapterSpec, adapters: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The shared tensors an adapter file carries besides each layer's own (VeRA's, with save_projection)."""
    if spec.method == "vera" and spec.save_projection and adapters:
        return projection_tensors(adapters)
    return {}


def load_shared(
    spec: AdapterSpec, adapters: list[nn.Module], tensors: dict[str, torch.Tensor], where: str
) -> None:
    """Puts saved shared tensors back; a file that should hold them and does not is refused."""
    if spec.method != "vera":
        return
    present = [key for key in PROJECTIONS if key in tensors]
    if spec.save_projection and len(present) < len(PROJECTIONS):
        raise ValueError(
            f"{where} lacks the VeRA projections vera_A and vera_B that its config says it saved "
            "(save_projection); re-save the adapter."
        )
    if present:
        load_projections(adapters, tensors, where)
