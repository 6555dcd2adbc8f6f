"""A low-data sweep: the whole experiment once per training fraction (a domain's ``sweep_fractions``).

Each fraction is one engine run (``data.fraction`` replaced) in ``fraction-<n>pct/`` of the run folder, on
the same loaded data; its adapters move to ``adapters/<stage>-<n>pct/``, where ``export`` finds them. The
runs merge into one RunResult: every label gets ``@<n>%``, the headline is the primary model at the
largest fraction (whose test predictions the plots and the top-level paired comparisons use; each
smaller fraction's models are paired in ``extra.comparisons_by_fraction``), and
``dataset.train_sizes_per_fraction`` gives the training images at each fraction.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from pipelines.core.evaluation import RunResult
from pipelines.core.evaluation.comparisons import BY_FRACTION, run_comparisons
from pipelines.core.experiment import run_experiment

__all__ = ["run_sweep", "percent"]

LABELLED_EXTRA = ("models",)  # extra entries keyed by model label


def percent(fraction: float) -> str:
    """``0.1`` -> ``'10%'``."""
    return f"{fraction * 100:g}%"


def run_sweep(hooks: Any, recipe: Any, fractions: list[float], run_dir: Path, resume: bool) -> RunResult:
    """Run ``recipe`` at each fraction with the same ``hooks`` and merge the runs (module docstring)."""
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"sweep fraction {fraction}: every fraction must be in (0, 1]")
    started = time.perf_counter()
    runs: dict[float, RunResult] = {}
    for fraction in fractions:
        at = recipe.model_copy(update={"data": recipe.data.model_copy(update={"fraction": fraction})})
        hooks.recipe = at
        folder = run_dir / f"fraction-{_slug(fraction)}"
        runs[fraction] = run_experiment(hooks, at, folder, resume)
        _move_adapters(runs[fraction], folder, run_dir, _slug(fraction))
    hooks.recipe = recipe
    return _merge(runs, time.perf_counter() - started)


def _slug(fraction: float) -> str:
    return percent(fraction).replace("%", "pct")


def _move_adapters(run: RunResult, folder: Path, run_dir: Path, slug: str) -> None:
    """``folder/adapters/<stage>`` -> ``run_dir/adapters/<stage>-<slug>`` (the path in the report too)."""
    adapter = run.info.get("adapter") or {}
    for saved in sorted((folder / "adapters").glob("*")) if (folder / "adapters").is_dir() else []:
        target = run_dir / "adapters" / f"{saved.name}-{slug}"
        if target.exists():  # a resumed sweep saves its adapters again
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        saved.rename(target)
        if adapter.get("directory") == str(saved):
            adapter["directory"] = str(target)
        for stage, directory in adapter.get("directories", {}).items():
            if directory == str(saved):
                adapter["directories"][stage] = str(target)
    if (folder / "adapters").is_dir():
        (folder / "adapters").rmdir()


def _merge(runs: dict[float, RunResult], wall_time_s: float) -> RunResult:
    top = max(runs)
    last = runs[top]

    def tagged(field: str, only: float | None = None) -> dict[str, Any]:
        return {f"{label}@{percent(f)}": value for f, run in runs.items() if only in (None, f)
                for label, value in getattr(run, field).items()}  # fmt: skip

    return RunResult(
        name=last.name, pipeline=last.pipeline, task=last.task, headline_metric=last.headline_metric,
        primary_model=f"{last.primary_model}@{percent(top)}", results=tagged("results"),
        predictions=tagged("predictions", top), parameters=tagged("parameters"),
        histories=tagged("histories"), info=_merged_info(runs, top, wall_time_s),
    )  # fmt: skip


def _merged_info(runs: dict[float, RunResult], top: float, wall_time_s: float) -> dict[str, Any]:
    info = runs[top].info
    dataset = dict(info["dataset"])
    sizes = {percent(f): r.info["dataset"]["splits"]["train"] for f, r in runs.items()}
    dataset["train_sizes_per_fraction"] = sizes
    extra = dict(info["extra"])
    for key in LABELLED_EXTRA:
        extra[key] = {f"{label}@{percent(f)}": value for f, r in runs.items()
                      for label, value in r.info["extra"].get(key, {}).items()}  # fmt: skip
    extra["sweep_fractions"] = list(runs)
    # The top-level comparisons pair the models at the largest fraction; each smaller one is paired here,
    # on its own run's predictions (the same test examples), which the merged result does not keep.
    extra[BY_FRACTION] = {percent(f): run_comparisons(r) for f, r in runs.items() if f != top}
    extra["adapters"] = {f"{r.info['adapter']['stages'][-1]}@{percent(f)}": r.info["adapter"]
                         for f, r in runs.items() if r.info.get("adapter")}  # fmt: skip
    cost = dict(info["cost"])
    cost.update(
        wall_time_s=round(wall_time_s, 2),
        peak_memory_bytes=max(r.info["cost"]["peak_memory_bytes"] for r in runs.values()),
        train_time_s={f"{label}@{percent(f)}": seconds for f, r in runs.items()
                      for label, seconds in r.info["cost"]["train_time_s"].items()},
        phases={percent(f): r.info["cost"]["phases"] for f, r in runs.items()},
    )  # fmt: skip
    return {**info, "dataset": dataset, "cost": cost, "notes": _merged_notes(runs), "extra": extra}


def _merged_notes(runs: dict[float, RunResult]) -> list[str]:
    """Every fraction's notes once; a note that only some fractions have says which."""
    where: dict[str, list[str]] = {}
    for fraction, run in runs.items():
        for note in run.info["notes"]:
            where.setdefault(note, []).append(percent(fraction))
    return [note if len(at) == len(runs) else f"At {', '.join(at)}: {note}" for note, at in where.items()]
