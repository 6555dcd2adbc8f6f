"""The recipe path of ``clinical/two_stage``: data and splits, the primary stages, the baselines on the
same data, seed and budget, perplexity before and after domain adaptation, adapters and the RunResult."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.clinical.data import (
    Notes,
    load_notes_file,
    mtsamples_task,
    split_notes,
    stratified_subset,
    write_splits,
)
from pipelines.clinical.metrics import perplexity_change
from pipelines.clinical.stages import (
    Stage,
    StageError,
    classification_data,
    describe_notes,
    lm_data,
    load_adapters,
    perplexity_of,
    save_adapters,
    score,
)
from pipelines.core.evaluation import RunResult, evaluate
from pipelines.core.peft import adapter_names, count_parameters, spec_to_dict
from pipelines.core.sampling import low_data_indices

__all__ = ["run_recipe_pipeline", "load_recipe_notes", "choose_splits"]


def load_recipe_notes(pipe: Any) -> Notes:
    """Read the recipe's dataset: MTSamples (``data.options.task_name``) or a notes file."""
    recipe, data = pipe.recipe, pipe.options.data
    if recipe.data.dataset == "mtsamples":
        notes = mtsamples_task(data.task_name, num_classes=data.num_classes)
    else:
        notes = load_notes_file(recipe.data.dataset, task=recipe.data.task, **pipe.columns)
    if recipe.data.task is not None and recipe.data.task != notes.task:
        raise StageError(
            f"data.task is '{recipe.data.task}' but the notes make a {notes.task} task "
            f"({recipe.data.dataset}, {data.task_name}); set data.task: {notes.task}"
        )
    return notes


def _low_data(indices: np.ndarray, notes: Notes, fraction: float, shots: int | None, seed: int) -> np.ndarray:
    """The core's stratified low-data draw (label sets are the classes of a multilabel task)."""
    if shots is not None and notes.task == "multilabel":
        raise StageError(
            "data.shots_per_class is for binary and multiclass tasks; use max_train for multilabel"
        )
    labels = [tuple(np.atleast_1d(notes.labels[i]).tolist()) for i in indices]
    return indices[low_data_indices(len(indices), labels, fraction, shots, seed)]


def choose_splits(pipe: Any, notes: Notes) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Return (full seeded splits, the subsets used after fraction / shots / caps)."""
    recipe, data = pipe.recipe, pipe.options.data
    full = split_notes(notes, data.split, seed=recipe.seed)
    for name in ("train", "test"):
        if name not in full or len(full[name]) == 0:
            raise StageError(f"data.options.split gives no '{name}' notes; give it a positive fraction")
    train = full["train"]
    train = _low_data(train, notes, recipe.data.fraction, recipe.data.shots_per_class, recipe.seed)
    used = {
        "train": stratified_subset(train, notes, data.max_train, recipe.seed),
        "test": stratified_subset(full["test"], notes, data.max_test, recipe.seed),
    }
    if "val" in full and len(full["val"]):
        used["val"] = stratified_subset(full["val"], notes, data.max_val, recipe.seed)
    return full, used


class _Clock:
    """Wall and CPU seconds per phase (CPU time tells the cost apart from other processes' load)."""

    def __init__(self) -> None:
        self.laps: dict[str, dict[str, float]] = {}
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.laps[name] = {"wall_s": round(wall - self.wall, 2), "cpu_s": round(cpu - self.cpu, 2)}
        self.wall, self.cpu = wall, cpu


def _peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _history(results: dict[str, Any], objective: dict[str, str]) -> list[dict]:
    rows = []
    for name, result in results.items():
        rows += [{**row, "stage": name, "objective": objective[name]} for row in result.history]
    return rows


def _throughput(results: dict[str, Any]) -> float:
    seconds = sum(r.wall_time_s for r in results.values())
    samples = sum(r.samples_per_second * r.wall_time_s for r in results.values())
    return samples / seconds if seconds else 0.0


def _baseline_stages(pipe: Any, name: str) -> list[Stage]:
    heads = [s for s in pipe.stages if s.objective == "classification"]
    if name == "head_only":
        first = heads[0]
        return [Stage("head", "classification", None, [], first.train, first.options)]
    added: list[str] = []
    stages = []
    for stage in heads:
        if stage.adapter is not None:
            added.append(stage.name)
        trainable = [n for n in stage.trainable if n in added]
        stages.append(
            Stage(stage.name, stage.objective, stage.adapter, trainable, stage.train, stage.options)
        )
    if not added:
        raise StageError("compare: single_stage_lora needs a classification stage with an adapter")
    return stages


def run_recipe_pipeline(pipe: Any, run_dir: Path, resume: bool) -> RunResult:
    """Run everything a recipe asks for and return the RunResult (the runner writes the report)."""
    started = time.perf_counter()
    recipe = pipe.recipe
    notes = load_recipe_notes(pipe)
    full, used = choose_splits(pipe, notes)
    write_splits(run_dir, notes, used, recipe.seed)
    pipe.class_names = notes.class_names
    clock = _Clock()
    backbone = pipe.backbone
    clock.lap("load_backbone")
    tokenizer, pad = backbone.tokenizer, int(backbone.tokenizer.pad_token_id)
    batch = pipe.options.data.eval_batch_size
    model = pipe.new_model(len(notes.class_names))
    cls_options = pipe.classification_options
    need_val = any(s.train.early_stopping_patience or s.train.eval_every for s in pipe.stages)
    sets = {
        split: classification_data(model, tokenizer, notes.subset(used[split]), cls_options.max_length, batch)
        for split in ("train", "test") + (("val",) if need_val and "val" in used else ())
    }
    lm_stages = [s for s in pipe.stages if s.objective == "causal_lm"]
    lm_sets, ppl, ppl_change, results, notes_out = {}, {}, {}, {}, []
    if lm_stages:
        length = lm_stages[0].options.max_length
        train_texts = notes.subset(full["train"]).texts
        for stage in lm_stages:
            if stage.options.max_length not in lm_sets:
                lm_sets[stage.options.max_length] = lm_data(
                    model, tokenizer, train_texts, stage.options.max_length, stage.options.max_blocks, batch
                )
        held_out = lm_data(
            model, tokenizer, notes.subset(full["test"]).texts, length, lm_stages[0].options.eval_blocks
        )
    clock.lap("tensors")  # tokenising and the cached prefix states
    if lm_stages:
        ppl["base_lm"] = perplexity_of(model, held_out, batch, recipe.evaluation.bootstrap, recipe.seed)

    def after_lm_stage(stage: Stage) -> None:
        after = perplexity_of(model, held_out, batch, recipe.evaluation.bootstrap, recipe.seed)
        ppl[f"after_{stage.name}"] = after
        change = perplexity_change(ppl["base_lm"], after, recipe.evaluation.bootstrap, recipe.seed)
        ppl_change[f"after_{stage.name}"] = change
        notes_out.append(
            f"Stage '{stage.name}' changed held-out perplexity from {ppl['base_lm']['value']:.2f} to "
            f"{after['value']:.2f} (x{change['ratio']:.3f}; paired change in NLL {change['value']:+.4f} "
            f"[{change['low']:+.4f}, {change['high']:+.4f}] nats/token over the same blocks)."
        )

    primary = "two_stage" if lm_stages else "single_stage"
    objective = {s.name: s.objective for s in pipe.stages}
    trained = pipe.train_stages(
        model, pipe.stages, sets["train"], lm_sets, run_dir / "stages", resume, after_lm_stage
    )
    pipe.model, pipe.train_results = model, trained
    evaluation = recipe.evaluation
    clock.lap(f"{primary}_train")
    predictions = {primary: score(model, sets["test"], pipe.task, pad, batch)}
    clock.lap(f"{primary}_test")
    parameters = {primary: count_parameters(model)}
    sizes = save_adapters(model, run_dir / "adapters", {"task": pipe.task, "class_names": notes.class_names})
    specs = {name: spec_to_dict(s.adapter) for s in pipe.stages if s.adapter is not None for name in [s.name]}
    histories = {primary: _history(trained, objective)}
    costs = {primary: {"train_wall_time_s": sum(r.wall_time_s for r in trained.values())}}
    throughput = _throughput(trained)
    for baseline in recipe.compare:
        stages = _baseline_stages(pipe, baseline)
        base_model = pipe.new_model(len(notes.class_names))
        done = pipe.train_stages(
            base_model, stages, sets["train"], lm_sets, run_dir / "baselines" / baseline, resume
        )
        clock.lap(f"{baseline}_train")
        predictions[baseline] = score(base_model, sets["test"], pipe.task, pad, batch)
        clock.lap(f"{baseline}_test")
        parameters[baseline] = count_parameters(base_model)
        histories[baseline] = _history(done, {s.name: s.objective for s in stages})
        costs[baseline] = {"train_wall_time_s": sum(r.wall_time_s for r in done.values())}
    if recipe.compare:  # baselines reused the backbone; give lab code the primary model back
        pipe.model = pipe.new_model(len(notes.class_names))
        load_adapters(pipe.model, run_dir / "adapters", list(specs))
    results = {
        label: evaluate(pipe.task, y, s, pipe.metrics, evaluation.bootstrap, recipe.seed)
        for label, (y, s) in predictions.items()
    }
    for label, value in ppl.items():
        results[label] = {"perplexity": {k: value[k] for k in ("value", "low", "high")}}
    if lm_stages:
        first = lm_stages[0]
        notes_out.append(
            f"Perplexity: {held_out.blocks.shape[0]} held-out blocks of {first.options.max_length} tokens "
            f"packed from test-split notes (never trained on); stage 1 trained on "
            f"{lm_sets[first.options.max_length].blocks.shape[0]} blocks from training-split notes."
        )
    notes_out += _dataset_notes(notes)
    if backbone.info.get("source") == "random":
        notes_out.append("The backbone has random weights (a test model): the numbers say nothing clinical.")
    if pipe.backbone_options.cached_layers:
        notes_out.append(
            f"The bottom {pipe.backbone_options.cached_layers} decoder layers hold no adapter; their outputs "
            "were computed once per note and reused by every stage and baseline (exact)."
        )
    headline = evaluation.headline or (evaluation.metrics[0] if evaluation.metrics else "auroc")
    dataset = {
        "name": recipe.data.dataset,
        "task_name": pipe.options.data.task_name if recipe.data.dataset == "mtsamples" else None,
        "class_names": notes.class_names,
        **notes.source,
        "full_splits": {k: int(len(v)) for k, v in full.items()},
        **describe_notes(notes, {k: used[k] for k in used if k in sets}),
        "splits_file": "splits.json",
    }
    info = {
        "backbone": {**backbone.info, "cached_layers": pipe.backbone_options.cached_layers},
        "adapter": {
            "method": ", ".join(sorted({d["method"] for d in specs.values()})) or "none",
            "spec": specs,
            "order": adapter_names(model.lm) or list(specs),
            "file_size_bytes": sum(v for k, v in sizes.items() if "/" not in k),
            "files": sizes,
        },
        "dataset": dataset,
        "cost": {
            "wall_time_s": time.perf_counter() - started,
            "peak_memory_bytes": _peak_memory_bytes(),
            "samples_per_second": throughput,
            "models": costs,
            "phases": clock.laps,
        },
        "notes": notes_out,
        "extra": {
            "perplexity": {k: {n: x for n, x in v.items() if n != "block_nll"} for k, v in ppl.items()},
            "perplexity_change": ppl_change,
            "stages": [_stage_summary(s) for s in pipe.stages],
        },
    }
    return RunResult(
        name=recipe.name,
        pipeline=recipe.pipeline,
        task=pipe.task,
        headline_metric=headline,
        primary_model=primary,
        results=results,
        predictions=predictions,
        parameters=parameters,
        histories=histories,
        info=info,
    )


def _stage_summary(stage: Stage) -> dict[str, Any]:
    return {
        "name": stage.name,
        "objective": stage.objective,
        "adapter": None if stage.adapter is None else stage.adapter.method,
        "trainable": list(stage.trainable),
        "options": stage.options.model_dump(),
    }


def _dataset_notes(notes: Notes) -> list[str]:
    counts = notes.counts
    out = []
    if counts.get("empty_dropped"):
        out.append(f"{counts['empty_dropped']} empty notes were dropped.")
    if counts.get("duplicate_rows_merged"):
        out.append(
            f"{counts['duplicate_rows_merged']} rows repeat another row's transcription (MTSamples files "
            "most reports under a specialty and a document type); they were merged into one note with all "
            "its labels, so no note is in two splits."
        )
    dropped = counts.get("no_class_dropped", 0) + counts.get("several_classes_dropped", 0)
    if dropped:
        out.append(f"{dropped} notes with none or several of the classes were dropped (multiclass).")
    return out
