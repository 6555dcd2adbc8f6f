"""Synthesise test utterances, vocode them and score them per utterance; the speech metrics; mel plots.

Every metric reads the synthesised *audio*: the predicted log-mel goes through the vocoder, and the
waveform's log-mel and F0 are compared with the recording's. Per utterance we keep four numbers (columns
of ``SCORE_COLUMNS``); the registered metrics of task ``"speech"`` average them, so
``pipelines.core.evaluation.evaluate("speech", intended_digits, scores)`` gives each a bootstrap interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.core.evaluation import EvaluationReport, evaluate, register_metric
from pipelines.core.evaluation.registry import list_metrics
from pipelines.speech.audio import Vocoder, mel_spectrogram, write_wav
from pipelines.speech.data import Example
from pipelines.speech.metrics import cosine_similarity, log_f0_rmse, mel_cepstral_distortion, yin_f0

__all__ = [
    "SCORE_COLUMNS",
    "SPEECH_METRICS",
    "Synthesis",
    "synthesize_and_score",
    "evaluate_scores",
    "plot_mels",
]

SCORE_COLUMNS = ("mcd", "log_f0_rmse", "speaker_similarity", "digit_prediction")
SPEECH_METRICS = ("mcd", "log_f0_rmse", "speaker_similarity", "intelligibility")


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


def _intelligibility(y_true: np.ndarray, y_score: np.ndarray) -> float:
    known = np.asarray(y_true, dtype=float) >= 0
    if not known.any():
        return float("nan")
    predicted = np.asarray(y_score, dtype=float)[:, 3]
    return float((predicted[known] == np.asarray(y_true, dtype=float)[known]).mean())


def _intelligibility_batched(y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    y_true = np.asarray(y_true, dtype=float)
    known = y_true >= 0
    correct = (np.asarray(y_score, dtype=float)[:, 3] == y_true)[known].astype(float)
    total = weights[:, known].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, weights[:, known] @ correct / total, np.nan)


def register_speech_metrics() -> None:
    """Register mcd, log_f0_rmse, speaker_similarity and intelligibility for task "speech" (idempotent)."""
    if "mcd" in list_metrics("speech"):
        return
    for column, (name, better) in enumerate(
        (("mcd", False), ("log_f0_rmse", False), ("speaker_similarity", True))
    ):
        fn, batched = _column_mean(column)
        register_metric(name, fn, ("speech",), "score", batched, greater_is_better=better, overwrite=True)
    register_metric(
        "intelligibility", _intelligibility, ("speech",), "score", _intelligibility_batched, overwrite=True
    )


register_speech_metrics()


@dataclass
class Synthesis:
    """Per-utterance scores (n, 4), intended digits (n,) (-1 unknown) and the synthesised audio/mels."""

    scores: np.ndarray
    digits: np.ndarray
    waveforms: list[np.ndarray] = field(default_factory=list)
    mels: list[torch.Tensor] = field(default_factory=list)


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
    ``vocode_reference``), vocode it and score it against the recording.

    Args:
        model: An AcousticModel (in eval mode); unused when vocode_reference.
        examples: Test examples (recordings with texts).
        speaker: Speaker id the model is conditioned on.
        vocoder: Turns mels into audio.
        evaluators: :class:`~pipelines.speech.evaluators.Evaluators` for speaker similarity and
            intelligibility; None leaves those columns NaN.
        num_bins: Mel bins the MCD reads (62 = below 4 kHz, where 8 kHz recordings have content).
    """
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    rows, waveforms, mels, digits = [], [], [], []
    for example in examples:
        predicted = example.mel if vocode_reference else model.synthesize(example.tokens, speaker)
        wav = vocoder(predicted)
        mel = mel_spectrogram(wav)
        mcd, path = mel_cepstral_distortion(example.mel, mel, num_bins=num_bins, return_path=True)
        reference_wav = _reference_wav(example)
        f0_error = log_f0_rmse(yin_f0(reference_wav), yin_f0(wav), path)
        rows.append([mcd, f0_error, np.nan, np.nan])
        waveforms.append(wav)
        mels.append(mel)
        digits.append(example.utterance.digit if example.utterance.digit is not None else -1)
    scores = np.array(rows, dtype=float).reshape(len(examples), 4)
    if evaluators is not None and examples:
        synthesized = evaluators.speaker_embeddings(mels)
        recorded = evaluators.speaker_embeddings([e.mel for e in examples])
        scores[:, 2] = [cosine_similarity(a, b) for a, b in zip(synthesized, recorded, strict=True)]
        scores[:, 3] = evaluators.digit_predictions(mels)
    if model is not None:
        model.train(was_training)
    return Synthesis(scores, np.array(digits), waveforms, mels)


def _reference_wav(example: Example) -> np.ndarray:
    from pipelines.speech.audio import AUDIO, load_wav
    from pipelines.speech.data import peak_normalize

    wav, _ = load_wav(example.utterance.path, AUDIO.sample_rate)
    return peak_normalize(wav)


def evaluate_scores(
    synthesis: Synthesis, bootstrap: int = 1000, seed: int = 0, metrics=None
) -> EvaluationReport:
    """The speech metrics with 95% bootstrap intervals over utterances."""
    return evaluate(
        "speech",
        synthesis.digits,
        synthesis.scores,
        metrics=list(metrics or SPEECH_METRICS),
        bootstrap=bootstrap,
        seed=seed,
    )


def plot_mels(
    path: Path, reference: list[torch.Tensor], synthesized: dict[str, list[torch.Tensor]], titles: list[str]
) -> Path:
    """A grid of log-mels: one row per utterance, the recording then each model's synthesis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 1 + len(synthesized)
    figure, axes = plt.subplots(
        len(reference), columns, figsize=(2.6 * columns, 2.0 * len(reference)), squeeze=False
    )
    for row, mel in enumerate(reference):
        panels = [("recording", mel)] + [(label, mels[row]) for label, mels in synthesized.items()]
        for column, (label, panel) in enumerate(panels):
            axis = axes[row][column]
            axis.imshow(
                np.asarray(panel).T, origin="lower", aspect="auto", vmin=-11.5, vmax=2.0, cmap="magma"
            )
            axis.set_title(f"{label}: {titles[row]}" if column == 0 else label, fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


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
