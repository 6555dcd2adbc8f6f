"""What a domain gives the experiment engine: a small Protocol of hooks and the plain records they return.

The engine (:mod:`pipelines.core.experiment.engine`) owns what a recipe means; a domain only knows its
data, its model and its predictions. Composition, not inheritance: a pipeline object that has these
methods is a domain's hooks, whatever its class.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

__all__ = ["ExperimentHooks", "ExperimentData", "StagePlan", "Outcome", "Trained"]


@dataclass
class ExperimentData:
    """What the domain loaded: the task, the training split's labels (for low-data draws) and provenance.

    Attributes:
        task: Evaluation task of the test predictions (binary, multiclass, regression, speech, ...).
        train_size: Examples in the training split before any low-data draw.
        train_labels: One hashable class per training example, or None (regression: no strata).
        info: The report's ``dataset`` entry (name, splits, checksums, ...).
        metrics: The domain's default metrics for this task when the recipe names none.
    """

    task: str
    train_size: int
    train_labels: Sequence[Hashable] | None
    info: dict[str, Any]
    metrics: list[str] = field(default_factory=list)


@dataclass
class StagePlan:
    """How the engine trains one stage: the data and loss, and what the stage adds and trains.

    Attributes:
        dataset: What ``core.training.train`` iterates (a map-style Dataset).
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        adapter: The stage's adapter spec with targets resolved for this model (None: no adapter).
        extra_trainable: Module names trained beside the adapters (a task head); saved with them.
        full: Every parameter trains (full fine-tuning); adapters and extra_trainable are ignored then.
        collate_fn, val_data, evaluate_fn: Passed to ``train``.
        train: The training settings (default: the stage's ``train`` section).
        checkpoint: Write training checkpoints (off for a large full fine-tuning baseline, if wanted).
        trained: The TrainResult of a training done before (a cached model the domain loaded): the
            engine records it and trains nothing.
    """

    dataset: Any
    loss_fn: Callable[[nn.Module, Any], Any]
    adapter: Any = None
    extra_trainable: list[str] = field(default_factory=list)
    full: bool = False
    collate_fn: Callable | None = None
    val_data: Any = None
    evaluate_fn: Callable | None = None
    train: Any = None
    checkpoint: bool = True
    trained: Any = None


@dataclass
class Outcome:
    """A model the engine does not train (a closed-form baseline such as one-hot ridge regression).

    Attributes:
        predictions: ``(y_true, y_score)`` on the test split.
        trainable: Parameters fitted.
        total: Parameters used in all (backbone included when it computes features).
        details: Anything worth reporting (its regularisation, features, fit time).
    """

    predictions: tuple[Any, Any]
    trainable: int
    total: int
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trained:
    """One model of the experiment after the engine trained and scored it."""

    label: str
    model: nn.Module | None
    predictions: tuple[Any, Any]
    parameters: dict[str, Any]
    results: list[Any] = field(default_factory=list)  # TrainResult of each stage
    adapters: dict[str, Path] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class ExperimentHooks(Protocol):
    """The domain's side of an experiment (see :func:`pipelines.core.experiment.run_experiment`).

    Optional hooks, used when the object has them (a Protocol cannot mark a method optional):
    ``primary_label(recipe) -> str`` (the primary model's label; default: its stages' adapter methods),
    ``after_stage(model, stage, result)`` (after each stage trained: tag history, measure), ``probe(model)
    -> Tensor`` (outputs compared after the saved adapters reload; no check without it) and
    ``evaluate_options(model) -> dict`` (this model's keyword arguments of ``evaluate``, e.g. a threshold).
    """

    def load_data(self, run_dir: Path) -> ExperimentData:
        """Read the dataset and cut its splits (written to the run folder where the domain does)."""
        ...

    def keep_training(self, indices: list[int]) -> None:
        """Use only these training examples from now on (the engine's low-data draw; all when none is
        asked for). A domain applies its own caps (``max_train``) after this."""
        ...

    def new_model(self) -> nn.Module:
        """A fresh model (backbone and head) to train one candidate on; every candidate starts equal."""
        ...

    def plan_stage(self, model: nn.Module, stage: Any, index: int) -> StagePlan:
        """Data, loss and resolved adapter of one stage; ``index`` is its recipe stage's (a compare spec's
        is the last stage's, a named baseline's stages count from 0)."""
        ...

    def predict(self, model: nn.Module) -> tuple[Any, Any]:
        """``(y_true, y_score)`` of a trained model on the test split."""
        ...

    def baseline(self, name: str) -> list[Any] | Outcome:
        """A named baseline: the stages the engine trains on a new model, or an untrained Outcome."""
        ...

    def describe(self, models: dict[str, Trained]) -> dict[str, Any]:
        """The report's domain facts: ``backbone``, ``adapter``, ``notes``, ``extra``, extra ``results``;
        ``models`` has the primary model first."""
        ...
