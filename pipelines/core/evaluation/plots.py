"""PNG plots for a run report: ROC and precision-recall curves, predicted-vs-true scatter, loss curves.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend change),
so writing a report works headless and does not disturb an interactive session.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core.evaluation import kernels
from pipelines.core.evaluation.metrics import as_numpy

_MAX_CURVES = 10  # per-class curves drawn for multiclass / multilabel
_MAX_POINTS = 5000  # scatter points per model, subsampled with a fixed seed


def _figure(n_axes: int = 1, width: float = 5.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * n_axes, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, n_axes, squeeze=False)[0]
    return figure, list(axes)


def _binary_columns(
    task: str, y_true: np.ndarray, y_score: np.ndarray
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(suffix, positives, score) pairs to draw: one for binary, one per class or label otherwise."""
    if task == "binary":
        score = y_score[:, -1] if y_score.ndim == 2 else y_score
        return [("", y_true.ravel() == 1, score.astype(float))]
    if task == "multiclass":
        columns = [(f" class {k}", y_true == k, y_score[:, k]) for k in range(y_score.shape[1])]
    elif task == "multilabel":
        columns = [(f" label {k}", y_true[:, k] == 1, y_score[:, k]) for k in range(y_score.shape[1])]
    else:
        return []
    return [column for column in columns if 0 < column[1].sum() < column[1].size][:_MAX_CURVES]


def plot_curves(
    path: Path, task: str, predictions: Mapping[str, Sequence[Any]], primary_model: str, kind: str
) -> bool:
    """Draw ROC (`kind="roc"`) or precision-recall (`kind="pr"`) curves; False when nothing to draw.

    Binary: one curve per model. Multiclass and multilabel: one curve per class (label) of
    `primary_model` (the first ten that have both classes), one-vs-rest.
    """
    from sklearn.metrics import precision_recall_curve, roc_curve

    if task == "binary":
        models = list(predictions)
    else:
        models = [primary_model] if primary_model in predictions else list(predictions)[:1]
    curves = []
    for model in models:
        y_true, y_score = (as_numpy(a) for a in predictions[model])
        for suffix, positive, score in _binary_columns(task, y_true, y_score):
            if not 0 < positive.sum() < positive.size or not np.isfinite(score).all():
                continue
            ones = np.ones((1, positive.size))
            if kind == "roc":
                x, y, _ = roc_curve(positive, score)
                area = f"AUROC {kernels.binary_auroc(positive, score, ones)[0]:.3f}"
            else:
                y, x, _ = precision_recall_curve(positive, score)
                area = f"AUPRC {kernels.binary_average_precision(positive, score, ones)[0]:.3f}"
            curves.append((f"{model}{suffix} ({area})", x, y))
    if not curves:
        return False
    figure, (axes,) = _figure()
    for label, x, y in curves:
        axes.plot(x, y, label=label, drawstyle="default" if kind == "roc" else "steps-post")
    if kind == "roc":
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        axes.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curve")
    else:
        axes.set(xlabel="recall", ylabel="precision", title="Precision-recall curve")
    axes.set(xlim=(0, 1), ylim=(0, 1.02))
    axes.legend(loc="lower right" if kind == "roc" else "lower left", fontsize="small")
    figure.savefig(path)
    return True


def plot_scatter(path: Path, predictions: Mapping[str, Sequence[Any]]) -> bool:
    """Predicted against true values, one panel per model, with the identity line."""
    panels = []
    for model, (y_true, y_pred) in predictions.items():
        y_true, y_pred = as_numpy(y_true).astype(float).ravel(), as_numpy(y_pred).astype(float).ravel()
        keep = np.isfinite(y_true) & np.isfinite(y_pred)
        y_true, y_pred = y_true[keep], y_pred[keep]
        if y_true.size > _MAX_POINTS:
            chosen = np.random.default_rng(0).choice(y_true.size, _MAX_POINTS, replace=False)
            y_true, y_pred = y_true[chosen], y_pred[chosen]
        if y_true.size:
            panels.append((model, y_true, y_pred))
    if not panels:
        return False
    figure, axes_list = _figure(len(panels), width=4.0)
    for axes, (model, y_true, y_pred) in zip(axes_list, panels, strict=True):
        low, high = min(y_true.min(), y_pred.min()), max(y_true.max(), y_pred.max())
        axes.scatter(y_true, y_pred, s=6, alpha=0.5)
        axes.plot([low, high], [low, high], color="grey", linestyle=":", linewidth=1)
        axes.set(xlabel="true", ylabel="predicted", title=model)
    figure.savefig(path)
    return True


def plot_losses(path: Path, histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> bool:
    """Training loss (solid) and validation loss (dashed) against step, one colour per model."""
    series = []
    for model, rows in histories.items():
        for key, style in (("loss", "-"), ("val_loss", "--")):
            points = [
                (row["step"], row[key])
                for row in rows
                if isinstance(row.get(key), (int, float)) and isinstance(row.get("step"), (int, float))
            ]
            if points:
                series.append((model, key, style, np.array(points, dtype=float)))
    if not series:
        return False
    from matplotlib.ticker import MaxNLocator

    figure, (axes,) = _figure(width=6.0)
    colours = {model: f"C{i}" for i, model in enumerate(dict.fromkeys(s[0] for s in series))}
    for model, key, style, points in series:
        marker = "o" if len(points) <= 12 else None  # a short run's few points stay visible as points
        axes.plot(points[:, 0], points[:, 1], style, marker=marker, markersize=3, color=colours[model],
                  label=f"{model} {key}")  # fmt: skip
    validation = any(key == "val_loss" for _, key, _, _ in series)
    title = "Training and validation loss" if validation else "Training loss"
    axes.set(xlabel="step", ylabel="loss", title=title)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(fontsize="small")
    figure.savefig(path)
    return True


def write_plots(
    run_dir: Path,
    task: str,
    predictions: Mapping[str, Sequence[Any]],
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    primary_model: str,
) -> list[str]:
    """Write the plots that apply (roc.png, pr.png, scatter.png, loss.png); return their file names."""
    written = []
    if predictions and task in ("binary", "multiclass", "multilabel"):
        for kind in ("roc", "pr"):
            if plot_curves(run_dir / f"{kind}.png", task, predictions, primary_model, kind):
                written.append(f"{kind}.png")
    if predictions and task == "regression" and plot_scatter(run_dir / "scatter.png", predictions):
        written.append("scatter.png")
    if histories and plot_losses(run_dir / "loss.png", histories):
        written.append("loss.png")
    return written
