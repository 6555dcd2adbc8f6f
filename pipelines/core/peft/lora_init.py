"""PiSSA and OLoRA: LoRA factors taken from the base weight, which keeps only the residual W - s B0 A0.

As HF peft computes them (`init_lora_weights="pissa" | "pissa_niter_K" | "olora"`): PiSSA (Meng et al. 2024)
takes B0 = V_r sqrt(S_r / s) and A0 = sqrt(S_r / s) U_r^T from the SVD W = V S U^T (full `torch.linalg.svd`,
or `torch.svd_lowrank` with K iterations, whose random basis comes from torch's global generator, as in
peft); OLoRA (Buyukakyuz 2024) takes B0 = Q[:, :r] and A0 = R[:r] from W = QR. The model is unchanged at init.

The adapter keeps A0 and B0 (`initial_lora_A`, `initial_lora_B`): a native file carries them, so loading it
on the original base rebuilds the very same residual without a decomposition; the HF peft file is the plain
LoRA of the trained change, s (B A - B0 A0) = s' [B, -B0] [A; A0], of rank 2r (peft's
`path_initial_model_for_weight_conversion`), which loads on the original, unmodified base.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

INITIAL = ("initial_lora_A", "initial_lora_B")
_GIVEN: contextvars.ContextVar[dict[str, tuple[torch.Tensor, torch.Tensor]] | None] = contextvars.ContextVar(
    "lora_initial_factors", default=None
)


def is_residual_init(init: str) -> bool:
    """Whether a LoRA `init` takes its factors out of the base weight (PiSSA, OLoRA)."""
    return init.startswith(("pissa", "olora"))


def initial_factors(init: str, weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, ...]:
    """(A0, B0) in float32 for a (out, in) weight, as HF peft's pissa_init / olora_init compute them."""
    weight = weight.detach().float()
    if init == "olora":
        q, upper = torch.linalg.qr(weight)
        return upper[:r].contiguous(), q[:, :r].contiguous()
    if init == "pissa":
        v, s, uh = torch.linalg.svd(weight, full_matrices=False)
        vr, sr, uhr = v[:, :r], s[:r] / scaling, uh[:r]
    else:  # pissa_niter_K
        vr, sr, ur = torch.svd_lowrank(weight, r, niter=int(init.split("_niter_")[-1]))
        sr, uhr = sr / scaling, ur.t()
    return torch.diag(torch.sqrt(sr)) @ uhr, vr @ torch.diag(torch.sqrt(sr))


def residual(weight: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, scaling: float) -> torch.Tensor:
    """W - (s B0) A0 in the weight's dtype (the same float operations as HF peft)."""
    return (weight.detach().float() - scaling * b0 @ a0).to(weight.dtype)


@contextlib.contextmanager
def given_factors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Within the block, residual-init LoRA layers at these paths take (A0, B0) from here (loading a file)."""
    token = _GIVEN.set(factors)
    try:
        yield
    finally:
        _GIVEN.reset(token)


def start(adapter: nn.Module, base: nn.Linear, spec: Any, name: str) -> None:
    """Registers and sets A0, B0 (and A, B to them) of a new residual-init layer; the base is not touched yet.

    Called as the layer is built, so the random basis of pissa_niter_K is drawn where HF peft draws it.
    """
    given = (_GIVEN.get() or {}).get(name)
    if given is not None:
        a0, b0 = (t.to(base.weight.device, torch.float32) for t in given)
    else:
        a0, b0 = initial_factors(spec.init, base.weight, spec.r, spec.scaling)
    with torch.no_grad():
        adapter.lora_A.weight.copy_(a0)
        adapter.lora_B.weight.copy_(b0)
    adapter.register_buffer(INITIAL[0], a0.clone())
    adapter.register_buffer(INITIAL[1], b0.clone())


def initialise(spec: Any, built: list[tuple[Any, nn.Module]]) -> None:
    """Subtracts s B0 A0 from the base weight of every newly built residual-init layer, once all are built."""
    for item, _ in built:
        others = item.wrapper.adapters.values() if item.wrapper is not None else ()
        if any(a.merged for a in others):
            raise ValueError(
                f"LoRA init {spec.init!r} decomposes {item.name!r}, which has a merged adapter; unmerge "
                "first."
            )
        if any(hasattr(a, "lora_magnitude_vector") for a in others):
            raise ValueError(
                f"LoRA init {spec.init!r} would change the base weight under the DoRA adapter on "
                f"{item.name!r}, whose scale depends on it; add it to a model without DoRA there."
            )
    with torch.no_grad():
        for item, adapter in built:
            weight = item.module.weight
            weight.copy_(residual(weight, adapter.initial_lora_A, adapter.initial_lora_B, spec.scaling))


def as_plain_lora(tensors: dict[str, torch.Tensor], paths: list[str]) -> dict[str, torch.Tensor]:
    """The rank-2r LoRA tensors [A; A0] and [B, -B0] of a residual-init adapter's native tensors."""
    plain = {}
    for path in paths:
        a0, b0 = (tensors[f"{path}.{key}"] for key in INITIAL)
        plain[f"{path}.lora_A.weight"] = torch.cat([tensors[f"{path}.lora_A.weight"], a0], dim=0)
        plain[f"{path}.lora_B.weight"] = torch.cat([tensors[f"{path}.lora_B.weight"], -b0], dim=1)
    return plain


def plain_lora_config(spec: Any) -> dict[str, Any]:
    """r, alpha and init of the rank-2r plain LoRA with the same scale (as peft's conversion writes them)."""
    alpha = spec.alpha * 2**0.5 if spec.use_rslora else spec.alpha * 2
    return {"r": 2 * spec.r, "lora_alpha": alpha, "init_lora_weights": True}
