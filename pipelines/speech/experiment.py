"""The hooks of ``speech/speaker_adaptation`` on the FSDD base for the core experiment engine.

The engine (:mod:`pipelines.core.experiment`) runs the recipe; this module only knows speech: the cached
base model, the target speaker's adaptation and test clips, the nearest base speaker every model speaks
as, the evaluators, the baselines (``lora``, ``full_finetune`` and the untrained ``nearest_speaker``),
the clip sweep, the reference rows (``vocoded_recording``, ``second_take``), the checks, the mel plot
and WAV samples. Training goes through :class:`~pipelines.speech.adaptation.ClipTraining`, as in lab code.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core.experiment import ExperimentData, Outcome, StagePlan, Trained
from pipelines.core.peft import save_adapter
from pipelines.speech.adaptation import (
    ClipTraining,
    adaptation_clips,
    baseline_stage,
    nearest_speaker,
    second_takes,
)
from pipelines.speech.audio import AUDIO
from pipelines.speech.data import Example
from pipelines.speech.model import AcousticModel, adapter_targets
from pipelines.speech.report import (
    METRIC_NOTES,
    REFERENCE_MODELS,
    adapter_facts,
    disabled_equals_base,
    probe_mels,
    reference_notes,
    reference_results,
    score_second_takes,
    write_media,
)
from pipelines.speech.saved import write_speech_facts
from pipelines.speech.scoring import (
    SPEECH_METRICS,
    Synthesis,
    synthesize_and_score,
    unscored_notes,
    unscored_summary,
)
from pipelines.speech.sweep import clip_sweep, model_syntheses
from pipelines.speech.targets import target_clips

__all__ = ["SpeechExperiment"]


class SpeechExperiment:
    """One run of ``speech/speaker_adaptation`` on the FSDD base (the engine's hooks).

    ``pipe`` is the SpeakerAdaptationPipeline (its options, FSDD session, vocoder and backbone);
    ``recipe`` the one the engine runs; ``resume`` also reaches base training and the clip sweep.
    """

    def __init__(self, pipe: Any, recipe: Any, resume: bool = False) -> None:
        self.pipe, self.recipe, self.resume = pipe, recipe, resume
        self.data, self.session = pipe.options.data, pipe.session
        self.metrics = list(recipe.evaluation.metrics or SPEECH_METRICS)
        self.syntheses: dict[int, Synthesis] = {}  # id(model) -> its test synthesis
        self.untrained: dict[str, Synthesis] = {}

    # ----- data and models ----------------------------------------------------------------------------
    def load_data(self, run_dir: Path) -> ExperimentData:
        self.run_dir = Path(run_dir)
        self.backbone = self.pipe._ensure_backbone(self.run_dir / "base", self.resume)
        held_out = self.pipe.backbone_options.held_out_speaker
        self.target = target_clips(self.session, self.data, held_out, self.backbone.speakers, self.pipe.name)
        self.clips, self.test = self.target.candidates, self.target.test
        self.evaluators = self.session.evaluators() if self.data.evaluators else None
        self.train = self._clips(self.data.adaptation_clips)
        self.info = self.target.info | {"splits": {"adaptation": len(self.train), "test": len(self.test)}}
        digits = [e.utterance.digit for e in self.train]  # data.fraction draws per digit where all are known
        labels = digits if None not in digits else None
        return ExperimentData("speech", len(self.train), labels, self.info, list(SPEECH_METRICS))

    def _clips(self, count: int | str) -> list[Example]:
        """The first ``count`` adaptation clips of the target in digit round-robin order."""
        by_path = {e.utterance.path: e for e in self.clips}
        return [by_path[u.path] for u in adaptation_clips([e.utterance for e in self.clips], count)]

    def keep_training(self, indices: list[int]) -> None:
        """The engine's ``data.fraction`` draw of the adaptation clips (all at 1.0); the nearest base
        speaker, whom every model speaks as, is chosen from these clips alone."""
        self.train = [self.train[i] for i in indices]
        self.info["splits"]["adaptation"] = len(self.train)
        self.speaker, self.cosines = 0, {0: math.nan}
        if self.evaluators is not None:
            candidates = self.session.base_speaker_examples()
            self.speaker, self.cosines = nearest_speaker(self.evaluators, self.train, candidates)
        self.pipe.speaker_id = self.speaker
        self.training = ClipTraining(self.backbone.model, self.train, self.speaker, self.recipe.seed)

    def _training(self, count: int | str) -> ClipTraining:
        """Training on the first ``count`` adaptation clips (the clip sweep)."""
        return ClipTraining(self.backbone.model, self._clips(count), self.speaker, self.recipe.seed)

    def new_model(self) -> AcousticModel:
        return self.training.new_model()

    def plan_stage(self, model: AcousticModel, stage: Any, index: int) -> StagePlan:
        return self.training.plan_stage(model, stage, index)

    def predict(self, model: AcousticModel) -> tuple[np.ndarray, np.ndarray]:
        """Synthesise, vocode and score the test clips as the nearest speaker: (digits, score matrix)."""
        synthesis = self._synthesize(model)
        self.syntheses[id(model)] = synthesis
        return synthesis.digits, synthesis.scores

    def _synthesize(self, model: AcousticModel | None, vocode_reference: bool = False) -> Synthesis:
        return synthesize_and_score(
            model, self.test, self.speaker, self.pipe.vocoder(), self.evaluators, self.session.num_bins,
            vocode_reference=vocode_reference,
        )  # fmt: skip

    def probe(self, model: AcousticModel):
        """Mels of the first test clips (the engine's reload check)."""
        return probe_mels(model, self.test)

    def primary_label(self, recipe: Any) -> str:
        """The stage's name (``speaker``), as speech reports have always named the adapted model."""
        return recipe.stages[-1].name

    # ----- baselines and report -----------------------------------------------------------------------
    def baseline(self, name: str) -> list[Any] | Outcome:
        """``lora`` and ``full_finetune`` on the stage's budget; ``nearest_speaker``: the base, untrained."""
        if name == "nearest_speaker":
            model = self.backbone.model
            self.untrained[name] = synthesis = self._synthesize(model)
            total = sum(p.numel() for p in model.parameters())
            speaks_as = {"speaks_as": self.backbone.speakers[self.speaker]}
            return Outcome((synthesis.digits, synthesis.scores), 0, total, speaks_as)
        options = self.pipe.stage_options
        stage = baseline_stage(name, self.recipe.stages[-1], options.lora_rank, options.finetune_lr,
                               adapter_targets())  # fmt: skip
        return [stage]

    def describe(self, models: dict[str, Trained]) -> dict[str, Any]:
        syntheses = model_syntheses(self, models)
        takes = self._second_takes()
        references = self._references(takes)
        syntheses.update(references)
        unscored = {label: unscored_summary(s, self.metrics) for label, s in syntheses.items()}
        sweep = clip_sweep(self, self.data.sweep_clips, self._training, unscored)
        primary = models[self.primary_label(self.recipe)]
        self.pipe.model = primary.model  # lab code may synthesise with it after run
        facts = {"speaker_id": self.speaker, "speakers": self.backbone.speakers}  # for pipe.load_adapter
        write_speech_facts(primary.adapters[self.recipe.stages[-1].name], facts)
        checks = {
            "disabled_adapter_equals_base": disabled_equals_base(
                self.backbone.model, primary.model, self.test
            ),
            "reloaded_adapter_equals_trained": primary.details.get("reload_identical"),
        }
        if "lora" in models:  # the LoRA baseline's adapter too, beside the primary's (engine-saved)
            save_adapter(models["lora"].model, self.run_dir / "adapters" / "lora", name="lora")
        data = self.data
        samples = write_media(
            self.run_dir, self.test, syntheses, data.plot_clips, data.samples, AUDIO.sample_rate
        )
        bootstrap, seed = self.recipe.evaluation.bootstrap, self.recipe.seed
        results = reference_results(references, self.test, self.evaluators, bootstrap, seed, self.metrics)
        return {
            "results": results,
            "backbone": {k: v for k, v in self.backbone.info.items() if k != "history"}
            | {"vocoder": self.pipe.vocoder().source},
            "adapter": adapter_facts(self.recipe.stages[-1], primary),
            "notes": self._notes(primary, samples, checks, takes, "recording" in results)
            + unscored_notes(unscored),
            "extra": {
                "checks": checks,
                "nearest_speaker_cosines": {self.backbone.speakers[k]: v for k, v in self.cosines.items()},
                "sweep_adaptation_clips": sweep,
                "reference_models": list(results),
                "second_takes": {
                    e.utterance.path.stem: t.utterance.path.stem
                    for e, t in zip(self.test, takes or [], strict=False)
                },  # fmt: skip
                "unscored": unscored,
                "evaluators": self.evaluators.meta if self.evaluators is not None else None,
            },
        }

    def _second_takes(self) -> list[Example] | None:
        """Another real take of each test text, used neither for scoring nor for any adaptation here."""
        if not self.data.second_take_reference:
            return None
        used = {e.utterance.path for count in [self.data.adaptation_clips, *self.data.sweep_clips]
                for e in self._clips(count)}  # fmt: skip
        takes = second_takes([e.utterance for e in self.test], self.target.takes_from, used)
        return self.session.examples(takes) if takes else None

    def _references(self, takes: list[Example] | None) -> dict[str, Synthesis]:
        """The reference rows (``extra.reference_models``): the recordings vocoded, another real take."""
        out = {}
        if self.data.vocode_reference:
            out["vocoded_recording"] = self._synthesize(None, vocode_reference=True)
        if takes is not None:
            out["second_take"] = score_second_takes(self.test, takes, self.evaluators, self.session.num_bins)
        return {label: out[label] for label in REFERENCE_MODELS if label in out}

    def _notes(self, primary: Trained, samples: list[str], checks: dict, takes, recording: bool) -> list[str]:
        base_total = sum(p.numel() for p in self.backbone.model.parameters())
        return [
            "Mel spectrograms, recording against each model's synthesis (first test clips): "
            "![mels](mels.png)",
            "Synthesised WAV files (22,050 Hz) are in samples/: "
            + ", ".join(samples[:6]) + (" ..." if len(samples) > 6 else ""),
            f"Every model speaks as base speaker '{self.backbone.speakers[self.speaker]}', the nearest by "
            f"speaker-ID cosine ({self.cosines[self.speaker]:.3f}) to the target's adaptation clips (speaker "
            "0 without evaluators); only the adapted weights carry the new voice.",
            f"Parameters: trainable are the weights a model trained, as a fraction of all its parameters, "
            f"adapters included (the base alone has {base_total:,}; the adapter adds "
            f"{primary.parameters['total'] - base_total:,}).",
            "Disabling the adapter reproduces the base bit for bit: "
            f"{checks['disabled_adapter_equals_base']}.",
            *reference_notes(self.data, takes, self.test, recording),
            *METRIC_NOTES,
        ]  # fmt: skip
