"""Metric functions against scikit-learn / scipy on seeded random inputs, and their degenerate cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as sk

from pipelines.core.evaluation import (
    UndefinedMetricWarning,
    accuracy,
    auprc,
    auroc,
    balanced_accuracy,
    f1,
    mae,
    mcc,
    mse,
    pearson,
    perplexity,
    spearman,
)

TOLERANCE = {"rtol": 1e-12, "atol": 1e-12}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _binary(rng, n=400):
    y_true = rng.integers(0, 2, n)
    y_score = np.round(rng.random(n) * 0.7 + 0.3 * y_true, 2)  # rounding makes ties, which must match too
    return y_true, y_score


def _multiclass(rng, n=400, k=4):
    y_true = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y_true]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, probabilities


def _multilabel(rng, n=300, labels=5):
    y_true = rng.integers(0, 2, (n, labels))
    y_true[:, 2] = 0  # a label without positives in this split
    y_score = np.clip(rng.random((n, labels)) * 0.8 + 0.2 * y_true, 0, 1)
    return y_true, y_score


def test_binary_score_metrics_equal_sklearn(rng):
    y_true, y_score = _binary(rng)
    np.testing.assert_allclose(auroc(y_true, y_score), sk.roc_auc_score(y_true, y_score), **TOLERANCE)
    np.testing.assert_allclose(
        auprc(y_true, y_score), sk.average_precision_score(y_true, y_score), **TOLERANCE
    )


def test_binary_with_other_labels_uses_the_greater_label_as_positive(rng):
    y_true, y_score = _binary(rng)
    labels = np.where(y_true == 1, "tumour", "normal")
    assert auroc(labels, y_score) == pytest.approx(sk.roc_auc_score(labels, y_score), abs=1e-12)


@pytest.mark.parametrize("multi_class", ["ovr", "ovo"])
@pytest.mark.parametrize("average", ["macro", "weighted"])
def test_multiclass_auroc_equals_sklearn(rng, multi_class, average):
    y_true, y_score = _multiclass(rng)
    expected = sk.roc_auc_score(y_true, y_score, multi_class=multi_class, average=average)
    np.testing.assert_allclose(
        auroc(y_true, y_score, multi_class=multi_class, average=average), expected, **TOLERANCE
    )


def test_multiclass_auprc_equals_sklearn(rng):
    y_true, y_score = _multiclass(rng)
    np.testing.assert_allclose(
        auprc(y_true, y_score), sk.average_precision_score(y_true, y_score), **TOLERANCE
    )


def test_multilabel_macro_leaves_out_the_label_without_positives(rng):
    y_true, y_score = _multilabel(rng)
    kept = [0, 1, 3, 4]
    with pytest.warns(UndefinedMetricWarning, match=r"labels \[2\] have only one class"):
        value = auroc(y_true, y_score)
    np.testing.assert_allclose(value, sk.roc_auc_score(y_true[:, kept], y_score[:, kept]), **TOLERANCE)
    with pytest.warns(UndefinedMetricWarning, match=r"labels \[2\]"):
        value = auprc(y_true, y_score)
    expected = sk.average_precision_score(y_true[:, kept], y_score[:, kept])
    np.testing.assert_allclose(value, expected, **TOLERANCE)
    micro = sk.roc_auc_score(y_true, y_score, average="micro")
    np.testing.assert_allclose(auroc(y_true, y_score, average="micro"), micro, **TOLERANCE)


def test_label_metrics_equal_sklearn(rng):
    y_true, y_pred = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    y_pred[y_pred == 3] = 0  # a class that is never predicted
    assert accuracy(y_true, y_pred) == pytest.approx(sk.accuracy_score(y_true, y_pred), abs=1e-12)
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(
        sk.balanced_accuracy_score(y_true, y_pred), abs=1e-12
    )
    assert mcc(y_true, y_pred) == pytest.approx(sk.matthews_corrcoef(y_true, y_pred), abs=1e-12)
    for average in ("macro", "micro"):
        expected = sk.f1_score(y_true, y_pred, average=average)
        assert f1(y_true, y_pred, average=average) == pytest.approx(expected, abs=1e-12)
    b_true, b_pred = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    assert f1(b_true, b_pred, average="binary") == pytest.approx(sk.f1_score(b_true, b_pred), abs=1e-12)
    assert mcc(b_true, b_pred) == pytest.approx(sk.matthews_corrcoef(b_true, b_pred), abs=1e-12)


def test_multilabel_label_metrics_equal_sklearn(rng):
    y_true, y_score = _multilabel(rng)
    y_pred = (y_score >= 0.5).astype(int)
    y_pred[:, 2] = 0  # no true and no predicted positives: counts as 0 in the macro average
    assert accuracy(y_true, y_pred) == pytest.approx(sk.accuracy_score(y_true, y_pred), abs=1e-12)
    assert f1(y_true, y_pred, average="micro") == pytest.approx(sk.f1_score(y_true, y_pred, average="micro"))
    with pytest.warns(UndefinedMetricWarning, match=r"labels \[2\] have no true and no predicted"):
        value = f1(y_true, y_pred, average="macro")
    with pytest.warns(sk_warning()):
        expected = sk.f1_score(y_true, y_pred, average="macro")
    assert value == pytest.approx(expected, abs=1e-12)


def sk_warning() -> type[Warning]:
    from sklearn.exceptions import UndefinedMetricWarning as SklearnWarning

    return SklearnWarning


def test_regression_metrics_equal_scipy_and_sklearn(rng):
    y_true = rng.normal(size=300)
    y_pred = np.round(y_true + rng.normal(size=300), 1)  # ties for the ranks
    assert spearman(y_true, y_pred) == pytest.approx(stats.spearmanr(y_true, y_pred).statistic, abs=1e-12)
    assert pearson(y_true, y_pred) == pytest.approx(stats.pearsonr(y_true, y_pred).statistic, abs=1e-12)
    assert mse(y_true, y_pred) == pytest.approx(sk.mean_squared_error(y_true, y_pred), abs=1e-12)
    assert mae(y_true, y_pred) == pytest.approx(sk.mean_absolute_error(y_true, y_pred), abs=1e-12)


def test_torch_tensors_are_accepted(rng):
    torch = pytest.importorskip("torch")
    y_true, y_score = _binary(rng)
    tensor_score = torch.tensor(y_score, dtype=torch.float64, requires_grad=True)
    assert auroc(torch.tensor(y_true), tensor_score) == pytest.approx(sk.roc_auc_score(y_true, y_score))


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (lambda: auroc([1, 1, 1], [0.2, 0.4, 0.9]), "only one class"),
        (lambda: auprc([0, 0, 0], [0.2, 0.4, 0.9]), "only one class"),
        (lambda: auroc([0, 1, 1], [0.2, float("nan"), 0.9]), "y_score contains NaN"),
        (lambda: auroc([], []), "the split is empty"),
        (lambda: auroc([0, 0, 0], np.full((3, 3), 1 / 3)), "only one class"),
        (lambda: auroc(np.zeros((4, 2)), np.full((4, 2), 0.5)), "no label has both classes"),
        (lambda: mcc([0, 1, 0, 1], [1, 1, 1, 1]), "constant"),
        (lambda: f1([0, 0, 0], [0, 0, 0], average="binary"), "pos_label 1 occurs in neither"),
        (lambda: accuracy([], []), "the split is empty"),
        (lambda: spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]), "y_pred is constant"),
        (lambda: pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]), "y_true is constant"),
        (lambda: pearson([1.0], [2.0]), "fewer than 2 examples"),
        (lambda: mse([1.0, 2.0], [1.0, float("inf")]), "y_pred contains NaN or infinite"),
        (lambda: perplexity([]), "there are no tokens"),
        (lambda: perplexity([1.0, 2.0], token_count=[0, 0]), "sums to 0"),
    ],
)
def test_degenerate_input_gives_nan_and_a_warning(call, reason):
    with pytest.warns(UndefinedMetricWarning, match=reason):
        value = call()
    assert math.isnan(value)


def test_sklearn_differences_are_documented_values():
    # scikit-learn returns 0 for a constant side; NaN says the coefficient is undefined.
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(mcc([0, 0, 1, 1], [0, 0, 0, 0]))
    # balanced accuracy of a single-class split is that class's recall, as in scikit-learn.
    assert balanced_accuracy([1, 1, 1, 1], [1, 0, 1, 1]) == pytest.approx(0.75)


def test_wrong_input_raises_with_a_message():
    with pytest.raises(ValueError, match="y_true has 3 examples but y_score has 2"):
        auroc([0, 1, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="y_score is 1-D but y_true has 3 classes"):
        auroc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="average='binary' needs two classes"):
        f1([0, 1, 2], [0, 1, 2], average="binary")
    with pytest.raises(ValueError, match="multi_class='ova' is not supported"):
        auroc([0, 1, 2], np.eye(3), multi_class="ova")


def test_perplexity_from_mean_or_summed_nll():
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert perplexity([1.0, 2.0, 3.0]) == pytest.approx(math.exp(2.0))
    # two sequences: 10 tokens with summed NLL 12, 30 tokens with summed NLL 20 -> exp(32 / 40)
    assert perplexity([12.0, 20.0], token_count=[10, 30]) == pytest.approx(math.exp(0.8))
    assert perplexity(1e6) == math.inf
