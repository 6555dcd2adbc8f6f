"""Held-out perplexity of a causal LM on packed blocks, with a bootstrap interval over blocks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipelines.core.evaluation import bootstrap_mean, perplexity

__all__ = ["held_out_perplexity", "perplexity_from_nll", "perplexity_change", "PerplexityLog"]


def perplexity_from_nll(
    block_nll: np.ndarray, tokens_per_block: int, bootstrap: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Return token-weighted perplexity ``exp(sum nll / tokens)`` and a 95% percentile bootstrap interval.

    Blocks have equal length, so the perplexity is exp of the mean per-block NLL per token, and its
    interval is exp of the bootstrap interval of that mean (resampling blocks, not tokens).

    Args:
        block_nll: Summed next-token NLL of each block.
        tokens_per_block: Predicted tokens in each block (block length - 1).
        bootstrap: Resamples of the blocks; 0 gives no interval (low = high = NaN).
        seed: Seed of the resampling.

    Returns:
        ``{"value", "low", "high", "nll", "tokens", "blocks"}``.
    """
    block_nll = np.asarray(block_nll, dtype=np.float64)
    if block_nll.size == 0:
        nan = float("nan")
        return {"value": nan, "low": nan, "high": nan, "nll": nan, "tokens": 0, "blocks": 0}
    counts = np.full(block_nll.shape, float(tokens_per_block))
    value = perplexity(block_nll, counts)
    mean = bootstrap_mean(block_nll / tokens_per_block, bootstrap=bootstrap, seed=seed)
    return {
        "value": float(value),
        "low": float(np.exp(mean.low)),
        "high": float(np.exp(mean.high)),
        "nll": float(mean.value),
        "tokens": int(block_nll.size * tokens_per_block),
        "blocks": int(block_nll.size),
        "block_nll": [float(v) for v in block_nll],
    }


def perplexity_change(before: dict, after: dict, bootstrap: int = 1000, seed: int = 0) -> dict[str, float]:
    """Return the paired change in mean NLL per token (after - before, same blocks) with its interval.

    Resampling blocks in pairs gives a much tighter interval than comparing two perplexity intervals.

    Returns:
        ``{"value", "low", "high"}`` in nats per token (negative: the model improved), plus ``ratio``
        (after / before perplexity).
    """
    first, second = np.asarray(before["block_nll"]), np.asarray(after["block_nll"])
    if first.shape != second.shape or first.size == 0:
        raise ValueError("perplexity_change needs two results on the same held-out blocks")
    tokens = before["tokens"] / before["blocks"]
    mean = bootstrap_mean((second - first) / tokens, bootstrap=bootstrap, seed=seed)
    return {
        "value": mean.value,
        "low": mean.low,
        "high": mean.high,
        "ratio": after["value"] / before["value"],
    }


@torch.inference_mode()
def held_out_perplexity(
    model: Any,
    blocks: torch.Tensor,
    batch_size: int = 8,
    bootstrap: int = 1000,
    seed: int = 0,
    prefix: torch.Tensor | None = None,
) -> dict[str, float]:
    """Return the perplexity of ``model`` (a :class:`ClinicalModel`) on full packed blocks.

    ``prefix`` holds the blocks' cached prefix states when ``model.cached_layers`` is set.

    Returns:
        See :func:`perplexity_from_nll`.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = []
    for start in range(0, len(blocks), batch_size):
        part = None if prefix is None else prefix[start : start + batch_size].to(device)
        sums.append(model.token_nll(blocks[start : start + batch_size].to(device), part).cpu())
    model.train(was_training)
    nll = torch.cat(sums).double().numpy() if sums else np.zeros(0)
    return perplexity_from_nll(nll, int(blocks.shape[1]) - 1, bootstrap=bootstrap, seed=seed)


class PerplexityLog:
    """Held-out perplexity of the base LM and after each causal-LM stage, with each stage's paired change
    from the base LM: the report's perplexity rows (``results``) and its ``extra`` entries."""

    def __init__(self, bootstrap: int = 1000, seed: int = 0) -> None:
        self.bootstrap, self.seed = bootstrap, seed
        self.values: dict[str, dict] = {}
        self.changes: dict[str, dict] = {}

    @property
    def base(self) -> dict:
        """The base LM's perplexity (before any stage)."""
        return self.values["base_lm"]

    def add_base(self, value: dict) -> None:
        """Record the base LM's perplexity (see :func:`held_out_perplexity`)."""
        self.values["base_lm"] = value

    def add_after(self, stage: str, value: dict) -> dict:
        """Record the perplexity after ``stage`` on the base LM's blocks; returns its paired change."""
        change = perplexity_change(self.base, value, self.bootstrap, self.seed)
        self.values[f"after_{stage}"], self.changes[f"after_{stage}"] = value, change
        return change

    def results(self) -> dict[str, dict]:
        """One ``results`` row per measurement: ``{"perplexity": {"value", "low", "high"}}``."""
        return {
            name: {"perplexity": {key: value[key] for key in ("value", "low", "high")}}
            for name, value in self.values.items()
        }

    def extra(self) -> dict[str, dict]:
        """Every measurement without its per-block NLL, and the paired changes."""
        values = {
            name: {k: v for k, v in value.items() if k != "block_nll"} for name, value in self.values.items()
        }
        return {"perplexity": values, "perplexity_change": self.changes}
