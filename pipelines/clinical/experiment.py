"""The clinical pipeline's hooks for the core experiment engine: notes and splits, the layer cache, the
causal-LM and classification stages, the baselines, perplexity before and after, and the report's facts.

The engine (:mod:`pipelines.core.experiment`) runs the recipe, and lab code's ``fit`` trains the same
stages through its ``train_candidate``; this module only knows clinical notes. Adapters live in the causal
LM (``model.lm``; targets name LM modules), and with ``backbone.options.cached_layers`` every dataset
carries the bottom layers' outputs, computed once per note with the frozen backbone and shared by every
stage and baseline (:mod:`pipelines.clinical.prepared`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from pipelines.clinical.data import Notes, class_weights, write_splits
from pipelines.clinical.metrics import PerplexityLog
from pipelines.clinical.model import ClinicalModel
from pipelines.clinical.prepared import (
    capped_splits,
    classification_sets,
    dataset_info,
    describe_notes,
    held_out_blocks,
    lm_key,
    lm_sets,
    lm_stages,
    load_recipe_notes,
    recipe_splits,
    validates,
)
from pipelines.clinical.report_notes import perplexity_change_note, run_notes
from pipelines.clinical.stages import (
    HEAD,
    ClassificationLoss,
    StageError,
    baseline_stages,
    check_compare_specs,
    export_run_adapters,
    lm_copy,
    lm_loss,
    perplexity_of,
    score,
    stage_adapter,
    stage_options,
)
from pipelines.clinical.tokens import PadCollate
from pipelines.core.experiment import ExperimentData, StagePlan, Trained

__all__ = ["ClinicalExperiment"]


class ClinicalExperiment:
    """One run of ``clinical/two_stage``: the engine's hooks, from a recipe or (``for_notes``) lab code."""

    def __init__(self, pipe: Any) -> None:
        self.pipe, self.recipe, self.task = pipe, pipe.recipe, pipe.task
        self.tokenizer: Any = None
        self.batch = 8
        self.run_dir: Path | None = None
        self.sets: dict[str, Any] = {}
        self.lm_sets: dict[tuple[int, int | None], Any] = {}
        self.held_out: Any = None
        self.perplexity = PerplexityLog(pipe.bootstrap, pipe.seed)
        self.stage_notes: list[str] = []

    @classmethod
    def for_notes(
        cls, pipe: Any, notes: Notes, val: Notes | None = None, domain_texts: list[str] | None = None
    ) -> ClinicalExperiment:
        """Hooks for lab code: classify ``notes`` (validation: ``val``); causal-LM stages read
        ``domain_texts`` (default: the notes' texts)."""
        hooks = cls(pipe)
        hooks.class_names, hooks.tokenizer = notes.class_names, pipe.backbone.tokenizer
        model = hooks.new_model()
        val = val if validates(pipe.stages) else None  # cached states only for notes a stage reads
        hooks.sets = hooks._classification_sets(model, {"train": notes, "val": val})
        texts = list(domain_texts) if domain_texts is not None else notes.texts
        hooks.lm_sets = lm_sets(model, hooks.tokenizer, texts, pipe.stages, hooks.batch)
        return hooks

    # ----- data and models ----------------------------------------------------------------------------
    def load_data(self, run_dir: Path) -> ExperimentData:
        recipe, data = self.recipe, self.pipe.options.data
        notes = load_recipe_notes(self.pipe)
        full = recipe_splits(notes, recipe, data)
        self.notes, self.full, self.run_dir = notes, full, Path(run_dir)
        self.class_names, self.batch = notes.class_names, data.eval_batch_size
        self.tokenizer = self.pipe.backbone.tokenizer
        self.cache_model = self.new_model()  # computes the cached prefix states; never trained
        check_compare_specs(self.cache_model, self.recipe)
        if lm_stages(recipe.stages):
            # Packed only as far as the stages read (max_blocks) and the perplexity needs (eval_blocks).
            train_texts = notes.subset(full["train"]).texts
            self.lm_sets = lm_sets(self.cache_model, self.tokenizer, train_texts, recipe.stages, self.batch)
            test_texts = notes.subset(full["test"]).texts  # held out: never trained on
            self.held_out = held_out_blocks(self.cache_model, self.tokenizer, test_texts, recipe.stages)
            self.perplexity.add_base(self._perplexity(self.cache_model))
        self.info = dataset_info(recipe, data, notes, full)
        labels = [tuple(np.atleast_1d(notes.labels[i]).tolist()) for i in full["train"]]
        return ExperimentData(self.task, len(full["train"]), labels, self.info)

    def keep_training(self, indices: list[int]) -> None:
        """The engine's low-data draw, then the stratified caps; writes the split ids to splits.json."""
        notes, seed = self.notes, self.recipe.seed
        used = capped_splits(notes, self.full, indices, self.pipe.options.data, seed)
        write_splits(self.run_dir, notes, used, seed)
        # Cached states for the drawn and capped notes only, and for validation only when a stage reads it.
        wanted = ("train", "test") + (("val",) if validates(self.recipe.stages) and "val" in used else ())
        self.sets = self._classification_sets(self.cache_model, {k: notes.subset(used[k]) for k in wanted})
        self.info.update(describe_notes(notes, {k: used[k] for k in wanted}))
        self.cache_model = None  # every tensor that needs it is made

    def _classification_sets(self, model: ClinicalModel, splits: dict[str, Notes | None]) -> dict[str, Any]:
        length = self.pipe.classification_options.max_length
        return classification_sets(model, self.tokenizer, splits, length, self.batch)

    def new_model(self) -> ClinicalModel:
        return self.pipe.new_model(len(self.class_names))

    def primary_label(self, recipe: Any) -> str:
        return "two_stage" if lm_stages(recipe.stages) else "single_stage"

    # ----- stages -------------------------------------------------------------------------------------
    def plan_stage(self, model: ClinicalModel, stage: Any, index: int) -> StagePlan:
        """The stage's data and loss; its adapter goes into the LM (see
        :func:`~pipelines.clinical.stages.stage_adapter`, which refuses an impossible one)."""
        options, spec = stage_options(stage), stage_adapter(model, stage)
        if stage.objective == "classification":
            plan = self._classification_plan(stage, options)
        elif not stage.trainable:
            raise StageError(
                f"stage '{stage.name}' has nothing to train; give it an adapter or trainable ones"
            )
        else:
            plan = StagePlan(self.lm_sets[lm_key(stage)], lm_loss)
        if len(plan.dataset) == 0:
            raise StageError(f"stage '{stage.name}' has no training data; lower max_length or add notes")
        plan.adapter, plan.collate_fn = spec, PadCollate(int(self.tokenizer.pad_token_id))
        plan.checkpoint = self.run_dir is not None  # lab code's fit writes no files
        return plan

    def _classification_plan(self, stage: Any, options: Any) -> StagePlan:
        data = self.sets["train"]
        weights = None
        if options.class_weights:
            weights = torch.tensor(class_weights(data.labels.numpy(), self.task), dtype=torch.float32)
        val = self.sets.get("val") if validates([stage]) else None
        return StagePlan(data, ClassificationLoss(self.task, weights), extra_trainable=[HEAD], val_data=val)

    def after_stage(self, model: ClinicalModel, stage: Any, result: Any) -> None:
        """Tag the history with the stage; after a causal-LM stage, the held-out perplexity and its change."""
        for row in result.history:
            row.setdefault("stage", stage.name)
            row.setdefault("objective", stage.objective)
        if stage.objective != "causal_lm" or self.held_out is None:
            return
        after = self._perplexity(model)
        change = self.perplexity.add_after(stage.name, after)
        self.stage_notes.append(perplexity_change_note(stage.name, self.perplexity.base, after, change))

    def _perplexity(self, model: ClinicalModel) -> dict:
        return perplexity_of(model, self.held_out, self.batch, self.pipe.bootstrap, self.pipe.seed)

    def predict(self, model: ClinicalModel) -> tuple[np.ndarray, np.ndarray]:
        if "test" not in self.sets:  # lab code's fit has no test split
            return np.zeros(0), np.zeros(0)
        return score(model, self.sets["test"], self.task, int(self.tokenizer.pad_token_id), self.batch)

    def probe(self, model: ClinicalModel) -> torch.Tensor:
        first = Subset(self.sets["test"], range(min(16, len(self.sets["test"]))))
        return torch.as_tensor(score(model, first, self.task, int(self.tokenizer.pad_token_id))[1])

    # ----- baselines and report -----------------------------------------------------------------------
    def baseline(self, name: str) -> list[Any]:
        """``head_only`` or ``single_stage_lora`` (see :func:`~pipelines.clinical.stages.baseline_stages`)."""
        return baseline_stages(self.recipe.stages, name)

    def describe(self, models: dict[str, Trained]) -> dict[str, Any]:
        """Perplexity rows, HF peft copies and the head beside the engine's adapters, the report's facts."""
        main = next(iter(models.values()))
        head_info = {"task": self.task, "class_names": self.class_names}
        bare_lm, folder = lm_copy(self.pipe.backbone.model), self.run_dir / "adapters"
        adapter = export_run_adapters(main.model, main.adapters, bare_lm, folder, head_info)
        backbone, cached = self.pipe.backbone, self.pipe.backbone_options.cached_layers
        notes = run_notes(self.notes, backbone.info, cached, self.held_out, self.lm_sets)
        return {
            "results": self.perplexity.results(),
            "backbone": {**backbone.info, "cached_layers": cached},
            "adapter": adapter,
            "notes": self.stage_notes + notes,
            "extra": self.perplexity.extra(),
        }
