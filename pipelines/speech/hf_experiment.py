"""The hooks of ``speech/speaker_adaptation`` on a transformers TTS backbone for the core experiment engine.

SpeechT5 or FastSpeech2Conformer: the target's clips (:func:`~pipelines.speech.targets.target_utterances`:
an FSDD speaker or the user's folders), featurised for the model, and the baselines (``lora``,
``full_finetune`` and the untrained ``base``); the clip sweep, checks, WAV samples and notes come from
the modules that own them. Training goes through :class:`~pipelines.speech.hf_adaptation.HfClipTraining`,
as in lab code. Adapters live in the transformers model inside the HfTts wrapper, and the engine saves
and reloads them there (:meth:`HfExperiment.adapter_module`): the files name the transformers model's own
modules and ``_name_or_path``, as lab code's ``save_adapter`` writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.core.experiment import ExperimentData, Outcome, StagePlan, Trained
from pipelines.speech.adaptation import adaptation_clips, baseline_stage
from pipelines.speech.data import digit_labels
from pipelines.speech.hf_adaptation import HF_METRICS, HfClipTraining, hf_examples, score_hf
from pipelines.speech.hf_tts import HfTts, hf_adapter_targets
from pipelines.speech.notes import hf_notes
from pipelines.speech.report import disabled_equals_base, write_media
from pipelines.speech.scoring import Synthesis, unscored_notes
from pipelines.speech.sweep import stage_label, summarize_models, untrained_baseline
from pipelines.speech.targets import target_utterances

__all__ = ["HfExperiment"]


class HfExperiment:
    """One run of ``speech/speaker_adaptation`` on a transformers backbone (the engine's hooks).

    ``pipe`` is the HfSpeakerAdaptationPipeline (backbone, options); ``recipe`` the one the engine runs.
    """

    primary_label = staticmethod(stage_label)

    def __init__(self, pipe: Any, recipe: Any, resume: bool = False) -> None:
        self.pipe, self.recipe, self.resume = pipe, recipe, resume
        self.data = pipe.data_options
        self.metrics = list(recipe.evaluation.metrics or HF_METRICS)
        self.syntheses: dict[int, Synthesis] = {}  # id(model) -> its test synthesis
        self.untrained: dict[str, Synthesis] = {}

    # ----- data and models ----------------------------------------------------------------------------
    def load_data(self, run_dir: Path) -> ExperimentData:
        self.run_dir, self.base = Path(run_dir), self.pipe.backbone()
        held_out = self.pipe.backbone_options.held_out_speaker
        self.utterances, self.test_utterances, self.info = target_utterances(
            self.data, self.pipe.name, held_out
        )
        labels = digit_labels(self.utterances)  # data.fraction draws per digit where digits are known
        return ExperimentData("speech", len(self.utterances), labels, self.info, list(HF_METRICS))

    def keep_training(self, indices: list[int]) -> None:
        """The engine's ``data.fraction`` draw of the adaptation clips (all at 1.0), featurised; the
        pitch and energy statistics come from these clips alone."""
        self.utterances = [self.utterances[i] for i in indices]
        self.train = hf_examples(self.base, self.utterances)
        self.statistics = self.train[0].extra.get("statistics") if self.train else None
        self.pipe.statistics = self.statistics
        self.test = hf_examples(self.base, self.test_utterances, self.statistics)
        self.info["splits"] = {"adaptation": len(self.train), "test": len(self.test)}
        self.training = HfClipTraining(self.base, self.train, self.recipe.seed)

    def sweep_training(self, count: int | str) -> HfClipTraining:
        """Training on the first ``count`` adaptation clips (the clip sweep)."""
        subset = hf_examples(self.base, adaptation_clips(self.utterances, count))
        return HfClipTraining(self.base, subset, self.recipe.seed)

    def new_model(self) -> HfTts:
        return self.training.new_model()

    def plan_stage(self, model: HfTts, stage: Any, index: int) -> StagePlan:
        return self.training.plan_stage(model, stage, index)

    def after_stage(self, model: HfTts, stage: Any, result: Any) -> None:
        self.training.after_stage(model, stage, result)

    def predict(self, model: HfTts) -> tuple[np.ndarray, np.ndarray]:
        """Synthesise, vocode and score the test clips: (digits, score matrix)."""
        synthesis = self.syntheses[id(model)] = score_hf(model, self.test, self.recipe.seed)
        return synthesis.digits, synthesis.scores

    def adapter_module(self, model: HfTts) -> torch.nn.Module:
        """The transformers model inside the wrapper: the module the adapter files describe."""
        return model.model

    def probe(self, model: HfTts) -> torch.Tensor:
        """The mel of the first test clip (the engine's reload check)."""
        return model.synthesize_mel(self.test[0].input_ids, self.recipe.seed)

    # ----- baselines and report -----------------------------------------------------------------------
    def baseline(self, name: str) -> list[Any] | Outcome:
        """``lora`` (the stage's targets) and ``full_finetune`` on the stage's budget; ``base`` untrained."""
        if name == "base":
            return untrained_baseline(self, name, self.base, score_hf(self.base, self.test, self.recipe.seed))
        stage, options = self.recipe.stages[-1], self.pipe.stage_options
        targets = list(stage.adapter.targets) or hf_adapter_targets(self.base.family)
        return [baseline_stage(name, stage, options.lora_rank, options.finetune_lr, targets)]

    def describe(self, models: dict[str, Trained]) -> dict[str, Any]:
        """The shared describe steps; the disabled-adapter check on the first test clip's mel (seed 0) beside
        the engine's reload check; the WAV samples."""
        run = summarize_models(self, models, {}, {"statistics": self.statistics})
        ids, rate = self.test[0].input_ids, self.base.features.sample_rate
        checks = {
            "disabled_adapter_equals_base": disabled_equals_base(
                self.base, run.primary.model, lambda tts: tts.synthesize_mel(ids)
            ),
            "reloaded_adapter_equals_trained": run.primary.details.get("reload_identical"),
        }
        samples = write_media(self.run_dir, self.test, run.syntheses, 0, self.data.samples, rate)
        return {
            "backbone": dict(self.base.info) | {"family": self.base.family, "sample_rate": rate},
            "adapter": run.adapter,
            "notes": hf_notes(samples, rate, checks, self.base.family) + unscored_notes(run.unscored),
            "extra": {"checks": checks, "sweep_adaptation_clips": run.sweep, "unscored": run.unscored,
                      "variance_statistics": self.statistics},
        }  # fmt: skip
