"""LoKr: the Kronecker product of a small and a low-rank factor, on Linear and Conv2d layers, and its merge.

Parameter names, shapes, initialisation and the update formula follow HF peft's LoKr layer, so adapter
files carry over key for key (`lokr_w1` or `lokr_w1_a`/`_b`; `lokr_w2` or `lokr_w2_a`/`_b`, `lokr_t2`).
"""

from __future__ import annotations

import torch
from torch import nn

from .specs import LoKr
from .weight_update import add_update, apply_update, kaiming_uniform, tucker, zeros

SUPPORTED = (nn.Linear, nn.Conv2d)
PARAMETERS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dimension: m is `factor` if it divides, else the divisor pair nearest the root.

    LyCORIS's rule, as HF peft copies it (a positive `factor` also caps m).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrAdapter(nn.Module):
    """Update (alpha / r) W1 kron W2, W1 (out_l x in_m), W2 (out_k x in_n [x kernel]); W1 starts at zero."""

    kind = "delta"
    mergeable = True

    def __init__(self, base: nn.Module, spec: LoKr, name: str):
        super().__init__()
        if not isinstance(base, SUPPORTED):
            raise ValueError(
                f"LoKr cannot adapt {name!r} ({type(base).__name__}); it supports Linear and Conv2d layers."
            )
        self.scaling, self.merged, r = spec.scaling, False, spec.r
        out_l, out_k = factorization(base.weight.shape[0], spec.decompose_factor)
        in_m, in_n = factorization(base.weight.shape[1], spec.decompose_factor)  # in_channels / groups
        kernel = tuple(base.weight.shape[2:])
        if not (spec.decompose_both and r < max(out_l, in_m) / 2):
            self.lokr_w1 = zeros(out_l, in_m)
        else:
            self.lokr_w1_a, self.lokr_w1_b = zeros(out_l, r), kaiming_uniform(r, in_m)
        if r >= max(out_k, in_n) / 2:
            self.lokr_w2 = kaiming_uniform(out_k, in_n, *kernel)
        elif spec.use_effective_conv2d and kernel not in ((), (1, 1)):
            self.lokr_t2 = kaiming_uniform(r, r, *kernel)
            self.lokr_w2_a, self.lokr_w2_b = kaiming_uniform(r, out_k), kaiming_uniform(r, in_n)
        else:
            self.lokr_w2_a = kaiming_uniform(out_k, r)
            self.lokr_w2_b = kaiming_uniform(r, in_n * (kernel[0] * kernel[1] if kernel else 1))

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The float32 update to the base weight, scale included, in the base weight's shape."""
        first = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        if hasattr(self, "lokr_w2"):
            second = self.lokr_w2
        elif hasattr(self, "lokr_t2"):
            second = tucker(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            second = self.lokr_w2_a @ self.lokr_w2_b
        if second.ndim == 4:
            first = first[:, :, None, None]
        return (torch.kron(first, second.contiguous()) * self.scaling).reshape(base.weight.shape)

    def delta(self, base: nn.Module, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return apply_update(base, x, self.delta_weight(base), base_out.dtype)

    def merge_into(self, base: nn.Module) -> None:
        add_update(base, self.delta_weight(base), 1)

    def unmerge_from(self, base: nn.Module) -> None:
        add_update(base, self.delta_weight(base), -1)
