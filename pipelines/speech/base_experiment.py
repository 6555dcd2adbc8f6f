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
from pipelines.core.training import TrainResult
from pipelines.speech.audio import AUDIO, load_vocoder
from pipelines.speech.backbones import acoustic_loss, load_backbone
from pipelines.speech.data import FSDD_SHA256
from pipelines.speech.model import AcousticModel
from pipelines.speech.report import METRIC_NOTES
from pipelines.speech.scoring import (
    SPEECH_METRICS,
    merge_syntheses,
    plot_mels,
    synthesize_and_score,
    unscored_notes,
    unscored_summary,
    write_samples,
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


def _loaded(training: dict) -> TrainResult:
    """The record of a base loaded from the cache: nothing trained in this run."""
    return TrainResult(
        steps=0, epochs=0.0, history=[], best_metric=None, best_step=None, metric_name="loss",
        stopped_early=False, restored_best=False, wall_time_s=0.0, peak_memory_bytes=0,
        samples_per_second=0.0, precision="fp32", checkpoint=None,
        notes=[f"loaded from the cache (trained earlier: {training.get('steps')} steps)"],
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
        self.tests = [e for s in self.backbone.speakers for e in self.session.speaker_examples(s, "test")
                      if e.utterance.index < per_digit]  # fmt: skip
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
        result = self.backbone.train_result or _loaded(self.training)
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
        tests, merged = self.tests, self.synthesis
        shown = list(range(0, len(tests), max(1, len(tests) // 3)))[:3]
        mels = {LABEL: [merged.mels[i] for i in shown]}
        titles = [tests[i].utterance.path.stem for i in shown]
        plot_mels(self.run_dir / "mels.png", [tests[i].mel for i in shown], mels, titles)
        samples = self.pipe.options.data.samples
        names = write_samples(self.run_dir / "samples", LABEL, merged, tests, samples, AUDIO.sample_rate)
        unscored = {LABEL: unscored_summary(merged, self.metrics)}
        cached = self.backbone.info.get("cached")
        notes = [
            "Mel spectrograms, recording against synthesis: ![mels](mels.png)",
            f"Synthesised WAV files in samples/: {', '.join(names)}",
            "The base was loaded from the cache (trained earlier)." if cached
            else "The base was trained in this run and cached.",
            *METRIC_NOTES,
            *unscored_notes(unscored),
        ]  # fmt: skip
        return {
            "backbone": {k: v for k, v in self.backbone.info.items() if k != "history"}
            | {"vocoder": self.vocoder.source},
            "adapter": {"method": "none (base training)"},
            "cost": {"base_training_s": self.training.get("wall_time_s")},
            "notes": notes,
            "extra": {"evaluators": self.evaluators.meta, "unscored": unscored},
        }
