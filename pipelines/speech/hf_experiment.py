"""The hooks of ``speech/speaker_adaptation`` on a transformers TTS backbone for the core experiment engine.

SpeechT5 or FastSpeech2Conformer: the target's clips (an FSDD speaker or the user's folders), featurised
for the model, the baselines (``lora``, ``full_finetune`` and the untrained ``base``), the clip sweep,
the checks and WAV samples. Training goes through :class:`~pipelines.speech.hf_adaptation.HfClipTraining`,
as in lab code. Adapters live in the transformers model inside the HfTts wrapper: the engine saves them
as paths of the wrapper (``model.<name>``), so :meth:`HfExperiment.describe` rewrites the file from the
transformers model (its own module names and ``_name_or_path``, as lab code's ``save_adapter`` writes)
and checks that this file reloads to identical mels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.core.experiment import ExperimentData, Outcome, StagePlan, Trained
from pipelines.core.peft import disable_adapters, load_adapter, save_adapter
from pipelines.speech.adaptation import adaptation_clips, baseline_stage
from pipelines.speech.data import FSDD_SHA256, Utterance, folder_utterances, fsdd_utterances, split_fsdd
from pipelines.speech.hf_adaptation import HF_METRICS, HfClipTraining, hf_examples, score_hf
from pipelines.speech.hf_tts import HfTts, hf_adapter_targets
from pipelines.speech.report import adapter_facts
from pipelines.speech.saved import write_speech_facts
from pipelines.speech.scoring import (
    Synthesis,
    unscored_notes,
    unscored_summary,
    write_samples,
)
from pipelines.speech.sweep import clip_sweep, model_syntheses

__all__ = ["HfExperiment", "HF_NOTES"]

HF_NOTES = [
    "mcd: mel-cepstral distortion in dB as TTS papers compute it: the synthesis is resampled to the "
    "recording's own rate (8 kHz for FSDD), both go through WORLD (harvest F0, CheapTrick envelope, 5 ms "
    "frames) and pysptk.sp2mc (order 24, all-pass constant of that rate); c1-c24, DTW-aligned, "
    "10/ln10*sqrt(2*sum(dc^2)) averaged over the aligned frames.",
    "log_f0_rmse (cents), gpe, vde, f0_coverage: WORLD harvest F0 of both waveforms on the MCD's frames "
    "and DTW path; log-F0 RMSE and GPE (F0 off by more than 20%) over the frames voiced in both, VDE the "
    "share of aligned frames whose voicing differs, f0_coverage the share voiced in both.",
    "log_mel_cepstral_distance: dB, RMS over the model's mel bins below half the recording's rate of the "
    "level-free log-mel difference kept to c1-c24 of the orthonormal DCT; a second view, not the MCD.",
]
DURATION_NOTE = (
    "FastSpeech2Conformer durations: transformers has no aligner, so each clip's voiced span is split evenly "
    "over its phones (leading silence to the first phone, trailing silence to <sos/eos>); token pitch and "
    "energy are standardised over the adaptation clips (ESPnet's global statistics are not published)."
)


class HfExperiment:
    """One run of ``speech/speaker_adaptation`` on a transformers backbone (the engine's hooks).

    ``pipe`` is the HfSpeakerAdaptationPipeline (backbone, options); ``recipe`` the one the engine runs.
    """

    def __init__(self, pipe: Any, recipe: Any, resume: bool = False) -> None:
        self.pipe, self.recipe, self.resume = pipe, recipe, resume
        self.data = pipe.data_options
        self.metrics = list(recipe.evaluation.metrics or HF_METRICS)
        self.syntheses: dict[int, Synthesis] = {}  # id(model) -> its test synthesis
        self.untrained: dict[str, Synthesis] = {}

    # ----- data and models ----------------------------------------------------------------------------
    def load_data(self, run_dir: Path) -> ExperimentData:
        self.run_dir, self.base = Path(run_dir), self.pipe.backbone()
        self.utterances, self.test_utterances, self.info = self._utterances()
        digits = [u.digit for u in self.utterances]  # data.fraction draws per digit where digits are known
        labels = digits if None not in digits else None
        return ExperimentData("speech", len(digits), labels, self.info, list(HF_METRICS))

    def _utterances(self) -> tuple[list[Utterance], list[Utterance], dict]:
        """Adaptation and test clips: the user's folders, else an FSDD speaker's official splits."""
        data = self.data
        if data.speaker_folder is not None:
            if data.test_folder is None:
                raise ValueError(
                    "data.options.speaker_folder needs data.options.test_folder (held-out clips to score)"
                )
            train = folder_utterances(data.speaker_folder, self.pipe.name)
            if data.adaptation_clips != "all":
                train = adaptation_clips(train, data.adaptation_clips)
            test = folder_utterances(data.test_folder, self.pipe.name)
            return train, test, {"name": str(data.speaker_folder), "test_folder": str(data.test_folder)}
        target = data.target_speaker or self.pipe.backbone_options.held_out_speaker
        clips = [u for u in fsdd_utterances() if u.speaker == target]
        train = adaptation_clips(split_fsdd(clips, "train"), data.adaptation_clips)
        test = [u for u in split_fsdd(clips, "test") if u.index < data.eval_clips_per_digit]
        return train, test, {"name": "fsdd", "sha256": FSDD_SHA256, "target_speaker": target}

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

    def _training(self, count: int | str) -> HfClipTraining:
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

    def probe(self, model: HfTts) -> torch.Tensor:
        """The mel of the first test clip (the engine's reload check)."""
        return model.synthesize_mel(self.test[0].input_ids, self.recipe.seed)

    def primary_label(self, recipe: Any) -> str:
        """The stage's name (``speaker``), as speech reports have always named the adapted model."""
        return recipe.stages[-1].name

    # ----- baselines and report -----------------------------------------------------------------------
    def baseline(self, name: str) -> list[Any] | Outcome:
        """``lora`` (the stage's targets) and ``full_finetune`` on the stage's budget; ``base`` untrained."""
        if name == "base":
            self.untrained[name] = synthesis = score_hf(self.base, self.test, self.recipe.seed)
            total = sum(p.numel() for p in self.base.parameters())
            return Outcome((synthesis.digits, synthesis.scores), 0, total)
        stage, options = self.recipe.stages[-1], self.pipe.stage_options
        targets = list(stage.adapter.targets) or hf_adapter_targets(self.base.family)
        return [baseline_stage(name, stage, options.lora_rank, options.finetune_lr, targets)]

    def describe(self, models: dict[str, Trained]) -> dict[str, Any]:
        syntheses = model_syntheses(self, models)
        unscored = {label: unscored_summary(s, self.metrics) for label, s in syntheses.items()}
        sweep = clip_sweep(self, self.data.sweep_clips, self._training, unscored)
        stage = self.recipe.stages[-1]
        primary = models[self.primary_label(self.recipe)]
        self.pipe.model = primary.model  # lab code may synthesise with it after run
        folder = primary.adapters[stage.name]
        save_adapter(primary.model.model, folder, name=stage.name)  # the transformers model's own paths
        write_speech_facts(folder, {"statistics": self.statistics})  # for pipe.load_adapter
        if "lora" in models:  # the LoRA baseline's adapter too, beside the primary's
            save_adapter(models["lora"].model.model, self.run_dir / "adapters" / "lora", name="lora")
        checks = self._checks(primary.model, folder)
        rate, count = self.base.features.sample_rate, self.data.samples
        samples = []
        for label, synthesis in syntheses.items():
            samples += write_samples(self.run_dir / "samples", label, synthesis, self.test, count, rate)
        return {
            "backbone": dict(self.base.info) | {"family": self.base.family, "sample_rate": rate},
            "adapter": adapter_facts(self.recipe.stages[-1], primary),
            "notes": self._notes(samples, checks) + unscored_notes(unscored),
            "extra": {"checks": checks, "sweep_adaptation_clips": sweep, "unscored": unscored,
                      "variance_statistics": self.statistics},
        }  # fmt: skip

    def _checks(self, adapted: HfTts, folder: Path) -> dict[str, bool]:
        """Disabling the adapter gives the base bit for bit; the file left in ``folder`` reloads into the
        transformers model to identical mels."""
        ids = self.test[0].input_ids
        with disable_adapters(adapted.model):
            disabled = adapted.synthesize_mel(ids)
        reloaded = self.base.copy()
        load_adapter(reloaded.model, folder)
        return {
            "disabled_adapter_equals_base": bool(torch.equal(disabled, self.base.synthesize_mel(ids))),
            "reloaded_adapter_equals_trained": bool(
                torch.equal(reloaded.synthesize_mel(ids), adapted.synthesize_mel(ids))
            ),
        }

    def _notes(self, samples: list[str], checks: dict[str, bool]) -> list[str]:
        notes = [
            f"Synthesised WAV files ({self.base.features.sample_rate} Hz) are in samples/: "
            + ", ".join(samples[:6]),
            "Disabling the adapter reproduces the base bit for bit: "
            f"{checks['disabled_adapter_equals_base']}; the saved adapter reloads to identical mels: "
            f"{checks['reloaded_adapter_equals_trained']}.",
            "Parameters: trainable are the weights a model trained, as a fraction of all its parameters, "
            "adapters included.",
            *HF_NOTES,
        ]
        return notes + ([DURATION_NOTE] if self.base.family == "fastspeech2_conformer" else [])
