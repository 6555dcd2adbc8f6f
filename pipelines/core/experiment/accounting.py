"""The numbers every report states the same way: headline metric, parameter counts and cost."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import torch
from torch import nn

from pipelines.core.peft import spec_to_dict

__all__ = ["Laps", "adapter_entry", "headline_metric", "parameter_count", "peak_memory_bytes", "cost"]


def headline_metric(recipe: Any, primary_results: Any) -> str:
    """``evaluation.headline``, else the first of ``evaluation.metrics``, else the first metric scored."""
    evaluation = recipe.evaluation
    return evaluation.headline or (
        evaluation.metrics[0] if evaluation.metrics else next(iter(primary_results))
    )


def parameter_count(model: nn.Module, trained: set[str]) -> dict[str, Any]:
    """Trainable = parameters any stage trained; total = every parameter of the model (shared ones once)."""
    unique: dict[int, tuple[str, nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        unique.setdefault(id(parameter), (name, parameter))
    total = sum(p.numel() for _, p in unique.values())
    trainable = sum(p.numel() for name, p in unique.values() if name in trained)
    return {"trainable": trainable, "total": total, "fraction": trainable / total if total else 0.0}


def peak_memory_bytes() -> int:
    """Peak CUDA memory allocated when on a GPU, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class Laps:
    """Wall and CPU seconds of each phase of a run (CPU time tells its cost apart from other jobs' load)."""

    def __init__(self) -> None:
        self.phases: dict[str, Any] = {"models": {}}
        self._mark = (time.perf_counter(), time.process_time())

    def lap(self, name: str, model: bool = False) -> None:
        """Close the phase ``name`` (under ``models`` when it trained and scored one model)."""
        wall, cpu = time.perf_counter(), time.process_time()
        seconds = {"wall_s": round(wall - self._mark[0], 2), "cpu_s": round(cpu - self._mark[1], 2)}
        (self.phases["models"] if model else self.phases)[name] = seconds
        self._mark = (wall, cpu)


def cost(models: dict[str, Any], primary: str, started: float, laps: Laps) -> dict[str, Any]:
    """Wall time, peak memory, the primary model's training throughput, each model's training time and the
    phases of the run (``laps``)."""
    results = models[primary].results
    seconds = sum(r.wall_time_s for r in results)
    samples = sum(r.samples_per_second * r.wall_time_s for r in results)
    return {
        "wall_time_s": round(time.perf_counter() - started, 2),
        "peak_memory_bytes": peak_memory_bytes(),
        "samples_per_second": samples / seconds if seconds else None,
        "train_time_s": {
            label: round(sum(r.wall_time_s for r in m.results), 2) for label, m in models.items()
        },
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "phases": laps.phases,
    }


def adapter_entry(recipe: Any, adapters: dict[str, Any]) -> dict[str, Any]:
    """The report's ``adapter``: the last stage's method and spec, the folder the primary model's last
    adapter was saved to (``adapters``: stage name -> folder) and the size of its tensor files, the stages,
    and every adapter stage's spec (``specs``) and folder (``directories``)."""
    final = recipe.stages[-1]
    stages = [stage.name for stage in recipe.stages]
    entry: dict[str, Any] = {"method": "head only", "stages": stages}
    specs = {stage.name: spec_to_dict(stage.adapter) for stage in recipe.stages if stage.adapter is not None}
    if specs:
        entry["specs"] = specs
        entry["directories"] = {name: str(folder) for name, folder in adapters.items()}
    if final.adapter is None:
        return entry
    entry.update(method=final.adapter.method, spec=specs[final.name])
    folder = adapters.get(final.name)
    if folder is not None:
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        entry.update(directory=str(folder), file_size_bytes=size)
    return entry
