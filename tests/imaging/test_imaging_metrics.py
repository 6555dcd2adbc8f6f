"""Imaging threshold metrics against scikit-learn (roc_curve, confusion_matrix, recall, f1) and known answers.

The convention under test: a score at or above the threshold is positive (scikit-learn's ``roc_curve``
convention), so scores tied with the threshold are positive, and the threshold is always an observed
score, so tied scores never fall on different sides.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score, roc_curve

from pipelines.imaging import methods
from pipelines.imaging.metrics import bootstrap_threshold_metrics, threshold_metrics, youden_threshold


def _sklearn_rates(y, s, threshold) -> dict[str, float]:
    """Sensitivity, specificity, accuracy, F1 of ``s >= threshold`` from scikit-learn's confusion matrix."""
    predicted = (np.asarray(s) >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, predicted, labels=[0, 1]).ravel()
    return {
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "accuracy": accuracy_score(y, predicted),
        "f1": f1_score(y, predicted, zero_division=np.nan),
    }


def _scores(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.clip(0.3 * y + rng.normal(0.4, 0.2, 300), 0, 1)
    if kind == "tied":  # two decimals: many ties, some across classes, and clipped 0.0 and 1.0 scores
        s = np.round(np.clip(0.6 * y + rng.normal(0.2, 0.3, 300), 0, 1), 1)
    if kind == "inverted":  # worse than chance, with saturated scores: calling nothing positive is best
        s = np.where(y == 1, 0.0, 1.0)
    return y, s


@pytest.mark.parametrize("kind", ["random", "tied", "inverted"])
@pytest.mark.parametrize("seed", [0, 1])
def test_youden_threshold_reaches_sklearns_best_point_of_the_roc_curve(kind, seed):
    y, s = _scores(kind, seed)
    fpr, tpr, thresholds = roc_curve(y, s)
    best_j = float(np.max(tpr - fpr))
    threshold = youden_threshold(y, s)
    rates = _sklearn_rates(y, s, threshold)  # >= at the returned threshold, counted by scikit-learn
    assert rates["sensitivity"] + rates["specificity"] - 1 == pytest.approx(best_j)
    if kind != "inverted":  # the threshold is sklearn's own point (an observed score)
        assert threshold == thresholds[int(np.argmax(tpr - fpr))] and threshold in s


def test_youden_threshold_ties_fall_on_one_side_and_count_as_positive():
    y = np.array([0, 0, 1, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.5, 0.5, 0.5, 0.9, 0.9])
    # candidates: 0.9 -> J = 2/4 - 0; 0.5 -> J = 4/4 - 1/3 (best); 0.2 -> 1 - 2/3; a threshold between
    # the tied 0.5s (which would split them) is never a candidate
    assert youden_threshold(y, s) == 0.5
    got = threshold_metrics(y, s, 0.5)  # the three tied scores are all positive
    assert got == pytest.approx(_sklearn_rates(y, s, 0.5))
    assert got["sensitivity"] == 1.0 and got["specificity"] == pytest.approx(2 / 3)


def test_youden_threshold_calls_nothing_positive_above_saturated_scores():
    y, s = np.array([0, 0, 1, 1]), np.array([1.0, 1.0, 0.0, 0.2])
    threshold = youden_threshold(y, s)
    assert threshold > 1.0 and threshold_metrics(y, s, threshold)["specificity"] == 1.0
    assert youden_threshold(y, np.array([0.9, 0.8, 0.1, 0.2])) == 1.0


@pytest.mark.parametrize("kind", ["random", "tied"])
def test_threshold_metrics_match_sklearn_confusion_matrix(kind):
    y, s = _scores(kind, 3)
    for threshold in (0.0, 0.3, 0.5, float(np.median(s)), 1.0):
        assert threshold_metrics(y, s, threshold) == pytest.approx(
            _sklearn_rates(y, s, threshold), nan_ok=True
        )


def test_threshold_metrics_exact_counts():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.05])
    # threshold 0.5: tp=2 fn=1 fp=1 tn=3
    got = threshold_metrics(y, s, 0.5)
    assert got == pytest.approx({"sensitivity": 2 / 3, "specificity": 3 / 4, "accuracy": 5 / 7, "f1": 4 / 6})


def test_threshold_metrics_without_positives_is_nan():
    got = threshold_metrics(np.zeros(4), np.array([0.1, 0.2, 0.8, 0.9]), 0.5)
    assert math.isnan(got["sensitivity"]) and got["specificity"] == 0.5


def test_youden_threshold_single_class_is_half():
    assert youden_threshold(np.ones(5), np.linspace(0, 1, 5)) == 0.5


def test_registered_sensitivity_and_specificity_match_sklearn_recall():
    from pipelines.core.evaluation import evaluate

    y, s = _scores("tied", 4)
    threshold = youden_threshold(y, s)
    report = evaluate("binary", y, s, ["sensitivity", "specificity"], bootstrap=0, threshold=threshold)
    predicted = (s >= threshold).astype(int)
    assert report["sensitivity"].value == pytest.approx(recall_score(y, predicted, pos_label=1))
    assert report["specificity"].value == pytest.approx(recall_score(y, predicted, pos_label=0))


def test_bootstrap_threshold_metrics_matches_a_loop_over_the_same_resamples():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.clip(0.4 * y + rng.normal(0.3, 0.2, 200), 0, 1)
    got = bootstrap_threshold_metrics(y, s, 0.5, resamples=200, seed=3)
    assert got == bootstrap_threshold_metrics(y, s, 0.5, resamples=200, seed=3)
    draws = np.random.default_rng(3)  # the documented scheme: numpy's generator, n indices per resample
    samples = []
    for _ in range(200):
        index = draws.integers(0, len(y), len(y))
        samples.append(_sklearn_rates(y[index], s[index], 0.5))
    for name, entry in got.items():
        low, high = np.percentile([row[name] for row in samples], [2.5, 97.5])
        assert entry["value"] == pytest.approx(_sklearn_rates(y, s, 0.5)[name])
        assert (entry["low"], entry["high"]) == pytest.approx((low, high))


def test_score_model_keeps_a_chosen_threshold_of_zero(monkeypatch):
    y_test, s_test = np.array([0, 1, 0, 1]), np.array([0.0, 0.1, 0.2, 0.3])
    monkeypatch.setattr(methods, "predict_scores", lambda model, loader: (y_test, s_test))
    monkeypatch.setattr(methods, "youden_threshold", lambda y, s: 0.0)
    report, _, threshold = methods.score_model(None, "val", "test", "binary", ["specificity"], 0, 0)
    assert threshold == 0.0 and report.threshold == 0.0
    assert report["specificity"].value == 0.0  # every score >= 0.0 is positive (0.5 would give 1.0)
