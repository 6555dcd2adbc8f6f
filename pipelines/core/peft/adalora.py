"""AdaLoRA's layer (Zhang et al. 2023): the SVD-form update s / init_r * B diag(E) A on a Linear or Conv2d.

As HF peft's SVDLinear and SVDConv2d: A (r, in), E (r, 1) and B (out, r) are drawn in peft's order from the
global generator (E starts at zero, A and B from N(0, 0.02)), and the update divides by init_r + 1e-5 however
many ranks are left. `rank_mask` records the ranks the schedule kept (adalora_schedule.py); the smoothed
importance and uncertainty of every entry are buffers too, so a training checkpoint resumes the schedule.
Files hold A, E, B and rank_mask (not the importance statistics); HF peft's file keeps only the kept ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .specs import AdaLoRA

FACTORS = ("lora_A", "lora_E", "lora_B")
STATISTICS = tuple(f"{kind}_{f}" for f in FACTORS for kind in ("importance", "uncertainty"))


class AdaLoRAAdapter(nn.Module):
    """One layer's AdaLoRA triplets; `rank_pattern[path]` in the spec builds it with only the kept ranks."""

    kind = "delta"
    mergeable = True
    training_state = STATISTICS  # in training checkpoints, not in adapter files

    def __init__(self, base: nn.Module, spec: AdaLoRA, name: str):
        super().__init__()
        if not isinstance(base, nn.Linear | nn.Conv2d) or getattr(base, "groups", 1) != 1:
            raise ValueError(
                f"AdaLoRA cannot adapt {name!r} ({type(base).__name__}); it supports Linear and ungrouped "
                "Conv2d layers, as HF peft."
            )
        self.spec, self.merged = spec, False
        pattern = spec.rank_pattern.get(name)
        if pattern is not None and len(pattern) != spec.init_r:
            raise ValueError(
                f"The adalora rank_pattern of {name!r} has {len(pattern)} entries; init_r is {spec.init_r}."
            )
        r = sum(pattern) if pattern is not None else spec.init_r
        fan_in = base.in_features if isinstance(base, nn.Linear) else base.weight[0].numel()
        out = base.out_features if isinstance(base, nn.Linear) else base.out_channels
        self.lora_A = nn.Parameter(torch.randn(r, fan_in))
        self.lora_E = nn.Parameter(torch.randn(r, 1))
        self.lora_B = nn.Parameter(torch.randn(out, r))
        torch.randn(1)  # HF peft draws its ranknum here; drawing it too keeps the two generators in step
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.register_buffer("ranknum", torch.tensor([float(spec.init_r)]), persistent=False)
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool))
        for key in STATISTICS:
            self.register_buffer(key, torch.zeros_like(getattr(self, key.split("_", 1)[1])))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The float32 update to the base weight, in its layout (HF peft's get_delta_weight)."""
        delta = self.lora_B @ (self.lora_A * self.lora_E) * self.spec.scaling / (self.ranknum + 1e-5)
        return delta.reshape(base.weight.shape)

    def delta(self, base: nn.Module, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        dtype, scale = base_out.dtype, self.spec.scaling
        h = self.dropout(x).to(dtype)
        if isinstance(base, nn.Linear):
            a, b = (self.lora_A * self.lora_E).to(dtype), self.lora_B.to(dtype)
            return (h @ a.T @ b.T) * scale / (self.ranknum.to(dtype) + 1e-5)
        weight = self.delta_weight(base).to(dtype)
        return F.conv2d(h, weight, None, base.stride, base.padding, base.dilation, base.groups)

    def merge_into(self, base: nn.Module) -> None:
        with torch.no_grad():
            base.weight.add_(self.delta_weight(base).to(base.weight.dtype))

    def unmerge_from(self, base: nn.Module) -> None:
        with torch.no_grad():
            base.weight.sub_(self.delta_weight(base).to(base.weight.dtype))


def kept_of_init(built: list[bool], mask: torch.Tensor) -> list[bool]:
    """Which of the init_r ranks are kept: the ranks a layer was built with, less those `mask` prunes."""
    kept = iter(mask.tolist())
    return [bool(next(kept)) if on else False for on in built]


def orthogonal_penalty(adapters: list[AdaLoRAAdapter]) -> torch.Tensor:
    """Mean over every A and B of ||P P^T - I||_F (A rows, B columns), as HF peft adds to the loss."""
    total, count = 0, 0
    for adapter in adapters:
        for p in (adapter.lora_A, adapter.lora_B):
            cov = p @ p.T if p is adapter.lora_A else p.T @ p
            identity = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            total = total + torch.norm(cov - identity, p="fro")
            count += 1
    return total / count if count else torch.zeros(())
