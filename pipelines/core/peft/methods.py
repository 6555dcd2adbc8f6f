"""The table through which inject.py builds LoHa, LoKr and VeRA layers, and the state their layers share."""

from __future__ import annotations

import torch
from torch import nn

from .loha import LoHaAdapter
from .lokr import LoKrAdapter
from .specs import AdapterSpec
from .vera import PROJECTIONS, VeRAAdapter, load_projections, projection_tensors, share_projections

# method -> the adapter class, built as cls(layer, spec, layer name)
BUILDERS: dict[str, type[nn.Module]] = {"loha": LoHaAdapter, "lokr": LoKrAdapter, "vera": VeRAAdapter}


def finish_build(spec: AdapterSpec, adapters: list[nn.Module]) -> None:
    """Runs once all of one adapter's layers are built: VeRA's layers get their shared projections."""
    if spec.method == "vera":
        share_projections(spec, adapters)


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
