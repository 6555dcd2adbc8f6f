"""The recipe path of ``imaging/classification``: data, the primary model, baselines, sweep, RunResult."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from pipelines.core.evaluation import RunResult
from pipelines.core.peft import (
    add_adapter,
    count_parameters,
    load_adapter,
    save_adapter,
    set_trainable,
    spec_to_dict,
)
from pipelines.core.training import train
from pipelines.imaging.data import build_transforms, collate, load_dataset_splits, make_dataset, subsample
from pipelines.imaging.methods import build_classifier, default_spec, resolve_targets, score_model
from pipelines.imaging.model import HEAD, classification_loss
from pipelines.imaging.options import StageOptions

__all__ = ["run_recipe_pipeline"]


def _cap(records: list[dict], limit: int | None, seed: int) -> list[dict]:
    """A stratified subset of about ``limit`` records (all when there are fewer)."""
    if limit is None or len(records) <= limit:
        return records
    return subsample(records, fraction=limit / len(records), seed=seed)


def _num_outputs(task: str, splits: dict[str, list]) -> int:
    labels = [r["label"] for split in splits.values() for r in split]
    if task == "multilabel":
        return len(labels[0])
    return 2 if task == "binary" else int(max(labels)) + 1


def _dataset_source(recipe, options) -> tuple[str | None, str | None]:
    dataset = recipe.data.dataset
    if options.data.path:
        return dataset, options.data.path
    if "/" in dataset or dataset.endswith((".npz", ".csv")):
        return None, dataset
    return dataset, None


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


class _Runner:
    """Holds what every model of one run shares: backbone, data, loaders, settings, collected results."""

    def __init__(self, pipe, run_dir: Path, resume: bool):
        self.pipe, self.recipe, self.options = pipe, pipe.recipe, pipe.options
        self.run_dir, self.resume, self.seed = run_dir, resume, pipe.recipe.seed
        self.backbone = pipe.load_backbone()
        data = self.options.data
        self.spatial = data.spatial_dims or self.backbone.spatial_dims
        name, path = _dataset_source(self.recipe, self.options)
        self.splits, self.data_info = load_dataset_splits(name, path, self.spatial, self.seed)
        self.task = self.recipe.data.task or (
            "binary" if _num_outputs("multiclass", self.splits) == 2 else "multiclass"
        )
        pipe.task = self.task
        self.outputs = _num_outputs(self.task, self.splits)
        self.metrics = pipe.metrics or []
        from_files = isinstance(self.splits["train"][0]["image"], str)
        transforms = data.transforms
        self.train_transform = build_transforms(transforms, True, self.spatial, from_files)
        evaluation = build_transforms(transforms, False, self.spatial, from_files)
        self.val = _cap(self.splits["val"], data.max_val, self.seed)
        self.test = _cap(self.splits["test"], data.max_test, self.seed)
        self.val_set = make_dataset(self.val, evaluation, transforms.cache_rate)
        self.test_set = make_dataset(self.test, evaluation, transforms.cache_rate)
        self.val_loader = DataLoader(self.val_set, data.eval_batch_size, shuffle=False, collate_fn=collate)
        self.test_loader = DataLoader(self.test_set, data.eval_batch_size, shuffle=False, collate_fn=collate)
        self.results: dict[str, Any] = {}
        self.predictions: dict[str, tuple] = {}
        self.parameters: dict[str, dict] = {}
        self.histories: dict[str, list] = {}
        self.per_model: dict[str, dict] = {}
        self.adapters: dict[str, dict] = {}
        self.notes: list[str] = []
        self.peak = 0

    def stage_options(self, index: int):
        stages = self.options.stages
        return stages[index] if index < len(stages) else StageOptions()

    def _train(self, label: str, model, config, train_set, directory: Path | None) -> dict:
        watch = config.early_stopping_patience or config.eval_every
        result = train(
            model, train_set, classification_loss, config, val_data=self.val_set if watch else None,
            run_dir=directory, resume=self.resume and directory is not None, collate_fn=collate,
            seed=self.seed, progress=False,
        )  # fmt: skip
        self.peak = max(self.peak, result.peak_memory_bytes)
        self.histories.setdefault(label, []).extend(result.history)
        entry = self.per_model.setdefault(label, {"train_wall_time_s": 0.0, "steps": 0})
        entry["train_wall_time_s"] += result.wall_time_s
        entry["steps"] += result.steps
        entry["samples_per_second"] = result.samples_per_second
        return entry

    def _score(self, label: str, model, keep_predictions: bool) -> None:
        started = time.perf_counter()
        report, predictions, threshold = score_model(
            model, self.val_loader, self.test_loader, self.task, self.metrics, self.pipe.bootstrap, self.seed
        )
        self.results[label] = report
        if keep_predictions:
            self.predictions[label] = predictions
        self.per_model[label].update(threshold=threshold, eval_wall_time_s=time.perf_counter() - started)

    def _count(self, label: str, model) -> None:
        parameters = count_parameters(model)
        self.parameters[label] = {
            "trainable": parameters.trainable, "total": parameters.total, "fraction": parameters.fraction
        }  # fmt: skip

    def primary(self, label: str, train_set, suffix: str, keep: bool) -> None:
        """Train the recipe's stages in order on one model, save its adapters, check they reload."""
        options = self.stage_options(0)
        model, _ = build_classifier(
            self.backbone, "linear_probe", None, self.outputs, self.task, "task",
            options.head_dropout, options.update_batchnorm_stats,
        )  # fmt: skip
        saved = []
        for index, stage in enumerate(self.recipe.stages):
            if stage.adapter is not None:
                resolved = resolve_targets(model, stage.adapter, self.backbone)
                add_adapter(model, resolved, name=stage.name)
                self.adapters[stage.name + suffix] = {
                    "method": stage.adapter.method,
                    "spec": spec_to_dict(stage.adapter),
                }
                saved.append(stage.name)
            if stage.trainable:
                set_trainable(model, list(stage.trainable), extra=[HEAD])
            else:
                model.requires_grad_(False)
                model.head.requires_grad_(True)
            if index == 0:
                self._count(label, model)
            directory = self.run_dir / "train" / f"{label}" / stage.name
            self._train(label, model, stage.train, train_set, directory)
        self._score(label, model, keep)
        for name in saved:
            folder = self.run_dir / "adapters" / f"{name}{suffix.replace('@', '-').replace('%', 'pct')}"
            save_adapter(model, folder, name=name, extra=[HEAD])
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            self.adapters[name + suffix].update(path=str(folder), file_size_bytes=size)
        if saved:
            self._check_reload(model, saved, suffix)

    def _check_reload(self, model, names: list[str], suffix: str) -> None:
        fresh, _ = build_classifier(self.backbone, "linear_probe", None, self.outputs, self.task, "task")
        for name in names:
            load_adapter(
                fresh, self.run_dir / "adapters" / f"{name}{suffix.replace('@', '-').replace('%', 'pct')}"
            )
        batch = next(iter(self.test_loader))["image"][:16]
        model.eval(), fresh.eval()
        with torch.no_grad():
            same = torch.equal(model(batch), fresh(batch))
        self.notes.append(
            f"Adapters {', '.join(names)}{suffix} reloaded into a fresh model give "
            f"{'identical' if same else 'DIFFERENT'} logits on {len(batch)} test images."
        )

    def baseline(self, kind: str, label: str, train_set, keep: bool) -> None:
        """Train one baseline with the first stage's budget (lr scaled for linear probe / full FT)."""
        stage = self.recipe.stages[0]
        options = self.stage_options(0)
        config, spec, method = stage.train, None, kind
        if kind in ("full_finetune", "linear_probe"):
            scale = (
                options.full_finetune_lr_scale if kind == "full_finetune" else options.linear_probe_lr_scale
            )
            config = config.model_copy(update={"lr": config.lr * scale})
        else:
            spec, method = default_spec(kind, self.backbone), "adapter"
        model, spec = build_classifier(
            self.backbone, method, spec, self.outputs, self.task, kind if spec else "task",
            options.head_dropout, options.update_batchnorm_stats,
        )  # fmt: skip
        self._count(label, model)
        directory = self.run_dir / "train" / label if options.checkpoint_baselines else None
        entry = self._train(label, model, config, train_set, directory)
        entry["lr"] = config.lr
        if spec is not None:
            entry["adapter"] = {"method": spec.method, "targets": len(spec.targets)}
        self._score(label, model, keep)


def run_recipe_pipeline(pipe, run_dir: Path, resume: bool, started: float) -> RunResult:
    """Run the primary model and baselines (at each sweep fraction) and collect the RunResult."""
    runner = _Runner(pipe, run_dir, resume)
    recipe, data = runner.recipe, runner.options.data
    methods = [s.adapter.method for s in recipe.stages if s.adapter is not None]
    primary = "+".join(methods) or "linear_probe"
    fractions = data.sweep_fractions or [recipe.data.fraction]
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"data.options.sweep_fractions has {fraction}; every fraction must be in (0, 1]")
    sweeping = data.sweep_fractions is not None
    sizes = {}
    for fraction in fractions:
        records = subsample(runner.splits["train"], fraction, recipe.data.shots_per_class, recipe.seed)
        records = _cap(records, data.max_train, recipe.seed)
        suffix = f"@{_percent(fraction)}" if sweeping else ""
        sizes[_percent(fraction)] = len(records)
        train_set = make_dataset(records, runner.train_transform, data.transforms.cache_rate)
        keep = fraction == max(fractions)
        runner.primary(primary + suffix, train_set, suffix, keep)
        for kind in recipe.compare:
            if kind == primary:
                runner.notes.append(f"Baseline '{kind}' is the primary model; trained once.")
                continue
            runner.baseline(kind, kind + suffix, train_set, keep)
    headline_model = primary + (f"@{_percent(max(fractions))}" if sweeping else "")
    info = _info(runner, primary, headline_model, sizes, fractions, started)
    return RunResult(
        name=recipe.name, pipeline=recipe.pipeline, task=runner.task,
        headline_metric=recipe.evaluation.headline or runner.metrics[0], primary_model=headline_model,
        results=runner.results, predictions=runner.predictions, parameters=runner.parameters,
        histories=runner.histories, info=info,
    )  # fmt: skip


def _info(
    runner: _Runner, primary: str, headline_model: str, sizes: dict, fractions: list, started: float
) -> dict:
    recipe, data = runner.recipe, runner.options.data
    dataset = dict(runner.data_info)
    dataset["splits"] = {"train": max(sizes.values()), "val": len(runner.val), "test": len(runner.test)}
    dataset["full_splits"] = runner.data_info["splits"]
    dataset.update(fraction=recipe.data.fraction, shots_per_class=recipe.data.shots_per_class)
    if data.sweep_fractions is not None:
        dataset["train_sizes_per_fraction"] = sizes
    size = data.transforms.image_size
    shape = "x".join([str(size)] * runner.spatial) if isinstance(size, int) else "x".join(map(str, size))
    notes = list(runner.notes)
    notes.append(
        f"Images resized to {shape}; binary thresholds chosen on validation by Youden's J "
        "and applied unchanged to test."
    )
    notes.append(f"Training images per fraction: {sizes} (data.options.max_train={data.max_train}).")
    primary_entry = runner.per_model.get(headline_model, {})
    adapter = runner.adapters.get(recipe.stages[-1].name + (headline_model[len(primary) :]), {})
    backbone = runner.backbone
    extra = {"models": runner.per_model, "image_size": size}
    if data.sweep_fractions is not None:
        extra.update(sweep_fractions=fractions, adapters=runner.adapters)
    return {
        "backbone": {**backbone.provenance, "family": backbone.family, "num_features": backbone.num_features},
        "adapter": adapter,
        "dataset": dataset,
        "cost": {
            "wall_time_s": time.perf_counter() - started,
            "peak_memory_bytes": runner.peak,
            "samples_per_second": primary_entry.get("samples_per_second"),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(),
        },
        "notes": notes,
        "extra": extra,
    }
