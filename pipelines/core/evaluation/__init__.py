"""Evaluation: metric functions, a metric registry, `evaluate` with bootstrap intervals, reports and plots.

Importing this package pulls in numpy only; scikit-learn and matplotlib load when a report is written.
"""

from __future__ import annotations

from pipelines.core.evaluation.comparisons import best_baseline_comparison
from pipelines.core.evaluation.delong import DeLongResult, delong_test
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
from pipelines.core.evaluation.paired import (
    Comparison,
    PairedDifference,
    compare_models,
    holm,
    paired_bootstrap,
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
    "Comparison",
    "DeLongResult",
    "EvaluationReport",
    "MetricResult",
    "MetricSpec",
    "PairedDifference",
    "RunResult",
    "UndefinedMetricWarning",
    "accuracy",
    "as_numpy",
    "auprc",
    "auroc",
    "balanced_accuracy",
    "best_baseline_comparison",
    "bootstrap_mean",
    "compare_models",
    "default_metrics",
    "delong_test",
    "evaluate",
    "f1",
    "get_metric",
    "holm",
    "list_metrics",
    "mae",
    "mcc",
    "mse",
    "package_versions",
    "paired_bootstrap",
    "pearson",
    "perplexity",
    "prepare_inputs",
    "register_metric",
    "spearman",
    "to_jsonable",
    "write_json_atomic",
    "write_report",
]
