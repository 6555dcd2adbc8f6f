"""Run reports: `RunResult` and `write_report`, which writes report.json, report.md and PNG plots."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core.evaluation.comparisons import run_comparisons
from pipelines.core.evaluation.evaluate import EvaluationReport, MetricResult
from pipelines.core.evaluation.plots import write_plots
from pipelines.core.files import write_text_atomic

REPORT_SCHEMA = Path(__file__).with_name("report.schema.json")  # the JSON Schema of report.json
INFO_KEYS = ("backbone", "adapter", "dataset", "cost", "notes", "extra")
REPORT_KEYS = (
    "name", "pipeline", "task", "headline", "results", "comparisons", "parameters",
    "backbone", "adapter", "dataset", "cost", "versions", "notes", "extra",
)  # fmt: skip

# Distribution names, looked up with importlib.metadata so nothing heavy is imported to learn a version.
_PACKAGES = (
    "peft-pipelines", "numpy", "scipy", "scikit-learn", "matplotlib", "torch", "safetensors", "pydantic",
    "transformers", "timm", "monai", "fair-esm", "torchaudio", "peft",
)  # fmt: skip


@dataclass
class RunResult:
    """Everything a pipeline run reports.

    Attributes:
        name: Run (recipe) name, the report title.
        pipeline: Registered pipeline name, e.g. "imaging/classification".
        task: Evaluation task ("binary", "multiclass", "multilabel", "regression", ...).
        headline_metric: The metric the report leads with, e.g. "auroc".
        primary_model: The model label the headline is about, e.g. "lora".
        results: Model label -> `EvaluationReport` (or a mapping metric -> MetricResult / dict / float).
        predictions: Model label -> (y_true, y_score) on the test split, for the plots and the paired
            comparisons of the primary model with each baseline scored on the same examples.
        parameters: Model label -> `ParameterCount` or {"trainable", "total", "fraction"}.
        histories: Model label -> training rows ({"step", "loss"} and {"step", "val_loss"}).
        info: backbone {name, source, weights}, adapter {method, spec, file_size_bytes}, dataset {name,
            splits, sha256}, cost {wall_time_s, peak_memory_bytes, samples_per_second}, notes [str], extra
            (its optional "reference_models" list names rows that are references, not competitors).
    """

    name: str
    pipeline: str
    task: str
    headline_metric: str
    primary_model: str
    results: dict[str, Any]
    predictions: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    histories: dict[str, list[dict]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.primary_model not in self.results:
            raise ValueError(
                f"RunResult {self.name!r}: primary_model {self.primary_model!r} is not in results "
                f"(models: {', '.join(self.results) or 'none'}); add its evaluation or name another model."
            )
        if self.headline_metric not in _metric_table(self.results[self.primary_model]):
            raise ValueError(
                f"RunResult {self.name!r}: headline metric {self.headline_metric!r} is not in the results of "
                f"{self.primary_model!r}; evaluate it or choose one of "
                f"{', '.join(_metric_table(self.results[self.primary_model]))}."
            )
        unknown = sorted(set(self.info) - set(INFO_KEYS))
        if unknown:
            raise ValueError(
                f"RunResult {self.name!r}: info has unknown keys {unknown}; use {', '.join(INFO_KEYS)} "
                "(anything else goes under info['extra'])."
            )


def to_jsonable(obj: Any, where: str = "value") -> Any:
    """Convert to JSON types: NaN and infinities become None, numpy and tensors become lists and numbers."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item(), where)
    if isinstance(obj, np.ndarray) or hasattr(obj, "detach"):
        from pipelines.core.evaluation.metrics import as_numpy

        return to_jsonable(as_numpy(obj).tolist(), where)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, EvaluationReport):
        return to_jsonable(obj.to_dict(), where)
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(value, f"{where}.{key}") for key, value in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(value, f"{where}[{i}]") for i, value in enumerate(obj)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj), where)
    if hasattr(obj, "model_dump"):  # pydantic models (recipe sections)
        return to_jsonable(obj.model_dump(), where)
    raise TypeError(
        f"{where} of type {type(obj).__name__} cannot be written as JSON; convert it to a number, string, "
        "list or dict first."
    )


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON (via `to_jsonable`, so NaN becomes null) to a temp file, then rename."""
    text = json.dumps(to_jsonable(obj, Path(path).name), indent=2, allow_nan=False, ensure_ascii=False)
    return write_text_atomic(Path(path), text + "\n")


def package_versions() -> dict[str, str]:
    """Python, platform and the versions of the installed packages that matter, without importing them."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    torch = sys.modules.get("torch")  # only when already imported: CUDA details are free then
    if torch is not None and getattr(torch.version, "cuda", None):
        versions["cuda"] = torch.version.cuda
    return versions


def _metric_table(report: Any) -> dict[str, dict[str, float]]:
    """{metric: {value, low, high}} from an EvaluationReport or a mapping of results or plain numbers."""
    table = {}
    for metric, result in report.items():
        if isinstance(result, MetricResult):
            table[metric] = result.to_dict()
        elif isinstance(result, Mapping):
            table[metric] = {key: float(_nan(result.get(key))) for key in ("value", "low", "high")}
        else:
            table[metric] = {"value": float(result), "low": math.nan, "high": math.nan}
    return table


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def _parameter_dict(count: Any) -> dict[str, Any]:
    if isinstance(count, Mapping):
        values = dict(count)
    elif dataclasses.is_dataclass(count):
        values = dataclasses.asdict(count)
    elif hasattr(count, "_asdict"):
        values = count._asdict()
    else:
        values = {
            key: getattr(count, key) for key in ("trainable", "total", "fraction") if hasattr(count, key)
        }
    if "fraction" not in values and values.get("total"):
        values["fraction"] = values["trainable"] / values["total"]
    return {key: values.get(key) for key in ("trainable", "total", "fraction")}


def _greater_is_better(metric: str) -> bool | None:
    from pipelines.core.evaluation.registry import get_metric

    try:
        return get_metric(metric).greater_is_better
    except ValueError:  # a metric only the pipeline knows; the index then asks the registry itself
        return None


def build_report(result: RunResult) -> dict[str, Any]:
    """The report.json payload (not yet JSON-converted)."""
    results = {model: _metric_table(report) for model, report in result.results.items()}
    headline = results[result.primary_model][result.headline_metric]
    extra = dict(result.info.get("extra") or {})
    evaluation = {
        model: {key: value for key, value in report.to_dict().items() if key != "metrics"}
        for model, report in result.results.items()
        if isinstance(report, EvaluationReport)
    }
    if evaluation:
        extra.setdefault("evaluation", evaluation)
    return {
        "name": result.name,
        "pipeline": result.pipeline,
        "task": result.task,
        "headline": {
            "metric": result.headline_metric,
            "model": result.primary_model,
            **headline,
            "greater_is_better": _greater_is_better(result.headline_metric),
        },
        "results": results,
        "comparisons": run_comparisons(result),
        "parameters": {model: _parameter_dict(count) for model, count in result.parameters.items()},
        "backbone": dict(result.info.get("backbone") or {}),
        "adapter": dict(result.info.get("adapter") or {}),
        "dataset": dict(result.info.get("dataset") or {}),
        "cost": dict(result.info.get("cost") or {}),
        "versions": package_versions(),
        "notes": [str(note) for note in result.info.get("notes") or []],
        "extra": extra,
    }


def write_report(run_dir: str | os.PathLike, result: RunResult) -> list[Path]:
    """Write report.json, report.md and the plots that apply into `run_dir`; return the paths written."""
    from pipelines.core.evaluation.report_markdown import render_markdown

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = to_jsonable(build_report(result), "report.json")  # markdown and JSON show the same values
    try:
        plots = write_plots(run_dir, result.task, result.predictions, result.histories, result.primary_model)
    except Exception as error:  # a broken plot must not lose the numbers; it is said in the report
        warnings.warn(
            f"write_report: drawing the plots failed ({error!r}); the report has none.", stacklevel=2
        )
        payload["notes"].append(f"Plots could not be drawn: {error!r}.")
        plots = []
    paths = [write_json_atomic(run_dir / "report.json", payload)]
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    paths.append(write_text_atomic(run_dir / "report.md", render_markdown(payload, plots, created)))
    return paths + [run_dir / name for name in plots]
