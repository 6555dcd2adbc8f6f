"""The protein pipelines: LoRA (or another core adapter) on ESM-2 for per-sequence and per-residue tasks.

``protein/sequence``: per-sequence regression (Spearman, Pearson, MSE) or classification (AUROC,
accuracy, MCC) with mean or BOS pooling. ``protein/residue``: per-residue classification (Q3 for
3-state secondary structure, per-residue AUROC and MCC for binding sites). A recipe may start with a
``masked_lm`` stage (evotuning: a LoRA adapter adapts the language model to the sequences first); the
task stage then trains its own adapter on top. Baselines: ``one_hot`` (ridge / logistic regression on
one-hot encodings) and ``linear_probe`` (the same linear models on frozen backbone features).

From lab code::

    lora = {"method": "lora", "r": 4, "alpha": 1, "targets": ["q", "k", "v", "dense"]}
    pipe = create_pipeline("protein/sequence", task="regression", backbone="esm2_small_random",
                           adapter=lora, train={"epochs": 5, "lr": 3e-4})
    pipe.fit((train_sequences, train_targets))
    report = pipe.evaluate((test_sequences, test_targets))      # report["spearman"].value / .low / .high
    pipe.save_adapter("my_adapter")                              # or format="peft" for HF peft

    pipe = create_pipeline("protein/sequence", task="regression", backbone="esm2_small_random")
    pipe.load("runs/gb1_lora/<timestamp>")     # a run folder, or a folder save_adapter() wrote
    y_true, y_score = pipe.predict((sequences, targets))
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn
from torch.utils.data import DataLoader

from pipelines.core.evaluation import EvaluationReport, RunResult, evaluate
from pipelines.core.peft import (
    LoRA,
    add_adapter,
    as_spec,
    load_adapter,
    save_adapter,
    set_trainable,
    wrappers,
)
from pipelines.core.registry import register_pipeline
from pipelines.core.training import TrainConfig, TrainResult, train
from pipelines.protein import adapters
from pipelines.protein.adapters import HEAD
from pipelines.protein.backbones import expand_targets, load_backbone
from pipelines.protein.batching import ProteinDataset, TaskCollator
from pipelines.protein.data import ProteinDataError, ProteinRecord, check_targets, records_from_lists
from pipelines.protein.datasets import RESIDUE_DATASETS, SEQUENCE_DATASETS, DataOptions
from pipelines.protein.metrics import register_protein_metrics
from pipelines.protein.model import ProteinModel, target_statistics
from pipelines.protein.options import BackboneOptions, ProteinOptions, StageOptions
from pipelines.protein.refusals import unread_fields
from pipelines.protein.splits import limit_length
from pipelines.protein.stages import task_stage

__all__ = ["ProteinOptions", "StageOptions", "BackboneOptions", "SequencePipeline", "ResiduePipeline"]

register_protein_metrics()
DEFAULT_METRICS = {
    "regression": ["spearman", "pearson", "mse"],
    "binary": ["auroc", "accuracy", "mcc"],
    "multiclass": ["accuracy", "auroc", "mcc"],
}


class _ProteinPipeline:
    LEVEL = "sequence"
    OBJECTIVES = ("masked_lm", "regression", "classification")
    BASELINES = ("one_hot", "linear_probe")
    SPEC_BASELINES = True  # the engine trains a spec in compare like the last stage

    @staticmethod
    def export_peft(source: Path, target: Path) -> Path:
        """``peft-pipelines export --format peft``: the adapter and its head as HF peft loads them."""
        from pipelines.protein import adapters

        return adapters.export_peft(source, target)

    def __init__(
        self,
        backbone: str | nn.Module = "esm2_small_random",
        task: str = "regression",
        adapter: Any = None,
        train: TrainConfig | dict | None = None,
        last_n_layers: int | None = None,
        pooling: Literal["mean", "bos"] = "mean",
        num_classes: int | None = None,
        backbone_options: dict | None = None,
        data_options: DataOptions | dict | None = None,
        metrics: list[str] | None = None,
        bootstrap: int = 1000,
        seed: int = 0,
        name: str = "task",
        recipe: Any = None,
        options: ProteinOptions | None = None,
    ):
        """Lab-code constructor.

        Args:
            backbone: A name for :func:`~pipelines.protein.backbones.load_backbone`, or a loaded backbone.
            task: ``regression``, ``binary`` or ``multiclass``.
            adapter: A spec or dict; targets may be role names (``q``, ``k``, ``v``, ``out``, ``fc1``,
                ``fc2``, ``query``, ``key``, ``value``, ``dense``). Default: LoRA r=8 on q, k, v, out.
            train: TrainConfig (or dict) of :meth:`fit`.
            last_n_layers: Adapt only the last N layers.
            pooling: ``mean`` or ``bos`` (per-sequence tasks).
            num_classes: Classes of a multiclass task (default: from the training labels).
            backbone_options: Options of ``load_backbone`` (``max_residues``, ``checkpoint_dir``...).
            data_options: Length policy, batch size and checks (:class:`DataOptions`).
            metrics: Test metrics (default per task).
            bootstrap: Bootstrap resamples of the 95% intervals.
            seed: Seed of head initialisation, training and bootstrap.
            name: Adapter name.
        """
        if task not in DEFAULT_METRICS:
            raise ValueError(f"unknown protein task '{task}'; choose regression, binary or multiclass")
        if self.LEVEL == "residue" and task == "regression":
            raise ValueError(
                "per-residue protein tasks are classification (binary or multiclass), not regression"
            )
        self.backbone_spec = backbone
        self.backbone: nn.Module | None = None if isinstance(backbone, str) else backbone
        self.provenance: dict | None = None if isinstance(backbone, str) else _given_provenance(backbone)
        self.backbone_options = {k: v for k, v in (backbone_options or {}).items() if v is not None}
        self.task = task
        default = LoRA(r=8, alpha=16, targets=["q", "k", "v", "out"])
        self.adapter = as_spec(adapter) if adapter is not None else default
        self.train_config = train if isinstance(train, TrainConfig) else TrainConfig(**(train or {}))
        self.last_n_layers, self.pooling, self.num_classes = last_n_layers, pooling, num_classes
        if isinstance(data_options, DataOptions):
            self.data_options = data_options
        else:
            self.data_options = DataOptions(**(data_options or {}))
        self.metrics = metrics or DEFAULT_METRICS[task]
        self.bootstrap, self.seed, self.name = bootstrap, seed, name
        self.recipe, self.options = recipe, options or ProteinOptions()
        self.model: ProteinModel | None = None

    @classmethod
    def check_recipe(cls, recipe: Any) -> list[tuple[str, str]]:
        """Refuse a task the level has not, stage objectives out of order, a masked_lm stage without an
        adapter, ``data.shots_per_class`` without per-sequence classes, and every option this configuration
        would not read (:func:`pipelines.protein.refusals.unread_fields`)."""
        task = recipe.data.task or ("regression" if cls.LEVEL == "sequence" else "multiclass")
        tasks = ("binary", "multiclass") if cls.LEVEL == "residue" else tuple(DEFAULT_METRICS)
        want = "regression" if task == "regression" else "classification"
        early = [(i, s) for i, s in enumerate(recipe.stages[:-1]) if s.objective != "masked_lm"]
        before = "comes before the task stage, so its objective must be masked_lm, not"
        errors = [(f"stages.{i}.objective", f"stage '{stage.name}' {before} '{stage.objective}'")
                  for i, stage in early]  # fmt: skip
        bare = [
            (i, s) for i, s in enumerate(recipe.stages) if s.objective == "masked_lm" and s.adapter is None
        ]
        errors += [(f"stages.{i}.adapter", f"the masked_lm stage '{stage.name}' trains only its adapter and "
                    "has none: give it one (e.g. method: lora)") for i, stage in bare]  # fmt: skip
        errors += unread_fields(recipe, cls.LEVEL)
        last = recipe.stages[-1]
        if task not in tasks:
            errors.append(("data.task", f"protein/{cls.LEVEL} has no task '{task}': set data.task to one of "
                           f"{', '.join(tasks)}"))  # fmt: skip
        elif last.objective != want:
            errors.append((f"stages.{len(recipe.stages) - 1}.objective", f"the last stage's objective must "
                           f"be '{want}' for task '{task}', not '{last.objective}'"))  # fmt: skip
        if recipe.data.shots_per_class is None:
            return errors
        if cls.LEVEL == "residue":
            errors.append(("data.shots_per_class", "per-residue labels have no per-protein class to count "
                           "shots of; use data.fraction (a share of the training proteins)"))  # fmt: skip
        elif task == "regression":
            errors.append(("data.shots_per_class", "a regression task has no classes; use data.fraction"))
        return errors

    @classmethod
    def from_recipe(cls, recipe: Any) -> _ProteinPipeline:
        """Build the pipeline from a validated recipe."""
        from pipelines.core.recipe import pipeline_options

        options = pipeline_options(recipe) or ProteinOptions()
        stage = options.stages[-1] if len(options.stages) == len(recipe.stages) else StageOptions()
        return cls(
            backbone=recipe.backbone.name,
            task=recipe.data.task or ("regression" if cls.LEVEL == "sequence" else "multiclass"),
            adapter=recipe.stages[-1].adapter,
            train=recipe.stages[-1].train,
            last_n_layers=stage.last_n_layers,
            pooling=stage.pooling,
            backbone_options=options.backbone.model_dump(),
            data_options=options.data,
            metrics=recipe.evaluation.metrics or None,
            bootstrap=recipe.evaluation.bootstrap,
            seed=recipe.seed,
            name=recipe.stages[-1].name,
            recipe=recipe,
            options=options,
        )

    # ----- building blocks ----------------------------------------------------------------------------
    def load_backbone(self) -> nn.Module:
        """Load (once) and return the backbone; ``self.provenance`` says where its weights came from."""
        if self.backbone is None:
            self.backbone, self.provenance = load_backbone(self.backbone_spec, **self.backbone_options)
        return self.backbone

    def records(self, data: Any) -> list[ProteinRecord]:
        """Records from records, ``(sequences, targets_or_labels)`` or ``{"sequences", "targets"}``.

        The residue limit applies as ``data_options.long_sequences`` says (default: refuse).
        """
        limit = self.data_options.max_residues or self.load_backbone().max_residues
        return limit_length(self._as_records(data), limit, self.data_options.long_sequences)

    def _as_records(self, data: Any) -> list[ProteinRecord]:
        if isinstance(data, dict):
            labels = data.get("residue_labels") if self.LEVEL == "residue" else None
            return records_from_lists(data["sequences"], data.get("targets"), labels, data.get("ids"))
        if isinstance(data, tuple) and len(data) == 2:
            sequences, values = data
            if self.LEVEL == "residue":
                return records_from_lists(list(sequences), residue_labels=list(values))
            return records_from_lists(list(sequences), targets=list(values))
        if isinstance(data, list) and all(isinstance(r, ProteinRecord) for r in data):
            check_targets(data)
            return data
        raise ProteinDataError(
            "protein data must be a list of ProteinRecord, a (sequences, targets) tuple or a dict with "
            "'sequences' and 'targets' (or 'residue_labels' for per-residue tasks)"
        )

    def model_task(self) -> str:
        return "residue" if self.LEVEL == "residue" else self.task

    def classes(self, train_records: list[ProteinRecord]) -> int:
        if self.task == "binary":
            return 2
        if self.num_classes is not None:
            return self.num_classes
        if self.task == "regression":
            return 1
        if self.LEVEL == "residue":
            return max(max(r.residue_labels or (0,)) for r in train_records) + 1
        return int(max(r.target for r in train_records)) + 1

    def build_model(self, train_records: list[ProteinRecord]) -> ProteinModel:
        """A fresh backbone + head (seeded), with regression targets standardised on ``train_records``."""
        import torch

        backbone = self.load_backbone()
        mean, std = target_statistics(train_records, self.task)
        torch.manual_seed(self.seed)
        num_classes = max(2, self.classes(train_records))
        self.model = ProteinModel(backbone, self.model_task(), num_classes, self.pooling, mean, std)
        return self.model

    def resolve_spec(self, spec: Any, last_n_layers: int | None) -> Any:
        """The spec with role names expanded into this backbone's module patterns."""
        if spec is None:
            return None
        targets = expand_targets(self.load_backbone(), list(spec.targets), last_n_layers)
        return replace(spec, targets=targets)

    def loader(self, records: list[ProteinRecord], shuffle: bool = False) -> DataLoader:
        collate = TaskCollator(self.load_backbone().vocabulary, self.model_task())
        size = self.data_options.eval_batch_size
        return DataLoader(ProteinDataset(records), batch_size=size, shuffle=shuffle, collate_fn=collate)

    def validation_fn(self, records: list[ProteinRecord]) -> Any:
        """evaluate_fn for the training loop: validation loss plus the task's first metrics."""
        loader = self.loader(records)

        def evaluate_fn(model: ProteinModel) -> dict[str, float]:
            import torch

            with torch.no_grad():
                losses = [(model.loss(batch).item(), len(batch["tokens"])) for batch in loader]
            y_true, y_score = model.predict(loader)
            task = "regression" if self.task == "regression" else self.task
            names = ["spearman"] if task == "regression" else ["accuracy"]
            report = evaluate(task, y_true, y_score, names, bootstrap=0)
            loss = sum(v * n for v, n in losses) / max(1, sum(n for _, n in losses))
            return {"loss": loss, **{k: float(report[k].value) for k in names}}

        return evaluate_fn

    def train_task(
        self, model: ProteinModel, spec: Any, name: str, config: TrainConfig, train_records, val_records,
        run_dir: Path | None = None, resume: bool = False, trainable: list[str] | None = None,
    ) -> TrainResult:  # fmt: skip
        """Add the (resolved) adapter ``name`` and train it with the head on the task loss."""
        if spec is not None:
            add_adapter(model, spec, name=name)
        names = trainable if trainable is not None else ([name] if spec is not None else [])
        set_trainable(model, names, extra=[HEAD])
        evaluate_fn = self.validation_fn(val_records) if val_records else None
        plan = task_stage(model, spec, train_records, self.model_task(), evaluate_fn)  # what a recipe trains
        return train(
            model, plan.dataset, plan.loss_fn, config, evaluate_fn=plan.evaluate_fn, run_dir=run_dir,
            resume=resume, collate_fn=plan.collate_fn, seed=self.seed, progress=False,
        )  # fmt: skip

    # ----- lab code -----------------------------------------------------------------------------------
    def fit(self, train_data: Any, val: Any = None, run_dir: Path | None = None) -> TrainResult:
        """Train the adapter and head on ``train_data`` (validation metrics each epoch when ``val``)."""
        train_records = self.records(train_data)
        val_records = self.records(val) if val is not None else None
        model = self.build_model(train_records)
        spec = self.resolve_spec(self.adapter, self.last_n_layers)
        return self.train_task(model, spec, self.name, self.train_config, train_records, val_records, run_dir)

    def predict(self, data: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(y_true, y_score)`` of the fitted model (y_true empty when the data has no labels)."""
        if self.model is None:
            raise RuntimeError("the pipeline has no model yet; call fit() or load_adapter() first")
        return self.model.predict(self.loader(self.records(data)))

    def evaluate(self, test: Any) -> EvaluationReport:
        """Metrics with 95% bootstrap intervals on ``test``."""
        y_true, y_score = self.predict(test)
        return evaluate(self.task, y_true, y_score, self.metrics, self.bootstrap, self.seed)

    def save_adapter(self, directory: str | Path, format: Literal["native", "peft"] = "native") -> Path:
        """Write the adapter and head (safetensors) and ``protein_head.json`` into ``directory``.

        ``format="peft"``: HF peft's layout, the head as ``modules_to_save`` (see
        :func:`pipelines.protein.adapters.export_peft`).
        """
        if self.model is None:
            raise RuntimeError("there is no trained model to save; call fit() first")
        directory = Path(directory)
        if format == "peft":
            import tempfile

            with tempfile.TemporaryDirectory() as scratch:
                return adapters.export_peft(self.save_adapter(Path(scratch) / directory.name), directory)
        save_adapter(self.model, directory, name=self.name, extra=[HEAD])
        facts = adapters.head_facts(self.model, self.task, self.LEVEL, [directory.name], self.provenance)
        adapters.write_head_facts(directory, facts)
        return directory

    def load_adapter(self, directory: str | Path, num_classes: int | None = None) -> ProteinModel:
        """A fresh model with the adapter and head saved by :meth:`save_adapter`."""
        import torch

        outputs = num_classes or self.num_classes or adapters.saved_outputs(Path(directory))
        self.model = ProteinModel(self.load_backbone(), self.model_task(), max(2, outputs), self.pooling)
        with torch.no_grad():
            self.name = load_adapter(self.model, directory)
        return self.model

    def load(self, path: str | Path) -> ProteinModel:
        """Restore what a run folder or :meth:`save_adapter` wrote, so :meth:`predict` works after it.

        Loads every stage's adapter in training order (a masked-LM stage's first), the head, its number
        of classes and the pooling it was trained with; refuses a head of another task or level, and a
        backbone other than the one it was trained on (when their weights can be told apart).
        """
        import torch

        folders = adapters.adapter_folders(path)
        head_folder = folders[-1]
        facts = adapters.read_head_facts(head_folder) or {}
        saved = (facts.get("task", self.task), facts.get("level", self.LEVEL))
        if saved != (self.task, self.LEVEL):
            raise ValueError(
                f"{head_folder} holds a {saved[1]}-level {saved[0]} head; create the pipeline with "
                f"task='{saved[0]}' (protein/{saved[1]}) to load it"
            )
        outputs = adapters.saved_outputs(head_folder)
        backbone = self._pristine_backbone()
        adapters.check_backbone(facts, self.provenance, head_folder)
        self.pooling = facts.get("pooling", self.pooling)
        model = ProteinModel(backbone, self.model_task(), max(2, outputs), self.pooling)
        with torch.no_grad():
            for folder in folders:
                self.name = load_adapter(model, folder)
        if self.task == "multiclass":
            self.num_classes = model.num_classes
        self.model = model
        return model

    def _pristine_backbone(self) -> nn.Module:
        """The backbone without adapters: reloaded by name when an earlier fit or load added some."""
        backbone = self.load_backbone()
        if next(iter(wrappers(backbone)), None) is None:
            return backbone
        if not isinstance(self.backbone_spec, str):
            raise ValueError(
                "the backbone passed to this pipeline already holds adapters from an earlier fit or load; "
                "create a new pipeline with a fresh backbone to load into"
            )
        self.backbone = None
        return self.load_backbone()

    # ----- recipe path --------------------------------------------------------------------------------
    def run(self, run_dir: Path, resume: bool = False) -> RunResult:
        """Run the recipe through the core experiment engine with this domain's hooks."""
        from pipelines.core.experiment import run_experiment
        from pipelines.protein.experiment import ProteinExperiment

        return run_experiment(ProteinExperiment(self), self.recipe, Path(run_dir), resume)


def _given_provenance(backbone: nn.Module) -> dict:
    given = getattr(backbone, "provenance", None)
    if isinstance(given, dict):
        return given
    return {"name": type(backbone).__name__, "source": "passed in by the caller", "weights": "not recorded"}


@register_pipeline("protein/sequence", options=ProteinOptions, demo="protein/gb1_lora")
class SequencePipeline(_ProteinPipeline):
    """Per-sequence protein regression or classification with LoRA on ESM-2 (FLIP GB1, own CSV files)."""

    LEVEL = "sequence"
    DATASETS = SEQUENCE_DATASETS


@register_pipeline("protein/residue", options=ProteinOptions)
class ResiduePipeline(_ProteinPipeline):
    """Per-residue protein classification with LoRA on ESM-2 (FLIP secondary structure, binding sites)."""

    LEVEL = "residue"
    DATASETS = RESIDUE_DATASETS
