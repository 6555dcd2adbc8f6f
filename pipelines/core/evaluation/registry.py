"""The metric registry: built-in metrics per task, and `register_metric` for a domain's own."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np

from pipelines.core.evaluation import kernels, metrics

TASKS = ("binary", "multiclass", "multilabel", "regression")

DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("auroc", "auprc", "accuracy", "balanced_accuracy", "f1", "mcc"),
    "multiclass": ("auroc", "accuracy", "balanced_accuracy", "f1_macro", "mcc"),
    "multilabel": ("auroc", "auprc", "f1_micro", "f1_macro"),
    "regression": ("spearman", "pearson", "mse", "mae"),
}


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric.

    Attributes:
        name: Registry name, the key in reports.
        fn: `fn(y_true, y_input) -> float`; y_input is the scores or the predicted labels (see `input`).
        tasks: Tasks the metric applies to.
        input: "score" (probabilities, or predictions for regression) or "label" (thresholded/argmax).
        batched: Optional `batched(y_true, y_input, weights) -> (B,)` over example weights (B, n), which
            makes the bootstrap vectorised; without it the bootstrap calls `fn` once per resample.
        greater_is_better: Direction, for model selection and reports.
    """

    name: str
    fn: Callable[..., float]
    tasks: tuple[str, ...]
    input: Literal["score", "label"] = "score"
    batched: Callable[..., np.ndarray] | None = None
    greater_is_better: bool = True


_REGISTRY: dict[str, MetricSpec] = {}


def register_metric(
    name: str,
    fn: Callable[..., float],
    tasks: Sequence[str],
    input: Literal["score", "label"] = "score",
    batched: Callable[..., np.ndarray] | None = None,
    greater_is_better: bool = True,
    overwrite: bool = False,
) -> MetricSpec:
    """Register `fn` as metric `name` for `tasks` and return its spec.

    A task outside binary/multiclass/multilabel/regression is allowed (e.g. "speech"): `evaluate`
    then passes y_true and y_score through unchanged and uses the metrics registered for that task.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"metric name must be a non-empty string, not {name!r}.")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"metric {name!r} is already registered; pass overwrite=True to replace it.")
    if not callable(fn):
        raise TypeError(f"metric {name!r}: fn must be callable, not {type(fn).__name__}.")
    if isinstance(tasks, str):
        tasks = (tasks,)
    tasks = tuple(tasks)
    if not tasks or not all(isinstance(task, str) and task for task in tasks):
        raise ValueError(f"metric {name!r}: tasks must be a non-empty sequence of task names, not {tasks!r}.")
    if input not in ("score", "label"):
        raise ValueError(f"metric {name!r}: input must be 'score' or 'label', not {input!r}.")
    spec = MetricSpec(name, fn, tasks, input, batched, greater_is_better)
    _REGISTRY[name] = spec
    return spec


def get_metric(name: str) -> MetricSpec:
    """The spec registered as `name`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown metric {name!r}; registered metrics: {', '.join(sorted(_REGISTRY))} "
            "(add one with register_metric)."
        ) from None


def list_metrics(task: str | None = None, pattern: str = "*") -> list[str]:
    """Sorted names of the registered metrics, optionally only those for `task` or matching `pattern`."""
    return sorted(
        name
        for name, spec in _REGISTRY.items()
        if (task is None or task in spec.tasks) and fnmatch.fnmatchcase(name, pattern)
    )


def known_tasks() -> list[str]:
    """The built-in tasks plus any task named by a registered metric."""
    extra = {task for spec in _REGISTRY.values() for task in spec.tasks} - set(TASKS)
    return [*TASKS, *sorted(extra)]


def default_metrics(task: str) -> list[str]:
    """The default metric names for `task` (every metric registered for a task that is not built in)."""
    if task in DEFAULT_METRICS:
        return list(DEFAULT_METRICS[task])
    names = list_metrics(task)
    if not names:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(known_tasks())}.")
    return names


def _register_builtins() -> None:
    classification = ("binary", "multiclass", "multilabel")
    register_metric("auroc", metrics.auroc, classification, "score", kernels.auroc)
    register_metric(
        "auroc_ovo",
        partial(metrics.auroc, multi_class="ovo"),
        ("multiclass",),
        "score",
        partial(kernels.auroc, multi_class="ovo"),
    )
    register_metric("auprc", metrics.auprc, classification, "score", kernels.average_precision)
    register_metric("accuracy", metrics.accuracy, classification, "label", kernels.accuracy)
    register_metric(
        "balanced_accuracy",
        metrics.balanced_accuracy,
        ("binary", "multiclass"),
        "label",
        kernels.balanced_accuracy,
    )
    register_metric(
        "f1",
        partial(metrics.f1, average="binary"),
        ("binary",),
        "label",
        partial(kernels.f1, average="binary"),
    )
    for average in ("macro", "micro"):
        register_metric(
            f"f1_{average}",
            partial(metrics.f1, average=average),
            classification,
            "label",
            partial(kernels.f1, average=average),
        )
    register_metric("mcc", metrics.mcc, ("binary", "multiclass"), "label", kernels.mcc)
    register_metric("spearman", metrics.spearman, ("regression",), "score", kernels.spearman)
    register_metric("pearson", metrics.pearson, ("regression",), "score", kernels.pearson)
    register_metric("mse", metrics.mse, ("regression",), "score", kernels.mse, greater_is_better=False)
    register_metric("mae", metrics.mae, ("regression",), "score", kernels.mae, greater_is_better=False)


_register_builtins()
