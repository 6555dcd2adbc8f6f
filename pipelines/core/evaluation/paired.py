"""Paired comparisons of models scored on the same test examples: paired bootstrap, Holm, compare_models.

Two models evaluated on one test set are paired: an example that is hard for one is usually hard for
the other. Independent intervals ignore that and hide real differences (or suggest false ones); these
functions resample the examples once and score both models on the same resamples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.core.evaluation.delong import DeLongResult, delong_test
from pipelines.core.evaluation.evaluate import _resample_values, _weights, prepare_inputs, resample_indices
from pipelines.core.evaluation.metrics import UndefinedMetricWarning, warn_undefined
from pipelines.core.evaluation.registry import TASKS, MetricSpec, default_metrics, get_metric, known_tasks

P_VALUE_DEFINITION = (
    "two-sided paired bootstrap of the centred difference: p = (1 + #{b: |d*_b - d| >= |d|}) / (1 + B)"
)


@dataclass(frozen=True)
class PairedDifference:
    """A metric of model a minus model b on the same examples, with its paired-bootstrap interval.

    Attributes:
        metric: Metric name.
        value_a: The metric of model a on all examples.
        value_b: The metric of model b on all examples.
        difference: value_a - value_b.
        low: 2.5th percentile of the resampled differences.
        high: 97.5th percentile of the resampled differences.
        standard_error: Standard deviation of the resampled differences.
        p_value: Two-sided p-value, `P_VALUE_DEFINITION`.
        n_examples: Examples in the split.
        bootstrap: Resamples drawn.
        seed: Seed of the resampling generator.
        skipped: Resamples left out because the metric was undefined there for either model.
    """

    metric: str
    value_a: float
    value_b: float
    difference: float
    low: float = math.nan
    high: float = math.nan
    standard_error: float = math.nan
    p_value: float = math.nan
    n_examples: int = 0
    bootstrap: int = 0
    seed: int = 0
    skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (NaN kept as float)."""
        return dict(self.__dict__)


def _specs(task: str, metrics: Sequence[str] | None) -> list[MetricSpec]:
    if task not in known_tasks():
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(known_tasks())}.")
    specs = [get_metric(name) for name in (default_metrics(task) if metrics is None else metrics)]
    for spec in specs:
        if task not in spec.tasks:
            raise ValueError(
                f"metric {spec.name!r} does not apply to task {task!r} "
                f"(it applies to {', '.join(spec.tasks)})."
            )
    return specs


def _resampled(
    specs: Sequence[MetricSpec], y_true, inputs: Mapping[str, Sequence[Any]], indices
) -> dict[str, list[np.ndarray]]:
    """Per model and metric, the metric on each resample of `indices` (index matrices shared by all)."""
    n = len(y_true)
    parts: dict[str, list[list[np.ndarray]]] = {name: [[] for _ in specs] for name in inputs}
    for chunk in indices:
        weights = _weights(chunk, n) if any(spec.batched for spec in specs) else None
        for name, model_inputs in inputs.items():
            for part, spec, x in zip(parts[name], specs, model_inputs, strict=True):
                part.append(_resample_values(spec, y_true, x, chunk, n, weights))
    return {name: [np.concatenate(part) for part in model_parts] for name, model_parts in parts.items()}


def _summary(point: PairedDifference, resampled: np.ndarray) -> PairedDifference:
    """Fill the interval, standard error and p-value of `point` from its resampled differences."""
    valid = resampled[np.isfinite(resampled)]
    skipped = int(resampled.size - valid.size)
    if skipped:
        warnings.warn(
            f"{point.metric} difference: {skipped} of {resampled.size} paired resamples were degenerate (the "
            "metric is undefined there for a model, e.g. one class only) and were skipped.",
            UndefinedMetricWarning,
            stacklevel=4,
        )
    fields = dict(point.__dict__, skipped=skipped)
    if valid.size >= 2:
        fields["low"], fields["high"] = (float(x) for x in np.percentile(valid, [2.5, 97.5]))
        fields["standard_error"] = float(np.std(valid, ddof=1))
    if valid.size:
        d = point.difference
        # A resample within rounding of |d| counts as extreme, so ties (common for accuracy) are conservative.
        tolerance = 1e-10 * max(1.0, abs(point.value_a), abs(point.value_b))
        extreme = int(np.count_nonzero(np.abs(valid - d) >= abs(d) - tolerance))
        fields["p_value"] = (1 + extreme) / (1 + valid.size)
    return PairedDifference(**fields)


def paired_bootstrap(
    task: str,
    y_true: Any,
    score_a: Any,
    score_b: Any,
    metrics: Sequence[str] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict[str, PairedDifference]:
    """Each metric of model a minus model b, with a paired 95% percentile interval and a p-value.

    One set of resample indices (`resample_indices(n, bootstrap, seed)`, the same draws `evaluate` makes
    with that seed) scores both models, so the interval keeps their pairing. The p-value is the two-sided
    bootstrap test of the centred difference (Efron & Tibshirani 1993, sec. 16.4; the +1 correction of
    Davison & Hinkley 1997, sec. 4.4): with d the difference on all examples and d*_b on resample b,
    p = (1 + #{b: |d*_b - d| >= |d|}) / (1 + B), over the B resamples where both models' metric is
    defined. Identical models give d = 0 and p = 1.

    Args:
        task: A task as in `evaluate`.
        y_true: Labels or targets, shared by both models.
        score_a: Scores of model a (as `evaluate`'s y_score).
        score_b: Scores of model b, same shape.
        metrics: Registered metric names; None for the task's default set.
        bootstrap: Resamples; 0 gives the differences only.
        seed: Seed of the resampling generator.
        threshold: Probability threshold for label metrics (binary, multilabel).

    Returns:
        Metric name -> `PairedDifference`; NaN with a warning where a metric is undefined.
    """
    return _paired_against(
        task, y_true, {"a": score_a, "b": score_b}, "a", ["b"], metrics, bootstrap, seed, threshold
    )["b"]


def _paired_against(
    task: str,
    y_true: Any,
    scores: Mapping[str, Any],
    model: str,
    baselines: Sequence[str],
    metrics: Sequence[str] | None,
    bootstrap: int,
    seed: int,
    threshold: float,
) -> dict[str, dict[str, PairedDifference]]:
    """Baseline -> metric -> `PairedDifference` of `model` minus it; `model` is scored once."""
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be 0 (no intervals) or a number of resamples, not {bootstrap}.")
    specs = _specs(task, metrics)
    encoded = {}
    for name in [model, *baselines]:
        y_true, score, pred = prepare_inputs(task, y_true, scores[name], threshold)
        if task in TASKS and name != model and score.shape != encoded[model][0].shape:
            raise ValueError(
                f"paired comparison: the scores of {name} {score.shape} and {model} "
                f"{encoded[model][0].shape} differ in shape."
            )
        encoded[name] = (score, pred)
    n = len(y_true)
    settings = {"n_examples": n, "bootstrap": bootstrap, "seed": seed}
    undefined = {s.name: PairedDifference(s.name, math.nan, math.nan, math.nan, **settings) for s in specs}
    broken = set()
    if n == 0:
        warn_undefined("every paired difference", "the split is empty (0 examples)", stacklevel=3)
        broken = set(encoded)
    elif task in TASKS:
        if not np.isfinite(y_true).all():
            broken = set(encoded)
        broken |= {name for name, (score, _) in encoded.items() if not np.isfinite(score).all()}
        if broken:
            warn_undefined(
                f"every paired difference with {', '.join(b for b in baselines if {b, model} & broken)}",
                "y_true or a model's scores contain NaN or infinite values",
                stacklevel=3,
            )
    if model in broken:
        return {b: {s.name: undefined[s.name] for s in specs} for b in baselines}
    inputs = {
        name: [pred if spec.input == "label" else score for spec in specs]
        for name, (score, pred) in encoded.items()
        if name not in broken
    }
    values = {
        name: [float(s.fn(y_true, x)) for s, x in zip(specs, xs, strict=True)] for name, xs in inputs.items()
    }
    active = [i for i, value in enumerate(values[model]) if math.isfinite(value)]  # as `evaluate`, only these
    resampled: dict[int, dict[str, np.ndarray]] = {}
    if bootstrap and active:
        chosen = {name: [xs[i] for i in active] for name, xs in inputs.items()}
        drawn = _resampled([specs[i] for i in active], y_true, chosen, resample_indices(n, bootstrap, seed))
        resampled = {i: {name: drawn[name][k] for name in drawn} for k, i in enumerate(active)}
    out: dict[str, dict[str, PairedDifference]] = {}
    for name in baselines:
        if name in broken:
            out[name] = {s.name: undefined[s.name] for s in specs}
            continue
        out[name] = {}
        for i, spec in enumerate(specs):
            a, b = values[model][i], values[name][i]
            point = PairedDifference(spec.name, a, b, a - b, **settings)
            if i in resampled and math.isfinite(point.difference):
                point = _summary(point, resampled[i][model] - resampled[i][name])
            out[name][spec.name] = point
    return out


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values, in the input order.

    The i-th smallest of m p-values becomes max over j <= i of min(1, (m - j + 1) p_(j)). NaN entries
    stay NaN and are not counted in m (as R's `p.adjust`).
    """
    p = np.asarray(list(p_values), dtype=float).ravel()
    finite = np.flatnonzero(~np.isnan(p))
    if ((p[finite] < 0) | (p[finite] > 1)).any():
        raise ValueError(f"holm: p-values must lie in [0, 1]; got {p[finite].tolist()}.")
    out = np.full(p.shape, math.nan)
    order = finite[np.argsort(p[finite], kind="mergesort")]
    m = order.size
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out.tolist()


@dataclass(frozen=True)
class Comparison:
    """One model against one baseline on one metric.

    Attributes:
        model: The headline model (a in the differences).
        baseline: The baseline (b).
        paired: The paired bootstrap of model - baseline.
        p_holm: Holm-adjusted paired-bootstrap p over the baselines (None with a single baseline).
        delong: DeLong's test, for AUROC on a binary task, else None.
        delong_p_holm: Holm-adjusted DeLong p over the baselines (None with a single baseline).
    """

    model: str
    baseline: str
    paired: PairedDifference
    p_holm: float | None = None
    delong: DeLongResult | None = None
    delong_p_holm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The paired fields, `p_holm` when adjusted, and `delong` (with its `p_holm`) when tested."""
        paired = self.paired
        row: dict[str, Any] = {
            "value_model": paired.value_a,
            "value_baseline": paired.value_b,
            **{k: getattr(paired, k) for k in ("difference", "low", "high", "standard_error", "p_value")},
            "skipped": paired.skipped,
        }
        if self.p_holm is not None:
            row["p_holm"] = self.p_holm
        if self.delong is not None:
            row["delong"] = self.delong.to_dict()
            if self.delong_p_holm is not None:
                row["delong"]["p_holm"] = self.delong_p_holm
        return row


def compare_models(
    task: str,
    y_true: Any,
    scores: Mapping[str, Any],
    model: str,
    baselines: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict[str, dict[str, Comparison]]:
    """`model` against each baseline: paired bootstrap per metric, DeLong for a binary AUROC, Holm.

    Args:
        task: A task as in `evaluate`.
        y_true: Labels or targets shared by every model.
        scores: Model name -> scores on the same examples.
        model: The headline model.
        baselines: Models to compare with; None for every other model in `scores`.
        metrics: Registered metric names; None for the task's default set.
        bootstrap: Resamples (the same indices for every pair).
        seed: Seed of the resampling generator.
        threshold: Probability threshold for label metrics.

    Returns:
        Baseline -> metric -> `Comparison`. With more than one baseline, each metric's p-values (and
        DeLong's, separately) are Holm-adjusted over the baselines.
    """
    if model not in scores:
        raise ValueError(f"compare_models: model {model!r} has no scores (have: {', '.join(scores)}).")
    baselines = [name for name in scores if name != model] if baselines is None else list(baselines)
    missing = [name for name in baselines if name not in scores]
    if missing:
        raise ValueError(f"compare_models: baselines {missing} have no scores (have: {', '.join(scores)}).")
    names = [spec.name for spec in _specs(task, metrics)]
    paired = _paired_against(task, y_true, scores, model, baselines, names, bootstrap, seed, threshold)
    delong = {}
    if task == "binary" and "auroc" in names:
        delong = {name: delong_test(y_true, scores[model], scores[name]) for name in baselines}
    adjust = len(baselines) > 1
    out: dict[str, dict[str, Comparison]] = {name: {} for name in baselines}
    for metric in names:
        p_holm = holm([paired[name][metric].p_value for name in baselines]) if adjust else None
        d_holm = holm([delong[name].p_value for name in baselines]) if adjust and delong else None
        for i, name in enumerate(baselines):
            with_delong = metric == "auroc" and bool(delong)
            out[name][metric] = Comparison(
                model,
                name,
                paired[name][metric],
                None if p_holm is None else p_holm[i],
                delong[name] if with_delong else None,
                None if d_holm is None or not with_delong else d_holm[i],
            )
    return out
