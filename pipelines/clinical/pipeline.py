"""The ``clinical/two_stage`` pipeline (Gema et al. 2023): a domain LoRA trained with the causal-LM
objective on clinical notes, then a task LoRA stacked on it plus a classification head.

The paper's four variants are recipe settings: (a) no domain stage; (b) stage 2 ``trainable: [task]``;
(c) stage 2 with ``adapter: null`` and ``trainable: [domain]``; (d) ``trainable: [domain, task]``.
From a recipe, ``run`` goes through the core experiment engine with this domain's hooks
(:mod:`pipelines.clinical.experiment`): it also trains the baselines in ``compare`` (``head_only``: the
frozen backbone and a head; ``single_stage_lora``: the classification stages alone, without domain
adaptation; an adapter spec: the last stage, a classification stage, with that adapter alone on the bare
backbone) on the same data, seed and budget, and reports held-out perplexity before and after each
causal-LM stage. Lab code's ``fit`` trains its stages through the same engine function.

From lab code::

    pipe = create_pipeline("clinical/two_stage", backbone="smollm2-135m", task="binary",
                           label_columns="label", task_train={"epochs": 3, "lr": 1e-3})
    pipe.fit(train_frame)                  # a DataFrame of notes (text + label columns) or Notes
    report = pipe.evaluate(test_frame)     # report["auroc"].value / .low / .high
    pipe.save("adapters/")                 # domain/, task/ (each with peft/), classifier/
    pipe.load("runs/<recipe>/<time>/adapters")   # a recipe run's model, for predict / evaluate
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipelines.clinical.backbones import Backbone, load_backbone
from pipelines.clinical.data import MTSAMPLES, Notes
from pipelines.clinical.experiment import ClinicalExperiment
from pipelines.clinical.model import ClinicalModel
from pipelines.clinical.notes_file import notes_from_frame
from pipelines.clinical.options import BackboneOptions, ClinicalOptions, StageOptions, as_model
from pipelines.clinical.recipe_checks import unread_fields
from pipelines.clinical.stages import (
    HEAD,
    PROMPT_CACHE_REASON,
    PROMPT_METHODS,
    Stage,
    StageError,
    as_section,
    build_model,
    classification_data,
    lm_copy,
    lm_data,
    load_adapters,
    perplexity_of,
    save_adapters,
    score,
    stage_options,
)
from pipelines.core.evaluation import EvaluationReport, RunResult, evaluate
from pipelines.core.experiment import run_experiment, train_candidate
from pipelines.core.peft import as_spec
from pipelines.core.recipe import Recipe, StageSection, pipeline_options
from pipelines.core.registry import register_pipeline
from pipelines.core.training import TrainConfig, TrainResult

__all__ = ["ClinicalTwoStagePipeline", "BASELINES", "DEFAULT_DOMAIN_ADAPTER", "DEFAULT_TASK_ADAPTER"]

BASELINES = ("head_only", "single_stage_lora")
# The paper's adapters (Gema et al. 2023, section 3).
DEFAULT_DOMAIN_ADAPTER = {
    "method": "lora",
    "r": 16,
    "alpha": 32,
    "dropout": 0.0,
    "targets": ["q_proj", "v_proj"],
}
DEFAULT_TASK_ADAPTER = {"method": "lora", "r": 8, "alpha": 4, "dropout": 0.1, "targets": ["q_proj", "v_proj"]}


def _train_config(value: Any) -> TrainConfig:
    return value if isinstance(value, TrainConfig) else TrainConfig.model_validate(dict(value or {}))


@register_pipeline("clinical/two_stage", options=ClinicalOptions, demo="clinical/mtsamples_cardio_two_stage")
class ClinicalTwoStagePipeline:
    """Clinical text classification with a domain adapter (causal LM) and a task adapter on LLaMA models."""

    OBJECTIVES = ("causal_lm", "classification")
    BASELINES = BASELINES
    SPEC_BASELINES = True  # a compare spec trains as the last (classification) stage, its adapter alone
    DATASETS = (MTSAMPLES.name,)

    def __init__(
        self,
        backbone: str | Backbone = "smollm2-135m",
        task: str = "binary",
        stages: list[Stage | StageSection] | None = None,
        domain_adapter: Any = DEFAULT_DOMAIN_ADAPTER,
        task_adapter: Any = DEFAULT_TASK_ADAPTER,
        train_domain_in_task_stage: bool = True,
        domain_train: TrainConfig | dict | None = None,
        task_train: TrainConfig | dict | None = None,
        block_length: int = 512,
        max_blocks: int | None = None,
        max_length: int = 512,
        pooling: str = "last",
        class_weights: bool = False,
        text_column: str = "text",
        label_columns: str | list[str] = "label",
        id_column: str | None = None,
        backbone_options: BackboneOptions | dict | None = None,
        metrics: list[str] | None = None,
        bootstrap: int = 1000,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        """Build the pipeline for lab code.

        Args:
            backbone: A name for :func:`~pipelines.clinical.backbones.load_backbone` or a loaded Backbone.
            task: ``binary``, ``multiclass`` or ``multilabel``.
            stages: Explicit stages (``Stage`` or the recipe's ``StageSection``); when omitted they are
                built from the arguments below.
            domain_adapter: Spec (or dict) of the stage-1 adapter; None skips domain adaptation.
            task_adapter: Spec of the stage-2 adapter; None trains no new adapter in stage 2.
            train_domain_in_task_stage: Keep training the domain adapter in stage 2 (variant d).
            domain_train, task_train: Training settings of the two stages (``TrainConfig`` fields).
            block_length, max_blocks: Stage 1's packed block length and cap on blocks.
            max_length: Tokens kept from the start of each note for classification.
            pooling, class_weights: Head pooling (``last``/``mean``) and class-weighted loss.
            text_column, label_columns, id_column: Columns of the DataFrames given to fit/evaluate.
            backbone_options: ``revision``, ``cached_layers``, ``tiny`` (see ``BackboneOptions``).
            metrics, bootstrap, seed: Evaluation metrics (default: the task's), resamples, seed.
            progress: Kept for compatibility: training runs through the experiment engine, which shows
                no progress bars.
        """
        if task not in ("binary", "multiclass", "multilabel"):
            raise ValueError(f"task must be binary, multiclass or multilabel, got '{task}'")
        self.backbone_spec = backbone
        self.backbone_options = as_model(BackboneOptions, backbone_options)
        self.task = task
        self.columns = {"text_column": text_column, "label_columns": label_columns, "id_column": id_column}
        self.metrics, self.bootstrap, self.seed, self.progress = metrics, bootstrap, seed, progress
        if stages is None:
            stages = self._default_stages(
                as_spec(domain_adapter), as_spec(task_adapter), train_domain_in_task_stage, domain_train,
                task_train, StageOptions(max_length=block_length, max_blocks=max_blocks),
                StageOptions(max_length=max_length, pooling=pooling, class_weights=class_weights),
            )  # fmt: skip
        self.stages = [as_section(stage) for stage in stages]
        self._check_stages()
        self.recipe: Recipe | None = None
        self.options = ClinicalOptions()
        self.model: Any = None
        self.class_names: list[str] | None = None
        self.train_results: dict[str, TrainResult] = {}
        self._backbone: Backbone | None = backbone if isinstance(backbone, Backbone) else None

    @staticmethod
    def _default_stages(domain, task_spec, train_domain, domain_train, task_train, lm_options, cls_options):
        stages = []
        if domain is not None:
            stages.append(
                Stage("domain", "causal_lm", domain, ["domain"], _train_config(domain_train), lm_options)
            )
        trainable = (["domain"] if domain is not None and train_domain else []) + (
            ["task"] if task_spec else []
        )
        stages.append(
            Stage("task", "classification", task_spec, trainable, _train_config(task_train), cls_options)
        )
        return stages

    def _check_stages(self) -> None:
        heads = [s for s in self.stages if s.objective == "classification"]
        if not heads:
            raise StageError("the clinical pipeline needs a classification stage (it trains the head)")
        if any(s.objective not in self.OBJECTIVES for s in self.stages):
            bad = next(s for s in self.stages if s.objective not in self.OBJECTIVES)
            raise StageError(
                f"stage '{bad.name}' has objective '{bad.objective}'; use causal_lm or classification"
            )
        first = stage_options(heads[0])
        for stage in heads[1:]:
            options = stage_options(stage)
            if (options.max_length, options.pooling) != (first.max_length, first.pooling):
                raise StageError(
                    f"classification stage '{stage.name}' changes max_length or pooling; every "
                    "classification stage must use the first one's"
                )

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> list[tuple[str, str]]:
        """Refuse what no run could do: ``data.shots_per_class`` on a multilabel task (a note has several
        classes), a compare spec when the last stage trains no head, prefix tuning or P-tuning with
        cached layers, and every field this configuration would not read
        (:func:`~pipelines.clinical.recipe_checks.unread_fields`)."""
        problems = []
        task_name = (recipe.data.options or {}).get("task_name")
        multilabel = recipe.data.task == "multilabel" or (
            recipe.data.dataset == "mtsamples" and task_name == "specialties_multilabel"
        )
        if recipe.data.shots_per_class is not None and multilabel:
            problems.append(("data.shots_per_class", "a multilabel note has several classes, so shots per "
                             "class are undefined; use data.fraction or data.options.max_train"))  # fmt: skip
        last = recipe.stages[-1]
        specs = [(f"compare.{i}", e) for i, e in enumerate(recipe.compare) if not isinstance(e, str)]
        if specs and last.objective != "classification":
            problems.append((specs[0][0], f"an adapter spec in compare trains as the last stage, and stage "
                             f"'{last.name}' is {last.objective}, which trains no head; end the stages with "
                             "a classification stage or name a baseline"))  # fmt: skip
        cached = (recipe.backbone.options or {}).get("cached_layers") or 0
        adapters = [(f"stages.{i}.adapter.method", s.adapter) for i, s in enumerate(recipe.stages)]
        for path, spec in adapters + [(f"{path}.method", spec) for path, spec in specs]:
            if cached and spec is not None and spec.method in PROMPT_METHODS:
                problems.append((path, PROMPT_CACHE_REASON.format(method=spec.method, cached=cached)))
        return problems + unread_fields(recipe)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> ClinicalTwoStagePipeline:
        """Build the pipeline a recipe describes (its options validated by ``ClinicalOptions``)."""
        options = pipeline_options(recipe) or ClinicalOptions()
        if len(options.stages) > len(recipe.stages):
            raise StageError(
                f"options give {len(options.stages)} stage option sets for {len(recipe.stages)} stages; "
                "put options inside each stage"
            )
        stages = list(recipe.stages)
        data = options.data
        pipeline = cls(
            backbone=recipe.backbone.name,
            task=recipe.data.task or "binary",
            stages=stages,
            text_column=data.text_column,
            label_columns=data.label_columns,
            id_column=data.id_column,
            backbone_options=options.backbone,
            metrics=recipe.evaluation.metrics or None,
            bootstrap=recipe.evaluation.bootstrap,
            seed=recipe.seed,
        )
        pipeline.recipe, pipeline.options = recipe, options
        return pipeline

    # -- pieces shared by lab code and the recipe path ------------------------------------------------

    @property
    def backbone(self) -> Backbone:
        """The loaded backbone (loaded on first use)."""
        if self._backbone is None:
            options = self.backbone_options
            extra: dict[str, Any] = dict(options.tiny) if self.backbone_spec == "tiny-random-llama" else {}
            if options.revision:
                extra["revision"] = options.revision
            if options.dtype != "float32":
                extra["dtype"] = options.dtype
            self._backbone = load_backbone(str(self.backbone_spec), extra)
        return self._backbone

    @property
    def classification_options(self) -> StageOptions:
        """Options of the first classification stage (tokens per note, pooling)."""
        return stage_options(next(s for s in self.stages if s.objective == "classification"))

    def _notes(self, data: Any) -> Notes:
        if isinstance(data, Notes):
            return data
        return notes_from_frame(data, task=self.task, **self.columns)

    def new_model(self, num_classes: int) -> ClinicalModel:
        """Return a fresh model: a copy of the backbone's LM (sharing its frozen weights, so adapters of one
        model never reach another), no adapters and a newly seeded head."""
        model = build_model(
            self.backbone, self.task, num_classes, self.classification_options.pooling,
            self.backbone_options.cached_layers, self.seed,
        )  # fmt: skip
        device = self.backbone_options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return model.to(device)

    # -- lab code -----------------------------------------------------------------------------------

    def fit(self, train: Any, val: Any = None, domain_texts: list[str] | None = None) -> TrainResult:
        """Train every stage on ``train`` (a DataFrame of notes or Notes) as a recipe would; ``val`` is the
        validation set of stages that set ``eval_every`` or early stopping; causal-LM stages read
        ``domain_texts`` (default: the training notes' texts). Returns the last stage's result."""
        notes = self._notes(train)
        val_notes = self._notes(val) if val is not None else None
        hooks = ClinicalExperiment.for_notes(self, notes, val_notes, domain_texts)
        trained = train_candidate(hooks, self.stages, "fit", Path("."), False, self.seed, False)
        self.model, self.class_names = trained.model, notes.class_names
        self.train_results = {
            stage.name: result for stage, result in zip(self.stages, trained.results, strict=True)
        }
        return trained.results[-1]

    def _require_model(self) -> None:
        if self.model is None:
            raise RuntimeError("the pipeline has no trained model yet; call fit() or load() first")

    def predict(self, notes: Any) -> tuple[Any, Any]:
        """Return ``(y_true, y_score)`` of the trained model on notes (DataFrame or Notes)."""
        self._require_model()
        notes = self._notes(notes)
        data = classification_data(
            self.model, self.backbone.tokenizer, notes, self.classification_options.max_length
        )
        return score(self.model, data, self.task, int(self.backbone.tokenizer.pad_token_id))

    def evaluate(self, test: Any) -> EvaluationReport:
        """Score the trained model on test notes with bootstrap intervals."""
        y_true, y_score = self.predict(test)
        return evaluate(self.task, y_true, y_score, self.metrics, self.bootstrap, self.seed)

    def perplexity(self, texts: list[str], block_length: int = 512, max_blocks: int | None = 64) -> dict:
        """Held-out perplexity of the current model's LM (adapters included) on ``texts``."""
        self._require_model()
        data = lm_data(self.model, self.backbone.tokenizer, list(texts), block_length, max_blocks)
        return perplexity_of(self.model, data, 8, self.bootstrap, self.seed)

    def save(self, directory: str | Path) -> dict[str, int]:
        """Save the adapters and the head as a recipe run does (native ``<adapter>/``, HF peft
        ``<adapter>/peft/``, ``classifier/``); returns bytes per saved folder."""
        self._require_model()
        heads = [s.name for s in self.stages if s.objective == "classification"]
        info = {"task": self.task, "class_names": self.class_names}
        return save_adapters(self.model, lm_copy(self.backbone.model), Path(directory), info, heads)

    def load(self, directory: str | Path) -> ClinicalModel:
        """Make the model saved by :meth:`save`, or by a recipe run (``<run dir>/adapters``), this
        pipeline's model (for predict, evaluate, perplexity); returns it."""
        info = json.loads((Path(directory) / HEAD / "head.json").read_text())
        model = self.new_model(len(info["class_names"]))
        load_adapters(model, Path(directory))
        self.model, self.class_names = model, list(info["class_names"])
        return model

    # -- recipe path --------------------------------------------------------------------------------

    def run(self, run_dir: Path, resume: bool = False) -> RunResult:
        """Run the recipe through the core experiment engine with this domain's hooks; the runner writes
        the report. The primary model's adapters are in ``run_dir/adapters`` (see :meth:`load`)."""
        if self.recipe is None:
            raise RuntimeError("run() needs a recipe; build the pipeline with from_recipe(), or use fit()")
        return run_experiment(ClinicalExperiment(self), self.recipe, Path(run_dir), resume)
