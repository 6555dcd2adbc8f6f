"""Repeated seeds: one recipe run once per seed, summarised per model with the spread across seeds.

Each repeat replaces ``recipe.seed``, which reseeds training (initialisation, data order, dropout), the
low-data draw and any split a pipeline cuts itself; published splits stay fixed. Per model and metric
the summary gives the mean over seeds and, when every seed scored the same test examples, a pooled 95%
interval: the same bootstrap resamples of the test set scored for every seed, the seed-mean taken on
each resample. For the headline metric it counts the seeds on which the primary model beat each
baseline and gives the pooled paired difference (seed-mean of the per-resample differences, with the
centred two-sided p-value of the paired bootstrap).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipelines.core.evaluation import EvaluationReport, MetricResult, RunResult, get_metric, prepare_inputs
from pipelines.core.evaluation.comparisons import BY_FRACTION
from pipelines.core.evaluation.evaluate import bootstrap_values
from pipelines.core.evaluation.report_markdown import format_p, signed_numbers

__all__ = ["SEED_SCOPE", "aggregate_seeds"]

SEED_SCOPE = (
    "each repeat sets recipe.seed: it reseeds training (initialisation, data order, dropout), the low-data "
    "draw and any split the pipeline cuts itself; published test splits stay the same"
)


def _values(report: Any) -> dict[str, float]:
    out = {}
    for metric, result in report.items():
        if isinstance(result, MetricResult):
            out[metric] = result.value
        elif isinstance(result, Mapping):
            out[metric] = math.nan if result.get("value") is None else float(result["value"])
        else:
            out[metric] = float(result)
    return out


def _resampled(run: RunResult, model: str, metric: str, bootstrap: int, seed: int) -> np.ndarray | None:
    """The metric of one seed's model on the shared test resamples, or None when it cannot be redone."""
    report, predictions = run.results.get(model), run.predictions.get(model)
    if predictions is None or not bootstrap:
        return None
    try:
        spec = get_metric(metric)
    except ValueError:
        return None
    threshold = report.threshold if isinstance(report, EvaluationReport) and report.threshold else 0.5
    y_true, y_score, y_pred = prepare_inputs(run.task, *predictions, threshold=threshold)
    chosen = y_pred if spec.input == "label" else y_score
    return bootstrap_values([spec], y_true, [chosen], bootstrap, seed)[0]


def _same_test_set(runs: list[RunResult], model: str) -> bool:
    truths = [run.predictions.get(model, (None,))[0] for run in runs]
    if any(truth is None for truth in truths):
        return False
    try:
        return all(np.array_equal(np.asarray(truth), np.asarray(truths[0])) for truth in truths[1:])
    except ValueError:  # ragged labels (per-residue tasks) that numpy cannot stack
        return False


def _interval(samples: np.ndarray) -> tuple[float, float]:
    valid = samples[np.isfinite(samples)]
    if valid.size < 2:
        return math.nan, math.nan
    low, high = np.percentile(valid, [2.5, 97.5])
    return float(low), float(high)


def _summary(runs: list[RunResult], model: str, bootstrap: int, seed: int) -> dict[str, dict[str, Any]]:
    pooled = _same_test_set(runs, model)
    table = {}
    for metric in _values(runs[0].results[model]):
        values = np.array([_values(run.results[model]).get(metric, math.nan) for run in runs])
        low = high = math.nan
        samples = [_resampled(run, model, metric, bootstrap, seed) for run in runs] if pooled else [None]
        if all(sample is not None for sample in samples):
            low, high = _interval(np.mean(samples, axis=0))
        table[metric] = {
            "value": float(np.mean(values)),
            "low": low,
            "high": high,
            "values": values.tolist(),
            "sd": float(np.std(values, ddof=1)),
            "min": float(values.min()),
            "max": float(values.max()),
        }
    return table


def _pooled_difference(
    runs: list[RunResult], primary: str, baseline: str, metric: str, bootstrap: int, seed: int
) -> dict[str, float]:
    """Interval and p-value of the seed-mean difference over the shared test resamples."""
    pairs = [
        (
            _resampled(run, primary, metric, bootstrap, seed),
            _resampled(run, baseline, metric, bootstrap, seed),
        )
        for run in runs
    ]
    if any(a is None or b is None for a, b in pairs):
        return {}
    differences = np.mean([a - b for a, b in pairs], axis=0)
    low, high = _interval(differences)
    valid = differences[np.isfinite(differences)]
    observed = [
        _values(run.results[primary])[metric] - _values(run.results[baseline])[metric] for run in runs
    ]
    d = float(np.mean(observed))
    extreme = int(np.sum(np.abs(valid - d) >= abs(d) - 1e-12))
    return {"low": low, "high": high, "p_value": (1 + extreme) / (1 + valid.size) if valid.size else math.nan}


def _wins(runs: list[RunResult], primary: str, metric: str, bootstrap: int, seed: int) -> dict[str, Any]:
    sign = 1.0 if get_metric(metric).greater_is_better else -1.0
    references = (runs[0].info.get("extra") or {}).get("reference_models", [])
    out = {}
    for baseline in runs[0].results:
        if baseline == primary or baseline in references:
            continue
        a = np.array([_values(run.results[primary])[metric] for run in runs])
        b = np.array([_values(run.results[baseline]).get(metric, math.nan) for run in runs])
        entry = {
            "metric": metric,
            "won": int(np.sum(sign * (a - b) > 0)),
            "of": len(runs),
            "difference": float(np.mean(a - b)),
            "low": math.nan,
            "high": math.nan,
            "p_value": math.nan,
        }
        if _same_test_set(runs, primary) and _same_test_set(runs, baseline):
            entry.update(_pooled_difference(runs, primary, baseline, metric, bootstrap, seed))
        out[baseline] = entry
    return out


def _notes(seeds: list[int], primary: str, wins: dict[str, Any]) -> list[str]:
    notes = [
        f"Repeated over seeds {seeds}: {SEED_SCOPE}. Each value is the mean over seeds; its interval is "
        "pooled over the same test resamples for every seed. Per-seed reports are in seed-<n>/."
    ]
    for baseline, entry in wins.items():
        difference, low, high = signed_numbers(entry["difference"], entry["low"], entry["high"])
        if low == "n/a" or high == "n/a":  # a model whose test predictions a run does not keep (a sweep's)
            pooled = "seed-mean; no pooled interval: the seeds' test predictions of both are not kept"
        else:
            pooled = f"[{low}, {high}] (seed-mean, pooled paired bootstrap, {format_p(entry['p_value'])})"
        notes.append(
            f"{primary} minus {baseline}: {entry['metric']} {difference} {pooled}; {primary} was ahead on "
            f"{entry['won']} of {entry['of']} seeds."
        )
    return notes


def aggregate_seeds(runs: dict[int, RunResult], bootstrap: int = 1000) -> RunResult:
    """One RunResult summarising the per-seed runs (see the module docstring); per-seed reports stay."""
    seeds, ordered = list(runs), list(runs.values())
    first = ordered[0]
    models = [model for model in first.results if all(model in run.results for run in ordered)]
    tables = {model: _summary(ordered, model, bootstrap, seeds[0]) for model in models}
    results = {
        model: {metric: {key: entry[key] for key in ("value", "low", "high")} for metric, entry in t.items()}
        for model, t in tables.items()
    }
    wins = _wins(ordered, first.primary_model, first.headline_metric, bootstrap, seeds[0])
    extra = dict(first.info.get("extra") or {})
    extra["seeds"] = {"seeds": seeds, "scope": SEED_SCOPE, "per_model": tables, "wins": wins}
    if extra.pop(BY_FRACTION, None) is not None:  # a sweep's pairs at its smaller fractions: every seed's
        extra["seeds"][BY_FRACTION] = {str(s): r.info["extra"][BY_FRACTION] for s, r in runs.items()}
    times = [(run.info.get("cost") or {}).get("wall_time_s") for run in ordered]
    notes = _notes(seeds, first.primary_model, wins) + list(first.info.get("notes") or [])
    info = {
        **first.info,
        "cost": {"wall_time_s": sum(t or 0 for t in times), "per_seed_wall_time_s": times},
        "notes": notes,
        "extra": extra,
    }
    return RunResult(
        first.name, first.pipeline, first.task, first.headline_metric, first.primary_model, results,
        {}, first.parameters, {}, info,
    )  # fmt: skip
