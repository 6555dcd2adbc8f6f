"""The ``imaging/classification`` pipeline: adapters on ViT and CNN backbones, trained on MONAI data.

From a recipe, ``run`` hands the experiment to the core engine (:mod:`pipelines.core.experiment`) with
this domain's hooks (:mod:`pipelines.imaging.experiment`): it trains the recipe's stages (the primary
model) and each baseline in ``compare`` on the same data, seed and budget, picks each model's threshold on
validation (Youden's J) and scores the test split with bootstrap intervals. A ``compare`` entry is
``linear_probe``, ``full_finetune``, an adapter method by name (``lora``, ``ssf``, ``bitfit``, ``norm``,
``bottleneck``, ``prompt``, ``ia3``: the method's default spec on this backbone, recorded with what each
stage trained in the report's ``extra.models``) or a full spec such as
``{method: lora, r: 16, targets: [qkv]}``, whose empty targets mean the backbone family's defaults.
``data.options.sweep_fractions`` repeats all of it at several training-set fractions (the low-data
experiment of Dutt et al. 2024) in one report (:mod:`pipelines.core.experiment.sweep`).

From lab code::

    pipe = create_pipeline("imaging/classification", backbone="dinov2_small",
                           adapter={"method": "lora", "r": 8}, train={"epochs": 2, "lr": 1e-3})
    pipe.fit("chest/train", "chest/val")        # folders of class sub-folders (or CSVs, .npz, datasets)
    report = pipe.evaluate("chest/test")        # report["auroc"].value / .low / .high
    pipe.save_adapter("my_adapter")             # adapter, head and the validation threshold
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import DataLoader

from pipelines.core.evaluation import EvaluationReport, RunResult
from pipelines.core.peft import adapter_specs, as_spec, load_adapter, save_adapter
from pipelines.core.registry import register_pipeline
from pipelines.core.training import TrainConfig, TrainResult
from pipelines.imaging.backbones import load_backbone
from pipelines.imaging.data import (
    PNEUMONIAMNIST,
    TransformOptions,
    build_transforms,
    check_classes,
    collate,
    make_dataset,
    path_records,
)
from pipelines.imaging.head_facts import FACTS, head_facts, operating_point, read_head_facts, write_head_facts
from pipelines.imaging.methods import BASELINES, build_classifier
from pipelines.imaging.metrics import DEFAULT_METRICS  # importing it registers sensitivity/specificity
from pipelines.imaging.model import HEAD, predict_scores
from pipelines.imaging.options import DataOptions, ImagingOptions, StageOptions

__all__ = [
    "ImagingOptions",
    "DataOptions",
    "StageOptions",
    "ImagingClassificationPipeline",
    "DEFAULT_METRICS",
]


@register_pipeline(
    "imaging/classification", options=ImagingOptions, demo="imaging/pneumoniamnist_dinov2s_lora"
)
class ImagingClassificationPipeline:
    """Image classification with adapters on ViT/CNN backbones (timm, MONAI, transformers) and MONAI data."""

    OBJECTIVES = ("classification",)
    BASELINES = BASELINES
    SPEC_BASELINES = True  # a compare entry may be a full adapter spec (the engine trains it)
    DATASETS = (PNEUMONIAMNIST.name,)

    @staticmethod
    def export_peft(source: Path, target: Path) -> Path:
        """``peft-pipelines export --format peft``: the adapter and its head as HF peft loads them."""
        from pipelines.imaging.export import export_peft

        return export_peft(source, target)

    def __init__(
        self,
        backbone: str = "dinov2_small",
        adapter: Any = None,
        method: Literal["adapter", "linear_probe", "full_finetune"] | None = None,
        task: str = "binary",
        num_classes: int | None = None,
        train: TrainConfig | dict | None = None,
        backbone_options: dict | None = None,
        transforms: TransformOptions | dict | None = None,
        metrics: list[str] | None = None,
        bootstrap: int = 1000,
        seed: int = 0,
        name: str = "task",
        head_dropout: float = 0.0,
        update_batchnorm_stats: bool = False,
        recipe: Any = None,
        options: ImagingOptions | None = None,
    ):
        """Lab-code constructor.

        Args:
            backbone: A backbone name for :func:`load_backbone` (or an already loaded ``Backbone``).
            adapter: An adapter spec or dict (``{"method": "lora", "r": 8}``); empty targets take the
                backbone's defaults. None with ``method`` None trains a linear probe.
            method: ``adapter`` (default when an adapter is given), ``linear_probe`` or ``full_finetune``.
            task: binary, multiclass or multilabel.
            num_classes: Head outputs; binary needs none (two logits).
            train: TrainConfig (or dict) of ``fit``.
            backbone_options: :class:`BackboneOptions` fields.
            transforms: Transform settings used when ``fit`` gets plain records instead of a dataset.
            metrics: Test metrics (default: AUROC, accuracy, F1, sensitivity, specificity for binary).
            bootstrap: Bootstrap resamples of the 95% intervals.
            seed: Seed of training and bootstrap.
            name: Adapter name.
            head_dropout: Dropout before the head.
            update_batchnorm_stats: Let tuned BatchNorm layers (full FT, NormTuning) update their statistics.
        """
        self.backbone_name = backbone if isinstance(backbone, str) else backbone.provenance["name"]
        self.backbone = None if isinstance(backbone, str) else backbone
        self.backbone_options = dict(backbone_options or {})
        self.adapter = as_spec(adapter)
        self.method = method or ("adapter" if self.adapter is not None else "linear_probe")
        self.task = task
        self.num_classes = num_classes
        self.train_config = train if isinstance(train, TrainConfig) else TrainConfig(**(train or {}))
        self.transforms = (
            transforms if isinstance(transforms, TransformOptions) else TransformOptions(**(transforms or {}))
        )
        self.metrics = metrics or DEFAULT_METRICS.get(task)
        self.bootstrap, self.seed, self.name, self.head_dropout = bootstrap, seed, name, head_dropout
        self.update_batchnorm_stats = update_batchnorm_stats
        self.recipe, self.options = recipe, options or ImagingOptions()
        self.model = None
        self.operating_point: dict | None = None  # the binary threshold and how it was chosen (head_facts)
        self.classes: list[str] | None = None

    @property
    def threshold(self) -> float | None:
        """The fitted or loaded model's binary threshold (None: ``evaluate`` calls scores >= 0.5 positive)."""
        return self.operating_point["threshold"] if self.operating_point else None

    @classmethod
    def check_recipe(cls, recipe: Any) -> list[tuple[str, str]]:
        """Refuse low-data fields a sweep would override, sweep fractions outside (0, 1], and every option
        this recipe's configuration would not read (:mod:`pipelines.imaging.refusals`)."""
        from pipelines.imaging.refusals import recipe_refusals

        return cls._sweep_refusals(recipe) + recipe_refusals(recipe)

    @staticmethod
    def _sweep_refusals(recipe: Any) -> list[tuple[str, str]]:
        fractions = recipe.data.options.get("sweep_fractions")
        if not fractions:
            return []
        problems = [("data.options.sweep_fractions", f"has {f}; every fraction must be in (0, 1]")
                    for f in fractions if not 0 < f <= 1]  # fmt: skip
        if recipe.data.fraction != 1.0:
            problems.append(("data.fraction", "data.options.sweep_fractions sets the fraction; remove one"))
        if recipe.data.shots_per_class is not None:
            problems.append(("data.shots_per_class", "a sweep over fractions cannot also fix the shots"))
        return problems

    @classmethod
    def from_recipe(cls, recipe) -> ImagingClassificationPipeline:
        """Build the pipeline from a validated recipe."""
        from pipelines.core.recipe import pipeline_options

        options = pipeline_options(recipe) or ImagingOptions()
        return cls(
            backbone=recipe.backbone.name,
            backbone_options=options.backbone.model_dump(),
            task=recipe.data.task or "binary",
            seed=recipe.seed,
            bootstrap=recipe.evaluation.bootstrap,
            metrics=recipe.evaluation.metrics or None,
            recipe=recipe,
            options=options,
        )

    # ----- lab code -----------------------------------------------------------------------------------
    def load_backbone(self):
        """Load (once) and return the backbone."""
        if self.backbone is None:
            self.backbone = load_backbone(self.backbone_name, **self.backbone_options)
        return self.backbone

    def _outputs(self) -> int:
        if self.task == "binary":
            return 2
        if self.num_classes is None:
            raise ValueError(
                f"task '{self.task}' needs num_classes; pass create_pipeline(..., num_classes=K)"
            )
        return self.num_classes

    def build_model(self):
        """A fresh classifier prepared for this pipeline's method (also used by ``fit``); its head and
        adapter start from ``seed``, as a recipe's models do."""
        import torch

        backbone = self.load_backbone()
        torch.manual_seed(self.seed)
        model, resolved = build_classifier(
            backbone, self.method, self.adapter, self._outputs(), self.task, self.name, self.head_dropout,
            self.update_batchnorm_stats,
        )  # fmt: skip
        self.model, self.resolved_adapter = model, resolved
        return model

    def _records(self, data: Any, split: str, optional: bool = False) -> Any:
        """The ``split`` records of a folder, CSV or .npz path (see :meth:`fit`); other data as given.

        ``optional``: None unless the file has that split (fit's own validation split)."""
        if not isinstance(data, (str, Path)):
            return data
        read, classes = path_records(data, self.load_backbone().spatial_dims, self.classes)
        self.classes = classes or self.classes
        if isinstance(read, list):
            return None if optional else read
        if optional or split in read:
            return read.get(split)
        raise ValueError(
            f"{data} has no {split} split (it has {', '.join(read)}); give the {split} data itself"
        )

    def _dataset(self, data, train: bool):
        if isinstance(data, list):  # plain records: apply this pipeline's MONAI transforms
            spatial = self.load_backbone().spatial_dims
            from_files = bool(data) and isinstance(data[0]["image"], str)
            return make_dataset(data, build_transforms(self.transforms, train, spatial, from_files))
        return data

    def fit(self, train_data, val=None, run_dir: Path | None = None) -> TrainResult:
        """Train on ``train_data`` and pick the binary threshold on ``val`` (Youden's J).

        Either may be a folder of class sub-folders (``<folder>/<class>/<image>``; classes in sorted
        order), a CSV (or ``.csv.gz``) of ``image`` paths (relative to the CSV) and integer ``label`` s, a
        MedMNIST-style ``.npz``, a list of records ``{"image": (C, H, W) array or file path, "label"}`` or a
        dataset of such dicts with tensors in [0, 1]. A CSV with a ``split`` column (or an ``.npz``) gives
        its ``train`` rows here and, when ``val`` is None, its ``val`` rows as ``val``; :meth:`evaluate`
        takes its ``test`` rows. A split of one class is refused before training.

        The model trains as a recipe's stage does (the engine's ``train_candidate`` with this pipeline's
        hooks); with ``run_dir`` its checkpoints go to ``run_dir/train/<name>/<name>/``.
        """
        from pipelines.core.experiment import train_candidate
        from pipelines.imaging.experiment import ImagingExperiment

        if isinstance(train_data, (str, Path)) and self.model is None:
            self.classes = None  # a fresh model takes the training folder's classes
        records = self._records(train_data, "train")
        val = self._records(train_data, "val", optional=True) if val is None else self._records(val, "val")
        train_set = self._dataset(records, True)
        val_set = self._dataset(val, False) if val is not None else None
        where = str(train_data) if isinstance(train_data, (str, Path)) else "fit()"
        for split, dataset in (("train", train_set), ("val", val_set)):
            given = getattr(dataset, "data", None)  # a MONAI dataset's records; other datasets are not read
            if isinstance(given, list) and (not given or isinstance(given[0], dict)):
                check_classes(split, given, where, self.classes)
        hooks, stage = ImagingExperiment.for_datasets(self, train_set, val_set, run_dir is not None)
        root = Path(run_dir) if run_dir is not None else Path()
        trained = train_candidate(hooks, [stage], self.name, root, False, self.seed, False)
        threshold = trained.details["evaluate"].get("threshold")
        self.operating_point = operating_point(threshold, "val", len(val_set) if val_set is not None else 0)
        return trained.results[0]

    def _loader(self, dataset) -> DataLoader:
        size = self.options.data.eval_batch_size
        return DataLoader(dataset, batch_size=size, shuffle=False, collate_fn=collate)

    def predict(self, data):
        """(y_true, y_score) of the fitted model on data of any form :meth:`fit` takes (a file's ``test``
        split); a folder's class sub-folders must be classes the model was trained on."""
        if self.model is None:
            raise RuntimeError("the pipeline has no model yet; call fit() or load_adapter() first")
        return predict_scores(self.model, self._loader(self._dataset(self._records(data, "test"), False)))

    def evaluate(self, test) -> EvaluationReport:
        """Score the fitted model on ``test`` (any form :meth:`fit` takes) at its operating point: the
        validation threshold, restored by :meth:`load_adapter` (0.5 without one)."""
        from pipelines.core.evaluation import evaluate

        y_true, y_score = self.predict(test)
        threshold = self.threshold if self.threshold is not None else 0.5
        return evaluate(self.task, y_true, y_score, self.metrics, self.bootstrap, self.seed, threshold)

    def save_adapter(self, directory: str | Path, format: Literal["native", "peft"] = "native") -> Path:
        """Write the adapter and head (safetensors) and ``imaging_head.json`` (the operating point and class
        names, :mod:`pipelines.imaging.head_facts`) into ``directory``.

        ``format="peft"``: HF peft's layout, the head as ``modules_to_save``
        (:mod:`pipelines.imaging.export`).
        """
        if self.model is None or self.resolved_adapter is None:
            raise RuntimeError("there is no trained adapter to save; fit() an adapter method first")
        if format == "peft":
            import tempfile

            with tempfile.TemporaryDirectory() as scratch:
                return self.export_peft(self.save_adapter(Path(scratch) / "native"), Path(directory))
        folder = save_adapter(self.model, directory, name=self.name, extra=[HEAD])
        write_head_facts(folder, head_facts(self.task, self.operating_point, self.classes))
        return folder

    def load_adapter(self, directory: str | Path):
        """Build a fresh model, load an adapter saved by :meth:`save_adapter` or a recipe run
        (``<run>/adapters/<stage>``) into it and restore its operating point and class names."""
        facts = read_head_facts(Path(directory))
        if facts is not None and facts["task"] != self.task:
            raise ValueError(
                f"{directory} holds a {facts['task']} model; create the pipeline with task='{facts['task']}'"
            )
        backbone = self.load_backbone()
        model, _ = build_classifier(backbone, "linear_probe", None, self._outputs(), self.task, self.name)
        self.name = load_adapter(model, directory)
        if facts is None:
            warnings.warn(
                f"{directory} has no {FACTS} (saved by an older version); evaluate() calls scores >= 0.5 "
                "positive, not the validation threshold the model was trained with",
                stacklevel=2,
            )
        self.model, self.resolved_adapter = model, adapter_specs(model)[self.name]
        self.operating_point = (facts or {}).get("operating_point")
        self.classes = (facts or {}).get("classes")
        return model

    # ----- recipe path --------------------------------------------------------------------------------
    def run(self, run_dir: Path, resume: bool = False) -> RunResult:
        """Run the recipe through the core experiment engine with this domain's hooks (once per sweep
        fraction when ``data.options.sweep_fractions`` is set)."""
        from pipelines.core.experiment import run_experiment
        from pipelines.core.experiment.sweep import run_sweep
        from pipelines.imaging.experiment import ImagingExperiment

        hooks, fractions = ImagingExperiment(self), self.options.data.sweep_fractions
        if fractions is None:
            return run_experiment(hooks, self.recipe, Path(run_dir), resume)
        return run_sweep(hooks, self.recipe, fractions, Path(run_dir), resume)
