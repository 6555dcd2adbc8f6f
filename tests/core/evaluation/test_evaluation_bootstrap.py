"""evaluate(): default metric sets, bootstrap intervals, determinism, degenerate resamples, the registry."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as sk

from pipelines.core.evaluation import (
    EvaluationReport,
    MetricResult,
    UndefinedMetricWarning,
    bootstrap_mean,
    evaluate,
    get_metric,
    kernels,
    list_metrics,
    register_metric,
)
from pipelines.core.evaluation.evaluate import _weights, bootstrap_values
from pipelines.core.evaluation.registry import _REGISTRY


def _binary(n=500, seed=0):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, n)
    return y_true, np.clip(rng.random(n) * 0.6 + 0.35 * y_true, 0, 1)


def test_default_metrics_per_task():
    rng = np.random.default_rng(0)
    y_true, y_score = _binary()
    assert list(evaluate("binary", y_true, y_score, bootstrap=0)) == [
        "auroc", "auprc", "accuracy", "balanced_accuracy", "f1", "mcc",
    ]  # fmt: skip
    labels = rng.integers(0, 3, 200)
    probabilities = rng.dirichlet(np.ones(3), 200)
    assert list(evaluate("multiclass", labels, probabilities, bootstrap=0)) == [
        "auroc", "accuracy", "balanced_accuracy", "f1_macro", "mcc",
    ]  # fmt: skip
    indicators = rng.integers(0, 2, (200, 3))
    report = evaluate("multilabel", indicators, rng.random((200, 3)), bootstrap=0)
    assert list(report) == ["auroc", "auprc", "f1_micro", "f1_macro"]
    targets = rng.normal(size=200)
    assert list(evaluate("regression", targets, targets + rng.normal(size=200), bootstrap=0)) == [
        "spearman", "pearson", "mse", "mae",
    ]  # fmt: skip


def test_binary_point_values_use_threshold_on_probability():
    y_true, y_score = _binary()
    report = evaluate("binary", y_true, y_score, bootstrap=0, threshold=0.6)
    labels = (y_score >= 0.6).astype(int)
    assert report["auroc"].value == pytest.approx(sk.roc_auc_score(y_true, y_score), abs=1e-12)
    assert report["accuracy"].value == pytest.approx(sk.accuracy_score(y_true, labels))
    assert report["f1"].value == pytest.approx(sk.f1_score(y_true, labels))
    assert report["mcc"].value == pytest.approx(sk.matthews_corrcoef(y_true, labels))
    assert math.isnan(report["auroc"].low) and math.isnan(report["auroc"].high)
    two_columns = evaluate("binary", y_true, np.stack([1 - y_score, y_score], axis=1), bootstrap=0)
    assert two_columns["auroc"].value == report["auroc"].value


def test_multiclass_labels_are_argmax():
    rng = np.random.default_rng(3)
    y_true, probabilities = rng.integers(0, 4, 300), rng.dirichlet(np.ones(4), 300)
    report = evaluate("multiclass", y_true, probabilities, metrics=["f1_macro", "auroc_ovo"], bootstrap=0)
    assert report["f1_macro"].value == pytest.approx(
        sk.f1_score(y_true, probabilities.argmax(axis=1), average="macro")
    )
    expected = sk.roc_auc_score(y_true, probabilities, multi_class="ovo")
    assert report["auroc_ovo"].value == pytest.approx(expected, abs=1e-12)


def test_bootstrap_is_deterministic_and_contains_the_estimate():
    y_true, y_score = _binary(1000)
    first = evaluate("binary", y_true, y_score, bootstrap=300, seed=7)
    second = evaluate("binary", y_true, y_score, bootstrap=300, seed=7)
    other = evaluate("binary", y_true, y_score, bootstrap=300, seed=8)
    assert first == second
    assert first["auroc"] != other["auroc"]
    for result in first.values():
        assert result.low <= result.value <= result.high
        assert result.high - result.low < 0.2


def test_resampled_kernels_equal_sklearn_on_each_resample():
    rng = np.random.default_rng(5)
    y_true, y_score = _binary(200, seed=5)
    y_score = np.round(y_score, 1)  # ties inside resamples
    indices = rng.integers(0, 200, size=(5, 200))
    weights = _weights(indices, 200)
    aurocs = kernels.auroc(y_true, y_score, weights)
    precisions = kernels.average_precision(y_true, y_score, weights)
    targets, predictions = rng.normal(size=200), np.round(rng.normal(size=200), 1)
    rank_correlations = kernels.spearman(targets, predictions, weights)
    f1s = kernels.f1(y_true, (y_score >= 0.5).astype(int), weights, average="binary")
    for row, sample in enumerate(indices):
        assert aurocs[row] == pytest.approx(sk.roc_auc_score(y_true[sample], y_score[sample]), abs=1e-12)
        expected = sk.average_precision_score(y_true[sample], y_score[sample])
        assert precisions[row] == pytest.approx(expected, abs=1e-12)
        expected = stats.spearmanr(targets[sample], predictions[sample]).statistic
        assert rank_correlations[row] == pytest.approx(expected, abs=1e-12)
        assert f1s[row] == pytest.approx(sk.f1_score(y_true[sample], y_score[sample] >= 0.5), abs=1e-12)


def test_bootstrap_uses_generator_indices_per_resample():
    y_true, y_score = _binary(100)
    values = bootstrap_values([get_metric("auroc")], y_true, [y_score], 3, seed=11)[0]
    indices = np.random.default_rng(11).integers(0, 100, size=(3, 100))
    expected = [sk.roc_auc_score(y_true[i], y_score[i]) for i in indices]
    np.testing.assert_allclose(values, expected, rtol=1e-12)


def test_degenerate_resamples_are_skipped_counted_and_warned():
    y_true = np.zeros(20, dtype=int)
    y_true[0] = 1  # one positive: about a third of resamples miss it
    y_score = np.linspace(0, 1, 20)
    with pytest.warns(UndefinedMetricWarning, match=r"auroc: \d+ of 200 bootstrap resamples were degenerate"):
        report = evaluate("binary", y_true, y_score, metrics=["auroc"], bootstrap=200)
    assert 0 < report.skipped["auroc"] < 200
    assert report["auroc"].value == 0.0


def test_degenerate_split_gives_nan_without_crashing():
    with pytest.warns(UndefinedMetricWarning, match="only one class"):
        report = evaluate("binary", np.ones(10, int), np.linspace(0, 1, 10), metrics=["auroc", "accuracy"])
    assert math.isnan(report["auroc"].value) and math.isnan(report["auroc"].low)
    assert report["accuracy"].value == 0.5
    with pytest.warns(UndefinedMetricWarning, match="the split is empty"):
        report = evaluate("binary", np.zeros(0, int), np.zeros(0))
    assert all(math.isnan(result.value) for result in report.values())
    with pytest.warns(UndefinedMetricWarning, match="NaN or infinite"):
        report = evaluate("regression", [1.0, 2.0, 3.0], [1.0, float("nan"), 2.0])
    assert list(report) == ["spearman", "pearson", "mse", "mae"]


def test_bootstrap_of_1000_on_1000_examples_is_vectorised():
    y_true, y_score = _binary(1000)
    weights = _weights(np.random.default_rng(0).integers(0, 1000, size=(1000, 1000)), 1000)
    assert kernels.auroc(y_true, y_score, weights).shape == (1000,)
    assert np.all(weights.sum(axis=1) == 1000)


def test_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown task 'binry'"):
        evaluate("binry", [0, 1], [0.1, 0.9])
    with pytest.raises(ValueError, match="metric 'f1' does not apply to task 'multiclass'"):
        evaluate("multiclass", [0, 1, 2], np.eye(3), metrics=["f1"])
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        evaluate("binary", [0, 1], [0.1, 0.9], metrics=["auc"])
    with pytest.raises(ValueError, match="binary task: y_true must hold labels 0..1; found"):
        evaluate("binary", [1, 2], [0.1, 0.9])


def test_report_round_trips_through_a_dict():
    y_true, y_score = _binary()
    report = evaluate("binary", y_true, y_score, bootstrap=50)
    data = report.to_dict()
    assert data["metrics"]["auroc"] == report["auroc"].to_dict()
    assert EvaluationReport.from_dict(data) == report
    assert set(data) == {"task", "n_examples", "bootstrap", "seed", "threshold", "skipped", "metrics"}


def test_register_a_custom_metric_and_task():
    def youden(y_true, y_pred):
        y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
        return float(y_pred[y_true == 1].mean() + (1 - y_pred[y_true == 0]).mean() - 1)

    register_metric("test_youden", youden, ("binary",), input="label")
    register_metric("test_mean_gap", lambda t, s: float(np.mean(s - t)), ("test_task",))
    try:
        with pytest.raises(ValueError, match="'test_youden' is already registered"):
            register_metric("test_youden", youden, ("binary",))
        assert "test_youden" in list_metrics("binary")
        assert list_metrics("test_task") == ["test_mean_gap"]
        y_true, y_score = _binary(200)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            report = evaluate(
                "binary", y_true, y_score, metrics=["test_youden", "balanced_accuracy"], bootstrap=20
            )
        assert report["test_youden"].value == pytest.approx(2 * report["balanced_accuracy"].value - 1)
        assert report["test_youden"].low <= report["test_youden"].value <= report["test_youden"].high
        custom = evaluate("test_task", [1.0, 2.0, 3.0], [2.0, 4.0, 6.0], bootstrap=0)
        assert custom["test_mean_gap"].value == 2.0
    finally:
        _REGISTRY.pop("test_youden", None)
        _REGISTRY.pop("test_mean_gap", None)


def test_bootstrap_mean_interval():
    values = np.random.default_rng(2).normal(5.0, 1.0, 400)
    result = bootstrap_mean(values, bootstrap=500, seed=1)
    assert result.value == pytest.approx(values.mean())
    assert result.low < result.value < result.high
    assert result == bootstrap_mean(values, bootstrap=500, seed=1)
    assert bootstrap_mean(values, bootstrap=0) == MetricResult(values.mean())
