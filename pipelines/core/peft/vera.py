"""VeRA: frozen random projections shared by every adapted Linear, trainable vectors d and b, and its merge.

As HF peft: one A (r x widest input) and B (widest output x r) per adapter, drawn from its PRNG key with
peft's Kaiming-uniform rule on a CPU generator, so the same key gives the same projections as peft; each
layer uses the top-left slice it needs. They are non-persistent buffers of one module all the adapter's
layers hold, so they never train, and state dicts carry only `vera_lambda_b` and `vera_lambda_d`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .specs import VeRA
from .weight_update import add_update

PARAMETERS = ("vera_lambda_b", "vera_lambda_d")
PROJECTIONS = ("vera_A", "vera_B")


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])  # fan_in of a (rows, columns) matrix
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen A (r x in_features) and B (out_features x r) of one VeRA adapter."""

    def __init__(self, r: int, in_features: int, out_features: int, key: int):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(key)
        self.register_buffer("vera_A", _kaiming_uniform((r, in_features), generator), persistent=False)
        self.register_buffer("vera_B", _kaiming_uniform((out_features, r), generator), persistent=False)


class VeRAAdapter(nn.Module):
    """Update diag(b) B diag(d) A on one Linear; b starts at zero, so the layer is unchanged at first."""

    kind = "delta"
    mergeable = True

    def __init__(self, base: nn.Module, spec: VeRA, name: str):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"VeRA cannot adapt {name!r} ({type(base).__name__}); it supports Linear layers only."
            )
        self.in_features, self.out_features, self.merged = base.in_features, base.out_features, False
        self.vera_lambda_b = nn.Parameter(torch.zeros(base.out_features))
        self.vera_lambda_d = nn.Parameter(torch.full((spec.r,), float(spec.d_initial)))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.projections: VeRAProjections | None = None  # set by share_projections

    def _sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            self.projections.vera_A[:, : self.in_features],
            self.projections.vera_B[: self.out_features, :],
        )

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The float32 update to the base weight, (b B)(d A)."""
        a, b = self._sliced()
        return (self.vera_lambda_b[:, None] * b.float()) @ (self.vera_lambda_d[:, None] * a.float())

    def delta(self, base: nn.Module, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        dtype = base_out.dtype
        a, b = self._sliced()
        h = F.linear(self.dropout(x).to(dtype), a.to(dtype)) * self.vera_lambda_d.to(dtype)
        return F.linear(h, b.to(dtype)) * self.vera_lambda_b.to(dtype)

    def merge_into(self, base: nn.Module) -> None:
        add_update(base, self.delta_weight(base), 1)

    def unmerge_from(self, base: nn.Module) -> None:
        add_update(base, self.delta_weight(base), -1)


def share_projections(spec: VeRA, adapters: list[VeRAAdapter]) -> None:
    """Gives all of one adapter's layers one pair of projections, as wide as the widest of them."""
    if not adapters:
        return
    widest_in = max(adapter.in_features for adapter in adapters)
    widest_out = max(adapter.out_features for adapter in adapters)
    shared = VeRAProjections(spec.r, widest_in, widest_out, spec.projection_prng_key)
    for adapter in adapters:
        adapter.projections = shared


def projection_tensors(adapters: list[VeRAAdapter]) -> dict[str, torch.Tensor]:
    """{"vera_A": A, "vera_B": B} of an adapter's shared projections."""
    shared = adapters[0].projections
    return {key: getattr(shared, key).detach().contiguous() for key in PROJECTIONS}


def load_projections(adapters: list[VeRAAdapter], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Replaces an adapter's projections by saved ones (peft's may be wider than the layers need)."""
    shared = adapters[0].projections
    for key, index in (("vera_A", 1), ("vera_B", 0)):
        value, current = tensors[key], getattr(shared, key)
        rank_axis = 1 - index
        rank, width = current.shape[rank_axis], current.shape[index]
        if value.ndim != 2 or value.shape[rank_axis] != rank or value.shape[index] < width:
            need = f"({rank}, >={width})" if rank_axis == 0 else f"(>={width}, {rank})"
            shape = tuple(value.shape)
            raise ValueError(f"{where}: tensor {key!r} has shape {shape}, the model needs {need}.")
        setattr(shared, key, value.to(device=current.device, dtype=current.dtype))
