"""Protein metrics: Q3 (3-state per-residue accuracy) and protein-level bootstrap intervals.

Per-residue predictions are flattened over the scored residues (unresolved residues and padding are
not scored) before ``pipelines.core.evaluation.evaluate``; its bootstrap resamples residues, which treats
residues of one protein as independent. ``protein_bootstrap`` resamples whole proteins instead, the
honest interval for per-residue metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipelines.core.evaluation import accuracy, get_metric, kernels, register_metric
from pipelines.protein.batching import MaskedLMCollator

__all__ = [
    "q3_accuracy", "protein_bootstrap", "protein_interval", "masked_lm_perplexity",
    "register_protein_metrics",
]  # fmt: skip


def q3_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of scored residues whose predicted 3-state class (H/E/C) is right."""
    return accuracy(y_true, y_pred)


def register_protein_metrics() -> None:
    """Register ``q3`` (multiclass, label input) once per process."""
    try:
        get_metric("q3")
    except ValueError:
        register_metric("q3", q3_accuracy, ("multiclass",), "label", kernels.accuracy)


def protein_bootstrap(
    metric: Callable[[np.ndarray, np.ndarray], float],
    y_true: np.ndarray,
    y_input: np.ndarray,
    residues_per_protein: list[int],
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """95% percentile interval of ``metric`` when whole proteins are resampled with replacement.

    Args:
        metric: ``metric(y_true, y_input) -> float`` on flattened residues.
        y_true: Flattened residue labels, proteins one after another.
        y_input: Matching scores or predicted labels.
        residues_per_protein: Scored residues of each protein, in order (sums to ``len(y_true)``).
        resamples: Bootstrap resamples.
        seed: Seed of numpy's generator.

    Returns:
        ``(low, high)``; NaN when there are fewer than two proteins.
    """
    counts = np.asarray(residues_per_protein, dtype=int)
    if counts.sum() != len(y_true) or len(y_true) != len(y_input):
        raise ValueError(
            f"residues_per_protein sums to {counts.sum()} but there are {len(y_true)} labels and "
            f"{len(y_input)} predictions; give the scored residues of each protein"
        )
    if len(counts) < 2:
        return float("nan"), float("nan")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        chosen = rng.integers(0, len(counts), len(counts))
        index = np.concatenate([np.arange(starts[i], starts[i] + counts[i]) for i in chosen])
        if len(index):
            values.append(metric(y_true[index], y_input[index]))
    finite = np.asarray([v for v in values if np.isfinite(v)])
    if not len(finite):
        return float("nan"), float("nan")
    return float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))


def protein_interval(
    metric: str, records: list, y_true: np.ndarray, y_score: np.ndarray, resamples: int
) -> dict[str, Any]:
    """``metric`` on flattened residues with whole proteins (``records``, in order) resampled."""
    counts = [sum(1 for label in (r.residue_labels or ()) if label != -100) for r in records]
    spec = get_metric(metric)
    y_input = y_score
    if spec.input == "label":
        y_input = y_score.argmax(1) if y_score.ndim == 2 else (y_score >= 0.5).astype(int)
    low, high = protein_bootstrap(spec.fn, y_true, y_input, counts, resamples)
    return {"metric": metric, "low": low, "high": high, "resamples": resamples}


def masked_lm_perplexity(model: Any, sequences: list, probability: float, batch_size: int = 32) -> float:
    """exp(mean cross-entropy) on masked residues of ``sequences`` with fixed (seed 0) masks."""
    collate = MaskedLMCollator(model.vocabulary, probability, seed=0)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = collate(sequences[start : start + batch_size])
            n = int((batch["labels"] != -100).sum())
            total += model.masked_lm_loss(batch).item() * n
            count += n
    model.train()
    return math.exp(total / max(1, count))
