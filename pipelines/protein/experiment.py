"""The protein pipelines' hooks for the core experiment engine: splits, models, stages, baselines, report.

The engine (:mod:`pipelines.core.experiment`) runs the recipe; this module only knows proteins: FLIP and
user files, ESM-2 models with a head, the masked-LM and task objectives, the one-hot and frozen-probe
baselines, per-protein intervals for per-residue metrics, and the notes a reader needs.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.core.experiment import ExperimentData, Outcome, StagePlan, Trained
from pipelines.protein.adapters import head_facts, write_head_facts
from pipelines.protein.baselines import extract_features, fit_baseline, one_hot_features
from pipelines.protein.batching import MaskedLMCollator, ProteinDataset, TaskCollator
from pipelines.protein.data import read_fasta_records
from pipelines.protein.datasets import load_splits, residue_classes
from pipelines.protein.metrics import masked_lm_perplexity, protein_interval
from pipelines.protein.model import ProteinModel
from pipelines.protein.notes import report_notes
from pipelines.protein.options import StageOptions
from pipelines.protein.splits import cap_records, check_classes, limit_length, write_splits

__all__ = ["ProteinExperiment"]

HEAD = "head"


class ProteinExperiment:
    """One recipe run of ``protein/sequence`` or ``protein/residue`` (the engine's hooks)."""

    def __init__(self, pipe: Any):
        self.pipe, self.recipe, self.options = pipe, pipe.recipe, pipe.options
        self.task, self.level = pipe.task, pipe.LEVEL
        self.splits: dict[str, list] = {}
        self.stage_facts: dict[str, dict] = {}
        self.baseline_details: dict[str, dict] = {}

    # ----- data and models ----------------------------------------------------------------------------
    def load_data(self, run_dir: Path) -> ExperimentData:
        backbone = self.pipe.load_backbone()
        uncapped = self.options.data.model_copy(update={"max_train": None})
        stratified = self.task != "regression" and self.level == "sequence"
        self.splits, self.info, self.issues = load_splits(
            self.recipe.data.dataset, uncapped, self.level, backbone.max_residues, seed=self.recipe.seed,
            limit_train=False, stratify=stratified,
        )  # fmt: skip
        self.run_dir = Path(run_dir)
        self.num_classes = self.pipe.num_classes
        if self.level == "residue" and self.num_classes is None:
            self.num_classes = residue_classes(self.recipe.data.dataset, self.options.data)
        check_classes(self.splits, self.task, self.level, self.info["name"], self.num_classes)
        train = self.splits["train"]
        metrics = list(self.pipe.metrics)
        labels = [record.target for record in train] if stratified else None
        return ExperimentData(self.task, len(train), labels, self.info, metrics)

    def keep_training(self, indices: list[int]) -> None:
        data = self.options.data
        train = cap_records([self.splits["train"][i] for i in indices], data.max_train, self.recipe.seed)
        limit = self.info["residue_limit"]
        self.splits["train"] = limit_length(train, limit, data.long_sequences, self.issues)
        check_classes(
            {"train": self.splits["train"]}, self.task, self.level, self.info["name"], self.num_classes
        )
        self.info.update(issues=self.issues.as_dict(), sizes={k: len(v) for k, v in self.splits.items()})
        facts = {"source": self.info["name"], "seed": self.recipe.seed, "cut": self.info["cut"]}
        write_splits(self.run_dir, self.splits, facts)
        self.info["splits_file"] = "splits.json"

    def new_model(self) -> ProteinModel:
        """A head on a copy of the loaded backbone, so adapters of one model never reach another."""
        pristine = self.pipe.load_backbone()
        train = self.splits["train"]
        mean, std = 0.0, 1.0
        if self.task == "regression":
            targets = np.asarray([r.target for r in train], dtype=np.float64)
            mean, std = float(targets.mean()), float(targets.std()) or 1.0
        torch.manual_seed(self.recipe.seed)
        classes = max(2, self.num_classes or self.pipe.classes(train))
        return ProteinModel(
            copy.deepcopy(pristine), self.pipe.model_task(), classes, self.pipe.pooling, mean, std
        )

    def _stage_options(self, index: int) -> StageOptions:
        stages = self.options.stages
        return stages[index] if len(stages) == len(self.recipe.stages) else StageOptions()

    def plan_stage(self, model: ProteinModel, stage: Any, index: int) -> StagePlan:
        options = self._stage_options(min(index, len(self.recipe.stages) - 1))
        spec = self.pipe.resolve_spec(stage.adapter, options.last_n_layers)
        if stage.objective == "masked_lm":
            if spec is None:
                raise ValueError(f"the masked_lm stage '{stage.name}' needs an adapter (e.g. LoRA) to train")
            sequences = self.splits["train"]
            if options.sequences_path:
                sequences = read_fasta_records(options.sequences_path, self.options.data.on_invalid)
            valid = self.splits["valid"]
            self.stage_facts[stage.name] = {
                "objective": "masked_lm", "sequences": len(sequences),
                "valid_perplexity_before": masked_lm_perplexity(model, valid, options.mask_probability),
                "mask_probability": options.mask_probability,
            }  # fmt: skip
            return StagePlan(
                ProteinDataset(sequences), lambda m, batch: m.masked_lm_loss(batch), spec,
                collate_fn=MaskedLMCollator(model.vocabulary, options.mask_probability),
                val_data=ProteinDataset(valid) if valid else None,
            )  # fmt: skip
        valid, train = self.splits["valid"], ProteinDataset(self.splits["train"])
        return StagePlan(
            train, lambda m, batch: m.loss(batch), spec, extra_trainable=[HEAD],
            collate_fn=TaskCollator(model.vocabulary, self.pipe.model_task()),
            evaluate_fn=self.pipe.validation_fn(valid) if valid else None,
        )  # fmt: skip

    def after_stage(self, model: ProteinModel, stage: Any, result: Any) -> None:
        facts = self.stage_facts.setdefault(stage.name, {"objective": stage.objective})
        facts.update(steps=result.steps, wall_time_s=result.wall_time_s)
        if stage.objective == "masked_lm":
            valid, probability = self.splits["valid"], facts["mask_probability"]
            facts["valid_perplexity_after"] = masked_lm_perplexity(model, valid, probability)

    def predict(self, model: ProteinModel) -> tuple[np.ndarray, np.ndarray]:
        return model.predict(self.pipe.loader(self.splits["test"]))

    def probe(self, model: ProteinModel) -> torch.Tensor:
        return torch.as_tensor(model.predict(self.pipe.loader(self.splits["test"][:16]))[1])

    # ----- baselines and report -----------------------------------------------------------------------
    def baseline(self, name: str) -> Outcome:
        """``one_hot`` or ``linear_probe`` (the frozen backbone's features): a penalised linear model."""
        started, backbone_total = time.perf_counter(), 0
        if name == "one_hot":
            features = one_hot_features(self.splits, self.level)
        else:
            model = self.new_model()
            features = {k: extract_features(model, self.pipe.loader(v)) for k, v in self.splits.items()}
            backbone_total = sum(p.numel() for p in model.backbone.parameters())
        regression = self.task == "regression"
        predictions, trainable, details = fit_baseline(features, regression, self.recipe.seed)
        self.baseline_details[name] = details | {"wall_time_s": time.perf_counter() - started}
        return Outcome(predictions, trainable, backbone_total + trainable, details)

    def describe(self, models: dict[str, Trained]) -> dict[str, Any]:
        primary = next(iter(models.values()))
        folder = primary.adapters.get(self.recipe.stages[-1].name)
        if folder:  # what reloading needs beside the tensors (Pipeline.load)
            stages = [s.name for s in self.recipe.stages if s.adapter is not None]
            facts = head_facts(primary.model, self.task, self.level, stages, self.pipe.provenance)
            write_head_facts(folder, facts)
        extra: dict[str, Any] = {"baselines": self.baseline_details, "stages": self.stage_facts}
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
