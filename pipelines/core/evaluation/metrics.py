"""Metric functions with scikit-learn's argument order and values.

Each takes array-likes (numpy arrays, lists, or torch tensors, which are moved to the CPU) and returns
a float. When a metric is undefined on its input (one class only, constant input, an empty split, NaN
scores) the result is NaN and an `UndefinedMetricWarning` names the reason; nothing raises for that.
Inputs that are wrong rather than degenerate (mismatched lengths, an unknown `average`) raise
`ValueError`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from pipelines.core.evaluation import kernels


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined on its input (or on some bootstrap resamples); the value is NaN."""


class _Undefined(Exception):
    """Raised inside a metric to return NaN with a warning naming `reason`."""


def as_numpy(values: Any) -> np.ndarray:
    """Convert an array-like or torch tensor (any device, bfloat16 included) to a numpy array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
        if str(values.dtype) == "torch.bfloat16":
            values = values.float()
        values = values.numpy()
    return np.asarray(values)


def warn_undefined(metric: str, reason: str, stacklevel: int = 2) -> float:
    """Warn that `metric` is undefined for `reason` and return NaN."""
    warnings.warn(f"{metric} is undefined: {reason}; returning NaN.", UndefinedMetricWarning, stacklevel + 1)
    return math.nan


def _metric(fn: Callable[..., float]) -> Callable[..., float]:
    """Turn an `_Undefined` raised by the metric into NaN and a warning at the caller."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> float:
        try:
            return float(fn(*args, **kwargs))
        except _Undefined as undefined:
            return warn_undefined(fn.__name__, str(undefined), stacklevel=2)

    return wrapper


def _pair(y_true: Any, other: Any, other_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as arrays with one row per example; degenerate cases raise `_Undefined`."""
    y_true, other = as_numpy(y_true), as_numpy(other)
    if y_true.ndim == 0 or other.ndim == 0:
        raise ValueError(f"y_true and {other_name} must be arrays with one entry per example, not scalars.")
    if len(y_true) != len(other):
        raise ValueError(
            f"y_true has {len(y_true)} examples but {other_name} has {len(other)}; pass one per example."
        )
    if len(y_true) == 0:
        raise _Undefined("the split is empty (0 examples)")
    for name, values in (("y_true", y_true), (other_name, other)):
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            raise _Undefined(f"{name} contains NaN or infinite values")
    return y_true, other


def _ones(n: int) -> np.ndarray:
    return np.ones((1, n))


def _check_average(average: str, allowed: tuple[str, ...], metric: str) -> None:
    if average not in allowed:
        raise ValueError(f"{metric}: average={average!r} is not supported here; use one of {allowed}.")


def _score_targets(metric: str, y_true: np.ndarray, y_score: np.ndarray, multi_class: str, average: str):
    """Encode y_true for a score metric: 0/1 for binary, indicators for multilabel, column indices."""
    if y_score.ndim == 2 and y_score.shape[1] == 1 and y_true.ndim == 1:
        y_score = y_score[:, 0]
    if y_score.ndim == 1:
        classes = np.unique(y_true)
        if classes.size > 2:
            raise ValueError(
                f"{metric}: y_score is 1-D but y_true has {classes.size} classes; pass (n, {classes.size}) "
                "scores, one column per class."
            )
        if classes.size < 2:
            raise _Undefined(f"only one class ({classes[0]!r}) is present in y_true")
        return (y_true == classes[1]).astype(np.int64), y_score.astype(float)
    if y_true.ndim == 2:
        if y_true.shape != y_score.shape:
            raise ValueError(
                f"{metric}: multilabel y_true {y_true.shape} and y_score {y_score.shape} differ."
            )
        _check_average(average, ("macro", "weighted", "micro"), metric)
        y_true = _indicators(metric, y_true)
        if average != "micro":
            columns = kernels.defined_columns(y_true)
            if columns.size == 0:
                raise _Undefined("no label has both classes in y_true")
            if columns.size < y_true.shape[1]:
                left_out = sorted(set(range(y_true.shape[1])) - set(columns.tolist()))
                warnings.warn(
                    f"{metric}: labels {left_out} have only one class in y_true and are left out of the "
                    f"{average} average.",
                    UndefinedMetricWarning,
                    stacklevel=4,
                )
        return y_true, y_score.astype(float)
    if multi_class not in ("ovr", "ovo"):
        raise ValueError(f"{metric}: multi_class={multi_class!r} is not supported; use 'ovr' or 'ovo'.")
    _check_average(average, ("macro", "weighted"), metric)
    n_columns = y_score.shape[1]
    classes = np.unique(y_true)
    if np.issubdtype(y_true.dtype, np.integer) and classes.min() >= 0 and classes.max() < n_columns:
        encoded = y_true.astype(np.int64)  # integer labels index the score columns directly
    elif classes.size == n_columns:
        encoded = np.searchsorted(classes, y_true)
    else:
        raise ValueError(
            f"{metric}: y_true has classes {classes.tolist()[:10]} that do not match the {n_columns} columns "
            "of y_score; pass integer labels 0..K-1 or exactly one column per class."
        )
    present = np.unique(encoded)
    if present.size < 2:
        raise _Undefined(f"only one class ({classes[0]!r}) is present in y_true")
    if present.size < n_columns:
        missing = sorted(set(range(n_columns)) - set(present.tolist()))
        warnings.warn(
            f"{metric}: classes {missing} do not occur in y_true and are left out of the {average} average.",
            UndefinedMetricWarning,
            stacklevel=4,
        )
    return encoded, y_score.astype(float)


def _indicators(metric: str, y_true: np.ndarray) -> np.ndarray:
    values = np.unique(y_true)
    if not np.isin(values, [0, 1]).all():
        raise ValueError(
            f"{metric}: multilabel y_true must hold 0/1 indicators; found {values[:10].tolist()}."
        )
    return y_true.astype(np.int64)


@_metric
def auroc(y_true: Any, y_score: Any, multi_class: str = "ovr", average: str = "macro") -> float:
    """Area under the ROC curve, as `sklearn.metrics.roc_auc_score`.

    Binary: y_score has shape (n,) (the greater label is positive). Multiclass: y_score (n, K) with
    integer labels 0..K-1 (or K distinct labels in sorted order), one-vs-rest or one-vs-one; classes
    absent from y_true are left out with a warning. Multilabel: y_true and y_score (n, L), macro over
    the labels that have both classes (others left out with a warning), "weighted", or "micro".
    Scores are ranked as given: pass probabilities for results equal to scikit-learn's.
    """
    y_true, y_score = _pair(y_true, y_score, "y_score")
    y_true, y_score = _score_targets("auroc", y_true, y_score, multi_class, average)
    return kernels.auroc(y_true, y_score, _ones(len(y_true)), multi_class, average)[0]


@_metric
def auprc(y_true: Any, y_score: Any, average: str = "macro") -> float:
    """Area under the precision-recall curve as average precision (`average_precision_score`).

    Inputs as for `auroc`; multiclass is one-vs-rest. NaN when y_true holds one class only.
    """
    y_true, y_score = _pair(y_true, y_score, "y_score")
    y_true, y_score = _score_targets("auprc", y_true, y_score, "ovr", average)
    return kernels.average_precision(y_true, y_score, _ones(len(y_true)), average)[0]


def _encode_labels(metric: str, y_true: Any, y_pred: Any, multilabel: bool = True):
    """Map labels to 0..K-1 over the union of y_true and y_pred (indicator matrices pass through)."""
    y_true, y_pred = _pair(y_true, y_pred, "y_pred")
    if y_true.ndim == 2 or y_pred.ndim == 2:
        if not multilabel:
            raise ValueError(
                f"{metric} takes 1-D labels; got y_true {y_true.shape} and y_pred {y_pred.shape}."
            )
        if y_true.shape != y_pred.shape:
            raise ValueError(f"{metric}: y_true {y_true.shape} and y_pred {y_pred.shape} differ.")
        return _indicators(metric, y_true), _indicators(metric, y_pred), np.array([0, 1])
    classes, encoded = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    return encoded[: len(y_true)], encoded[len(y_true) :], classes


@_metric
def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of correct labels (`accuracy_score`; subset accuracy for indicator matrices)."""
    y_true, y_pred, _ = _encode_labels("accuracy", y_true, y_pred)
    return kernels.accuracy(y_true, y_pred, _ones(len(y_true)))[0]


@_metric
def balanced_accuracy(y_true: Any, y_pred: Any) -> float:
    """Mean recall over the classes in y_true (`balanced_accuracy_score`)."""
    y_true, y_pred, _ = _encode_labels("balanced_accuracy", y_true, y_pred, multilabel=False)
    return kernels.balanced_accuracy(y_true, y_pred, _ones(len(y_true)))[0]


@_metric
def f1(y_true: Any, y_pred: Any, average: str = "macro", pos_label: Any = 1) -> float:
    """F1 score (`f1_score`); the default average is "macro" (scikit-learn's is "binary").

    "macro" averages over the labels in y_true or y_pred (for indicator matrices over every label,
    a label without true or predicted positives counting 0, with a warning); "micro" pools the counts;
    "binary" scores `pos_label` and is NaN when it occurs in neither y_true nor y_pred.
    """
    _check_average(average, ("macro", "micro", "binary"), "f1")
    y_true, y_pred, classes = _encode_labels("f1", y_true, y_pred)
    weights = _ones(len(y_true))
    if y_true.ndim == 2:
        if average == "binary":
            raise ValueError(
                "f1: average='binary' does not apply to multilabel input; use 'macro' or 'micro'."
            )
        empty = np.flatnonzero((y_true.sum(axis=0) == 0) & (y_pred.sum(axis=0) == 0))
        if average == "macro" and empty.size:
            warnings.warn(
                f"f1: labels {empty.tolist()} have no true and no predicted positives and count as 0 in the "
                "macro average, as in scikit-learn.",
                UndefinedMetricWarning,
                stacklevel=3,
            )
        value = kernels.f1(y_true, y_pred, weights, average)[0]
    elif average == "binary":
        if classes.size > 2:
            raise ValueError(f"f1: average='binary' needs two classes but found {classes.size}; use 'macro'.")
        if pos_label not in classes.tolist():
            raise _Undefined(f"pos_label {pos_label!r} occurs in neither y_true nor y_pred")
        position = classes.tolist().index(pos_label)
        value = kernels.f1(y_true, y_pred, weights, "binary", position)[0]
    else:
        value = kernels.f1(y_true, y_pred, weights, average)[0]
    if math.isnan(value):
        raise _Undefined("there are no positive labels in y_true or y_pred")
    return value


@_metric
def mcc(y_true: Any, y_pred: Any) -> float:
    """Matthews correlation coefficient (`matthews_corrcoef`); NaN (not 0) when a side is constant."""
    y_true, y_pred, _ = _encode_labels("mcc", y_true, y_pred, multilabel=False)
    value = kernels.mcc(y_true, y_pred, _ones(len(y_true)))[0]
    if math.isnan(value):
        raise _Undefined("y_true or y_pred holds a single class (constant)")
    return value


def _regression_pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = _pair(y_true, y_pred, "y_pred")
    y_true, y_pred = y_true.astype(float), y_pred.astype(float)
    if y_true.ndim > 1 or y_pred.ndim > 1:
        if y_true.size != len(y_true) or y_pred.size != len(y_pred):
            raise ValueError(
                f"expected one value per example; got y_true {y_true.shape}, y_pred {y_pred.shape}."
            )
        y_true, y_pred = y_true.ravel(), y_pred.ravel()
    return y_true, y_pred


def _correlation(kernel, y_true: Any, y_pred: Any) -> float:
    y_true, y_pred = _regression_pair(y_true, y_pred)
    if len(y_true) < 2:
        raise _Undefined("fewer than 2 examples")
    for name, values in (("y_true", y_true), ("y_pred", y_pred)):
        if (values == values[0]).all():
            raise _Undefined(f"{name} is constant")
    return kernel(y_true, y_pred, _ones(len(y_true)))[0]


@_metric
def spearman(y_true: Any, y_pred: Any) -> float:
    """Spearman rank correlation (`scipy.stats.spearmanr`, ties get average ranks)."""
    return _correlation(kernels.spearman, y_true, y_pred)


@_metric
def pearson(y_true: Any, y_pred: Any) -> float:
    """Pearson correlation (`scipy.stats.pearsonr`)."""
    return _correlation(kernels.pearson, y_true, y_pred)


@_metric
def mse(y_true: Any, y_pred: Any) -> float:
    """Mean squared error (`mean_squared_error`)."""
    y_true, y_pred = _regression_pair(y_true, y_pred)
    return kernels.mse(y_true, y_pred, _ones(len(y_true)))[0]


@_metric
def mae(y_true: Any, y_pred: Any) -> float:
    """Mean absolute error (`mean_absolute_error`)."""
    y_true, y_pred = _regression_pair(y_true, y_pred)
    return kernels.mae(y_true, y_pred, _ones(len(y_true)))[0]


@_metric
def perplexity(nll: Any, token_count: Any = None) -> float:
    """Perplexity, exp of the mean negative log-likelihood per token (natural log).

    Without `token_count`, `nll` is a mean token NLL (a scalar) or per-token NLLs (their mean is used).
    With `token_count`, `nll` holds summed NLLs (per sequence or batch) and `token_count` the number of
    tokens behind each sum: perplexity = exp(sum(nll) / sum(token_count)), the corpus-level value.
    """
    nll = as_numpy(nll).astype(float).ravel()
    if not np.isfinite(nll).all():
        raise _Undefined("nll contains NaN or infinite values")
    if token_count is None:
        if nll.size == 0:
            raise _Undefined("there are no tokens")
        mean_nll = float(nll.mean())
    else:
        counts = as_numpy(token_count).astype(float).ravel()
        if counts.shape != nll.shape:
            raise ValueError(
                f"perplexity: nll {nll.shape} and token_count {counts.shape} differ; pass one each."
            )
        if counts.sum() <= 0:
            raise _Undefined("token_count sums to 0 (there are no tokens)")
        mean_nll = float(nll.sum() / counts.sum())
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf
