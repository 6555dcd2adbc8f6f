"""Weighted metric kernels: one value per row of example weights, for the bootstrap and the point estimate.

Every kernel takes encoded inputs (labels 0..K-1, 0/1 indicators, float scores) and a weight matrix of
shape (B, n): row b holds how many times each example appears in resample b (all ones for the point
estimate). A resample is therefore never materialised; sorts happen once on the full data, and ties
are grouped so AUROC and average precision equal scikit-learn's tie handling exactly. An undefined
value (one class, constant input, nothing weighted) is NaN; the public functions turn it into a warning.
"""

from __future__ import annotations

import numpy as np

NAN = float("nan")


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise ratio, NaN where the denominator is zero."""
    out = np.full(np.broadcast(numerator, denominator).shape, NAN)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _tie_groups(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable sort order of `values` and the start index of each run of equal values in that order."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.concatenate([[0], np.flatnonzero(ordered[1:] != ordered[:-1]) + 1])
    return order, starts


def binary_auroc(positive: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Area under the ROC curve (Mann-Whitney U with ties counted half) for each weight row."""
    if positive.size == 0:
        return np.full(weights.shape[0], NAN)
    order, starts = _tie_groups(score)
    sorted_weights = weights[:, order]
    pos = np.add.reduceat(sorted_weights * positive[order], starts, axis=1)
    neg = np.add.reduceat(sorted_weights, starts, axis=1) - pos
    neg_below = np.cumsum(neg, axis=1) - neg
    numerator = np.sum(pos * (neg_below + 0.5 * neg), axis=1)
    return _divide(numerator, pos.sum(axis=1) * neg.sum(axis=1))


def binary_average_precision(positive: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision (sum over thresholds of recall step times precision) for each weight row."""
    if positive.size == 0:
        return np.full(weights.shape[0], NAN)
    order, starts = _tie_groups(-score)
    sorted_weights = weights[:, order]
    pos = np.add.reduceat(sorted_weights * positive[order], starts, axis=1)
    total = np.add.reduceat(sorted_weights, starts, axis=1)
    true_positives, predicted = np.cumsum(pos, axis=1), np.cumsum(total, axis=1)
    precision = np.zeros_like(true_positives)
    np.divide(true_positives, predicted, out=precision, where=predicted != 0)
    n_pos, n_all = pos.sum(axis=1), total.sum(axis=1)
    out = _divide(np.sum(pos * precision, axis=1), n_pos)
    out[n_pos == n_all] = NAN  # no negatives: precision is 1 everywhere, nothing is being ranked
    return out


def defined_columns(y_true: np.ndarray) -> np.ndarray:
    """Indices of the indicator columns that hold both classes."""
    positives = y_true.sum(axis=0)
    return np.flatnonzero((positives > 0) & (positives < y_true.shape[0]))


def _average(values: np.ndarray, support: np.ndarray, average: str) -> np.ndarray:
    """Macro (plain) or support-weighted mean over axis 1; NaN when any column is undefined."""
    if average == "weighted":
        return _divide(np.sum(values * support, axis=1), support.sum(axis=1))
    return values.mean(axis=1)


def _indicator_score(kernel, y_true, y_score, weights, average: str) -> np.ndarray:
    """Apply a binary kernel per indicator column (macro/weighted over defined columns, or micro)."""
    if average == "micro":
        flat_weights = np.repeat(weights, y_true.shape[1], axis=1)
        return kernel(y_true.ravel().astype(bool), y_score.ravel(), flat_weights)
    columns = defined_columns(y_true)
    if columns.size == 0:
        return np.full(weights.shape[0], NAN)
    values = np.stack([kernel(y_true[:, c].astype(bool), y_score[:, c], weights) for c in columns], axis=1)
    support = weights @ y_true[:, columns]
    return _average(values, support, average)


def _multiclass_score(kernel, y_true, y_score, weights, multi_class: str, average: str) -> np.ndarray:
    """One-vs-rest or one-vs-one over the classes present in y_true."""
    classes = np.unique(y_true)
    if classes.size < 2:
        return np.full(weights.shape[0], NAN)
    if multi_class == "ovr":
        indicator = (y_true[:, None] == classes[None, :]).astype(float)
        return _indicator_score(kernel, indicator, y_score[:, classes], weights, average)
    pair_values, prevalence = [], []
    for i, a in enumerate(classes):
        for b in classes[i + 1 :]:
            pair_weights = weights * ((y_true == a) | (y_true == b))
            a_vs_b = kernel(y_true == a, y_score[:, a], pair_weights)
            b_vs_a = kernel(y_true == b, y_score[:, b], pair_weights)
            pair_values.append((a_vs_b + b_vs_a) / 2)
            prevalence.append(pair_weights.sum(axis=1))
    return _average(np.stack(pair_values, axis=1), np.stack(prevalence, axis=1), average)


def auroc(y_true, y_score, weights, multi_class: str = "ovr", average: str = "macro") -> np.ndarray:
    """AUROC from encoded inputs: 0/1 and (n,) scores, class indices and (n, K), or indicators (n, L)."""
    if y_score.ndim == 1:
        return binary_auroc(y_true.astype(bool), y_score, weights)
    if y_true.ndim == 2:
        return _indicator_score(binary_auroc, y_true, y_score, weights, average)
    return _multiclass_score(binary_auroc, y_true, y_score, weights, multi_class, average)


def average_precision(y_true, y_score, weights, average: str = "macro") -> np.ndarray:
    """Average precision from encoded inputs (binary, multiclass one-vs-rest, or multilabel)."""
    if y_score.ndim == 1:
        return binary_average_precision(y_true.astype(bool), y_score, weights)
    if y_true.ndim == 2:
        return _indicator_score(binary_average_precision, y_true, y_score, weights, average)
    return _multiclass_score(binary_average_precision, y_true, y_score, weights, "ovr", average)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, weights: np.ndarray) -> np.ndarray:
    """Weighted confusion matrices, shape (B, K, K), rows are true classes and columns predictions."""
    rows = weights.shape[0]
    cells = y_true * n_classes + y_pred
    flat = (np.arange(rows)[:, None] * n_classes**2 + cells[None, :]).ravel()
    counts = np.bincount(flat, weights=weights.ravel(), minlength=rows * n_classes**2)
    return counts.reshape(rows, n_classes, n_classes)


def _indicator_counts(y_true, y_pred, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted true positives, false positives and false negatives per label, each (B, L)."""
    y_true, y_pred = y_true.astype(float), y_pred.astype(float)
    return weights @ (y_true * y_pred), weights @ ((1 - y_true) * y_pred), weights @ (y_true * (1 - y_pred))


def _n_classes(*arrays: np.ndarray) -> int:
    return int(max((a.max() for a in arrays if a.size), default=0)) + 1


def accuracy(y_true, y_pred, weights) -> np.ndarray:
    """Fraction of exact matches (subset accuracy for indicator matrices)."""
    correct = y_true == y_pred
    if correct.ndim == 2:
        correct = correct.all(axis=1)
    return _divide(weights @ correct.astype(float), weights.sum(axis=1))


def balanced_accuracy(y_true, y_pred, weights) -> np.ndarray:
    """Mean recall over the classes present in y_true."""
    matrices = confusion(y_true, y_pred, _n_classes(y_true, y_pred), weights)
    support = matrices.sum(axis=2)
    recall = _divide(np.diagonal(matrices, axis1=1, axis2=2), support)
    present = support > 0
    return _divide(np.where(present, recall, 0).sum(axis=1), present.sum(axis=1))


def f1(y_true, y_pred, weights, average: str = "macro", pos_label: int = 1) -> np.ndarray:
    """F1 score: macro over labels seen in y_true or y_pred, micro, or binary for `pos_label`."""
    if y_true.ndim == 2:
        tp, fp, fn = _indicator_counts(y_true, y_pred, weights)
        if average == "micro":
            tp, fp, fn = tp.sum(axis=1), fp.sum(axis=1), fn.sum(axis=1)
            return _divide(2 * tp, 2 * tp + fp + fn)
        # a label with no true and no predicted positives counts as 0, as scikit-learn does
        return np.nan_to_num(_divide(2 * tp, 2 * tp + fp + fn), nan=0.0).mean(axis=1)
    matrices = confusion(y_true, y_pred, max(_n_classes(y_true, y_pred), pos_label + 1), weights)
    tp = np.diagonal(matrices, axis1=1, axis2=2)
    fp, fn = matrices.sum(axis=1) - tp, matrices.sum(axis=2) - tp
    if average == "micro":
        tp, fp, fn = tp.sum(axis=1), fp.sum(axis=1), fn.sum(axis=1)
    elif average == "binary":
        tp, fp, fn = tp[:, pos_label], fp[:, pos_label], fn[:, pos_label]
    else:
        denominator = 2 * tp + fp + fn
        seen = denominator > 0
        per_label = np.where(seen, _divide(2 * tp, denominator), 0)
        return _divide(per_label.sum(axis=1), seen.sum(axis=1))
    return _divide(2 * tp, 2 * tp + fp + fn)


def mcc(y_true, y_pred, weights) -> np.ndarray:
    """Matthews correlation coefficient (the multiclass R_K statistic; binary is the usual phi)."""
    matrices = confusion(y_true, y_pred, _n_classes(y_true, y_pred), weights)
    true_counts, pred_counts = matrices.sum(axis=2), matrices.sum(axis=1)
    correct = np.trace(matrices, axis1=1, axis2=2)
    total = matrices.sum(axis=(1, 2))
    covariance = correct * total - np.sum(true_counts * pred_counts, axis=1)
    var_pred = total**2 - np.sum(pred_counts**2, axis=1)
    var_true = total**2 - np.sum(true_counts**2, axis=1)
    return _divide(covariance, np.sqrt(var_pred * var_true))


def _constant(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Whether the examples carrying weight in each row all hold one value."""
    used = weights > 0
    low = np.where(used, values, np.inf).min(axis=1)
    high = np.where(used, values, -np.inf).max(axis=1)
    return low >= high


def _weighted_pearson(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    total = weights.sum(axis=1, keepdims=True)
    dx = x - np.sum(weights * x, axis=1, keepdims=True) / total
    dy = y - np.sum(weights * y, axis=1, keepdims=True) / total
    numerator = np.sum(weights * dx * dy, axis=1)
    denominator = np.sqrt(np.sum(weights * dx**2, axis=1) * np.sum(weights * dy**2, axis=1))
    return np.clip(_divide(numerator, denominator), -1.0, 1.0)


def pearson(y_true, y_pred, weights) -> np.ndarray:
    """Pearson correlation; NaN where either side is constant."""
    out = _weighted_pearson(y_true[None, :], y_pred[None, :], weights)
    out[_constant(y_true, weights) | _constant(y_pred, weights)] = NAN
    return out


def _weighted_ranks(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties averaged) of each example inside each weighted resample."""
    order, starts = _tie_groups(values)
    group_weight = np.add.reduceat(weights[:, order], starts, axis=1)
    group_rank = np.cumsum(group_weight, axis=1) - group_weight + (group_weight + 1) / 2
    group_of_sorted = np.repeat(np.arange(starts.size), np.diff(np.append(starts, values.size)))
    ranks = np.empty(weights.shape)
    ranks[:, order] = group_rank[:, group_of_sorted]
    return ranks


def spearman(y_true, y_pred, weights) -> np.ndarray:
    """Spearman rank correlation (Pearson on average ranks); NaN where either side is constant."""
    out = _weighted_pearson(_weighted_ranks(y_true, weights), _weighted_ranks(y_pred, weights), weights)
    out[_constant(y_true, weights) | _constant(y_pred, weights)] = NAN
    return out


def mse(y_true, y_pred, weights) -> np.ndarray:
    """Mean squared error."""
    return _divide(weights @ (y_true - y_pred) ** 2, weights.sum(axis=1))


def mae(y_true, y_pred, weights) -> np.ndarray:
    """Mean absolute error."""
    return _divide(weights @ np.abs(y_true - y_pred), weights.sum(axis=1))


def mean(values, _unused, weights) -> np.ndarray:
    """Weighted mean of per-example values (the second argument is ignored)."""
    return _divide(weights @ values, weights.sum(axis=1))
