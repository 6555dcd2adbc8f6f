"""The protein pipelines' hooks for the core experiment engine: splits, models, stages, baselines, report.

The engine (:mod:`pipelines.core.experiment`) runs the recipe; this module only knows proteins: FLIP and
user files, ESM-2 models with a head, the masked-LM and task objectives, the one-hot and frozen-probe
baselines, per-protein intervals for per-residue metrics, and the notes a reader needs.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.core.experiment import ExperimentData, Outcome, StagePlan, Trained
from pipelines.core.peft import spec_to_dict
from pipelines.protein.adapters import head_facts, write_head_facts
from pipelines.protein.baselines import extract_features, fit_linear, one_hot_sequences, one_hot_windows
from pipelines.protein.batching import MaskedLMCollator, ProteinDataset, TaskCollator
from pipelines.protein.data import read_fasta_records
from pipelines.protein.datasets import load_splits, residue_classes
from pipelines.protein.metrics import protein_bootstrap
from pipelines.protein.model import ProteinModel
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
        _check_stages(self.recipe, self.task)
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
                "valid_perplexity_before": _masked_lm_perplexity(model, valid, options.mask_probability, 32),
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
            probability = facts["mask_probability"]
            facts["valid_perplexity_after"] = _masked_lm_perplexity(
                model, self.splits["valid"], probability, 32
            )

    def predict(self, model: ProteinModel) -> tuple[np.ndarray, np.ndarray]:
        return model.predict(self.pipe.loader(self.splits["test"]))

    def probe(self, model: ProteinModel) -> torch.Tensor:
        return torch.as_tensor(model.predict(self.pipe.loader(self.splits["test"][:16]))[1])

    # ----- baselines and report -----------------------------------------------------------------------
    def baseline(self, name: str) -> Outcome:
        started = time.perf_counter()
        splits = self.splits
        if name == "one_hot":
            if self.level == "residue":
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
            backbone_total = 0
        else:  # linear_probe: features of the frozen backbone, no adapter
            model = self.new_model()
            (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = (
                extract_features(model, self.pipe.loader(splits[k])) for k in ("train", "valid", "test")
            )
            backbone_total = sum(p.numel() for p in model.backbone.parameters())
        kind = "regression" if self.task == "regression" else "classification"
        if kind == "classification":
            y_train, y_valid, y_test = (y.astype(np.int64) for y in (y_train, y_valid, y_test))
        predict, details = fit_linear(kind, x_train, y_train, x_valid, y_valid, seed=self.recipe.seed)
        classes = len(np.unique(y_train))
        trainable = (x_train.shape[1] + 1) * (1 if kind == "regression" or classes <= 2 else classes)
        details.update(features=int(x_train.shape[1]), wall_time_s=time.perf_counter() - started)
        self.baseline_details[name] = details
        return Outcome((y_test, predict(x_test)), trainable, backbone_total + trainable, details)

    def describe(self, models: dict[str, Trained]) -> dict[str, Any]:
        final = self.recipe.stages[-1]
        primary = next(iter(models.values()))
        folder = primary.adapters.get(final.name)
        weights = folder / "adapter_model.safetensors" if folder else None
        if folder:  # what reloading needs beside the tensors (Pipeline.load)
            stages = [s.name for s in self.recipe.stages if s.adapter is not None]
            facts = head_facts(primary.model, self.task, self.level, stages, self.pipe.provenance)
            write_head_facts(folder, facts)
        extra: dict[str, Any] = {"baselines": self.baseline_details, "stages": self.stage_facts}
        if self.level == "residue":
            extra["protein_level_interval"] = {
                label: self._protein_interval(*m.predictions) for label, m in models.items()
            }
        return {
            "backbone": self.pipe.provenance,
            "adapter": {
                "method": final.adapter.method if final.adapter is not None else "head only",
                "spec": spec_to_dict(final.adapter) if final.adapter is not None else None,
                "file_size_bytes": weights.stat().st_size if weights else None,
                "directory": str(folder) if folder else None,
                "stages": [s.name for s in self.recipe.stages],
            },
            "notes": _notes(self.pipe.provenance or {}, self.info, self.level),
            "extra": extra,
        }

    def _protein_interval(self, y_true: np.ndarray, y_score: np.ndarray) -> dict[str, Any]:
        """The headline per-residue metric with whole proteins (not residues) resampled."""
        from pipelines.core.evaluation import get_metric

        test = self.splits["test"]
        counts = [sum(1 for label in (r.residue_labels or ()) if label != -100) for r in test]
        evaluation = self.recipe.evaluation
        headline = evaluation.headline or (evaluation.metrics or self.pipe.metrics)[0]
        spec = get_metric(headline)
        if spec.input == "label":
            y_input = y_score.argmax(1) if y_score.ndim == 2 else (y_score >= 0.5).astype(int)
        else:
            y_input = y_score
        resamples = min(200, evaluation.bootstrap)
        low, high = protein_bootstrap(spec.fn, y_true, y_input, counts, resamples)
        return {"metric": headline, "low": low, "high": high, "resamples": resamples}


def _check_stages(recipe: Any, task: str) -> None:
    stages = recipe.stages
    want = "regression" if task == "regression" else "classification"
    if stages[-1].objective != want:
        raise ValueError(
            f"recipe '{recipe.name}': the last stage's objective must be '{want}' for task "
            f"'{task}', not '{stages[-1].objective}'"
        )
    for stage in stages[:-1]:
        if stage.objective != "masked_lm":
            raise ValueError(
                f"recipe '{recipe.name}': stage '{stage.name}' comes before the task stage, so its "
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


def _notes(provenance: dict, dataset_info: dict, level: str) -> list[str]:
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
    if dataset_info.get("recipe_dataset"):
        notes.append(
            f"The data is the user's file {dataset_info['name']} (data.options.path), not the recipe's "
            f"data.dataset '{dataset_info['recipe_dataset']}'."
        )
    for split, how in (dataset_info.get("cut") or {}).items():
        notes.append(f"The data has no {split} split, so the pipeline cut one: {how}.")
    if dataset_info.get("cut"):
        notes.append("The record ids of each split are in splits.json in the run folder.")
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
    if level == "residue":
        notes.append(
            "Per-residue intervals in the table resample residues as if independent; "
            "extra.protein_level_interval resamples whole proteins (wider, more honest)."
        )
    return notes
