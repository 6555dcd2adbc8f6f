"""The imaging pipeline's hooks for the core experiment engine: data, classifiers, stages, baselines, report.

The engine (:mod:`pipelines.core.experiment`) runs the recipe; this module only knows images: MONAI
records and transforms, a classifier on a ViT/CNN backbone, the linear-probe and full fine-tuning
baselines, the adapter methods' default specs, the binary threshold chosen on validation (Youden's J)
and the notes a reader needs. Lab code (``ImagingClassificationPipeline.fit``) trains through the same
hooks on in-memory datasets (:meth:`ImagingExperiment.for_datasets`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipelines.core.experiment import ExperimentData, StagePlan, Trained, compare_label
from pipelines.core.experiment import primary_label as stage_methods_label
from pipelines.core.peft import adapter_specs, spec_to_dict
from pipelines.imaging.data import (
    build_transforms,
    collate,
    label_key,
    load_dataset_splits,
    make_dataset,
    subsample,
)
from pipelines.imaging.head_facts import head_facts, operating_point, write_head_facts
from pipelines.imaging.methods import build_classifier, default_spec, resolve_targets
from pipelines.imaging.metrics import DEFAULT_METRICS, youden_threshold
from pipelines.imaging.model import HEAD, classification_loss, predict_scores
from pipelines.imaging.options import StageOptions

__all__ = ["ImagingExperiment", "cap_records"]

SCRATCH_BASELINES = ("linear_probe", "full_finetune")  # no adapter: the head alone, or every parameter


@dataclass(frozen=True)
class _Role:
    """How one stage trains beyond its section: every parameter, a scaled lr, checkpoints."""

    full: bool = False
    lr_scale: float = 1.0
    checkpoint: bool = True


def cap_records(records: list[dict], limit: int | None, seed: int) -> list[dict]:
    """A stratified subset of about ``limit`` records (all when there are fewer)."""
    if limit is None or len(records) <= limit:
        return records
    return subsample(records, fraction=limit / len(records), seed=seed)


class ImagingExperiment:
    """One recipe run of ``imaging/classification`` (the engine's hooks); see the module docstring."""

    def __init__(self, pipe: Any):
        self.pipe, self.recipe, self.options = pipe, pipe.recipe, pipe.options
        self.splits: dict[str, list] | None = None
        self.roles: dict[int, _Role] = {}
        self.baseline_stages: dict[str, list] = {}
        self.baseline_facts: dict[str, dict] = {}

    @classmethod
    def for_datasets(cls, pipe: Any, train_set: Any, val_set: Any, checkpoint: bool) -> tuple[Any, Any]:
        """Hooks and the one stage of lab code: ``pipe``'s model (built once) trained on these datasets.

        Returns:
            (hooks, the StageSection made of the constructor's adapter, method, name and train config).
        """
        from pipelines.core.recipe import StageSection

        hooks = cls(pipe)
        hooks.recipe = None  # lab code: no recipe, no test split; the pipe's own model and datasets
        hooks.task, hooks.backbone = pipe.task, pipe.load_backbone()
        hooks.train_set, hooks.val_set = train_set, val_set
        hooks.val_loader = pipe._loader(val_set) if val_set is not None else None
        adapter = pipe.adapter if pipe.method == "adapter" else None
        stage = StageSection(
            name=pipe.name, objective="classification", adapter=adapter, train=pipe.train_config
        )
        hooks.roles = {id(stage): _Role(full=pipe.method == "full_finetune", checkpoint=checkpoint)}
        return hooks, stage

    # ----- data and models ----------------------------------------------------------------------------
    def load_data(self, run_dir: Path) -> ExperimentData:
        if self.splits is None:  # a sweep runs the engine once per fraction on the same data
            self._load()
        data = self.options.data
        self.roles = {id(stage): _Role() for stage in self.recipe.stages}
        self.baseline_stages, self.baseline_facts = {}, {}
        self.info = {
            **self.data_info,
            "splits": {"train": len(self.splits["train"]), "val": len(self.val), "test": len(self.test)},
            "full_splits": self.data_info["splits"],
            "fraction": self.recipe.data.fraction, "shots_per_class": self.recipe.data.shots_per_class,
            "max_train": data.max_train,
        }  # fmt: skip
        labels = [label_key(record) for record in self.splits["train"]]
        return ExperimentData(self.task, len(labels), labels, self.info, DEFAULT_METRICS.get(self.task, []))

    def _load(self) -> None:
        pipe, data = self.pipe, self.options.data
        self.backbone = pipe.load_backbone()
        self.spatial = data.spatial_dims or self.backbone.spatial_dims
        name, path = _dataset_source(self.recipe, self.options)
        self.splits, self.data_info = load_dataset_splits(name, path, self.spatial, self.recipe.seed)
        self.task = self.recipe.data.task or (
            "binary" if _num_outputs("multiclass", self.splits) == 2 else "multiclass"
        )
        pipe.task = self.task
        self.outputs = _num_outputs(self.task, self.splits)
        from_files = isinstance(self.splits["train"][0]["image"], str)
        self.train_transform = build_transforms(data.transforms, True, self.spatial, from_files)
        evaluation = build_transforms(data.transforms, False, self.spatial, from_files)
        self.val = cap_records(self.splits["val"], data.max_val, self.recipe.seed)
        self.test = cap_records(self.splits["test"], data.max_test, self.recipe.seed)
        self.val_set = make_dataset(self.val, evaluation, data.transforms.cache_rate)
        self.test_set = make_dataset(self.test, evaluation, data.transforms.cache_rate)
        self.val_loader = DataLoader(self.val_set, data.eval_batch_size, shuffle=False, collate_fn=collate)
        self.test_loader = DataLoader(self.test_set, data.eval_batch_size, shuffle=False, collate_fn=collate)
        self.probe_images = None

    def keep_training(self, indices: list[int]) -> None:
        """The engine's low-data draw, then ``data.options.max_train`` (a stratified cap) on what it kept."""
        data = self.options.data
        kept = [self.splits["train"][i] for i in indices]
        records = cap_records(kept, data.max_train, self.recipe.seed)
        self.train_set = make_dataset(records, self.train_transform, data.transforms.cache_rate)
        self.info["splits"]["train"] = len(records)

    def new_model(self) -> nn.Module:
        """A classifier on a copy of the backbone with only its head trainable (lab code: the pipe's own).

        Every candidate's head starts from the recipe's seed (so do the adapters added right after it).
        """
        if self.recipe is None:
            return self.pipe.model or self.pipe.build_model()
        options = self._stage_options(self.recipe.stages[0])
        torch.manual_seed(self.recipe.seed)
        return build_classifier(
            self.backbone, "linear_probe", None, self.outputs, self.task, "task", options.head_dropout,
            options.update_batchnorm_stats,
        )[0]  # fmt: skip

    def _stage_options(self, stage: Any) -> StageOptions:
        """A recipe stage's options; a baseline's are those of the last stage, whose budget it trains on."""
        stages, given = self.recipe.stages, self.options.stages
        index = next((i for i, s in enumerate(stages) if s is stage), len(stages) - 1)
        return given[index] if index < len(given) else StageOptions()

    def plan_stage(self, model: nn.Module, stage: Any, index: int) -> StagePlan:
        role = self.roles.get(id(stage)) or _Role(checkpoint=self._stage_options(stage).checkpoint_baselines)
        adapter = None
        if stage.adapter is not None and stage.name not in adapter_specs(model):  # lab: built with it
            adapter = resolve_targets(model, stage.adapter, self.backbone)
        config = stage.train
        if role.lr_scale != 1.0:
            config = config.model_copy(update={"lr": config.lr * role.lr_scale})
        if self.recipe is not None and not any(stage is s for s in self.recipe.stages):
            self.baseline_facts[stage.name] = _baseline_facts(stage, adapter, config, role)
        watch = config.early_stopping_patience or config.eval_every
        return StagePlan(
            self.train_set, classification_loss, adapter, [HEAD], full=role.full, collate_fn=collate,
            val_data=self.val_set if watch else None, train=config, checkpoint=role.checkpoint,
        )  # fmt: skip

    def predict(self, model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        """Test-split scores (lab code has no test split here: empty arrays)."""
        if self.recipe is None:
            return np.empty(0), np.empty(0)
        return predict_scores(model, self.test_loader)

    def evaluate_options(self, model: nn.Module) -> dict[str, float]:
        """The binary threshold, chosen by this model's own validation scores (Youden's J)."""
        if self.task != "binary" or self.val_loader is None:
            return {}
        return {"threshold": youden_threshold(*predict_scores(model, self.val_loader))}

    def probe(self, model: nn.Module) -> torch.Tensor:
        """Logits of up to 16 test images (the engine's reload check)."""
        if self.probe_images is None:  # read when first needed: a DataLoader's iterator draws a torch seed
            self.probe_images = next(iter(self.test_loader))["image"][:16]
        return model(self.probe_images.to(next(model.parameters()).device)).cpu()

    # ----- baselines and report -----------------------------------------------------------------------
    def primary_label(self, recipe: Any) -> str:
        """The stages' adapter methods joined by '+'; a head-only recipe is a linear probe."""
        label = stage_methods_label(recipe)
        return "linear_probe" if label == "head_only" else label

    def baseline(self, name: str) -> list[Any]:
        """One stage with the last recipe stage's objective and budget: the head alone (lr scaled), every
        parameter (lr scaled), or the method's default adapter on this backbone."""
        last = self.recipe.stages[-1]
        options = self._stage_options(last)
        if name in SCRATCH_BASELINES:
            full = name == "full_finetune"
            scale = options.full_finetune_lr_scale if full else options.linear_probe_lr_scale
            update = {"adapter": None, "trainable": []}
            role = _Role(full=full, lr_scale=scale, checkpoint=options.checkpoint_baselines)
        else:
            update = {"adapter": default_spec(name, self.backbone), "trainable": [name]}
            role = _Role(checkpoint=options.checkpoint_baselines)
        stages = [last.model_copy(update={"name": name, **update})]
        self.roles[id(stages[0])] = role
        self.baseline_stages[name] = stages  # keeps the stage (and its id) alive for plan_stage
        return stages

    def describe(self, models: dict[str, Trained]) -> dict[str, Any]:
        primary = next(iter(models))
        folder = models[primary].adapters.get(self.recipe.stages[-1].name)
        if folder is not None:  # the operating point beside the tensors (load_adapter restores it)
            threshold = models[primary].details.get("evaluate", {}).get("threshold")
            point = operating_point(threshold, "val", len(self.val))
            write_head_facts(folder, head_facts(self.task, point, self.data_info.get("classes")))
        size = self.options.data.transforms.image_size
        backbone = self.backbone
        facts = {"family": backbone.family, "num_features": backbone.num_features}
        return {
            "backbone": {**backbone.provenance, **facts},
            "notes": self._notes(primary),
            "extra": {"image_size": size, "baselines": self.baseline_facts},
        }

    def _notes(self, primary: str) -> list[str]:
        data, info = self.options.data, self.info
        size = data.transforms.image_size
        shape = "x".join([str(size)] * self.spatial) if isinstance(size, int) else "x".join(map(str, size))
        notes = [f"Baseline '{primary}' is the primary model; trained once."
                 for entry in self.recipe.compare if compare_label(entry) == primary]  # fmt: skip
        notes.append(
            f"Images resized to {shape}; binary thresholds chosen on validation by Youden's J "
            "and applied unchanged to test."
        )
        low = info["low_data"]
        drawn = [f"data.fraction={low['fraction']:g}"]
        if low["shots_per_class"] is not None:
            drawn.append(f"data.shots_per_class={low['shots_per_class']}")
        if data.max_train is not None:
            drawn.append(f"then data.options.max_train={data.max_train}")
        notes.append(
            f"Training images: {info['splits']['train']} of {low['train_full']} ({', '.join(drawn)})."
        )
        return notes


def _baseline_facts(stage: Any, resolved: Any, config: Any, role: _Role) -> dict[str, Any]:
    """What a baseline trained: the spec as given (targets before resolution), its modules, the lr."""
    facts: dict[str, Any] = {"lr": config.lr, "full": role.full, "checkpoints": role.checkpoint}
    if stage.adapter is not None:
        facts["adapter"] = spec_to_dict(stage.adapter)
        facts["adapted_modules"] = len(resolved.targets) if resolved is not None else None
    return facts


def _num_outputs(task: str, splits: dict[str, list]) -> int:
    labels = [r["label"] for split in splits.values() for r in split]
    if task == "multilabel":
        return len(labels[0])
    return 2 if task == "binary" else int(max(labels)) + 1


def _dataset_source(recipe: Any, options: Any) -> tuple[str | None, str | None]:
    dataset = recipe.data.dataset
    if options.data.path:
        return dataset, options.data.path
    if "/" in dataset or dataset.endswith((".npz", ".csv", ".csv.gz")):
        return None, dataset
    return dataset, None
