"""`evaluate`: the metrics of a task with 95% percentile-bootstrap intervals, as an `EvaluationReport`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.core.evaluation import kernels
from pipelines.core.evaluation.metrics import UndefinedMetricWarning, as_numpy, warn_undefined
from pipelines.core.evaluation.registry import (
    TASKS,
    MetricSpec,
    default_metrics,
    get_metric,
    known_tasks,
    list_metrics,
)

# Resamples are drawn in chunks so the (chunk, n) weight matrices stay around 32 MB each.
_MAX_CELLS_PER_CHUNK = 4_000_000


@dataclass(frozen=True)
class MetricResult:
    """A metric's value on the split and its 95% bootstrap interval (NaN bounds without a bootstrap)."""

    value: float
    low: float = math.nan
    high: float = math.nan

    def to_dict(self) -> dict[str, float]:
        """{"value", "low", "high"} as floats (NaN kept; JSON writers turn it into null)."""
        return {"value": self.value, "low": self.low, "high": self.high}

    def __str__(self) -> str:
        if math.isnan(self.low):
            return f"{self.value:.4g}"
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


@dataclass
class EvaluationReport(Mapping[str, MetricResult]):
    """Metric name -> `MetricResult` for one split, with how it was computed.

    Attributes:
        task: The task evaluated.
        metrics: Metric name -> result, in the order asked for.
        n_examples: Examples in the split.
        bootstrap: Resamples drawn (0: no intervals).
        seed: Seed of the resampling generator.
        threshold: Probability threshold that made labels (binary, multilabel), else None.
        skipped: Metric name -> resamples left out of its interval because the metric was undefined there.
    """

    task: str
    metrics: dict[str, MetricResult]
    n_examples: int
    bootstrap: int = 0
    seed: int = 0
    threshold: float | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, name: str) -> MetricResult:
        try:
            return self.metrics[name]
        except KeyError:
            raise KeyError(
                f"metric {name!r} is not in this report; it has {', '.join(self.metrics)}."
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the settings and `metrics` {name: {value, low, high}} (NaN kept as float)."""
        return {
            "task": self.task,
            "n_examples": self.n_examples,
            "bootstrap": self.bootstrap,
            "seed": self.seed,
            "threshold": self.threshold,
            "skipped": dict(self.skipped),
            "metrics": {name: result.to_dict() for name, result in self.metrics.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        """Inverse of `to_dict`; None values (JSON null) become NaN."""

        def number(value: Any) -> float:
            return math.nan if value is None else float(value)

        results = {
            name: MetricResult(number(r["value"]), number(r.get("low")), number(r.get("high")))
            for name, r in data["metrics"].items()
        }
        return cls(
            task=data["task"],
            metrics=results,
            n_examples=int(data["n_examples"]),
            bootstrap=int(data.get("bootstrap", 0)),
            seed=int(data.get("seed", 0)),
            threshold=data.get("threshold"),
            skipped=dict(data.get("skipped", {})),
        )

    def __str__(self) -> str:
        lines = [f"{self.task}: {self.n_examples} examples, {self.bootstrap} bootstrap resamples"]
        lines += [f"  {name}: {result}" for name, result in self.metrics.items()]
        return "\n".join(lines)


def _as_examples(values: Any) -> np.ndarray:
    """An array with one entry per example; ragged sequences become a 1-D object array."""
    try:
        return as_numpy(values)
    except ValueError:
        out = np.empty(len(values), dtype=object)
        out[:] = list(values)
        return out


def _single_column(name: str, task: str, values: np.ndarray) -> np.ndarray:
    if values.ndim == 2 and values.shape[1] == 1:
        return values[:, 0]
    if values.ndim != 1:
        raise ValueError(f"{task} task: {name} must have shape (n,), got {values.shape}.")
    return values


def prepare_inputs(task: str, y_true: Any, y_score: Any, threshold: float = 0.5):
    """Validate and encode inputs for `task`; return (y_true, y_score, y_pred) as numpy arrays.

    binary: y_true 0/1 (n,), y_score the positive-class probability (n,) or (n, 2), y_pred = score >=
    threshold. multiclass: y_true 0..K-1, y_score (n, K), y_pred = argmax. multilabel: 0/1 and
    per-label sigmoid probabilities (n, L), y_pred = score >= threshold. regression: y_pred = y_score.
    """
    if task not in TASKS:
        y_true, y_score = _as_examples(y_true), _as_examples(y_score)
        if len(y_true) != len(y_score):
            raise ValueError(
                f"{task} task: y_true has {len(y_true)} examples but y_score has {len(y_score)}."
            )
        return y_true, y_score, y_score
    y_true, y_score = as_numpy(y_true), as_numpy(y_score)
    if y_true.ndim == 0 or y_score.ndim == 0 or len(y_true) != len(y_score):
        raise ValueError(
            f"{task} task: y_true {y_true.shape} and y_score {y_score.shape} must have one row per example."
        )
    if task == "regression":
        y_true = _single_column("y_true", task, y_true).astype(float)
        y_score = _single_column("y_score", task, y_score).astype(float)
        return y_true, y_score, y_score
    if task == "binary":
        if y_score.ndim == 2 and y_score.shape[1] == 2:
            y_score = y_score[:, 1]
        y_score = _single_column("y_score (the positive-class probability, or (n, 2))", task, y_score)
        y_true = _single_column("y_true", task, y_true)
    elif task == "multiclass":
        if y_score.ndim != 2 or y_score.shape[1] < 2 or y_true.ndim != 1:
            raise ValueError(
                f"multiclass task: y_true must be (n,) labels and y_score (n, K) with K >= 2; "
                f"got {y_true.shape} and {y_score.shape}."
            )
    elif y_true.shape != y_score.shape or y_true.ndim != 2:
        raise ValueError(
            f"multilabel task: y_true {y_true.shape} and y_score {y_score.shape} must be equal (n, L)."
        )
    allowed = np.arange(y_score.shape[1]) if task == "multiclass" else np.array([0, 1])
    values = np.unique(y_true)
    if not np.isin(values, allowed).all():
        raise ValueError(
            f"{task} task: y_true must hold labels {allowed[0]}..{allowed[-1]}; found {values[:10].tolist()} "
            "(map the classes to column indices, the positive class to 1)."
        )
    y_true, y_score = y_true.astype(np.int64), y_score.astype(float)
    if task == "multiclass":
        y_pred = np.argmax(y_score, axis=1) if len(y_score) else np.zeros(0, np.int64)
    else:
        y_pred = (y_score >= threshold).astype(np.int64)
    return y_true, y_score, y_pred


def _weights(indices: np.ndarray, n: int) -> np.ndarray:
    """How many times each example appears in each row of resample indices, shape (rows, n)."""
    rows = indices.shape[0]
    flat = (indices + np.arange(rows)[:, None] * n).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(float)


def _resample_values(
    spec: MetricSpec, y_true, y_input, indices: np.ndarray, n: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """`spec` on each row of resample `indices`; `weights` is `_weights(indices, n)` when already made."""
    if spec.batched is not None:
        weights = _weights(indices, n) if weights is None else weights
        return np.asarray(spec.batched(y_true, y_input, weights), dtype=float)
    values = np.full(indices.shape[0], math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for row, sample in enumerate(indices):
            try:
                values[row] = float(spec.fn(y_true[sample], y_input[sample]))
            except (ValueError, ZeroDivisionError, FloatingPointError):
                pass  # a resample on which the metric is undefined; counted as skipped
    return values


def resample_indices(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Resample indices in chunks of rows: `default_rng(seed).integers(0, n, (rows, n))`, drawn in order.

    Every bootstrap here (`evaluate`, `paired_bootstrap`) draws from this, so one seed gives the same
    resamples to every model scored on the same examples.
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, _MAX_CELLS_PER_CHUNK // max(n, 1)))
    for start in range(0, n_resamples, chunk):
        yield rng.integers(0, n, size=(min(chunk, n_resamples - start), n))


def bootstrap_values(
    specs: Sequence[MetricSpec], y_true, inputs: Sequence[Any], n_resamples: int, seed: int
) -> list[np.ndarray]:
    """Each metric on the same `n_resamples` resamples of the examples (`resample_indices`)."""
    n = len(y_true)
    parts: list[list[np.ndarray]] = [[] for _ in specs]
    for indices in resample_indices(n, n_resamples, seed):
        weights = _weights(indices, n) if any(spec.batched for spec in specs) else None
        for part, spec, y_input in zip(parts, specs, inputs, strict=True):
            part.append(_resample_values(spec, y_true, y_input, indices, n, weights))
    return [np.concatenate(part) if part else np.zeros(0) for part in parts]


def _interval(name: str, values: np.ndarray) -> tuple[float, float, int]:
    valid = values[np.isfinite(values)]
    skipped = int(values.size - valid.size)
    if skipped:
        warnings.warn(
            f"{name}: {skipped} of {values.size} bootstrap resamples were degenerate (the metric is "
            "undefined there, e.g. one class only) and were skipped for the interval.",
            UndefinedMetricWarning,
            stacklevel=3,
        )
    if valid.size < 2:
        return math.nan, math.nan, skipped
    low, high = np.percentile(valid, [2.5, 97.5])
    return float(low), float(high), skipped


def evaluate(
    task: str,
    y_true: Any,
    y_score: Any,
    metrics: Sequence[str] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    threshold: float = 0.5,
) -> EvaluationReport:
    """Compute `metrics` (default: the task's set) with 95% percentile-bootstrap intervals over examples.

    Args:
        task: "binary", "multiclass", "multilabel", "regression", or a task of registered metrics.
        y_true: Labels (binary 0/1, multiclass 0..K-1, multilabel (n, L) 0/1) or regression targets.
        y_score: Probabilities (binary (n,) or (n, 2); multiclass (n, K); multilabel sigmoid (n, L)) or
            regression predictions. Label metrics use score >= threshold, or argmax for multiclass.
        metrics: Registered metric names; None for `default_metrics(task)`.
        bootstrap: Resamples for the intervals; 0 leaves low/high NaN.
        seed: Seed of `numpy.random.default_rng` that draws the resample indices.
        threshold: Probability threshold for labels (binary, multilabel).

    Returns:
        The report; `report["auroc"].value`, `.low`, `.high`.
    """
    if task not in known_tasks():
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(known_tasks())}.")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be 0 (no intervals) or a number of resamples, not {bootstrap}.")
    names = list(default_metrics(task) if metrics is None else metrics)
    specs = [get_metric(name) for name in names]
    for spec in specs:
        if task not in spec.tasks:
            raise ValueError(
                f"metric {spec.name!r} does not apply to task {task!r} (it applies to "
                f"{', '.join(spec.tasks)}); metrics for {task}: {', '.join(list_metrics(task))}."
            )
    y_true, y_score, y_pred = prepare_inputs(task, y_true, y_score, threshold)
    n = len(y_true)
    report = EvaluationReport(
        task, {}, n, bootstrap, seed, threshold if task in ("binary", "multilabel") else None
    )
    if task in TASKS and task != "regression" and n and ((y_score < 0) | (y_score > 1)).any():
        warnings.warn(
            f"evaluate: {task} y_score has values outside [0, 1]; pass probabilities (softmax or sigmoid), "
            "since labels come from them and scikit-learn's multiclass AUROC expects them.",
            UserWarning,
            stacklevel=2,
        )
    reason = None
    if n == 0:
        reason = "the split is empty (0 examples)"
    elif task in TASKS and not (np.isfinite(y_score).all() and np.isfinite(y_true).all()):
        reason = "y_true or y_score contains NaN or infinite values"
    if reason is not None:
        warn_undefined(f"every metric ({', '.join(names)})", reason)
        report.metrics = {name: MetricResult(math.nan) for name in names}
        return report
    inputs = [y_pred if spec.input == "label" else y_score for spec in specs]
    values = [float(spec.fn(y_true, y_input)) for spec, y_input in zip(specs, inputs, strict=True)]
    defined = [i for i, value in enumerate(values) if not math.isnan(value)]
    intervals: dict[int, tuple[float, float, int]] = {}
    if bootstrap and defined:
        resampled = bootstrap_values(
            [specs[i] for i in defined], y_true, [inputs[i] for i in defined], bootstrap, seed
        )
        intervals = {i: _interval(names[i], v) for i, v in zip(defined, resampled, strict=True)}
    for i, (name, value) in enumerate(zip(names, values, strict=True)):
        low, high, skipped = intervals.get(i, (math.nan, math.nan, 0))
        report.metrics[name] = MetricResult(value, low, high)
        if skipped:
            report.skipped[name] = skipped
    return report


def bootstrap_mean(values: Any, bootstrap: int = 1000, seed: int = 0) -> MetricResult:
    """Mean of per-example values (e.g. per-utterance MCD) with its 95% percentile-bootstrap interval."""
    values = as_numpy(values).astype(float).ravel()
    if values.size == 0 or not np.isfinite(values).all():
        reason = "there are no values" if values.size == 0 else "values contain NaN or infinite entries"
        return MetricResult(warn_undefined("mean", reason))
    spec = MetricSpec("mean", lambda v, _: float(np.mean(v)), ("regression",), "score", kernels.mean)
    value = float(values.mean())
    if not bootstrap:
        return MetricResult(value)
    low, high, _ = _interval("mean", bootstrap_values([spec], values, [values], bootstrap, seed)[0])
    return MetricResult(value, low, high)
