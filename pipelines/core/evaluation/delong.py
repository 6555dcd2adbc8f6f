"""DeLong's test of the AUROC difference of two models scored on the same binary test set."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.core.evaluation.evaluate import prepare_inputs
from pipelines.core.evaluation.metrics import as_numpy, warn_undefined

MULTICLASS_REASON = (
    "DeLong's test here is for a binary AUROC; for a multiclass (one-vs-rest macro) AUROC only the "
    "paired bootstrap applies"
)


@dataclass(frozen=True)
class DeLongResult:
    """DeLong's test of the AUROC difference of two models on the same binary test set.

    Attributes:
        auroc_a: AUROC of model a.
        auroc_b: AUROC of model b.
        difference: auroc_a - auroc_b.
        variance: DeLong's variance of the difference.
        z: difference / sqrt(variance).
        p_value: Two-sided normal p-value, 2 * (1 - Phi(|z|)).
        n_positive: Positive examples.
        n_negative: Negative examples.
        reason: Why the test is undefined (NaN fields), else None.
    """

    auroc_a: float
    auroc_b: float
    difference: float
    variance: float
    z: float
    p_value: float
    n_positive: int = 0
    n_negative: int = 0
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (NaN kept as float)."""
        return dict(self.__dict__)


def _binary_scores(scores: Any) -> np.ndarray:
    scores = as_numpy(scores)
    return scores[:, 1] if scores.ndim == 2 and scores.shape[1] == 2 else scores


def _undefined_delong(reason: str, aurocs=(math.nan, math.nan), n_positive=0, n_negative=0) -> DeLongResult:
    warn_undefined("DeLong's test", reason, stacklevel=3)
    nan = math.nan
    return DeLongResult(*aurocs, nan, nan, nan, nan, n_positive, n_negative, reason)


def delong_components(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUROCs and DeLong's structural components by midranks (Sun & Xu 2014).

    Args:
        positive: Boolean labels (n,).
        scores: One row of scores per model (k, n).

    Returns:
        (aurocs (k,), V10 (k, positives), V01 (k, negatives)): V10[i] is the fraction of negatives that
        positive i outranks (ties half), V01[j] the fraction of positives that outrank negative j.
    """
    from scipy.stats import rankdata

    x, y = scores[:, positive], scores[:, ~positive]
    m, n = x.shape[1], y.shape[1]
    tz = rankdata(np.concatenate([x, y], axis=1), axis=1)
    tx, ty = rankdata(x, axis=1), rankdata(y, axis=1)
    aurocs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    return aurocs, (tz[:, :m] - tx) / n, 1.0 - (tz[:, m:] - ty) / m


def delong_test(y_true: Any, score_a: Any, score_b: Any) -> DeLongResult:
    """DeLong, DeLong & Clarke-Pearson (1988) test of AUROC(a) - AUROC(b) on the same binary test set.

    The variance is S10[a,a] + S10[b,b] - 2 S10[a,b] over positives plus the same over negatives, where
    S10 = cov(V10) / m and S01 = cov(V01) / n of the structural components (`delong_components`);
    z = difference / sqrt(variance), p = 2 * (1 - Phi(|z|)). Multiclass scores (n, K > 2) are not
    tested: the result is NaN with `MULTICLASS_REASON`, since only the paired bootstrap applies there.

    Args:
        y_true: 0/1 labels (n,).
        score_a: Positive-class probabilities (n,) or (n, 2) of model a.
        score_b: The same for model b.

    Returns:
        The result; NaN fields, a warning and `reason` when undefined (one class, fewer than two
        examples of a class, NaN scores, zero variance with a nonzero difference). Identical scores give
        difference 0, variance 0, z 0 and p = 1.
    """
    a, b = _binary_scores(score_a), _binary_scores(score_b)
    if any(s.ndim == 2 and s.shape[1] > 2 for s in (a, b)):
        return _undefined_delong(MULTICLASS_REASON)
    y, a, _ = prepare_inputs("binary", y_true, a)
    _, b, _ = prepare_inputs("binary", y, b)
    n_positive = int(y.sum())
    n_negative = len(y) - n_positive
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return _undefined_delong(
            "a model's scores contain NaN or infinite values", n_positive=n_positive, n_negative=n_negative
        )
    if n_positive < 2 or n_negative < 2:
        return _undefined_delong(
            f"it needs at least two positive and two negative examples ({n_positive} positive, "
            f"{n_negative} negative)",
            n_positive=n_positive,
            n_negative=n_negative,
        )
    aurocs, v10, v01 = delong_components(y.astype(bool), np.stack([a, b]))
    auroc_a, auroc_b = float(aurocs[0]), float(aurocs[1])
    if np.array_equal(a, b):
        return DeLongResult(auroc_a, auroc_a, 0.0, 0.0, 0.0, 1.0, n_positive, n_negative)
    covariance = np.cov(v10) / n_positive + np.cov(v01) / n_negative
    variance = float(max(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1], 0.0))
    difference = auroc_a - auroc_b
    if variance <= 1e-12 * max(covariance[0, 0], covariance[1, 1]):
        if difference == 0:  # e.g. one model's scores a monotone transform of the other's: no change
            return DeLongResult(auroc_a, auroc_b, 0.0, 0.0, 0.0, 1.0, n_positive, n_negative)
        return _undefined_delong(
            "the variance of the AUROC difference is zero while the difference is not, so the normal "
            "approximation does not apply",
            (auroc_a, auroc_b),
            n_positive,
            n_negative,
        )
    from scipy.stats import norm

    z = difference / math.sqrt(variance)
    p_value = float(min(1.0, 2 * norm.sf(abs(z))))
    return DeLongResult(auroc_a, auroc_b, difference, variance, z, p_value, n_positive, n_negative)
