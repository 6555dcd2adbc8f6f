"""Speech metrics: MCD with DTW, YIN F0, log-F0 RMSE, and their registration for task "speech"."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.core.evaluation import evaluate
from pipelines.speech.audio import AUDIO, mel_spectrogram
from pipelines.speech.metrics import (
    cosine_similarity,
    dtw_path,
    log_f0_rmse,
    mel_cepstral_distortion,
    yin_f0,
)
from pipelines.speech.scoring import SPEECH_METRICS

RATE = AUDIO.sample_rate


def _tone(f0: float, seconds: float = 0.4) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (0.5 * np.sin(2 * np.pi * f0 * t) + 0.2 * np.sin(2 * np.pi * 2 * f0 * t)).astype(np.float32)


def test_mcd_of_a_signal_against_itself_is_zero_and_grows_with_noise():
    wav = _tone(150.0)
    mel = mel_spectrogram(wav)
    assert mel_cepstral_distortion(mel, mel) == 0.0
    rng = np.random.default_rng(0)
    values = [
        mel_cepstral_distortion(
            mel, mel_spectrogram(wav + level * rng.standard_normal(len(wav)).astype(np.float32))
        )
        for level in (0.001, 0.01, 0.1)
    ]
    assert 0 < values[0] < values[1] < values[2]


def test_mcd_matches_the_formula_for_a_constant_offset_in_one_cepstral_coefficient():
    frames, bins = 6, 80
    reference = np.zeros((frames, bins))
    # a log-mel whose orthonormal DCT has c1 = 1 and every other coefficient 0
    k = np.arange(bins)
    shifted = np.tile(np.cos(np.pi / bins * (k + 0.5)) * math.sqrt(2.0 / bins), (frames, 1))
    expected = 10 / math.log(10) * math.sqrt(2.0)
    assert mel_cepstral_distortion(reference, shifted) == pytest.approx(expected, rel=1e-9)


def test_dtw_path_follows_the_cheap_cells():
    cost = np.array([[0.0, 0.0, 5.0], [5.0, 5.0, 0.0]])
    assert dtw_path(cost) == [(0, 0), (0, 1), (1, 2)]
    assert dtw_path(np.zeros((3, 3))) == [(0, 0), (1, 1), (2, 2)]


def test_yin_finds_the_fundamental_of_a_harmonic_tone():
    f0 = yin_f0(_tone(150.0))
    assert len(f0) == len(mel_spectrogram(_tone(150.0)))
    voiced = f0[2:-2]
    assert np.all(np.abs(voiced - 150.0) < 0.5)
    assert np.all(yin_f0(np.zeros(RATE // 4, dtype=np.float32)) == 0)


def test_log_f0_rmse_in_cents_over_frames_voiced_in_both():
    reference = np.array([100.0, 100.0, 0.0, 200.0])
    synthesized = np.array([200.0, 100.0, 150.0, 0.0])
    # voiced in both: frames 0 (an octave, 1200 cents) and 1 (0 cents)
    assert log_f0_rmse(reference, synthesized) == pytest.approx(math.sqrt(1200.0**2 / 2))
    assert math.isnan(log_f0_rmse(np.zeros(3), synthesized[:3]))


def test_cosine_similarity():
    assert cosine_similarity([1.0, 0.0], [1.0, 0.0]) == 1.0
    assert cosine_similarity([1.0, 0.0], [0.0, 2.0]) == 0.0


def test_speech_metrics_are_registered_and_average_per_utterance_scores():
    # columns: mcd, log_f0_rmse, speaker_similarity, predicted digit
    scores = np.array([[4.0, 10.0, 0.5, 3], [6.0, np.nan, 0.7, 1], [8.0, 30.0, 0.9, 2]])
    digits = np.array([3, 1, 5])
    report = evaluate("speech", digits, scores, metrics=list(SPEECH_METRICS), bootstrap=200, seed=0)
    assert report["mcd"].value == pytest.approx(6.0)
    assert report["log_f0_rmse"].value == pytest.approx(20.0)
    assert report["speaker_similarity"].value == pytest.approx(0.7)
    assert report["intelligibility"].value == pytest.approx(2 / 3)
    assert report["mcd"].low >= 4.0 and report["mcd"].high <= 8.0
