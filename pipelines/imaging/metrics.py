"""Threshold metrics of diagnostic tests: Youden's J on validation, then sensitivity and specificity on test.

AUROC does not depend on a threshold; sensitivity, specificity, accuracy and F1 do. A threshold chosen on
the test set itself flatters them, so the pipeline picks it on the validation set (Youden's J, the point
of the ROC curve farthest above the diagonal) and applies it unchanged to the test set.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "youden_threshold",
    "threshold_metrics",
    "bootstrap_threshold_metrics",
    "sensitivity",
    "specificity",
    "THRESHOLD_METRICS",
    "DEFAULT_METRICS",
]

THRESHOLD_METRICS = ("sensitivity", "specificity", "accuracy", "f1")
DEFAULT_METRICS = {
    "binary": ["auroc", "accuracy", "f1", "sensitivity", "specificity"],
    "multiclass": ["auroc", "accuracy", "f1_macro"],
    "multilabel": ["auroc", "f1_macro"],
}


def youden_threshold(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Return the score threshold maximising sensitivity + specificity - 1 on (validation) data.

    A score at or above the threshold is called positive, as in scikit-learn's ``roc_curve``, whose
    points are the candidates: the threshold is always an observed score, so tied scores fall on the
    same side; among equally good points the first (highest threshold) wins. When calling nothing
    positive is best, the threshold is 1.0, or just above the highest score if that is 1.0 itself.
    With one class only the threshold is 0.5.
    """
    from sklearn.metrics import roc_curve

    y_true = np.asarray(y_true).ravel()
    y_score = np.asarray(y_score).ravel()
    if len(np.unique(y_true)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(y_true, y_score)
    best = int(np.argmax(tpr - fpr))
    threshold = float(thresholds[best])
    top = float(y_score.max())
    if math.isfinite(threshold) and threshold <= top:
        return threshold
    # roc_curve's first point (nothing positive) sits above every score; 1.0 would call saturated
    # scores of exactly 1.0 positive, so step past them
    return 1.0 if top < 1.0 else float(np.nextafter(top, np.inf))


def threshold_metrics(y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, accuracy and F1 of calling ``y_score >= threshold`` positive.

    A ratio with an empty denominator (no positives, say) is NaN, not an error.
    """
    y_true = np.asarray(y_true).ravel().astype(bool)
    predicted = np.asarray(y_score).ravel() >= threshold
    tp = float(np.sum(predicted & y_true))
    tn = float(np.sum(~predicted & ~y_true))
    fp = float(np.sum(predicted & ~y_true))
    fn = float(np.sum(~predicted & y_true))

    def ratio(num: float, den: float) -> float:
        return num / den if den > 0 else float("nan")

    return {
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "accuracy": ratio(tp + tn, tp + tn + fp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def bootstrap_threshold_metrics(
    y_true: np.ndarray, y_score: np.ndarray, threshold: float, resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Threshold metrics with percentile 95% bootstrap intervals (the threshold stays fixed).

    Returns:
        metric -> {"value", "low", "high"}; low/high are NaN when ``resamples`` is 0.
    """
    y_true = np.asarray(y_true).ravel()
    y_score = np.asarray(y_score).ravel()
    point = threshold_metrics(y_true, y_score, threshold)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in point}
    for _ in range(resamples):
        index = rng.integers(0, len(y_true), len(y_true))
        for name, value in threshold_metrics(y_true[index], y_score[index], threshold).items():
            draws[name].append(value)
    result = {}
    for name, value in point.items():
        values = np.asarray(draws[name], dtype=float)
        values = values[np.isfinite(values)]
        low, high = np.percentile(values, [2.5, 97.5]) if len(values) else (math.nan, math.nan)
        result[name] = {"value": value, "low": float(low), "high": float(high)}
    return result


def sensitivity(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """True-positive rate of 0/1 predictions (NaN without positives)."""
    y_true, y_pred = np.asarray(y_true).ravel() > 0.5, np.asarray(y_pred).ravel() > 0.5
    positives = y_true.sum()
    return float((y_pred & y_true).sum() / positives) if positives else math.nan


def specificity(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """True-negative rate of 0/1 predictions (NaN without negatives)."""
    y_true, y_pred = np.asarray(y_true).ravel() > 0.5, np.asarray(y_pred).ravel() > 0.5
    negatives = (~y_true).sum()
    return float((~y_pred & ~y_true).sum() / negatives) if negatives else math.nan


def _register() -> None:
    from pipelines.core.evaluation import list_metrics, register_metric

    for name, fn in (("sensitivity", sensitivity), ("specificity", specificity)):
        if name not in list_metrics():  # the core may ship its own one day; keep it then
            register_metric(name, fn, ("binary",), input="label")


_register()
