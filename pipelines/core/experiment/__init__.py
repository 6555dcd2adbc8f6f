"""The experiment engine: what a recipe means, written once; domains supply hooks (see ``hooks.py``)."""

from __future__ import annotations

from pipelines.core.experiment.accounting import headline_metric, parameter_count, peak_memory_bytes
from pipelines.core.experiment.engine import compare_label, primary_label, run_experiment, train_candidate
from pipelines.core.experiment.hooks import ExperimentData, ExperimentHooks, Outcome, StagePlan, Trained

__all__ = [
    "ExperimentData", "ExperimentHooks", "Outcome", "StagePlan", "Trained", "compare_label",
    "headline_metric", "parameter_count", "peak_memory_bytes", "primary_label", "run_experiment",
    "train_candidate",
]  # fmt: skip
