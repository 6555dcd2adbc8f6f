"""Speech synthesis metrics: mel-cepstral distortion (WORLD + SPTK, DTW), a log-mel cepstral distance, cosine.

- ``mcd_db``: the MCD of TTS papers. Both waveforms (same sample rate) go through WORLD: harvest F0 and
  the CheapTrick spectral envelope on 5 ms frames; ``pysptk.sp2mc`` turns each envelope into a
  mel-cepstrum of order 24 with the all-pass constant of the sample rate (``pysptk.util.mcepalpha``:
  0.31 at 8 kHz, 0.41 at 16 kHz, 0.455 at 22,050 Hz). c0 (the level) is dropped; the c1-c24 sequences
  are aligned by DTW (Euclidean frame distance) and MCD = 10 / ln 10 * sqrt(2 * sum_d (c_d - c'_d)^2),
  averaged over the aligned frame pairs, in dB. With ln|H(w)| = c0 + sum_d c_d cos(d w~), this is the RMS
  over the warped frequency axis of the log-spectral difference in dB (20 log10 of the amplitude).
- ``log_mel_cepstral_distance``: the same quantity on the log-mel (natural log of the mel magnitude, N
  bins): with the orthonormal DCT-II c_k of the bins, Parseval gives
  RMS over bins of 20 log10 difference = 20 / ln 10 * sqrt(sum_k (c_k - c'_k)^2 / N); c1-c24 are kept
  (c0 is the level), DTW-aligned on those cepstra, averaged over aligned frames, in dB. Not the MCD of
  papers (mel filterbank bins, not an all-pass warped cepstrum): a second view, never named "mcd".

The F0 metrics on the same frames and DTW path are in :mod:`pipelines.speech.pitch`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "FRAME_PERIOD_MS",
    "MCEP_ORDER",
    "WorldFeatures",
    "world_features",
    "dtw_path",
    "mel_cepstral_distortion",
    "mcd_db",
    "log_mel_cepstral_distance",
    "cosine_similarity",
]

FRAME_PERIOD_MS = 5.0
MCEP_ORDER = 24
MCD_CONSTANT = 10.0 / math.log(10.0) * math.sqrt(2.0)


def import_world():
    """``(pyworld, pysptk)``, or an ImportError that says how to install them."""
    try:
        with warnings.catch_warnings():  # both import pkg_resources, which warns that it is deprecated
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            import pysptk
            import pyworld
    except ImportError as error:
        if error.name == "pkg_resources":
            raise ImportError(
                "pyworld and pysptk import pkg_resources, which setuptools 82 removed; "
                "run `pip install 'setuptools<82'`"
            ) from error
        raise ImportError(
            "the speech metrics need pyworld and pysptk; run `pip install 'peft-pipelines[speech]'`"
        ) from error
    return pyworld, pysptk


@lru_cache(maxsize=8)
def mcep_alpha(sample_rate: int) -> float:
    """The all-pass constant that best fits the mel scale at this rate (``pysptk.util.mcepalpha``)."""
    return float(import_world()[1].util.mcepalpha(sample_rate))


@dataclass(frozen=True)
class WorldFeatures:
    """WORLD analysis of one waveform on ``FRAME_PERIOD_MS`` frames."""

    f0: np.ndarray  # (frames,) Hz, 0 where unvoiced (harvest)
    mel_cepstrum: np.ndarray  # (frames, order + 1), SPTK mel-cepstrum of the CheapTrick envelope
    sample_rate: int


def world_features(
    wav: np.ndarray, sample_rate: int, order: int = MCEP_ORDER, frame_period: float = FRAME_PERIOD_MS
) -> WorldFeatures:
    """Harvest F0 and the order-``order`` mel-cepstrum of the CheapTrick envelope of a waveform.

    Raises:
        ValueError: The waveform is empty.
    """
    pyworld, pysptk = import_world()
    x = np.ascontiguousarray(np.asarray(wav, dtype=np.float64).ravel())
    if x.size == 0:
        raise ValueError("world_features got an empty waveform")
    f0, times = pyworld.harvest(x, sample_rate, frame_period=frame_period)
    envelope = pyworld.cheaptrick(x, f0, times, sample_rate)
    cepstrum = pysptk.sp2mc(envelope, order=order, alpha=mcep_alpha(sample_rate))
    return WorldFeatures(f0, np.asarray(cepstrum, dtype=np.float64), sample_rate)


def dtw_path(cost: np.ndarray) -> np.ndarray:
    """Minimum-total-cost monotonic alignment of a (n, m) local cost matrix, steps (1,0), (0,1), (1,1).

    The accumulated cost is swept one anti-diagonal at a time (each a vectorised numpy step); ties prefer
    the diagonal step. Returns the (k, 2) integer array of (row, column) pairs from (0, 0) to (n-1, m-1).
    """
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    if n == 0 or m == 0:
        return np.zeros((0, 2), dtype=int)
    total = np.full((n + 1, m + 1), np.inf)
    total[0, 0] = 0.0
    step = np.zeros((n + 1, m + 1), dtype=np.int8)  # 0 diagonal, 1 from above (i-1), 2 from the left (j-1)
    for diagonal in range(2, n + m + 1):
        i = np.arange(max(1, diagonal - m), min(n, diagonal - 1) + 1)
        j = diagonal - i
        options = np.stack((total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]))
        best = np.argmin(options, axis=0)
        total[i, j] = cost[i - 1, j - 1] + options[best, np.arange(len(i))]
        step[i, j] = best
    path, i, j = [], n, m
    while i > 0 and j > 0:  # the trace back is O(n + m)
        path.append((i - 1, j - 1))
        move = step[i, j]
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    return np.array(path[::-1], dtype=int)


def _euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))


def mel_cepstral_distortion(
    reference_cepstrum: np.ndarray, synthesized_cepstrum: np.ndarray
) -> tuple[float, np.ndarray]:
    """MCD in dB between two SPTK mel-cepstrum sequences (frames, order + 1), c0 dropped, after DTW.

    Returns:
        (MCD, DTW path as a (k, 2) array of reference and synthesised frame indices).
    """
    reference = np.asarray(reference_cepstrum, dtype=np.float64)[:, 1:]
    synthesized = np.asarray(synthesized_cepstrum, dtype=np.float64)[:, 1:]
    distances = _euclidean(reference, synthesized)
    path = dtw_path(distances)
    return MCD_CONSTANT * float(distances[path[:, 0], path[:, 1]].mean()), path


def mcd_db(reference: np.ndarray, synthesized: np.ndarray, sample_rate: int) -> float:
    """Mel-cepstral distortion in dB of two waveforms at the same sample rate (see the module docstring).

    Resample the synthesis to the recording's rate first when they differ (``audio.resample``).
    """
    return mel_cepstral_distortion(
        world_features(reference, sample_rate).mel_cepstrum,
        world_features(synthesized, sample_rate).mel_cepstrum,
    )[0]


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None]
    matrix = np.cos(np.pi / n * (i + 0.5) * k) * math.sqrt(2.0 / n)
    matrix[0] /= math.sqrt(2.0)
    return matrix


def log_mel_cepstral_distance(
    reference_log_mel: np.ndarray | torch.Tensor,
    synthesized_log_mel: np.ndarray | torch.Tensor,
    order: int = MCEP_ORDER,
    num_bins: int | None = None,
) -> float:
    """Log-mel cepstral distance in dB of two natural-log mels (frames, bins) (see the module docstring).

    Args:
        reference_log_mel: Log-mel of the recording.
        synthesized_log_mel: Log-mel of the synthesised audio (any number of frames).
        order: Highest cepstral coefficient kept (24: c1-c24).
        num_bins: Use only the lowest bins (e.g. 62 bins = below 4 kHz for 8 kHz recordings).

    Returns:
        The distance, NaN with a warning for an empty input.
    """
    reference = np.asarray(reference_log_mel, dtype=np.float64)[:, :num_bins]
    synthesized = np.asarray(synthesized_log_mel, dtype=np.float64)[:, :num_bins]
    if len(reference) == 0 or len(synthesized) == 0:
        warnings.warn("log_mel_cepstral_distance got an empty mel; returning NaN", stacklevel=2)
        return math.nan
    bins = reference.shape[1]
    basis = _dct_matrix(bins)[1 : order + 1].T
    distances = _euclidean(reference @ basis, synthesized @ basis)
    path = dtw_path(distances)
    return 20.0 / math.log(10.0) / math.sqrt(bins) * float(distances[path[:, 0], path[:, 1]].mean())


def cosine_similarity(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Cosine of the angle between two embedding vectors."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denominator) if denominator > 0 else math.nan
