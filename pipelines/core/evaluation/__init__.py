"""Evaluation: metric functions, a metric registry, `evaluate` with bootstrap intervals, reports and plots.

Importing this package pulls in numpy only; scikit-learn and matplotlib load when a report is written.
"""

from __future__ import annotations

from pipelines.core.evaluation.evaluate import (
    EvaluationReport,
    MetricResult,
    bootstrap_mean,
    evaluate,
    prepare_inputs,
)
from pipelines.core.evaluation.metrics import (
    UndefinedMetricWarning,
    accuracy,
    as_numpy,
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
from pipelines.core.evaluation.registry import (
    DEFAULT_METRICS,
    TASKS,
    MetricSpec,
    default_metrics,
    get_metric,
    list_metrics,
    register_metric,
)
from pipelines.core.evaluation.report import (
    RunResult,
    package_versions,
    to_jsonable,
    write_json_atomic,
    write_report,
)

__all__ = [
    "DEFAULT_METRICS",
    "TASKS",
    "EvaluationReport",
    "MetricResult",
    "MetricSpec",
    "RunResult",
    "UndefinedMetricWarning",
    "accuracy",
    "as_numpy",
    "auprc",
    "auroc",
    "balanced_accuracy",
    "bootstrap_mean",
    "default_metrics",
    "evaluate",
    "f1",
    "get_metric",
    "list_metrics",
    "mae",
    "mcc",
    "mse",
    "package_versions",
    "pearson",
    "perplexity",
    "prepare_inputs",
    "register_metric",
    "spearman",
    "to_jsonable",
    "write_json_atomic",
    "write_report",
]
