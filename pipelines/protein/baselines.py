"""Baselines that show whether an adapter helps: one-hot linear models and a frozen-backbone linear probe.

Per-sequence tasks: ridge regression (regression) or logistic regression (classification) on one-hot
encodings padded to the longest training sequence (FLIP's one-hot baseline). Per-residue tasks: logistic
regression on the one-hot window around each residue. The probe fits the same linear models on frozen
backbone features. Regularisation strength is chosen on the validation split (or a 10% hold-out).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipelines.core.evaluation import spearman
from pipelines.protein.data import IGNORE_INDEX, ProteinRecord

__all__ = [
    "ONE_HOT_LETTERS",
    "one_hot_sequences",
    "one_hot_windows",
    "fit_linear",
    "extract_features",
    "one_hot_features",
    "fit_baseline",
]

ONE_HOT_LETTERS = "ACDEFGHIKLMNPQRSTVWY"  # any other letter (X, B, Z, U, O) gets the 21st column
_COLUMN = {letter: i for i, letter in enumerate(ONE_HOT_LETTERS)}
ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)
CS = (0.01, 0.1, 1.0, 10.0)


def one_hot_sequences(sequences: list[str], length: int) -> np.ndarray:
    """(n, length * 21) float32 one-hot; longer sequences are cut at ``length``, shorter ones zero-padded."""
    width = len(ONE_HOT_LETTERS) + 1
    out = np.zeros((len(sequences), length, width), dtype=np.float32)
    for row, sequence in enumerate(sequences):
        for position, letter in enumerate(sequence[:length]):
            out[row, position, _COLUMN.get(letter, width - 1)] = 1.0
    return out.reshape(len(sequences), -1)


def one_hot_windows(records: list[ProteinRecord], half_window: int = 7) -> tuple[Any, np.ndarray]:
    """Sparse one-hot of the ``2 * half_window + 1`` residues around each scored residue, and the labels.

    Returns:
        ``(X, y)``: a scipy CSR matrix (scored residues, window * 22) and their labels, proteins in order.
    """
    from scipy import sparse

    width = len(ONE_HOT_LETTERS) + 2  # + other letter + "outside the sequence"
    rows, cols, labels = [], [], []
    row = 0
    for record in records:
        sequence, residue_labels = record.sequence, record.residue_labels or ()
        for position, label in enumerate(residue_labels):
            if label == IGNORE_INDEX:
                continue
            for offset in range(-half_window, half_window + 1):
                j = position + offset
                letter_column = _COLUMN.get(sequence[j], width - 2) if 0 <= j < len(sequence) else width - 1
                rows.append(row)
                cols.append((offset + half_window) * width + letter_column)
            labels.append(label)
            row += 1
    matrix = sparse.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(row, (2 * half_window + 1) * width)
    )
    return matrix, np.asarray(labels, dtype=np.int64)


def _holdout(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    cut = max(1, n // 10)
    return order[cut:], order[:cut]


def fit_linear(
    task: str,
    x_train: Any,
    y_train: np.ndarray,
    x_valid: Any | None = None,
    y_valid: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[Any, dict]:
    """Fit ridge (regression) or logistic regression (classification), choosing the penalty on validation.

    Without a validation split, 10% of the training rows are held out to choose it; the final model is
    refit on all training rows either way.

    Returns:
        ``(predict, info)``: ``predict(x)`` gives predictions or class probabilities (positive class for
        binary), and ``info`` the chosen penalty and the validation score of each candidate.
    """
    from sklearn.linear_model import LogisticRegression, Ridge

    if x_valid is None or y_valid is None or len(y_valid) == 0:
        keep, held = _holdout(len(y_train), seed)
        fit_x, fit_y, val_x, val_y = x_train[keep], y_train[keep], x_train[held], y_train[held]
    else:
        fit_x, fit_y, val_x, val_y = x_train, y_train, x_valid, y_valid

    def build(value: float) -> Any:
        if task == "regression":
            return Ridge(alpha=value)
        return LogisticRegression(C=value, max_iter=500)

    def score(model: Any) -> float:
        if task == "regression":
            return spearman(val_y, model.predict(val_x))
        return float((model.predict(val_x) == val_y).mean())

    grid = ALPHAS if task == "regression" else CS
    scores = {}
    for value in grid:
        scores[value] = score(build(value).fit(fit_x, fit_y))
    finite = {k: v for k, v in scores.items() if np.isfinite(v)}
    best = max(finite, key=finite.get) if finite else grid[len(grid) // 2]
    model = build(best).fit(x_train, y_train)

    def predict(x: Any) -> np.ndarray:
        if task == "regression":
            return model.predict(x)
        probabilities = model.predict_proba(x)
        return probabilities[:, 1] if probabilities.shape[1] == 2 else probabilities

    name = "alpha" if task == "regression" else "C"
    metric = "spearman" if task == "regression" else "accuracy"
    return predict, {name: best, f"validation_{metric}": {str(k): v for k, v in scores.items()}}


@torch.no_grad()
def extract_features(model: Any, loader: Any) -> tuple[np.ndarray, np.ndarray]:
    """Frozen features of a :class:`~pipelines.protein.model.ProteinModel` and the matching labels.

    Per-sequence tasks give pooled features (n, hidden); the residue task gives one row per scored residue.
    """
    was_training = model.training
    model.eval()
    device = model.head.linear.weight.device
    features, labels = [], []
    try:
        for batch in loader:
            hidden = model.features(batch["tokens"].to(device)).float()
            if model.task == "residue":
                keep = batch["labels"] != IGNORE_INDEX
                features.append(hidden[keep.to(device)].cpu().numpy())
                labels.append(batch["labels"][keep].numpy())
            else:
                features.append(hidden.cpu().numpy())
                labels.append(batch["target"].numpy())
    finally:
        model.train(was_training)
    return np.concatenate(features), np.concatenate(labels)


def one_hot_features(splits: dict[str, list[ProteinRecord]], level: str) -> dict[str, tuple[Any, np.ndarray]]:
    """One-hot ``(x, y)`` of each split: windows around each scored residue, or whole sequences padded to
    the longest training sequence."""
    if level == "residue":
        return {key: one_hot_windows(records) for key, records in splits.items()}
    length = max(len(r.sequence) for r in splits["train"])
    return {
        key: (one_hot_sequences([r.sequence for r in rows], length), np.asarray([r.target for r in rows]))
        for key, rows in splits.items()
    }


def fit_baseline(
    features: dict[str, tuple[Any, np.ndarray]], regression: bool, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], int, dict]:
    """Fit :func:`fit_linear` on ``features`` (train, valid, test); returns (test ``(y_true, y_score)``,
    parameters fitted, details)."""
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = (
        features[k] for k in ("train", "valid", "test")
    )
    if not regression:
        y_train, y_valid, y_test = (y.astype(np.int64) for y in (y_train, y_valid, y_test))
    kind = "regression" if regression else "classification"
    predict, details = fit_linear(kind, x_train, y_train, x_valid, y_valid, seed=seed)
    classes = len(np.unique(y_train))
    trainable = (x_train.shape[1] + 1) * (1 if regression or classes <= 2 else classes)
    details["features"] = int(x_train.shape[1])
    return (y_test, predict(x_test)), trainable, details
