"""The hooks of ``speech/speaker_adaptation`` on the FSDD base for the core experiment engine.

The engine (:mod:`pipelines.core.experiment`) runs the recipe; this module only knows speech: the cached
base model, the target speaker's clips (:mod:`~pipelines.speech.targets`), the nearest base speaker every
model speaks as, the evaluators and the baselines (``lora``, ``full_finetune`` and the untrained
``nearest_speaker``). The report's reference rows, checks, mel plot and WAV samples come from
:mod:`~pipelines.speech.report`, its prose from :mod:`~pipelines.speech.notes`, the clip sweep from
:mod:`~pipelines.speech.sweep`. Training goes through :class:`~pipelines.speech.adaptation.ClipTraining`,
as in lab code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core.experiment import ExperimentData, Outcome, StagePlan, Trained
from pipelines.speech.adaptation import ClipTraining, baseline_stage, speaking_as
from pipelines.speech.audio import AUDIO
from pipelines.speech.data import digit_labels
from pipelines.speech.model import AcousticModel, adapter_targets
from pipelines.speech.notes import METRIC_NOTES, adaptation_notes, reference_notes
from pipelines.speech.report import (
    disabled_equals_base,
    probe_mels,
    reference_results,
    reference_syntheses,
    write_media,
)
from pipelines.speech.scoring import SPEECH_METRICS, Synthesis, synthesize_and_score, unscored_notes
from pipelines.speech.sweep import stage_label, summarize_models, untrained_baseline
from pipelines.speech.targets import second_take_clips, take_pairs, target_clips

__all__ = ["SpeechExperiment"]


class SpeechExperiment:
    """One run of ``speech/speaker_adaptation`` on the FSDD base (the engine's hooks).

    ``pipe`` is the SpeakerAdaptationPipeline (its options, FSDD session, vocoder and backbone);
    ``recipe`` the one the engine runs; ``resume`` also reaches base training and the clip sweep.
    """

    primary_label = staticmethod(stage_label)

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
        self.test = self.target.test
        self.evaluators = self.session.evaluators() if self.data.evaluators else None
        self.train = self.target.adaptation(self.data.adaptation_clips)
        self.info = self.target.info | {"splits": {"adaptation": len(self.train), "test": len(self.test)}}
        labels = digit_labels([e.utterance for e in self.train])  # data.fraction draws per digit
        return ExperimentData("speech", len(self.train), labels, self.info, list(SPEECH_METRICS))

    def keep_training(self, indices: list[int]) -> None:
        """The engine's ``data.fraction`` draw of the adaptation clips (all at 1.0); the nearest base
        speaker, whom every model speaks as, is chosen from these clips alone."""
        self.train = [self.train[i] for i in indices]
        self.info["splits"]["adaptation"] = len(self.train)
        self.speaker, self.cosines = speaking_as(
            self.evaluators, self.train, self.session.base_speaker_examples
        )
        self.pipe.speaker_id = self.speaker
        self.training = ClipTraining(self.backbone.model, self.train, self.speaker, self.recipe.seed)

    def sweep_training(self, count: int | str) -> ClipTraining:
        """Training on the first ``count`` adaptation clips (the clip sweep)."""
        clips = self.target.adaptation(count)
        return ClipTraining(self.backbone.model, clips, self.speaker, self.recipe.seed)

    def new_model(self) -> AcousticModel:
        return self.training.new_model()

    def plan_stage(self, model: AcousticModel, stage: Any, index: int) -> StagePlan:
        return self.training.plan_stage(model, stage, index)

    def predict(self, model: AcousticModel) -> tuple[np.ndarray, np.ndarray]:
        """Synthesise, vocode and score the test clips as the nearest speaker: (digits, score matrix)."""
        synthesis = self.syntheses[id(model)] = self._synthesize(model)
        return synthesis.digits, synthesis.scores

    def _synthesize(self, model: AcousticModel | None, vocode_reference: bool = False) -> Synthesis:
        return synthesize_and_score(
            model, self.test, self.speaker, self.pipe.vocoder(), self.evaluators, self.session.num_bins,
            vocode_reference=vocode_reference,
        )  # fmt: skip

    def probe(self, model: AcousticModel):
        """Mels of the first test clips (the engine's reload check, and the disable check)."""
        return probe_mels(model, self.test)

    # ----- baselines and report -----------------------------------------------------------------------
    def baseline(self, name: str) -> list[Any] | Outcome:
        """``lora`` and ``full_finetune`` on the stage's budget; ``nearest_speaker``: the base, untrained."""
        if name == "nearest_speaker":
            model, speaks_as = self.backbone.model, {"speaks_as": self.backbone.speakers[self.speaker]}
            return untrained_baseline(self, name, model, self._synthesize(model), speaks_as)
        options = self.pipe.stage_options
        stage = baseline_stage(name, self.recipe.stages[-1], options.lora_rank, options.finetune_lr,
                               adapter_targets())  # fmt: skip
        return [stage]

    def describe(self, models: dict[str, Trained]) -> dict[str, Any]:
        data, base, speakers = self.data, self.backbone.model, self.backbone.speakers
        takes = second_take_clips(self.session, self.target, data)
        references = reference_syntheses(
            data, self.test, takes, self._synthesize, self.evaluators, self.session.num_bins
        )
        run = summarize_models(self, models, references, {"speaker_id": self.speaker, "speakers": speakers})
        checks = {
            "disabled_adapter_equals_base": disabled_equals_base(base, run.primary.model, self.probe),
            "reloaded_adapter_equals_trained": run.primary.details.get("reload_identical"),
        }
        rate, bootstrap, seed = AUDIO.sample_rate, self.recipe.evaluation.bootstrap, self.recipe.seed
        samples = write_media(self.run_dir, self.test, run.syntheses, data.plot_clips, data.samples, rate)
        results = reference_results(references, self.test, self.evaluators, bootstrap, seed, self.metrics)
        base_total, total = sum(p.numel() for p in base.parameters()), run.primary.parameters["total"]
        notes = adaptation_notes(samples, speakers[self.speaker], self.cosines[self.speaker], base_total,
                                 total, checks["disabled_adapter_equals_base"])  # fmt: skip
        return {
            "results": results,
            "backbone": self.backbone.report_info() | {"vocoder": self.pipe.vocoder().source},
            "adapter": run.adapter,
            "notes": notes + reference_notes(data, takes, self.test, "recording" in results) + METRIC_NOTES
            + unscored_notes(run.unscored),
            "extra": {
                "checks": checks,
                "nearest_speaker_cosines": {speakers[k]: v for k, v in self.cosines.items()},
                "sweep_adaptation_clips": run.sweep,
                "reference_models": list(results),
                "second_takes": take_pairs(self.test, takes),
                "unscored": run.unscored,
                "evaluators": self.evaluators.meta if self.evaluators is not None else None,
            },
        }  # fmt: skip
