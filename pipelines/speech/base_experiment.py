"""The hooks of ``speech/base_multispeaker`` for the core experiment engine.

The base model is what :func:`~pipelines.speech.backbones.load_backbone` gives: the cached one for
these settings, or one trained now (its TrainResult; ``resume`` continues an interrupted training) and
cached, so that the adaptation recipe finds the same base. Its one stage is that training, recorded
by the engine (``StagePlan.trained``), not repeated; every weight counts as trained. It is scored on
each base speaker's test clips, speaking as that speaker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core.experiment import ExperimentData, StagePlan, Trained
from pipelines.core.recipe import BackboneSection, DataSection, Recipe, StageSection
from pipelines.speech.audio import AUDIO, load_vocoder
from pipelines.speech.backbones import acoustic_loss, load_backbone, loaded_train_result
from pipelines.speech.data import FSDD_SHA256
from pipelines.speech.model import AcousticModel
from pipelines.speech.notes import base_notes
from pipelines.speech.report import write_base_media
from pipelines.speech.scoring import (
    SPEECH_METRICS,
    merge_syntheses,
    synthesize_and_score,
    unscored_notes,
    unscored_summary,
)

__all__ = ["BaseExperiment", "base_recipe"]

LABEL = "base"


def base_recipe(seed: int = 0) -> Recipe:
    """The recipe of lab code's ``BaseMultispeakerPipeline(...).run``: score the base on FSDD."""
    return Recipe(
        name="base_multispeaker", pipeline="speech/base_multispeaker", seed=seed,
        backbone=BackboneSection(name="fsdd_multispeaker"), data=DataSection(dataset="fsdd"),
        stages=[StageSection(name=LABEL, objective="tts")],
    )  # fmt: skip


class BaseExperiment:
    """One run of ``speech/base_multispeaker`` (the engine's hooks); see the module docstring."""

    def __init__(self, pipe: Any, recipe: Any, resume: bool = False) -> None:
        self.pipe, self.resume, self.session = pipe, resume, pipe.session
        self.metrics = list(recipe.evaluation.metrics or SPEECH_METRICS)

    def load_data(self, run_dir: Path) -> ExperimentData:
        self.run_dir = Path(run_dir)
        settings = self.pipe.backbone_options.base_settings()
        self.backbone = load_backbone(
            "fsdd_multispeaker", settings, self.session.base_training_examples, self.run_dir / "base",
            self.resume,
        )  # fmt: skip
        self.evaluators = self.session.evaluators()
        self.vocoder = load_vocoder(self.pipe.backbone_options.vocoder)
        per_digit = self.pipe.options.data.eval_clips_per_digit
        self.tests = [e for s in self.backbone.speakers for e in self.session.test_examples(s, per_digit)]
        self.training = self.backbone.info.get("training", {})
        clips = self.training.get("train_clips") or 0
        info = {"name": "fsdd", "sha256": FSDD_SHA256, "base_speakers": self.backbone.speakers,
                "splits": {"train": clips, "test_scored": len(self.tests)}}  # fmt: skip
        return ExperimentData("speech", clips, None, info, list(SPEECH_METRICS))

    def keep_training(self, indices: list[int]) -> None:
        """The base trains on every training clip of its speakers (speech refuses the low-data fields)."""

    def new_model(self) -> AcousticModel:
        return self.backbone.model

    def plan_stage(self, model: AcousticModel, stage: Any, index: int) -> StagePlan:
        """The base's training, done by ``load_backbone`` (now or when it was cached): recorded, not rerun."""
        result = self.backbone.train_result or loaded_train_result(self.training)
        return StagePlan(None, acoustic_loss, full=True, trained=result)

    def predict(self, model: AcousticModel) -> tuple[np.ndarray, np.ndarray]:
        """Each test clip synthesised as its own speaker, vocoded and scored."""
        self.synthesis = merge_syntheses([
            synthesize_and_score(model, [e], e.speaker, self.vocoder, self.evaluators, self.session.num_bins)
            for e in self.tests
        ])  # fmt: skip
        return self.synthesis.digits, self.synthesis.scores

    def primary_label(self, recipe: Any) -> str:
        return LABEL

    def baseline(self, name: str) -> list[Any]:
        raise ValueError(f"speech/base_multispeaker compares no baselines; remove '{name}' from compare")

    def describe(self, models: dict[str, Trained]) -> dict[str, Any]:
        samples = self.pipe.options.data.samples
        names = write_base_media(self.run_dir, LABEL, self.tests, self.synthesis, samples, AUDIO.sample_rate)
        unscored = {LABEL: unscored_summary(self.synthesis, self.metrics)}
        return {
            "backbone": self.backbone.report_info() | {"vocoder": self.vocoder.source},
            "adapter": {"method": "none (base training)"},
            "cost": {"base_training_s": self.training.get("wall_time_s")},
            "notes": base_notes(names, self.backbone.info.get("cached")) + unscored_notes(unscored),
            "extra": {"evaluators": self.evaluators.meta, "unscored": unscored},
        }
