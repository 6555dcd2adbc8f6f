"""New-speaker adaptation of a transformers TTS model (SpeechT5, FastSpeech2Conformer) with its own loss.

Methods: the stage's adapter (default: serial bottleneck adapters, hidden 16, on the feed-forward outputs
of encoder and decoder, and on FastSpeech2Conformer's variance predictors), ``lora`` (same targets, rank
``lora_rank``), ``full_finetune`` (every weight, ``finetune_lr``) and ``base`` (the frozen model, no
training). The base is never changed: each method adapts a copy. Scores read the vocoded audio, as on the
offline path: the synthesis is resampled to the recording's own rate, then MCD (WORLD + SPTK), the F0
measures (harvest) and the log-mel cepstral distance (bins below half the recording's rate), with bootstrap
intervals. Every trained method goes through the core engine's ``train_candidate`` with
:class:`HfClipTraining` as its hooks, in lab code and recipes alike.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.core.evaluation import EvaluationReport
from pipelines.core.experiment import StagePlan, train_candidate
from pipelines.core.peft import (
    AdapterSpec,
    Bottleneck,
    ParameterCount,
    adapter_specs,
    count_parameters,
)
from pipelines.core.peft.inject import logical_modules, matches
from pipelines.core.recipe import StageSection
from pipelines.core.training import TrainConfig, TrainResult
from pipelines.speech.adaptation import baseline_stage
from pipelines.speech.audio import AUDIO, load_wav, mel_spectrogram, resample
from pipelines.speech.data import Utterance, peak_normalize, uniform_durations
from pipelines.speech.hf_features import HfExample, collate_hf, log_mel, mel_bins_below
from pipelines.speech.hf_tts import HfTts, hf_adapter_targets
from pipelines.speech.pitch import harvest_f0
from pipelines.speech.scoring import (
    EMPTY,
    NO_DIGIT,
    SCORE_COLUMNS,
    Synthesis,
    evaluate_scores,
    merge_syntheses,
    score_waveforms,
)

__all__ = [
    "HF_METHODS",
    "HF_METRICS",
    "HfAdapted",
    "HfClipTraining",
    "hf_examples",
    "resolve_hf_adapter",
    "mirror_adapters",
    "adapt_hf",
    "score_hf",
    "add_intelligibility",
    "hf_loss",
    "default_hf_adapter",
]

HF_METHODS = ("lora", "full_finetune", "base")
HF_METRICS = ("mcd", "log_f0_rmse", "gpe", "vde", "f0_coverage", "log_mel_cepstral_distance")
LN10 = math.log(10.0)
TOO_SHORT = "the synthesis is shorter than the digit classifier's 46 ms window"


@dataclass
class HfAdapted:
    """A transformers TTS model after one method, with its training result and parameter count."""

    label: str
    model: HfTts
    result: TrainResult | None
    parameters: ParameterCount
    wall_time_s: float


def default_hf_adapter(family: str, hidden: int = 16) -> Bottleneck:
    """Serial bottleneck adapters on the feed-forward outputs (and FastSpeech2Conformer's predictors)."""
    return Bottleneck(targets=hf_adapter_targets(family), hidden=hidden, placement="serial")


def _token_means(
    values: np.ndarray, durations: torch.Tensor, voiced_only: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    means, has = [], []
    start = 0
    for count in durations.tolist():
        span = values[start : start + count]
        if voiced_only:
            span = span[span > 0]
        means.append(float(span.mean()) if len(span) else 0.0)
        has.append(len(span) > 0)
        start += count
    return torch.tensor(means), torch.tensor(has)


def _featurize(tts: HfTts, utterance: Utterance) -> HfExample:
    import soundfile

    rate = tts.features.sample_rate
    wav, _ = load_wav(utterance.path, rate)
    wav = peak_normalize(wav)
    mel, energy = log_mel(wav, tts.features)
    ids = tts.tokenize(utterance.text)
    source_rate = soundfile.info(str(utterance.path)).samplerate
    example = HfExample(ids, mel, utterance=utterance, extra={"wav": wav, "source_rate": source_rate})
    if tts.family == "fastspeech2_conformer":
        phones = len(ids) - 1  # the tokenizer ends every text with <sos/eos>
        if phones < 1:
            raise ValueError(f"transcript of {utterance.path} gives no phones; check its text")
        split = uniform_durations(mel * LN10, phones)
        durations = torch.cat([split[:1] + split[1:2], split[2:-1], split[-1:]])
        f0 = harvest_f0(wav, rate, frame_period=1000.0 * tts.features.hop_length / rate)
        f0 = np.pad(f0, (0, max(0, len(mel) - len(f0))))[: len(mel)]
        log_f0 = np.where(f0 > 0, np.log(np.maximum(f0, 1e-6)), 0.0)
        example.durations = durations
        example.pitch, example.extra["voiced"] = _token_means(log_f0, durations, voiced_only=True)
        example.energy, _ = _token_means(energy.numpy(), durations, voiced_only=False)
    return example


def hf_examples(tts: HfTts, utterances: list[Utterance], statistics: dict | None = None) -> list[HfExample]:
    """Featurise utterances for ``tts``; FastSpeech2Conformer's pitch and energy are standardised with
    ``statistics`` (default: those of these utterances, stored in each example's ``extra``)."""
    examples = [_featurize(tts, u) for u in utterances]
    if tts.family != "fastspeech2_conformer" or not examples:
        return examples
    if statistics is None:
        voiced = torch.cat([e.pitch[e.extra["voiced"]] for e in examples])
        energy = torch.cat([e.energy for e in examples])
        statistics = {
            "pitch": (
                float(voiced.mean()) if len(voiced) else 0.0,
                float(voiced.std()) if len(voiced) > 1 else 1.0,
            ),
            "energy": (float(energy.mean()), float(energy.std()) if len(energy) > 1 else 1.0),
        }
    (p_mean, p_std), (e_mean, e_std) = statistics["pitch"], statistics["energy"]
    for e in examples:
        e.pitch = torch.where(e.extra["voiced"], (e.pitch - p_mean) / max(p_std, 1e-6), 0.0)
        e.energy = (e.energy - e_mean) / max(e_std, 1e-6)
        e.extra["statistics"] = statistics
    return examples


def hf_loss(model: HfTts, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss (a plain function so it pickles)."""
    return model.loss(batch)


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[HfExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> HfExample:
        return self.examples[index]


def resolve_hf_adapter(model: HfTts, spec: AdapterSpec) -> AdapterSpec:
    """The spec with its targets (names in the transformers model; none: :func:`hf_adapter_targets`)
    resolved to the modules they select, written as paths of the HfTts wrapper (``model.<name>``)."""
    targets = list(spec.targets) or hf_adapter_targets(model.family)
    chosen = [item.name for item in logical_modules(model.model)
              if any(matches(t, item.name, item.module) for t in targets)]  # fmt: skip
    if not chosen:
        raise ValueError(
            f"adapter targets {targets} match no module of the {model.family} model; name its modules "
            f"(e.g. {hf_adapter_targets(model.family)[0]})"
        )
    return replace(spec, targets=[f"model.{name}" for name in chosen])


def mirror_adapters(model: HfTts) -> None:
    """Register the wrapper's adapters on the transformers model too, with its own module names, so that
    ``model.model`` alone is the adapted model (``save_adapter``, HF peft export, lab code)."""
    inner = adapter_specs(model.model)
    for name, spec in adapter_specs(model).items():
        inner.setdefault(name, replace(spec, targets=[t.removeprefix("model.") for t in spec.targets]))


class HfClipTraining:
    """The engine's training hooks on a speaker's clips for a transformers TTS model.

    Each candidate is a copy of the frozen base (its adapter starts from ``seed``); adapters go into the
    transformers model; a stage without an adapter is full fine-tuning. The model's own loss.
    """

    def __init__(self, base: HfTts, examples: list[HfExample], seed: int, checkpoint: bool = True) -> None:
        self.base, self.examples, self.seed, self.checkpoint = base, examples, seed, checkpoint

    def new_model(self) -> HfTts:
        torch.manual_seed(self.seed)
        return self.base.copy()

    def plan_stage(self, model: HfTts, stage: Any, index: int) -> StagePlan:
        if not self.examples:
            raise ValueError(
                f"no adaptation clips for '{stage.name}'; give at least one WAV file with its transcript"
            )
        spec = resolve_hf_adapter(model, stage.adapter) if stage.adapter is not None else None
        repeats = max(1, int(np.ceil(stage.train.batch_size / len(self.examples))))
        reduction = getattr(model.model.config, "reduction_factor", 1) if model.family == "speecht5" else 1
        return StagePlan(
            _Dataset(self.examples * repeats), hf_loss, spec, full=spec is None,
            collate_fn=functools.partial(collate_hf, reduction_factor=reduction), checkpoint=self.checkpoint,
        )  # fmt: skip

    def after_stage(self, model: HfTts, stage: Any, result: Any) -> None:
        mirror_adapters(model)
        model.eval()

    def predict(self, model: HfTts) -> tuple[np.ndarray, np.ndarray]:
        """Lab code has no test split here: empty arrays."""
        return np.empty(0), np.empty(0)


def adapt_hf(
    base: HfTts,
    method: str,
    examples: list[HfExample],
    config: TrainConfig,
    spec: AdapterSpec | None = None,
    name: str = "speaker",
    finetune_lr: float = 3e-5,
    lora_rank: int = 4,
    seed: int = 0,
    run_dir=None,
) -> HfAdapted:
    """Adapt a copy of ``base`` with ``adapter`` (the stage's spec), ``lora``, ``full_finetune`` or
    ``base`` (no training) through the engine's ``train_candidate``; the base itself never changes."""
    start = time.perf_counter()
    if method == "base":
        model = base.copy().requires_grad_(False).eval()
        return HfAdapted(method, model, None, count_parameters(model), 0.0)
    spec = spec or default_hf_adapter(base.family)
    stage = StageSection(name=name, objective="tts", adapter=spec, train=config)
    if method != "adapter":
        targets = list(spec.targets) or hf_adapter_targets(base.family)
        stage = baseline_stage(method, stage, lora_rank, finetune_lr, targets)
    hooks = HfClipTraining(base, examples, seed, checkpoint=run_dir is not None)
    trained = train_candidate(hooks, [stage], method, Path(run_dir or "."), False, seed, False)
    model = trained.model.eval()
    return HfAdapted(method, model, trained.results[0], count_parameters(model), time.perf_counter() - start)


@torch.no_grad()
def score_hf(model: HfTts, examples: list[HfExample], seed: int = 0, evaluators=None) -> Synthesis:
    """Synthesise, vocode and score each example against its recording (:data:`HF_METRICS`); with the FSDD
    ``evaluators``, also intelligibility (:func:`add_intelligibility`)."""
    rate = model.features.sample_rate
    parts = []
    for example in examples:
        wav = model.vocode(model.synthesize_mel(example.input_ids, seed))
        mel, _ = log_mel(wav, model.features) if len(wav) else (torch.zeros(0, model.features.n_mels), None)
        bins = mel_bins_below(example.extra["source_rate"] / 2, model.features)
        parts.append(
            score_waveforms([example.utterance], [wav], rate, [example.mel * LN10], [mel * LN10], bins)
        )
    synthesis = merge_syntheses(parts)
    return synthesis if evaluators is None else add_intelligibility(synthesis, examples, rate, evaluators)


def add_intelligibility(synthesis: Synthesis, examples: list[HfExample], rate: int, evaluators) -> Synthesis:
    """Fill the digit column: the FSDD digit classifier reads each synthesis resampled to 22,050 Hz in its
    own HiFi-GAN features (the model's mels are another scale); a clip without a digit stays unscored."""
    column = SCORE_COLUMNS.index("digit_prediction")
    resampled = [resample(wav, rate, AUDIO.sample_rate) if len(wav) else wav for wav in synthesis.waveforms]
    audible = [row for row, wav in enumerate(resampled) if len(wav) > AUDIO.n_fft]
    if audible:
        mels = [mel_spectrogram(resampled[row]) for row in audible]
        synthesis.scores[audible, column] = evaluators.digit_predictions(mels)
    for row, (example, reasons) in enumerate(zip(examples, synthesis.unscored, strict=True)):
        reasons.pop("intelligibility", None)
        if example.utterance.digit is None:
            reasons["intelligibility"] = NO_DIGIT
        elif row not in audible:
            reasons["intelligibility"] = EMPTY if not len(resampled[row]) else TOO_SHORT
    return synthesis


def evaluate_hf(
    model: HfTts, examples: list[HfExample], bootstrap: int = 1000, seed: int = 0
) -> EvaluationReport:
    """The metrics of :data:`HF_METRICS` with 95% bootstrap intervals over the examples."""
    return evaluate_scores(score_hf(model, examples, seed), bootstrap, seed, list(HF_METRICS))
