"""The clinical pipeline's hooks for the core experiment engine: notes and splits, the layer cache, the
causal-LM and classification stages, the baselines, perplexity before and after, and the report's facts.

The engine (:mod:`pipelines.core.experiment`) runs the recipe, and lab code's ``fit`` trains the same
stages through its ``train_candidate``; this module only knows clinical notes. Adapters live in the causal
LM (``model.lm``; targets name LM modules), and with ``backbone.options.cached_layers`` every dataset
carries the bottom layers' outputs, computed once per note with the frozen backbone and shared by every
stage and baseline.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from pipelines.clinical.data import (
    Notes,
    class_weights,
    mtsamples_task,
    split_notes,
    stratified_subset,
    write_splits,
)
from pipelines.clinical.metrics import perplexity_change
from pipelines.clinical.model import ClinicalModel
from pipelines.clinical.notes_file import load_notes_file
from pipelines.clinical.stages import (
    HEAD,
    WEIGHTS,
    ClassificationLoss,
    StageError,
    check_cached_layers,
    classification_data,
    describe_notes,
    lm_adapter,
    lm_copy,
    lm_data,
    lm_loss,
    perplexity_of,
    save_exports,
    score,
    stage_options,
)
from pipelines.clinical.tokens import PadCollate
from pipelines.core.experiment import ExperimentData, StagePlan, Trained, compare_label
from pipelines.core.experiment.engine import compare_stages
from pipelines.core.peft import adapter_names, spec_to_dict, wrappers

__all__ = ["ClinicalExperiment", "load_recipe_notes"]


def load_recipe_notes(pipe: Any) -> Notes:
    """Read the recipe's dataset: MTSamples (``data.options.task_name``) or a notes file."""
    recipe, data = pipe.recipe, pipe.options.data
    if recipe.data.dataset == "mtsamples":
        notes = mtsamples_task(data.task_name, num_classes=data.num_classes)
    else:
        notes = load_notes_file(recipe.data.dataset, task=recipe.data.task, **pipe.columns)
    if notes.task != pipe.task:
        raise StageError(
            f"data.task is '{recipe.data.task or 'unset (binary)'}' but the notes make a {notes.task} task "
            f"({recipe.data.dataset}, {data.task_name}); set data.task: {notes.task}"
        )
    return notes


class ClinicalExperiment:
    """One run of ``clinical/two_stage``: the engine's hooks, from a recipe or (``for_notes``) lab code."""

    def __init__(self, pipe: Any) -> None:
        self.pipe, self.recipe, self.task = pipe, pipe.recipe, pipe.task
        self.tokenizer: Any = None
        self.batch = 8
        self.run_dir: Path | None = None
        self.sets: dict[str, Any] = {}
        self.lm_sets: dict[int, Any] = {}
        self.held_out: Any = None
        self.perplexity: dict[str, dict] = {}
        self.change: dict[str, dict] = {}
        self.notes_out: list[str] = []
        self.laps: dict[str, dict[str, float]] = {}
        self._clock = (time.perf_counter(), time.process_time())

    @classmethod
    def for_notes(
        cls, pipe: Any, notes: Notes, val: Notes | None = None, domain_texts: list[str] | None = None
    ) -> ClinicalExperiment:
        """Hooks for lab code: classify ``notes`` (validation: ``val``); causal-LM stages read
        ``domain_texts`` (default: the notes' texts)."""
        hooks = cls(pipe)
        hooks.class_names, hooks.tokenizer = notes.class_names, pipe.backbone.tokenizer
        model = hooks.new_model()
        val = val if _validates(pipe.stages) else None  # cached states only for notes a stage reads
        hooks.sets = hooks._classification_sets(model, {"train": notes, "val": val})
        texts = list(domain_texts) if domain_texts is not None else notes.texts
        hooks._lm_sets(model, texts, pipe.stages)
        return hooks

    def _lap(self, name: str) -> None:
        """Wall and CPU seconds of a phase (CPU time tells the cost apart from other processes' load)."""
        wall, cpu = time.perf_counter(), time.process_time()
        self.laps[name] = {"wall_s": round(wall - self._clock[0], 2), "cpu_s": round(cpu - self._clock[1], 2)}
        self._clock = (wall, cpu)

    # ----- data and models ----------------------------------------------------------------------------
    def load_data(self, run_dir: Path) -> ExperimentData:
        recipe, data = self.recipe, self.pipe.options.data
        notes = load_recipe_notes(self.pipe)
        self._lap("load_notes")
        full = split_notes(notes, data.split, seed=recipe.seed)
        for name in ("train", "test"):
            if name not in full or len(full[name]) == 0:
                raise StageError(f"data.options.split gives no '{name}' notes; give it a positive fraction")
        if recipe.data.shots_per_class is not None and notes.task == "multilabel":
            raise StageError("data.shots_per_class is for binary and multiclass tasks; use data.fraction")
        self.notes, self.full, self.run_dir = notes, full, Path(run_dir)
        self.class_names, self.batch = notes.class_names, data.eval_batch_size
        self.tokenizer = self.pipe.backbone.tokenizer
        self._lap("load_backbone")
        self.cache_model = self.new_model()  # computes the cached prefix states; never trained
        self._check_compare_specs()
        lm_stages = [s for s in recipe.stages if s.objective == "causal_lm"]
        if lm_stages:
            # Packed only as far as the stages read (max_blocks) and the perplexity needs (eval_blocks).
            self._lm_sets(self.cache_model, notes.subset(full["train"]).texts, recipe.stages)
            first = stage_options(lm_stages[0])
            test_texts = notes.subset(full["test"]).texts  # held out: never trained on
            self.held_out = lm_data(
                self.cache_model, self.tokenizer, test_texts, first.max_length, first.eval_blocks
            )
            self._lap("lm_blocks")
            self.perplexity["base_lm"] = self._perplexity(self.cache_model)
            self._lap("base_perplexity")
        info = {
            "name": recipe.data.dataset,
            "task_name": data.task_name if recipe.data.dataset == "mtsamples" else None,
            "class_names": notes.class_names, **notes.source,
            "full_splits": {k: int(len(v)) for k, v in full.items()}, "splits_file": "splits.json",
        }  # fmt: skip
        labels = [tuple(np.atleast_1d(notes.labels[i]).tolist()) for i in full["train"]]
        self.info = info
        return ExperimentData(self.task, len(full["train"]), labels, info)

    def _check_compare_specs(self) -> None:
        """Refuse, before anything trains, a compare spec the model cannot hold: a target that matches no LM
        module, or an adapter below the cached layers (the classification sets' cached states)."""
        for index, entry in enumerate(self.recipe.compare):
            if isinstance(entry, str):
                continue
            stage = compare_stages(self.recipe, entry)[0]
            try:
                spec = lm_adapter(self.cache_model, stage.adapter, stage.name)
                check_cached_layers(self.cache_model, [t.removeprefix("lm.") for t in spec.targets])
            except StageError as error:
                raise StageError(f"compare.{index}: {error}") from None

    def keep_training(self, indices: list[int]) -> None:
        """The engine's low-data draw, then the stratified caps; writes the split ids to splits.json."""
        notes, full, data, seed = self.notes, self.full, self.pipe.options.data, self.recipe.seed
        train = full["train"][np.asarray(indices, dtype=np.int64)]
        used = {
            "train": stratified_subset(train, notes, data.max_train, seed),
            "test": stratified_subset(full["test"], notes, data.max_test, seed),
        }
        if "val" in full and len(full["val"]):
            used["val"] = stratified_subset(full["val"], notes, data.max_val, seed)
        write_splits(self.run_dir, notes, used, seed)
        # Cached states for the drawn and capped notes only, and for validation only when a stage reads it.
        wanted = ("train", "test") + (("val",) if _validates(self.recipe.stages) and "val" in used else ())
        self.sets = self._classification_sets(self.cache_model, {k: notes.subset(used[k]) for k in wanted})
        self.info.update(describe_notes(notes, {k: used[k] for k in wanted}))
        self.cache_model = None  # every tensor that needs it is made
        self._lap("classification_sets")

    def _classification_sets(self, model: ClinicalModel, splits: dict[str, Notes | None]) -> dict[str, Any]:
        length = self.pipe.classification_options.max_length
        return {
            name: classification_data(model, self.tokenizer, notes, length, self.batch)
            for name, notes in splits.items()
            if notes is not None
        }

    def _lm_sets(self, model: ClinicalModel, texts: list[str], stages: list[Any]) -> None:
        """Packed blocks of ``texts`` for each causal-LM block length (the first stage's caps win)."""
        for stage in stages:
            options = stage_options(stage)
            if stage.objective == "causal_lm" and options.max_length not in self.lm_sets:
                self.lm_sets[options.max_length] = lm_data(
                    model, self.tokenizer, texts, options.max_length, options.max_blocks, self.batch
                )

    def new_model(self) -> ClinicalModel:
        return self.pipe.new_model(len(self.class_names))

    def primary_label(self, recipe: Any) -> str:
        return "two_stage" if any(s.objective == "causal_lm" for s in recipe.stages) else "single_stage"

    # ----- stages -------------------------------------------------------------------------------------
    def plan_stage(self, model: ClinicalModel, stage: Any, index: int) -> StagePlan:
        """The stage's data and loss; its adapter goes into the LM. Refuses, before anything changes, a
        stage that trains a missing adapter or puts an adapter below the cached layers."""
        options = stage_options(stage)
        spec = lm_adapter(model, stage.adapter, stage.name)
        known = adapter_names(model) + ([stage.name] if spec is not None else [])
        unknown = [n for n in stage.trainable or [] if n not in known]
        if unknown:
            raise StageError(
                f"stage '{stage.name}' trains adapter(s) {unknown} that the model does not have "
                f"(it has {adapter_names(model)}); add them in an earlier stage"
            )
        # set_trainable (next, in the engine) trains only adapters and the head, so checking the adapters
        # already there and the modules about to get one covers everything the stage will train.
        check_cached_layers(model, [t.removeprefix("lm.") for t in spec.targets] if spec is not None else [])
        if stage.objective == "classification":
            plan = self._classification_plan(stage, options)
        elif not stage.trainable:
            raise StageError(
                f"stage '{stage.name}' has nothing to train; give it an adapter or trainable ones"
            )
        else:
            plan = StagePlan(self.lm_sets[options.max_length], lm_loss)
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
        validate = stage.train.early_stopping_patience or stage.train.eval_every
        val = self.sets.get("val") if validate else None
        return StagePlan(data, ClassificationLoss(self.task, weights), extra_trainable=[HEAD], val_data=val)

    def after_stage(self, model: ClinicalModel, stage: Any, result: Any) -> None:
        """Tag the history with the stage; after a causal-LM stage, the held-out perplexity and its change."""
        for row in result.history:
            row.setdefault("stage", stage.name)
            row.setdefault("objective", stage.objective)
        if stage.objective != "causal_lm" or self.held_out is None:
            return
        before, after = self.perplexity["base_lm"], self._perplexity(model)
        change = perplexity_change(before, after, self.pipe.bootstrap, self.pipe.seed)
        self.perplexity[f"after_{stage.name}"], self.change[f"after_{stage.name}"] = after, change
        self.notes_out.append(
            f"Stage '{stage.name}' changed held-out perplexity from {before['value']:.2f} to "
            f"{after['value']:.2f} (x{change['ratio']:.3f}; paired change in NLL {change['value']:+.4f} "
            f"[{change['low']:+.4f}, {change['high']:+.4f}] nats/token over the same blocks)."
        )

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
        """``head_only``: the frozen backbone and a head; ``single_stage_lora``: the classification stages
        alone (no domain adaptation), training only the adapters they add."""
        heads = [s for s in self.recipe.stages if s.objective == "classification"]
        if name == "head_only":
            return [heads[0].model_copy(update={"name": "head", "adapter": None, "trainable": []})]
        if name != "single_stage_lora":
            raise StageError(f"compare: unknown baseline '{name}'; use head_only or single_stage_lora")
        added: list[str] = []
        stages = []
        for stage in heads:
            if stage.adapter is not None:
                added.append(stage.name)
            stages.append(stage.model_copy(update={"trainable": [n for n in stage.trainable if n in added]}))
        if not added:
            raise StageError("compare: single_stage_lora needs a classification stage with an adapter")
        return stages

    def describe(self, models: dict[str, Trained]) -> dict[str, Any]:
        """Perplexity rows, HF peft copies and the head beside the engine's adapters, the report's facts."""
        main = next(iter(models.values()))
        folder = self.run_dir / "adapters"
        sizes = {name: (path / WEIGHTS).stat().st_size for name, path in main.adapters.items()}
        head_info = {"task": self.task, "class_names": self.class_names}
        sizes.update(save_exports(main.model, lm_copy(self.pipe.backbone.model), folder, head_info))
        specs = {s.name: spec_to_dict(s.adapter) for s in self.recipe.stages if s.adapter is not None}
        backbone = self.pipe.backbone
        perplexity = {k: {n: x for n, x in v.items() if n != "block_nll"} for k, v in self.perplexity.items()}
        return {
            "results": {
                k: {"perplexity": {n: v[n] for n in ("value", "low", "high")}}
                for k, v in self.perplexity.items()
            },
            "backbone": {**backbone.info, "cached_layers": self.pipe.backbone_options.cached_layers},
            "adapter": {
                "method": ", ".join(sorted({d["method"] for d in specs.values()})) or "none",
                "spec": specs,
                "order": adapter_names(main.model),
                "file_size_bytes": sum(v for k, v in sizes.items() if "/" not in k),
                "files": sizes,
            },
            "cost": {"phases": self.laps},
            "notes": self.notes_out + self._notes(),
            "extra": {
                "perplexity": perplexity,
                "perplexity_change": self.change,
                "stages": [_stage_summary(s) for s in self.recipe.stages],
                "baselines": self._spec_facts(models),
            },
        }

    def _spec_facts(self, models: dict[str, Trained]) -> dict[str, dict]:
        """What each compare spec trained: the spec as written and the LM modules its adapter went on."""
        facts = {}
        for entry in self.recipe.compare:
            label = compare_label(entry)
            if isinstance(entry, str) or models.get(label) is None or models[label].model is None:
                continue
            modules = [path.removeprefix("lm.") for path, wrapper in wrappers(models[label].model)
                       if label in wrapper.adapters]  # fmt: skip
            last = self.recipe.stages[-1]
            facts[label] = {"adapter": spec_to_dict(entry), "adapted_modules": modules,
                            "stage": {"like": last.name, "objective": last.objective}}  # fmt: skip
        return facts

    def _notes(self) -> list[str]:
        out = []
        lm_stages = [s for s in self.recipe.stages if s.objective == "causal_lm"]
        if lm_stages:
            first = stage_options(lm_stages[0])
            out.append(
                f"Perplexity: {self.held_out.blocks.shape[0]} held-out blocks of {first.max_length} tokens "
                f"packed from test-split notes (never trained on); stage 1 trained on "
                f"{self.lm_sets[first.max_length].blocks.shape[0]} blocks from training-split notes."
            )
        last = self.recipe.stages[-1]
        out += [
            f"Compare entry '{compare_label(entry)}' trained as the last stage ('{last.name}', "
            f"{last.objective}: its notes, training settings and steps) with only this adapter and the head, "
            "on the backbone without the earlier stages' adapters."
            for entry in self.recipe.compare
            if not isinstance(entry, str)
        ]
        out += _dataset_notes(self.notes)
        if self.pipe.backbone.info.get("source") == "random":
            out.append("The backbone has random weights (a test model): the numbers say nothing clinical.")
        cached = self.pipe.backbone_options.cached_layers
        if cached:
            out.append(
                f"The bottom {cached} decoder layers hold no adapter; their outputs were computed once per "
                "note and reused by every stage and baseline (exact)."
            )
        return out


def _validates(stages: list[Any]) -> bool:
    """Whether any stage reads the validation split (eval_every or early stopping)."""
    return any(s.train.early_stopping_patience or s.train.eval_every for s in stages)


def _stage_summary(stage: Any) -> dict[str, Any]:
    return {
        "name": stage.name,
        "objective": stage.objective,
        "adapter": None if stage.adapter is None else stage.adapter.method,
        "trainable": list(stage.trainable or []),
        "options": stage_options(stage).model_dump(),
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
