"""Adapter arithmetic: a new LoRA adapter from a weighted combination of the model's LoRA adapters.

As HF peft's `add_weighted_adapter`, at every layer any source adapter is on (the sources present there
take part). With s_i each source's scale and w_i its weight, the new adapter has alpha = r (scale 1) and:

- "cat": A = concat_i(w_i s_i A_i), B = concat_i(B_i) along the rank; rank sum_i r_i. Its update is
  exactly sum_i w_i s_i B_i A_i.
- "svd" (and "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"): the rank-r truncated
  SVD (B = U S, A = V^T) of the task_vectors.py rule applied to the updates s_i B_i A_i; r is `svd_rank`,
  or the largest source rank; `svd_clamp` clamps U S and V^T at that quantile of their entries.
- "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune": the rule applied to the A_i with weights
  sign(w_i s_i) sqrt|w_i s_i| and, apart, to the B_i with weights sqrt|w_i s_i|; all sources need the same
  rank. Cheap, but not the weighted sum of the updates (products of different adapters' A and B enter).

DARE draws its masks from `generator` (default: torch's global generator, as peft), layer by layer, A's
before B's (or one update per source), in source order, before the new adapter's layers are built.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from .inject import _NAME, adapter_names, adapter_specs, add_adapter, wrappers
from .specs import LoRA
from .task_vectors import PRUNING, RULES, SIGN_METHODS, merge_task_tensors

SVD = tuple(f"{rule}_svd" for rule in RULES if rule != "linear") + ("svd",)
COMBINATIONS = ("cat", *RULES, *SVD)


def factors(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoRA adapter's A and B tensors (the parameters themselves)."""
    if hasattr(adapter, "lora_embedding_A"):
        return adapter.lora_embedding_A, adapter.lora_embedding_B
    return adapter.lora_A.weight, adapter.lora_B.weight


def _rank_axis_of_a(base: nn.Module) -> int:
    return 1 if isinstance(base, nn.ConvTranspose1d) else 0  # its A is a ConvTranspose1d: (in, r, k)


def _check(model, adapters, weights, name, combination_type, density, majority_sign_method) -> str:
    known = adapter_names(model)
    if not _NAME.match(name):
        raise ValueError(
            f"Adapter name {name!r} must be letters, digits, '_' or '-', starting with a letter or '_'."
        )
    if name in known:
        raise ValueError(f"The model already has an adapter named {name!r}; choose another name.")
    if not adapters or len(weights) != len(adapters):
        raise ValueError(
            f"add_weighted_adapter needs one weight per adapter; got adapters {list(adapters)} and weights "
            f"{list(weights)}."
        )
    if combination_type not in COMBINATIONS:
        raise ValueError(
            f"Unknown combination_type {combination_type!r}; choose one of {list(COMBINATIONS)}."
        )
    for source in adapters:
        if source not in known:
            raise ValueError(f"The model has no adapter named {source!r}; it has {known}.")
        spec = adapter_specs(model)[source]
        if not isinstance(spec, LoRA) or spec.use_dora:
            what = "DoRA" if isinstance(spec, LoRA) else spec.method
            raise ValueError(
                f"add_weighted_adapter combines plain LoRA adapters only; {source!r} is {what}, whose update "
                "is not a low-rank product B A."
            )
    rule = combination_type.removesuffix("_svd") if combination_type != "svd" else "linear"
    if len(adapters) == 1:  # as peft: one adapter is only ever rescaled
        combination_type = rule = "linear"
    if rule in PRUNING and (density is None or not 0 <= density):
        raise ValueError(
            f"combination_type {combination_type!r} needs a density between 0 and 1 (the fraction of each "
            f"tensor kept), not {density}."
        )
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method {majority_sign_method!r} is not 'total' or 'frequency'.")
    ranks = {adapter_specs(model)[source].r for source in adapters}
    if combination_type in RULES and len(ranks) > 1:
        raise ValueError(
            f"combination_type {combination_type!r} combines A and B factor by factor, so all adapters need "
            f"one rank; they have ranks {sorted(ranks)}; use 'cat' or 'svd'."
        )
    return combination_type


def _svd_factors(delta, base, rank, a_shape, b_shape, layer, clamp, full_matrices, driver):
    embedding = isinstance(base, nn.Embedding)
    if isinstance(base, nn.modules.conv._ConvNd):
        if getattr(base, "groups", 1) != 1 or isinstance(base, nn.ConvTranspose1d):
            raise ValueError(
                f"SVD combination cannot factor the update of {layer!r} ({type(base).__name__}, grouped or "
                "transposed) into one LoRA; use 'cat' or 'linear'."
            )
        delta = delta.flatten(start_dim=1)
    if embedding:
        delta = delta.T
    if rank > min(delta.shape):
        raise ValueError(
            f"svd_rank {rank} exceeds what the {tuple(delta.shape)} update of {layer!r} has; choose at most "
            f"{min(delta.shape)}."
        )
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    u, vh = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh.reshape(a_shape), u.reshape(b_shape)


def _cat_factors(present, weights, base, a_shape, b_shape, layer, dtype):
    if getattr(base, "groups", 1) != 1:
        raise ValueError(
            f"'cat' cannot join the ranks of {layer!r}, a grouped convolution (groups={base.groups}), "
            "whose LoRA holds a rank block per group; use 'linear'."
        )
    axis = _rank_axis_of_a(base)
    a_parts = [
        factors(adapter)[0].detach() * w * adapter.scaling
        for adapter, w in zip(present, weights, strict=True)
    ]
    b_parts = [factors(adapter)[1].detach() for adapter in present]
    new_a, new_b = torch.zeros(a_shape, dtype=dtype), torch.zeros(b_shape, dtype=dtype)
    a_cat, b_cat = torch.cat(a_parts, dim=axis), torch.cat(b_parts, dim=1)
    new_a.narrow(axis, 0, a_cat.shape[axis]).copy_(a_cat)
    new_b.narrow(1, 0, b_cat.shape[1]).copy_(b_cat)
    return new_a, new_b


def _factor_wise(present, weights, rule, density, sign_method, generator):
    signed, plain = [], []
    for adapter, weight in zip(present, weights, strict=True):
        scaled = weight * adapter.scaling
        signed.append(math.sqrt(abs(scaled)) * (1 if scaled >= 0 else -1))
        plain.append(math.sqrt(abs(scaled)))
    device = factors(present[0])[0].device
    merged = []
    for index, side_weights in ((0, signed), (1, plain)):
        tensors = [factors(adapter)[index].detach() for adapter in present]
        merged.append(
            merge_task_tensors(
                tensors, torch.tensor(side_weights).to(device), rule, density, sign_method, generator
            )
        )
    return merged


def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Adds LoRA adapter `name` combining `adapters` with `weights` (see the module docstring).

    The arguments are HF peft's; `generator` seeds DARE's masks. The new adapter trains, as after
    add_adapter; the sources keep their state. Returns the model.
    """
    combination_type = _check(model, adapters, weights, name, combination_type, density, majority_sign_method)
    specs = [adapter_specs(model)[source] for source in adapters]
    ranks = [spec.r for spec in specs]
    rank = (
        sum(ranks)
        if combination_type == "cat"
        else (svd_rank or max(ranks))
        if combination_type in SVD
        else ranks[0]
    )
    rule = "linear" if combination_type == "svd" else combination_type.removesuffix("_svd")
    computed, paths = [], []
    for layer, wrapper in wrappers(model):
        chosen = [
            (wrapper.adapters[s], w) for s, w in zip(adapters, weights, strict=True) if s in wrapper.adapters
        ]
        if not chosen:
            continue
        present, layer_weights = [a for a, _ in chosen], [w for _, w in chosen]
        base, (a, b) = wrapper.base_layer, factors(present[0])
        a_shape, b_shape = list(a.shape), list(b.shape)
        a_shape[_rank_axis_of_a(base)] = b_shape[1] = rank * getattr(base, "groups", 1)
        if combination_type == "cat":
            pair = _cat_factors(present, layer_weights, base, a_shape, b_shape, layer, a.dtype)
        elif combination_type in SVD:
            deltas = [adapter.delta_weight(base).detach() for adapter in present]
            device = deltas[0].device
            merged = merge_task_tensors(deltas, torch.tensor(layer_weights).to(device), rule, density,
                                        majority_sign_method, generator)  # fmt: skip
            pair = _svd_factors(
                merged, base, rank, a_shape, b_shape, layer, svd_clamp, svd_full_matrices, svd_driver
            )
        else:
            pair = _factor_wise(present, layer_weights, rule, density, majority_sign_method, generator)
        computed.append(pair)
        paths.append(layer)
    first = specs[0]
    exact = [f"re:{re.escape(path)}" for path in paths]
    add_adapter(
        model, LoRA(r=rank, alpha=float(rank), dropout=first.dropout, targets=exact, init="default"), name
    )
    new_layers = [wrapper.adapters[name] for _, wrapper in wrappers(model) if name in wrapper.adapters]
    with torch.no_grad():
        for adapter, (new_a, new_b) in zip(new_layers, computed, strict=True):
            target_a, target_b = factors(adapter)
            target_a.copy_(new_a)
            target_b.copy_(new_b)
    return model
