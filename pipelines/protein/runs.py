"""The recipe path of the protein pipelines: stages, baselines, test scores and the report's content."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.core.evaluation import RunResult, evaluate
from pipelines.core.peft import count_parameters, load_adapter, save_adapter, spec_to_dict
from pipelines.protein.baselines import extract_features, fit_linear, one_hot_sequences, one_hot_windows
from pipelines.protein.batching import MaskedLMCollator
from pipelines.protein.data import read_fasta_records
from pipelines.protein.datasets import load_splits, residue_classes
from pipelines.protein.metrics import protein_bootstrap
from pipelines.protein.options import StageOptions

__all__ = ["run_protein_recipe"]

TASK_OBJECTIVES = ("regression", "classification")


def _check_stages(pipe: Any) -> None:
    stages = pipe.recipe.stages
    want = "regression" if pipe.task == "regression" else "classification"
    if stages[-1].objective != want:
        raise ValueError(
            f"recipe '{pipe.recipe.name}': the last stage's objective must be '{want}' for task "
            f"'{pipe.task}', not '{stages[-1].objective}'"
        )
    for stage in stages[:-1]:
        if stage.objective != "masked_lm":
            raise ValueError(
                f"recipe '{pipe.recipe.name}': stage '{stage.name}' comes before the task stage, so its "
                f"objective must be masked_lm, not '{stage.objective}'"
            )


def _masked_lm_perplexity(model: Any, sequences: list, probability: float, batch_size: int) -> float:
    """exp(mean cross-entropy) on masked residues of ``sequences`` with fixed (seed 0) masks."""
    collate = MaskedLMCollator(model.vocabulary, probability, seed=0)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = collate(sequences[start : start + batch_size])
            n = int((batch["labels"] != -100).sum())
            total += model.masked_lm_loss(batch).item() * n
            count += n
    model.train()
    return math.exp(total / max(1, count))


def _baseline(name: str, pipe: Any, model: Any, splits: dict, eval_task: str) -> tuple[Any, dict, dict]:
    """Fit a baseline; return (test predictions (y_true, y_score), parameter count, details)."""
    started = time.perf_counter()
    if name == "one_hot":
        if pipe.LEVEL == "residue":
            (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = (
                one_hot_windows(splits[k]) for k in ("train", "valid", "test")
            )
        else:
            length = max(len(r.sequence) for r in splits["train"])
            x_train, x_valid, x_test = (one_hot_sequences([r.sequence for r in splits[k]], length)
                                        for k in ("train", "valid", "test"))  # fmt: skip
            y_train, y_valid, y_test = (
                np.asarray([r.target for r in splits[k]]) for k in ("train", "valid", "test")
            )
        total_backbone = 0
    else:  # linear_probe: frozen backbone features (before any adapter is added)
        (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = (
            extract_features(model, pipe.loader(splits[k])) for k in ("train", "valid", "test")
        )
        total_backbone = sum(p.numel() for p in model.backbone.parameters())
    task = "regression" if eval_task == "regression" else "classification"
    if task == "classification":
        y_train, y_valid, y_test = (y.astype(np.int64) for y in (y_train, y_valid, y_test))
    predict, details = fit_linear(task, x_train, y_train, x_valid, y_valid, seed=pipe.seed)
    outputs = 1 if task == "regression" else (len(np.unique(y_train)) if len(np.unique(y_train)) > 2 else 1)
    trainable = (x_train.shape[1] + 1) * outputs
    parameters = {"trainable": trainable, "total": total_backbone + trainable,
                  "fraction": trainable / (total_backbone + trainable)}  # fmt: skip
    details.update({"features": int(x_train.shape[1]), "wall_time_s": time.perf_counter() - started})
    return (y_test, predict(x_test)), parameters, details


def _score(pipe: Any, eval_task: str, y_true: np.ndarray, y_score: np.ndarray) -> Any:
    recipe = pipe.recipe
    return evaluate(eval_task, y_true, y_score, pipe.metrics, recipe.evaluation.bootstrap, recipe.seed)


def _protein_intervals(pipe: Any, test: list, y_true: np.ndarray, y_score: np.ndarray) -> dict:
    """Per-residue metrics with proteins (not residues) resampled, for the headline metric."""
    from pipelines.core.evaluation import get_metric

    counts = [sum(1 for label in (r.residue_labels or ()) if label != -100) for r in test]
    headline = pipe.recipe.evaluation.headline or pipe.metrics[0]
    spec = get_metric(headline)
    if spec.input == "label":
        y_input = y_score.argmax(1) if y_score.ndim == 2 else (y_score >= 0.5).astype(int)
    else:
        y_input = y_score
    low, high = protein_bootstrap(
        spec.fn, y_true, y_input, counts, min(200, pipe.recipe.evaluation.bootstrap)
    )
    return {
        "metric": headline,
        "low": low,
        "high": high,
        "resamples": min(200, pipe.recipe.evaluation.bootstrap),
    }


def run_protein_recipe(pipe: Any, run_dir: Path, resume: bool) -> RunResult:
    """Run a protein recipe: baselines on the frozen backbone, then every stage, then the test scores."""
    started = time.perf_counter()
    recipe, options = pipe.recipe, pipe.options
    _check_stages(pipe)
    backbone = pipe.load_backbone()
    splits, dataset_info, issues = load_splits(
        recipe.data.dataset,
        options.data,
        pipe.LEVEL,
        backbone.max_residues,
        recipe.data.fraction,
        recipe.seed,
        shots_per_class=recipe.data.shots_per_class,
        stratify=pipe.task != "regression" and pipe.LEVEL == "sequence",
    )
    if pipe.LEVEL == "residue" and pipe.num_classes is None:
        pipe.num_classes = residue_classes(recipe.data.dataset, options.data)
    eval_task = pipe.task
    model = pipe.build_model(splits["train"])
    results, predictions, parameters, histories, extra = {}, {}, {}, {}, {"baselines": {}, "stages": {}}
    for name in recipe.compare:
        (y_true, y_score), parameters[name], details = _baseline(name, pipe, model, splits, eval_task)
        results[name], predictions[name] = _score(pipe, eval_task, y_true, y_score), (y_true, y_score)
        extra["baselines"][name] = details
    stage_options = options.stages if len(options.stages) == len(recipe.stages) else []
    last_result, spec = None, None
    for index, stage in enumerate(recipe.stages):
        stage_opts = stage_options[index] if stage_options else StageOptions()
        spec = pipe.resolve_spec(stage.adapter, stage_opts.last_n_layers)
        adapter_dir = run_dir / "adapters" / stage.name
        stage_dir = run_dir / "stages" / stage.name
        if resume and (adapter_dir / "adapter_model.safetensors").is_file():
            load_adapter(model, adapter_dir)
            extra["stages"][stage.name] = {"resumed_from": str(adapter_dir)}
            continue
        if stage.objective == "masked_lm":
            sequences = splits["train"]
            if stage_opts.sequences_path:
                sequences = read_fasta_records(stage_opts.sequences_path, options.data.on_invalid)
            before = _masked_lm_perplexity(model, splits["valid"], stage_opts.mask_probability, 32)
            last_result = pipe.train_masked_lm(
                model, spec, stage.name, stage.train, sequences, splits["valid"], stage_opts.mask_probability,
                stage_dir, resume, stage.trainable,
            )  # fmt: skip
            after = _masked_lm_perplexity(model, splits["valid"], stage_opts.mask_probability, 32)
            extra["stages"][stage.name] = {
                "objective": "masked_lm",
                "sequences": len(sequences),
                "valid_perplexity_before": before,
                "valid_perplexity_after": after,
            }
            histories[f"{stage.name} (masked_lm)"] = last_result.history
            save_adapter(model, adapter_dir, name=stage.name)
        else:
            last_result = pipe.train_task(
                model, spec, stage.name, stage.train, splits["train"], splits["valid"], stage_dir, resume,
                stage.trainable,
            )  # fmt: skip
            histories[_label(stage)] = last_result.history
            if spec is not None:
                save_adapter(model, adapter_dir, name=stage.name, extra=["head"])
        extra["stages"][stage.name] = {**extra["stages"].get(stage.name, {}), "steps": last_result.steps,
                                       "wall_time_s": last_result.wall_time_s}  # fmt: skip
    primary = _label(recipe.stages[-1])
    y_true, y_score = model.predict(pipe.loader(splits["test"]))
    results[primary], predictions[primary] = _score(pipe, eval_task, y_true, y_score), (y_true, y_score)
    count = count_parameters(model)
    parameters[primary] = {"trainable": count.trainable, "total": count.total, "fraction": count.fraction}
    if pipe.LEVEL == "residue":
        extra["protein_level_interval"] = {
            label: _protein_intervals(pipe, splits["test"], *predictions[label]) for label in predictions
        }
    final = recipe.stages[-1]
    weights = run_dir / "adapters" / final.name / "adapter_model.safetensors"
    adapter_info = {
        "method": spec.method if spec is not None else "head only",
        "spec": spec_to_dict(spec) if spec is not None else None,
        "file_size_bytes": weights.stat().st_size if weights.is_file() else None,
        "directory": str(weights.parent) if weights.is_file() else None,
        "stages": [s.name for s in recipe.stages],
    }
    cost = {
        "wall_time_s": time.perf_counter() - started,
        "peak_memory_bytes": getattr(last_result, "peak_memory_bytes", None),
        "samples_per_second": getattr(last_result, "samples_per_second", None),
        "max_rss_bytes": _max_rss(),
        "threads": torch.get_num_threads(),
    }
    return RunResult(
        name=recipe.name, pipeline=recipe.pipeline, task=eval_task,
        headline_metric=recipe.evaluation.headline or pipe.metrics[0], primary_model=primary,
        results=results, predictions=predictions, parameters=parameters, histories=histories,
        info={"backbone": pipe.provenance, "adapter": adapter_info, "dataset": dataset_info,
              "cost": cost, "notes": _notes(pipe, dataset_info, issues), "extra": extra},
    )  # fmt: skip


def _label(stage: Any) -> str:
    return stage.adapter.method if stage.adapter is not None else "head_only"


def _max_rss() -> int | None:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return None


def _notes(pipe: Any, dataset_info: dict, issues: Any) -> list[str]:
    provenance = pipe.provenance or {}
    notes = []
    if provenance.get("pretrained") is False:
        arch = provenance.get("architecture", {})
        notes.append(
            f"The backbone is a randomly initialised ESM-2 architecture ({arch.get('num_layers')} layers, "
            f"{arch.get('embed_dim')} wide; seed {provenance.get('init_seed')}), NOT pretrained weights: no "
            "protein language model weights are available offline. Its numbers show the pipeline works, "
            "not what ESM-2 can do; expect the one-hot baseline to be strong."
        )
    else:
        notes.append(f"Backbone weights: {provenance.get('weights')}.")
    counts = dataset_info["issues"]
    if counts["cropped"]:
        notes.append(
            f"{counts['cropped']} sequences were cropped to their first {dataset_info['residue_limit']} "
            "residues (data.options.long_sequences: crop)."
        )
    if counts["skipped_total"]:
        notes.append(f"{counts['skipped_total']} records were skipped: {counts['skipped']}.")
    if counts["duplicate_ids"]:
        notes.append(
            f"The split file lists {counts['duplicate_ids']} protein IDs more than once (kept as published)."
        )
    if pipe.LEVEL == "residue":
        notes.append(
            "Per-residue intervals in the table resample residues as if independent; "
            "extra.protein_level_interval resamples whole proteins (wider, more honest)."
        )
    return notes
