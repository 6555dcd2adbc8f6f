"""Synthesise test utterances, vocode them and score them per utterance; the speech metrics; mel plots.

Every metric reads the synthesised *audio*. The waveform is resampled to the recording's own rate (FSDD:
8 kHz; the vocoder writes 22,050 Hz) and both go through WORLD for the MCD and the F0 measures, on one DTW
path (:mod:`pipelines.speech.metrics`, :mod:`pipelines.speech.pitch`); the log-mel cepstral distance reads
the log-mels; the evaluators read the log-mels too. Per utterance we keep the columns of
``SCORE_COLUMNS``, and for each NaN the reason it could not be scored; the registered metrics of task
``"speech"`` average the finite values, so ``pipelines.core.evaluation.evaluate("speech", digits, scores)``
gives each a bootstrap interval, and :func:`unscored_summary` says how many utterances each one left out.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from pipelines.core.evaluation import EvaluationReport, evaluate, register_metric
from pipelines.speech.audio import AUDIO, Vocoder, load_wav, mel_spectrogram, resample, write_wav
from pipelines.speech.data import Example, Utterance, peak_normalize
from pipelines.speech.metrics import (
    WorldFeatures,
    cosine_similarity,
    log_mel_cepstral_distance,
    mel_cepstral_distortion,
    world_features,
)
from pipelines.speech.pitch import gross_pitch_error, log_f0_rmse, voiced_coverage, voicing_decision_error
from pipelines.speech.plots import plot_mels  # the report's mel grid, kept importable from here

__all__ = [
    "SCORE_COLUMNS",
    "SPEECH_METRICS",
    "Synthesis",
    "waveform_scores",
    "score_waveforms",
    "merge_syntheses",
    "synthesize_and_score",
    "score_recordings",
    "evaluate_scores",
    "unscored_summary",
    "unscored_notes",
    "plot_mels",
]

SCORE_COLUMNS = (
    "mcd",
    "log_f0_rmse",
    "gpe",
    "vde",
    "f0_coverage",
    "log_mel_cepstral_distance",
    "speaker_similarity",
    "digit_prediction",
)
SPEECH_METRICS = (*SCORE_COLUMNS[:-1], "intelligibility")
WAVEFORM_METRICS = ("mcd", "log_f0_rmse", "gpe", "vde", "f0_coverage")
LOWER_IS_BETTER = ("mcd", "log_f0_rmse", "gpe", "vde", "log_mel_cepstral_distance")
EMPTY = "the synthesis is empty"
NOT_VOICED_IN_BOTH = "no DTW-aligned frame pair is voiced in both"
NO_EVALUATORS = "no evaluators (data.options.evaluators is off)"
NO_DIGIT = "no digit label (the transcript is not one digit word)"
_DIGIT = SCORE_COLUMNS.index("digit_prediction")


def _column_mean(column: int):
    def value(y_true: np.ndarray, y_score: np.ndarray) -> float:
        values = np.asarray(y_score, dtype=float)[:, column]
        values = values[np.isfinite(values)]
        return float(values.mean()) if values.size else float("nan")

    def batched(y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray) -> np.ndarray:
        values = np.asarray(y_score, dtype=float)[:, column]
        finite = np.isfinite(values)
        total = weights[:, finite].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, weights[:, finite] @ values[finite] / total, np.nan)

    return value, batched


def _scored_digits(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=float)
    predicted = np.asarray(y_score, dtype=float)[:, _DIGIT]
    return (y_true >= 0) & np.isfinite(predicted), (predicted == y_true).astype(float)


def _intelligibility(y_true: np.ndarray, y_score: np.ndarray) -> float:
    known, correct = _scored_digits(y_true, y_score)
    return float(correct[known].mean()) if known.any() else float("nan")


def _intelligibility_batched(y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    known, correct = _scored_digits(y_true, y_score)
    total = weights[:, known].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, weights[:, known] @ correct[known] / total, np.nan)


def register_speech_metrics() -> None:
    """Register the speech metrics (``SPEECH_METRICS``) for task "speech" (idempotent)."""
    for column, name in enumerate(SCORE_COLUMNS[:-1]):
        fn, batched = _column_mean(column)
        better = name not in LOWER_IS_BETTER
        register_metric(name, fn, ("speech",), "score", batched, greater_is_better=better, overwrite=True)
    register_metric(
        "intelligibility", _intelligibility, ("speech",), "score", _intelligibility_batched, overwrite=True
    )


register_speech_metrics()


@dataclass
class Synthesis:
    """Per-utterance scores (n, len(SCORE_COLUMNS)), intended digits (n,) (-1 unknown), the synthesised
    audio and mels, and per utterance the reason of each NaN score ({column: reason})."""

    scores: np.ndarray
    digits: np.ndarray
    waveforms: list[np.ndarray] = field(default_factory=list)
    mels: list[torch.Tensor] = field(default_factory=list)
    unscored: list[dict[str, str]] = field(default_factory=list)


@lru_cache(maxsize=512)
def _recording(path: Path) -> tuple[np.ndarray, int, WorldFeatures]:
    wav, rate = load_wav(path)
    wav = peak_normalize(wav)
    return wav, rate, world_features(wav, rate)


def waveform_scores(
    utterance: Utterance, synthesized: np.ndarray, sample_rate: int
) -> tuple[dict[str, float], dict[str, str]]:
    """MCD and the F0 measures of a waveform against the utterance's recording, at the recording's rate.

    Returns:
        ({metric: value}, {metric: why it is NaN}).
    """
    if len(synthesized) == 0:
        return dict.fromkeys(WAVEFORM_METRICS, math.nan), dict.fromkeys(WAVEFORM_METRICS, EMPTY)
    _, rate, reference = _recording(Path(utterance.path))
    features = world_features(resample(synthesized, sample_rate, rate), rate)
    mcd, path = mel_cepstral_distortion(reference.mel_cepstrum, features.mel_cepstrum)
    values = {
        "mcd": mcd,
        "log_f0_rmse": log_f0_rmse(reference.f0, features.f0, path),
        "gpe": gross_pitch_error(reference.f0, features.f0, path),
        "vde": voicing_decision_error(reference.f0, features.f0, path),
        "f0_coverage": voiced_coverage(reference.f0, features.f0, path),
    }
    reasons = {name: NOT_VOICED_IN_BOTH for name in ("log_f0_rmse", "gpe") if math.isnan(values[name])}
    return values, reasons


def score_waveforms(
    utterances: list[Utterance],
    waveforms: list[np.ndarray],
    sample_rates: int | list[int],
    reference_mels: list[torch.Tensor],
    mels: list[torch.Tensor],
    num_bins: int | None = None,
    evaluators=None,
) -> Synthesis:
    """Score each waveform against the recording of its utterance.

    Args:
        utterances: The recordings (with texts, digits).
        waveforms: The audio to score, one per utterance (a synthesis, or another real take).
        sample_rates: Their rate (one for all, or one each); resampled to each recording's rate.
        reference_mels: Natural-log mels of the recordings (for the log-mel distance and the evaluators).
        mels: Natural-log mels of the waveforms, in the same features.
        num_bins: Mel bins the log-mel distance reads (62 = below 4 kHz, for 8 kHz recordings).
        evaluators: :class:`~pipelines.speech.evaluators.Evaluators` for speaker similarity and
            intelligibility; None leaves those columns NaN.
    """
    rates = [sample_rates] * len(waveforms) if isinstance(sample_rates, int) else list(sample_rates)
    scores = np.full((len(utterances), len(SCORE_COLUMNS)), np.nan)
    unscored = []
    for row, (utterance, wav, rate) in enumerate(zip(utterances, waveforms, rates, strict=True)):
        values, reasons = waveform_scores(utterance, wav, rate)
        if len(mels[row]):
            values["log_mel_cepstral_distance"] = log_mel_cepstral_distance(
                reference_mels[row], mels[row], num_bins=num_bins
            )
        else:
            reasons["log_mel_cepstral_distance"] = EMPTY
        for name, value in values.items():
            scores[row, SCORE_COLUMNS.index(name)] = value
        if evaluators is None:
            reasons |= {"speaker_similarity": NO_EVALUATORS, "intelligibility": NO_EVALUATORS}
        elif utterance.digit is None:
            reasons["intelligibility"] = NO_DIGIT
        unscored.append(reasons)
    if evaluators is not None and utterances:
        synthesized = evaluators.speaker_embeddings(mels)
        recorded = evaluators.speaker_embeddings(reference_mels)
        column = SCORE_COLUMNS.index("speaker_similarity")
        scores[:, column] = [cosine_similarity(a, b) for a, b in zip(synthesized, recorded, strict=True)]
        scores[:, _DIGIT] = evaluators.digit_predictions(mels)
    digits = np.array([u.digit if u.digit is not None else -1 for u in utterances])
    return Synthesis(scores, digits, list(waveforms), list(mels), unscored)


def merge_syntheses(parts: list[Synthesis]) -> Synthesis:
    """One Synthesis of several, in order."""
    return Synthesis(
        np.concatenate([p.scores for p in parts]) if parts else np.zeros((0, len(SCORE_COLUMNS))),
        np.concatenate([p.digits for p in parts]) if parts else np.zeros(0, dtype=int),
        [w for p in parts for w in p.waveforms],
        [m for p in parts for m in p.mels],
        [u for p in parts for u in p.unscored],
    )


@torch.no_grad()
def synthesize_and_score(
    model: torch.nn.Module,
    examples: list[Example],
    speaker: int,
    vocoder: Vocoder,
    evaluators=None,
    num_bins: int | None = None,
    vocode_reference: bool = False,
) -> Synthesis:
    """Synthesise each example's text as ``speaker`` (or copy-synthesise the recording's mel when
    ``vocode_reference``), vocode it and score it against the recording (:func:`score_waveforms`).

    Args:
        model: An AcousticModel (in eval mode); unused when vocode_reference.
        examples: Test examples (recordings with texts).
        speaker: Speaker id the model is conditioned on.
        vocoder: Turns mels into audio (at 22,050 Hz).
        evaluators: Evaluators for speaker similarity and intelligibility; None leaves those NaN.
        num_bins: Mel bins the log-mel distance reads.
    """
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    waveforms = [
        vocoder(example.mel if vocode_reference else model.synthesize(example.tokens, speaker))
        for example in examples
    ]
    mels = [mel_spectrogram(wav) for wav in waveforms]
    if model is not None:
        model.train(was_training)
    return score_waveforms(
        [e.utterance for e in examples],
        waveforms,
        AUDIO.sample_rate,
        [e.mel for e in examples],
        mels,
        num_bins,
        evaluators,
    )


def score_recordings(examples: list[Example], evaluators) -> Synthesis:
    """The test recordings themselves through the digit classifier (the ``recording`` reference row).

    Only the digit column is scored (read by ``intelligibility``): every other metric would compare a
    recording with itself.
    """
    scores = np.full((len(examples), len(SCORE_COLUMNS)), np.nan)
    if examples:
        scores[:, _DIGIT] = evaluators.digit_predictions([e.mel for e in examples])
    digits = np.array([e.utterance.digit if e.utterance.digit is not None else -1 for e in examples])
    unscored = [{} if e.utterance.digit is not None else {"intelligibility": NO_DIGIT} for e in examples]
    return Synthesis(scores, digits, [], [e.mel for e in examples], unscored)


def evaluate_scores(
    synthesis: Synthesis, bootstrap: int = 1000, seed: int = 0, metrics=None
) -> EvaluationReport:
    """The speech metrics with 95% bootstrap intervals over utterances (each over its scored ones)."""
    return evaluate(
        "speech",
        synthesis.digits,
        synthesis.scores,
        metrics=list(metrics or SPEECH_METRICS),
        bootstrap=bootstrap,
        seed=seed,
    )


def unscored_summary(synthesis: Synthesis, metrics=None) -> dict[str, dict]:
    """{metric: {"count", "of", "reasons": {reason: count}}} for each metric that left utterances out."""
    out = {}
    for name in metrics or SPEECH_METRICS:
        reasons = Counter(item[name] for item in synthesis.unscored if name in item)
        if reasons:
            out[name] = {
                "count": sum(reasons.values()),
                "of": len(synthesis.unscored),
                "reasons": dict(reasons),
            }
    return out


def unscored_notes(summaries: dict[str, dict[str, dict]]) -> list[str]:
    """One report line per model that has utterances some metric could not score, or one line saying none."""
    lines = []
    for model, summary in summaries.items():
        parts = [
            f"{metric} {item['count']} of {item['of']} ("
            + "; ".join(f"{count}: {reason}" for reason, count in item["reasons"].items())
            + ")"
            for metric, item in summary.items()
        ]
        if parts:
            lines.append(
                f"Utterances not scored, {model}: " + ", ".join(parts) + "; its means leave them out."
            )
    return lines or ["Every metric scored every test utterance of every model."]


def write_samples(
    folder: Path, label: str, synthesis: Synthesis, examples: list[Example], count: int, sample_rate: int
) -> list[str]:
    """Write the first ``count`` synthesised clips as ``<label>_<recording name>.wav``; returns names."""
    names = []
    for example, wav in list(zip(examples, synthesis.waveforms, strict=True))[:count]:
        name = f"{label}_{example.utterance.path.stem}.wav"
        write_wav(folder / name, wav, sample_rate)
        names.append(name)
    return names
