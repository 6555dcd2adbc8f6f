"""Merging task tensors: weighted sums, magnitude pruning, TIES and DARE, as HF peft's merge_utils has them.

Each rule takes same-shaped tensors t_i (one per source adapter) and weights w_i:

- linear: sum_i w_i t_i (task arithmetic, Ilharco et al. 2023).
- magnitude_prune: the same after keeping each t_i's int(density * numel) largest magnitudes.
- ties (Yadav et al. 2023): prune by magnitude, elect each entry's sign (that of the sum of the pruned
  t_i, "total", or of their signs, "frequency"; zero counts as positive), then average the w_i t_i whose
  sign agrees over the number that agree (at least one).
- dare_linear, dare_ties (Yu et al. 2024): as linear and ties, but each t_i keeps a random `density`
  fraction of its entries (Bernoulli masks, drawn in order from `generator`, or torch's global generator
  as peft does) and is divided by density.

A density of 1 or more prunes nothing (and draws nothing).
"""

from __future__ import annotations

import torch

RULES = ("linear", "magnitude_prune", "ties", "dare_linear", "dare_ties")
PRUNING = {
    "magnitude_prune": "magnitude",
    "ties": "magnitude",
    "dare_linear": "random",
    "dare_ties": "random",
}
SIGN_METHODS = ("total", "frequency")


def prune(
    tensor: torch.Tensor, density: float, method: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keeps a `density` fraction of the tensor: its largest magnitudes, or random entries rescaled."""
    if density >= 1:
        return tensor
    if method == "magnitude":
        mask = torch.zeros_like(tensor).reshape(-1)
        mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Where each stacked tensor's sign agrees with the elected sign of its entry."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.ndim - 1))


def merge_task_tensors(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    rule: str,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One tensor from `tensors` and their `weights` by `rule` (see the module docstring)."""
    if rule in PRUNING:
        tensors = [prune(t, density, PRUNING[rule], generator) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    if rule in ("ties", "dare_ties"):
        agrees = majority_sign_mask(stacked, majority_sign_method)
        kept = (_weighted(stacked, weights) * agrees).sum(dim=0)
        return kept / torch.clamp(agrees.sum(dim=0), min=1.0)
    return _weighted(stacked, weights).sum(dim=0)
