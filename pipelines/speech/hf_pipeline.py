"""``speech/speaker_adaptation`` on a transformers TTS backbone (SpeechT5 or FastSpeech2Conformer).

Chosen by the recipe's ``backbone.name`` (``hf:<hub id>``, a local folder, or ``test_tiny_speecht5`` /
``test_tiny_fastspeech2_conformer``); lab code uses :class:`HfSpeakerAdaptationPipeline` directly::

    pipe = HfSpeakerAdaptationPipeline("hf:microsoft/speecht5_tts", train={"max_steps": 300})
    pipe.fit("my_speaker_wavs/")          # WAV files + metadata.csv (id|text) or .txt beside each
    report = pipe.evaluate("my_speaker_test_wavs/")
    wav = pipe.synthesize("seven")        # at pipe.sample_rate (SpeechT5 16 kHz, FastSpeech2Conformer 22,050)
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pipelines.core.evaluation import EvaluationReport, RunResult
from pipelines.core.peft import AdapterSpec, disable_adapters, load_adapter, save_adapter
from pipelines.core.training import TrainConfig, TrainResult
from pipelines.speech.adaptation import adaptation_clips
from pipelines.speech.data import FSDD_SHA256, Utterance, folder_utterances, fsdd_utterances, split_fsdd
from pipelines.speech.hf_adaptation import (
    HF_METRICS,
    adapt_hf,
    default_hf_adapter,
    evaluate_hf,
    hf_examples,
    score_hf,
)
from pipelines.speech.hf_tts import HfTts, load_hf_tts
from pipelines.speech.options import AdaptationDataOptions, AdaptationStageOptions, SpeechBackboneOptions
from pipelines.speech.scoring import evaluate_scores, unscored_notes, unscored_summary, write_samples

__all__ = ["HfSpeakerAdaptationPipeline"]

NOTES = [
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


def _utterances(data: str | Path | list[Utterance], speaker: str) -> list[Utterance]:
    return folder_utterances(data, speaker) if isinstance(data, (str, Path)) else list(data)


class HfSpeakerAdaptationPipeline:
    """Adapt a frozen SpeechT5 / FastSpeech2Conformer to a new speaker with a small adapter."""

    def __init__(
        self,
        backbone: str | HfTts = "hf:microsoft/speecht5_tts",
        adapter: AdapterSpec | None = None,
        train: TrainConfig | dict | None = None,
        backbone_options: SpeechBackboneOptions | dict | None = None,
        name: str = "speaker",
        seed: int = 0,
        stage_options: AdaptationStageOptions | None = None,
        data_options: AdaptationDataOptions | dict | None = None,
        compare: list[str] | tuple[str, ...] = ("lora", "base"),
    ) -> None:
        if isinstance(backbone_options, dict):
            backbone_options = SpeechBackboneOptions(**backbone_options)
        self.backbone_options = backbone_options or SpeechBackboneOptions()
        self.backbone_name = backbone if isinstance(backbone, str) else backbone.info.get("name", "custom")
        self.tts = backbone if isinstance(backbone, HfTts) else None
        self.adapter = adapter
        self.train_config = train if isinstance(train, TrainConfig) else TrainConfig(**(train or {}))
        self.name, self.seed = name, seed
        self.stage_options = stage_options or AdaptationStageOptions()
        if isinstance(data_options, dict):
            data_options = AdaptationDataOptions(**data_options)
        self.data_options = data_options or AdaptationDataOptions()
        unknown = [c for c in compare if c not in ("lora", "full_finetune", "base", "nearest_speaker")]
        if unknown:
            raise ValueError(
                f"compare has {unknown}; a transformers backbone compares lora, full_finetune, base"
            )
        # the offline path's nearest_speaker is, here, the frozen base with its speaker conditioning
        self.compare = list(dict.fromkeys("base" if c == "nearest_speaker" else c for c in compare))
        self.model: HfTts | None = None
        self.statistics: dict | None = None
        self.recipe = None

    def backbone(self) -> HfTts:
        """The frozen transformers backbone (loaded once)."""
        if self.tts is None:
            options = self.backbone_options
            self.tts = load_hf_tts(
                self.backbone_name, options.hf_vocoder, options.speaker_embedding, options.local_files_only
            )
        return self.tts

    @property
    def sample_rate(self) -> int:
        """The model's audio rate (inputs are resampled to it, synthesis comes out at it)."""
        return self.backbone().features.sample_rate

    def _spec(self) -> AdapterSpec:
        return self.adapter or default_hf_adapter(self.backbone().family)

    # lab code -------------------------------------------------------------------------------------
    def fit(self, train: str | Path | list[Utterance], val=None) -> TrainResult:
        """Train the adapter on a folder of WAV files with transcripts (or Utterances)."""
        examples = hf_examples(self.backbone(), _utterances(train, self.name))
        self.statistics = examples[0].extra.get("statistics") if examples else None
        adapted = adapt_hf(
            self.backbone(), "adapter", examples, self.train_config, self._spec(), self.name, seed=self.seed
        )
        self.model = adapted.model
        return adapted.result

    def _require_fit(self) -> HfTts:
        if self.model is None:
            raise RuntimeError("the pipeline has no adapted model yet; call fit(train) first")
        return self.model

    def evaluate(self, test: str | Path | list[Utterance], bootstrap: int = 1000) -> EvaluationReport:
        """MCD and log-F0 RMSE of the adapted voice on test recordings."""
        model = self._require_fit()
        examples = hf_examples(self.backbone(), _utterances(test, self.name), self.statistics)
        return evaluate_hf(model, examples, bootstrap, self.seed)

    def synthesize(self, text: str) -> np.ndarray:
        """The adapted voice saying ``text`` at :attr:`sample_rate`."""
        model = self._require_fit()
        return model.vocode(model.synthesize_mel(model.tokenize(text), self.seed))

    def save_adapter(self, directory: str | Path) -> Path:
        """Write the adapter (native format, safetensors) to ``directory``."""
        return save_adapter(self._require_fit().model, directory, name=self.name)

    # recipe path ------------------------------------------------------------------------------------
    def _data(self) -> tuple[list[Utterance], list[Utterance], dict]:
        data = self.data_options
        if data.speaker_folder is not None:
            if data.test_folder is None:
                raise ValueError(
                    "data.options.speaker_folder needs data.options.test_folder (held-out clips to score)"
                )
            train = folder_utterances(data.speaker_folder, self.name)
            train = (
                adaptation_clips(train, data.adaptation_clips) if data.adaptation_clips != "all" else train
            )
            test = folder_utterances(data.test_folder, self.name)
            return train, test, {"name": str(data.speaker_folder), "test_folder": str(data.test_folder)}
        target = data.target_speaker or self.backbone_options.held_out_speaker
        clips = [u for u in fsdd_utterances() if u.speaker == target]
        train = adaptation_clips(split_fsdd(clips, "train"), data.adaptation_clips)
        test = [u for u in split_fsdd(clips, "test") if u.index < data.eval_clips_per_digit]
        return train, test, {"name": "fsdd", "sha256": FSDD_SHA256, "target_speaker": target}

    def run(self, run_dir: Path, resume: bool = False) -> RunResult:
        """Adapt with the stage's adapter and the baselines in ``compare``; score all on the same clips."""
        started = time.perf_counter()
        base = self.backbone()
        train_utterances, test_utterances, dataset = self._data()
        train_examples = hf_examples(base, train_utterances)
        self.statistics = train_examples[0].extra.get("statistics")
        test_examples = hf_examples(base, test_utterances, self.statistics)
        stage = self.stage_options
        adapted, results, syntheses = {}, {}, {}
        for method in ["adapter", *self.compare]:
            label = self.name if method == "adapter" else method
            adapted[label] = adapt_hf(
                base, method, train_examples, self.train_config, self._spec(), self.name,
                stage.finetune_lr, stage.lora_rank, self.seed, run_dir / "train" / label,
            )  # fmt: skip
            if method in ("adapter", "lora"):
                save_adapter(adapted[label].model.model, run_dir / "adapters" / label, name=self.name)
            syntheses[label] = score_hf(adapted[label].model, test_examples, self.seed)
            results[label] = evaluate_scores(syntheses[label], self._bootstrap(), self.seed, self._metrics())
        self.model = adapted[self.name].model
        unscored = {
            label: unscored_summary(synthesis, self._metrics()) for label, synthesis in syntheses.items()
        }
        sweep = {}
        for count in self.data_options.sweep_clips:
            subset = hf_examples(base, adaptation_clips(train_utterances, count))
            item = adapt_hf(
                base, "adapter", subset, self.train_config, self._spec(), self.name, seed=self.seed
            )
            synthesis = score_hf(item.model, test_examples, self.seed)
            unscored[f"sweep_{count}"] = unscored_summary(synthesis, self._metrics())
            report = evaluate_scores(synthesis, self._bootstrap(), self.seed, self._metrics())
            sweep[str(count)] = {metric: report[metric].to_dict() for metric in report}
        checks = self.checks(base, self.model, run_dir / "adapters" / self.name, test_examples)
        samples = []
        for label, synthesis in syntheses.items():
            samples += write_samples(
                run_dir / "samples",
                label,
                synthesis,
                test_examples,
                self.data_options.samples,
                base.features.sample_rate,
            )
        return self._result(
            run_dir,
            base,
            adapted,
            results,
            sweep,
            checks,
            samples,
            dataset,
            train_examples,
            test_examples,
            started,
            unscored,
        )

    def _metrics(self) -> list[str]:
        """The recipe's metrics, else HF_METRICS (no evaluators here: speaker similarity would be NaN)."""
        recipe = self.recipe
        return list(recipe.evaluation.metrics) if recipe and recipe.evaluation.metrics else list(HF_METRICS)

    def _bootstrap(self) -> int:
        return self.recipe.evaluation.bootstrap if self.recipe is not None else 1000

    @staticmethod
    def checks(base: HfTts, adapted: HfTts, folder: Path, examples) -> dict:
        """Disabling the adapter gives the base bit for bit; the saved adapter reloads to identical mels."""
        ids = examples[0].input_ids
        reference = base.synthesize_mel(ids)
        with disable_adapters(adapted.model):
            disabled = adapted.synthesize_mel(ids)
        reloaded = base.copy()
        load_adapter(reloaded.model, folder)
        return {
            "disabled_adapter_equals_base": bool(torch.equal(disabled, reference)),
            "reloaded_adapter_equals_trained": bool(
                torch.equal(reloaded.synthesize_mel(ids), adapted.synthesize_mel(ids))
            ),
        }

    def _result(
        self,
        run_dir,
        base,
        adapted,
        results,
        sweep,
        checks,
        samples,
        dataset,
        train_examples,
        test_examples,
        started,
        unscored,
    ) -> RunResult:
        total = sum(p.numel() for p in base.parameters())
        main = adapted[self.name]
        folder = run_dir / "adapters" / self.name
        trained = [item.result for item in adapted.values() if item.result is not None]
        notes = [
            f"Synthesised WAV files ({base.features.sample_rate} Hz) are in samples/: "
            + ", ".join(samples[:6]),
            "Disabling the adapter reproduces the base bit for bit: "
            f"{checks['disabled_adapter_equals_base']}; the saved adapter reloads to identical mels: "
            f"{checks['reloaded_adapter_equals_trained']}.",
            *NOTES,
            *unscored_notes(unscored),
        ]
        if base.family == "fastspeech2_conformer":
            notes.append(DURATION_NOTE)
        headline = (
            self.recipe.evaluation.headline
            if self.recipe is not None and self.recipe.evaluation.headline
            else "mcd"
        )
        return RunResult(
            name=self.recipe.name if self.recipe else "speaker_adaptation",
            pipeline="speech/speaker_adaptation",
            task="speech",
            headline_metric=headline,
            primary_model=self.name,
            results=results,
            parameters={
                label: {
                    "trainable": item.parameters.trainable,
                    "total": item.parameters.total,
                    "fraction": item.parameters.trainable / total,
                }
                for label, item in adapted.items()
            },  # fmt: skip
            histories={
                label: item.result.history for label, item in adapted.items() if item.result is not None
            },
            info={
                "backbone": dict(base.info)
                | {"family": base.family, "sample_rate": base.features.sample_rate},
                "adapter": {
                    "method": self._spec().method,
                    "spec": self._spec(),
                    "file": str(folder / "adapter_model.safetensors"),
                    "file_size_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                    "trainable_parameters": main.parameters.trainable,
                    "fraction_of_base": main.parameters.trainable / total,
                },
                "dataset": dataset
                | {"splits": {"adaptation": len(train_examples), "test": len(test_examples)}},
                "cost": {
                    "wall_time_s": round(time.perf_counter() - started, 1),
                    "peak_memory_bytes": max((r.peak_memory_bytes for r in trained), default=0),
                    "samples_per_second": sum(r.samples_per_second for r in trained) / max(len(trained), 1),
                    "train_time_s": {label: round(item.wall_time_s, 2) for label, item in adapted.items()},
                },
                "notes": notes,
                "extra": {
                    "checks": checks,
                    "sweep_adaptation_clips": sweep,
                    "unscored": unscored,
                    "variance_statistics": self.statistics,
                },
            },
        )
