"""The report's `comparisons` section: the headline model against each baseline on the same test examples."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.core.evaluation.evaluate import EvaluationReport
from pipelines.core.evaluation.metrics import as_numpy
from pipelines.core.evaluation.paired import P_VALUE_DEFINITION, compare_models
from pipelines.core.evaluation.registry import get_metric, list_metrics

if TYPE_CHECKING:
    from pipelines.core.evaluation.report import RunResult


# extra.<this>: a fraction sweep's comparisons at each fraction below the largest, {"10%": section, ...}
BY_FRACTION = "comparisons_by_fraction"


def _label_mismatch(labels: Any, reference: Any, primary: str) -> str | None:
    """Why `labels` are not provably the test labels of `primary`, or None when they are equal."""
    try:
        labels, reference = as_numpy(labels), as_numpy(reference)
    except (TypeError, ValueError):  # ragged labels (e.g. sequences) have no array form to compare
        return f"its test labels cannot be compared element-wise with those of {primary}"
    if labels.shape != reference.shape:
        return f"its test labels differ from those of {primary}"
    floating = np.issubdtype(labels.dtype, np.floating) or np.issubdtype(reference.dtype, np.floating)
    # regression targets may come back as float32 from one model and float64 from another
    same = (
        np.allclose(labels, reference, rtol=1e-6, atol=0) if floating else np.array_equal(labels, reference)
    )
    return None if same else f"its test labels differ from those of {primary}"


def run_comparisons(result: RunResult) -> dict[str, Any]:
    """The `comparisons` payload of a run, or {} when the primary model has no competitor.

    Competitors are the other models in `result.results` except `info["extra"]["reference_models"]`.
    Each one with test predictions whose y_true equals the primary model's is compared on the primary
    model's metrics that are registered for the task (paired bootstrap with the primary report's
    resamples and seed, else 1000 and 0; DeLong for a binary AUROC; Holm over several baselines).
    """
    primary = result.primary_model
    references = list((result.info.get("extra") or {}).get("reference_models") or [])
    competitors = [name for name in result.results if name != primary and name not in references]
    if not competitors:
        return {}
    report = result.results[primary]
    evaluated = isinstance(report, EvaluationReport)
    bootstrap, seed = (report.bootstrap, report.seed) if evaluated else (1000, 0)
    threshold = report.threshold if evaluated and report.threshold is not None else 0.5
    registered = set(list_metrics(result.task))  # a metric computed outside the registry has no paired form
    metrics = [name for name in report if name in registered]
    not_compared: dict[str, str] = {}
    baselines: list[str] = []
    if primary not in result.predictions:
        not_compared = {name: f"the primary model {primary} has no test predictions" for name in competitors}
    else:
        y_true = result.predictions[primary][0]
        for name in competitors:
            if name not in result.predictions:
                not_compared[name] = "no test predictions"
            elif reason := _label_mismatch(result.predictions[name][0], y_true, primary):
                not_compared[name] = reason
            else:
                baselines.append(name)
    section: dict[str, Any] = {
        "model": primary,
        "baselines": baselines,
        "metrics": metrics,
        "n_examples": len(result.predictions[primary][0]) if primary in result.predictions else 0,
        "bootstrap": bootstrap,
        "seed": seed,
        "p_value": P_VALUE_DEFINITION,
        "adjustment": "holm" if len(baselines) > 1 else None,
        "excluded": [name for name in references if name in result.results and name != primary],
        "not_compared": not_compared,
        "results": {},
    }
    if baselines and metrics:
        scores = {name: result.predictions[name][1] for name in [primary, *baselines]}
        try:
            compared = compare_models(
                result.task, y_true, scores, primary, baselines, metrics, bootstrap, seed, threshold
            )
        except (ValueError, TypeError) as error:  # the report keeps its numbers and says why
            warnings.warn(f"build_report: the paired comparisons failed ({error}).", stacklevel=3)
            section["error"] = str(error)
            return section
        section["results"] = {
            name: {metric: comparison.to_dict() for metric, comparison in rows.items()}
            for name, rows in compared.items()
        }
    return section


def _greater_is_better(metric: str) -> bool:
    try:
        return get_metric(metric).greater_is_better
    except ValueError:  # a metric not registered in this process: assume higher is better, as the runner
        return True


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def best_baseline_comparison(payload: Mapping[str, Any], baselines: Sequence[str] = ()) -> dict | None:
    """The headline metric's comparison against the best compared baseline of a report.json payload.

    Best is the baseline with the best headline value in `payload["results"]`, in the direction of the
    metric registry's `greater_is_better`; `baselines` (e.g. a recipe's `compare`) restricts the choice.

    Returns:
        {"model", "baseline", "metric", "baseline_value", "n_baselines", then the comparison's fields}
        or None when the report has no comparison of the headline metric.
    """
    section = payload.get("comparisons") or {}
    metric = payload["headline"]["metric"]
    compared = {
        name: rows[metric]
        for name, rows in (section.get("results") or {}).items()
        if metric in rows and (not baselines or name in baselines)
    }
    table = payload.get("results") or {}
    values = {name: ((table.get(name) or {}).get(metric) or {}).get("value") for name in compared}
    values = {name: value for name, value in values.items() if _finite(value)}
    if not values:
        return None
    sign = 1.0 if _greater_is_better(metric) else -1.0
    best = max(values, key=lambda name: sign * values[name])
    return {
        "model": section.get("model"),
        "baseline": best,
        "metric": metric,
        "baseline_value": values[best],
        "n_baselines": len(section.get("baselines") or []),
        **compared[best],
    }
