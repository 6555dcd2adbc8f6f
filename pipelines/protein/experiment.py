"""The protein pipelines' hooks for the core experiment engine: splits, models, stages, baselines, report.

The engine (:mod:`pipelines.core.experiment`) runs the recipe and reports what each stage trained; this
module only knows proteins: FLIP and user files, ESM-2 models with a head, the masked-LM and task stages
(:mod:`pipelines.protein.stages`), the one-hot and frozen-probe baselines, per-protein intervals for
per-residue metrics, the masked-LM perplexities and the notes (:mod:`pipelines.protein.notes`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.core.experiment import ExperimentData, Outcome, StagePlan, Trained
from pipelines.protein.adapters import head_facts, write_head_facts
from pipelines.protein.baselines import extract_features, fit_baseline, one_hot_features
from pipelines.protein.metrics import masked_lm_perplexity, protein_interval
from pipelines.protein.model import ProteinModel, target_statistics
from pipelines.protein.notes import report_notes
from pipelines.protein.prepared import PreparedSplits, prepare_splits
from pipelines.protein.stages import masked_lm_stage, task_stage

__all__ = ["ProteinExperiment"]


class ProteinExperiment:
    """One recipe run of ``protein/sequence`` or ``protein/residue`` (the engine's hooks)."""

    def __init__(self, pipe: Any):
        self.pipe, self.recipe, self.options = pipe, pipe.recipe, pipe.options
        self.task, self.level = pipe.task, pipe.LEVEL
        self.data: PreparedSplits | None = None
        self.splits: dict[str, list] = {}
        self.masked_lm: dict[str, dict] = {}  # stage name -> its facts, perplexity before and after

    # ----- data and models ----------------------------------------------------------------------------
    def load_data(self, run_dir: Path) -> ExperimentData:
        self.run_dir, max_residues = Path(run_dir), self.pipe.load_backbone().max_residues
        self.data = prepare_splits(
            self.recipe.data.dataset, self.options.data, self.task, self.level, max_residues,
            self.recipe.seed, self.pipe.num_classes,
        )  # fmt: skip
        self.splits, self.info = self.data.splits, self.data.info
        train, labels = self.splits["train"], self.data.train_labels()
        return ExperimentData(self.task, len(train), labels, self.info, list(self.pipe.metrics))

    def keep_training(self, indices: list[int]) -> None:
        self.data.keep_training(indices, self.options.data, self.recipe.seed, self.run_dir)

    def new_model(self) -> ProteinModel:
        """A head on a copy of the loaded backbone, so adapters of one model never reach another."""
        pristine, train = self.pipe.load_backbone(), self.splits["train"]
        mean, std = target_statistics(train, self.task)
        torch.manual_seed(self.recipe.seed)
        classes = max(2, self.data.num_classes or self.pipe.classes(train))
        return ProteinModel(
            copy.deepcopy(pristine), self.pipe.model_task(), classes, self.pipe.pooling, mean, std
        )

    def plan_stage(self, model: ProteinModel, stage: Any, index: int) -> StagePlan:
        options = self.options.for_stage(index, len(self.recipe.stages))
        spec = self.pipe.resolve_spec(stage.adapter, options.last_n_layers)
        if stage.objective == "masked_lm":
            limit = self.info["residue_limit"]
            plan, facts = masked_lm_stage(
                model, stage.name, spec, options, self.splits, self.options.data, limit
            )
            self.masked_lm[stage.name] = facts
            return plan
        valid = self.splits["valid"]
        evaluate_fn = self.pipe.validation_fn(valid) if valid else None
        return task_stage(model, spec, self.splits["train"], self.pipe.model_task(), evaluate_fn)

    def after_stage(self, model: ProteinModel, stage: Any, result: Any) -> None:
        """A masked-LM stage's validation perplexity after training (the engine records steps and time)."""
        if stage.objective == "masked_lm":
            facts = self.masked_lm[stage.name]
            valid, probability = self.splits["valid"], facts["mask_probability"]
            facts["valid_perplexity_after"] = masked_lm_perplexity(model, valid, probability)

    def predict(self, model: ProteinModel) -> tuple[np.ndarray, np.ndarray]:
        return model.predict(self.pipe.loader(self.splits["test"]))

    def probe(self, model: ProteinModel) -> torch.Tensor:
        return torch.as_tensor(model.predict(self.pipe.loader(self.splits["test"][:16]))[1])

    # ----- baselines and report -----------------------------------------------------------------------
    def baseline(self, name: str) -> Outcome:
        """``one_hot`` or ``linear_probe`` (the frozen backbone's features): a penalised linear model."""
        backbone_total = 0
        if name == "one_hot":
            features = one_hot_features(self.splits, self.level)
        else:
            model = self.new_model()
            features = {k: extract_features(model, self.pipe.loader(v)) for k, v in self.splits.items()}
            backbone_total = sum(p.numel() for p in model.backbone.parameters())
        predictions, trainable, details = fit_baseline(features, self.task == "regression", self.recipe.seed)
        return Outcome(predictions, trainable, backbone_total + trainable, details)

    def describe(self, models: dict[str, Trained]) -> dict[str, Any]:
        primary = next(iter(models.values()))
        folder = primary.adapters.get(self.recipe.stages[-1].name)
        if folder:  # what reloading needs beside the tensors (Pipeline.load)
            stages = [s.name for s in self.recipe.stages if s.adapter is not None]
            facts = head_facts(primary.model, self.task, self.level, stages, self.pipe.provenance)
            write_head_facts(folder, facts)
        extra: dict[str, Any] = {"masked_lm": self.masked_lm} if self.masked_lm else {}
        if self.level == "residue":
            evaluation = self.recipe.evaluation
            metric = evaluation.headline or (evaluation.metrics or self.pipe.metrics)[0]
            test, resamples = self.splits["test"], min(200, evaluation.bootstrap)
            extra["protein_level_interval"] = {
                label: protein_interval(metric, test, *m.predictions, resamples)
                for label, m in models.items()
            }
        notes = report_notes(self.pipe.provenance or {}, self.info, self.level)
        return {"backbone": self.pipe.provenance, "notes": notes, "extra": extra}
