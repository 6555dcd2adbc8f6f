"""The imaging pipeline's hooks for the core experiment engine: data, classifiers, stages, baselines, report.

The engine (:mod:`pipelines.core.experiment`) runs the recipe and reports what each stage trained; these
hooks give it the prepared images (:mod:`pipelines.imaging.prepared`), a classifier on a ViT/CNN backbone,
the baselines' stages (:mod:`pipelines.imaging.baselines`), the binary threshold chosen on validation
(Youden's J) and the notes (:mod:`pipelines.imaging.notes`). Lab code (``ImagingClassificationPipeline.fit``)
trains through the same hooks on in-memory datasets (:meth:`ImagingExperiment.for_datasets`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.core.experiment import ExperimentData, StagePlan, Trained
from pipelines.core.experiment import primary_label as stage_methods_label
from pipelines.core.peft import adapter_specs
from pipelines.imaging.baselines import StageRole, baseline_stage
from pipelines.imaging.data import collate
from pipelines.imaging.head_facts import head_facts, operating_point, write_head_facts
from pipelines.imaging.methods import build_classifier, resolve_targets
from pipelines.imaging.metrics import DEFAULT_METRICS, youden_threshold
from pipelines.imaging.model import HEAD, classification_loss, predict_scores
from pipelines.imaging.notes import report_notes
from pipelines.imaging.prepared import PreparedImages, prepare_images

__all__ = ["ImagingExperiment"]


class ImagingExperiment:
    """One recipe run of ``imaging/classification`` (the engine's hooks); see the module docstring."""

    def __init__(self, pipe: Any):
        self.pipe, self.recipe, self.options = pipe, pipe.recipe, pipe.options
        self.images: PreparedImages | None = None
        self.probe_images: torch.Tensor | None = None
        self.roles: dict[int, StageRole] = {}
        self.baseline_stages: dict[str, list] = {}

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
        stage = StageSection(
            name=pipe.name, objective="classification", train=pipe.train_config,
            adapter=pipe.adapter if pipe.method == "adapter" else None,
        )  # fmt: skip
        hooks.roles = {id(stage): StageRole(full=pipe.method == "full_finetune", checkpoint=checkpoint)}
        return hooks, stage

    # ----- data and models ----------------------------------------------------------------------------
    def load_data(self, run_dir: Path) -> ExperimentData:
        if self.images is None:  # a sweep runs the engine once per fraction on the same data
            self.backbone = self.pipe.load_backbone()
            self.images = prepare_images(self.recipe, self.options.data, self.backbone)
            self.task = self.pipe.task = self.images.task
            self.val_set, self.val_loader = self.images.val_set, self.images.val_loader
        self.roles = {id(stage): StageRole() for stage in self.recipe.stages}
        self.baseline_stages = {}
        self.info = self.images.dataset_info(self.recipe, self.options.data)
        labels = self.images.train_labels()
        return ExperimentData(self.task, len(labels), labels, self.info, DEFAULT_METRICS.get(self.task, []))

    def keep_training(self, indices: list[int]) -> None:
        """The engine's low-data draw, then ``data.options.max_train`` (a stratified cap) on what it kept."""
        self.train_set, used = self.images.training_set(indices, self.options.data, self.recipe.seed)
        self.info["splits"]["train"] = used

    def new_model(self) -> nn.Module:
        """A classifier on a copy of the backbone with only its head trainable (lab code: the pipe's own).

        Every candidate's head starts from the recipe's seed (so do the adapters added right after it).
        """
        if self.recipe is None:
            return self.pipe.model or self.pipe.build_model()
        options = self.options.for_stage(self.recipe.stages, self.recipe.stages[0])
        torch.manual_seed(self.recipe.seed)
        return build_classifier(
            self.backbone, "linear_probe", None, self.images.outputs, self.task, "task", options.head_dropout,
            options.update_batchnorm_stats,
        )[0]  # fmt: skip

    def plan_stage(self, model: nn.Module, stage: Any, index: int) -> StagePlan:
        role = self.roles.get(id(stage))
        if role is None:  # a compare entry written as a spec: a baseline on the last stage's budget
            role = StageRole(
                checkpoint=self.options.for_stage(self.recipe.stages, stage).checkpoint_baselines
            )
        adapter = None
        if stage.adapter is not None and stage.name not in adapter_specs(model):  # lab: built with it
            adapter = resolve_targets(model, stage.adapter, self.backbone)
        config = role.train_config(stage.train)
        watch = config.early_stopping_patience or config.eval_every
        return StagePlan(
            self.train_set, classification_loss, adapter, [HEAD], full=role.full, collate_fn=collate,
            val_data=self.val_set if watch else None, train=config, checkpoint=role.checkpoint,
        )  # fmt: skip

    def predict(self, model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        """Test-split scores (lab code has no test split here: empty arrays)."""
        if self.recipe is None:
            return np.empty(0), np.empty(0)
        return predict_scores(model, self.images.test_loader)

    def evaluate_options(self, model: nn.Module) -> dict[str, float]:
        """The binary threshold, chosen by this model's own validation scores (Youden's J)."""
        if self.task != "binary" or self.val_loader is None:
            return {}
        return {"threshold": youden_threshold(*predict_scores(model, self.val_loader))}

    def probe(self, model: nn.Module) -> torch.Tensor:
        """Logits of up to 16 test images (the engine's reload check)."""
        if self.probe_images is None:  # read when first needed: a DataLoader's iterator draws a torch seed
            self.probe_images = next(iter(self.images.test_loader))["image"][:16]
        return model(self.probe_images.to(next(model.parameters()).device)).cpu()

    # ----- baselines and report -----------------------------------------------------------------------
    def primary_label(self, recipe: Any) -> str:
        """The stages' adapter methods joined by '+'; a head-only recipe is a linear probe."""
        label = stage_methods_label(recipe)
        return "linear_probe" if label == "head_only" else label

    def baseline(self, name: str) -> list[Any]:
        """A named baseline: one stage on the last stage's budget (:mod:`pipelines.imaging.baselines`)."""
        last = self.recipe.stages[-1]
        options = self.options.for_stage(self.recipe.stages, last)
        stage, role = baseline_stage(name, last, options, self.backbone)
        self.roles[id(stage)] = role
        self.baseline_stages[name] = [stage]  # keeps the stage (and its id) alive for plan_stage
        return self.baseline_stages[name]

    def describe(self, models: dict[str, Trained]) -> dict[str, Any]:
        primary, backbone = next(iter(models.values())), self.backbone
        folder = primary.adapters.get(self.recipe.stages[-1].name)
        if folder is not None:  # the operating point beside the tensors (load_adapter restores it)
            threshold = primary.details.get("evaluate", {}).get("threshold")
            point = operating_point(threshold, "val", len(self.images.val))
            write_head_facts(folder, head_facts(self.task, point, self.images.provenance.get("classes")))
        facts = {"family": backbone.family, "num_features": backbone.num_features}
        size, cap = self.options.data.transforms.image_size, self.options.data.max_train
        return {
            "backbone": {**backbone.provenance, **facts},
            "notes": report_notes(size, self.images.spatial_dims, self.info, cap),
            "extra": {"image_size": size},
        }
