"""Speech synthesis metrics: mel-cepstral distortion with DTW, F0 by YIN, log-F0 RMSE, cosine similarity.

- ``mel_cepstral_distortion``: cepstra are the orthonormal DCT-II of the natural-log mel magnitude
  (the HiFi-GAN log-mel), coefficients c1-c24 (c0, the level, is left out); the two sequences are aligned
  by dynamic time warping on those cepstra and MCD = 10 / ln 10 * sqrt(2 * sum_d (c_d - c'_d)^2),
  averaged over the aligned frame pairs, in dB.
- ``log_f0_rmse``: F0 from :func:`yin_f0` on both waveforms, on the same frame grid as the mels; RMSE of
  the log-F0 difference in cents over the DTW-aligned frame pairs that are voiced in both.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipelines.speech.audio import AUDIO, AudioConfig

__all__ = [
    "mel_cepstrum",
    "dtw_path",
    "mel_cepstral_distortion",
    "yin_f0",
    "log_f0_rmse",
    "cosine_similarity",
]

_MCD_CONSTANT = 10.0 / math.log(10.0) * math.sqrt(2.0)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None]
    matrix = np.cos(np.pi / n * (i + 0.5) * k) * math.sqrt(2.0 / n)
    matrix[0] /= math.sqrt(2.0)
    return matrix


def mel_cepstrum(log_mel: np.ndarray | torch.Tensor, order: int = 24) -> np.ndarray:
    """Cepstra c0..c_order (frames, order + 1) of a log-mel (frames, bins)."""
    log_mel = np.asarray(log_mel, dtype=np.float64)
    return log_mel @ _dct_matrix(log_mel.shape[1])[: order + 1].T


def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """Minimum-cost monotonic alignment of a (n, m) local cost matrix with steps (1,0), (0,1), (1,1)."""
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf)
    total[0, 0] = 0.0
    for i in range(1, n + 1):
        row, previous = total[i], total[i - 1]
        for j in range(1, m + 1):
            row[j] = cost[i - 1, j - 1] + min(previous[j], row[j - 1], previous[j - 1])
    path, i, j = [], n, m
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        step = int(np.argmin((total[i - 1, j - 1], total[i - 1, j], total[i, j - 1])))
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    return path[::-1]


def _aligned(reference: np.ndarray, synthesized: np.ndarray) -> tuple[list[tuple[int, int]], np.ndarray]:
    diff = reference[:, None, :] - synthesized[None, :, :]
    distances = np.sqrt((diff**2).sum(axis=-1))
    return dtw_path(distances), distances


def mel_cepstral_distortion(
    reference_mel: np.ndarray | torch.Tensor,
    synthesized_mel: np.ndarray | torch.Tensor,
    order: int = 24,
    num_bins: int | None = None,
    return_path: bool = False,
) -> float | tuple[float, list[tuple[int, int]]]:
    """MCD in dB between two log-mels (frames, bins) after DTW alignment (see the module docstring).

    Args:
        reference_mel: Log-mel of the recording.
        synthesized_mel: Log-mel of the synthesised audio (any number of frames).
        order: Highest cepstral coefficient (24: c1-c24).
        num_bins: Use only the lowest bins (e.g. 62 bins = below 4 kHz for 8 kHz recordings).
        return_path: Also return the DTW path (reference frame, synthesised frame).

    Returns:
        The MCD (NaN with a warning for an empty input), and the path when asked.
    """
    reference = np.asarray(reference_mel, dtype=np.float64)[:, :num_bins]
    synthesized = np.asarray(synthesized_mel, dtype=np.float64)[:, :num_bins]
    if len(reference) == 0 or len(synthesized) == 0:
        import warnings

        warnings.warn("mel_cepstral_distortion got an empty mel; returning NaN", stacklevel=2)
        return (math.nan, []) if return_path else math.nan
    ref_cep = mel_cepstrum(reference, order)[:, 1:]
    syn_cep = mel_cepstrum(synthesized, order)[:, 1:]
    path, distances = _aligned(ref_cep, syn_cep)
    value = _MCD_CONSTANT * float(np.mean([distances[i, j] for i, j in path]))
    return (value, path) if return_path else value


def yin_f0(
    wav: np.ndarray,
    config: AudioConfig = AUDIO,
    f0_min: float = 60.0,
    f0_max: float = 400.0,
    threshold: float = 0.15,
    silence_db: float = 40.0,
) -> np.ndarray:
    """F0 in Hz per mel frame (0 where unvoiced) by YIN (de Cheveigne and Kawahara 2002).

    Frames follow :func:`~pipelines.speech.audio.mel_spectrogram` (same padding, window and hop), so
    F0 frame i belongs to mel frame i. A frame is voiced when the cumulative-mean-normalised difference
    dips below ``threshold`` between the two lags of ``f0_max`` and ``f0_min`` and its energy is within
    ``silence_db`` of the loudest frame and above -80 dBFS.
    """
    wav = np.asarray(wav, dtype=np.float64)
    pad = (config.n_fft - config.hop_length) // 2
    padded = np.pad(wav, (pad, pad), mode="reflect")
    frames_count = max((len(padded) - config.n_fft) // config.hop_length + 1, 0)
    if frames_count == 0:
        return np.zeros(0)
    index = np.arange(config.n_fft)[None] + config.hop_length * np.arange(frames_count)[:, None]
    frames = padded[index]
    tau_min = max(int(config.sample_rate / f0_max), 2)
    tau_max = min(int(config.sample_rate / f0_min) + 1, config.n_fft // 2)
    width = config.n_fft - tau_max
    difference = np.zeros((frames_count, tau_max + 1))
    for tau in range(1, tau_max + 1):
        delta = frames[:, :width] - frames[:, tau : tau + width]
        difference[:, tau] = (delta**2).sum(axis=1)
    cumulative = np.cumsum(difference[:, 1:], axis=1)
    normalized = np.ones_like(difference)
    normalized[:, 1:] = difference[:, 1:] * np.arange(1, tau_max + 1) / np.maximum(cumulative, 1e-12)
    energy = (frames**2).mean(axis=1)
    loud = 10 * np.log10(np.maximum(energy, 1e-20)) >= 10 * np.log10(max(energy.max(), 1e-20)) - silence_db
    loud &= energy > 1e-8  # digital silence (below -80 dBFS) is never voiced
    f0 = np.zeros(frames_count)
    for f in range(frames_count):
        if not loud[f]:
            continue
        below = np.nonzero(normalized[f, tau_min : tau_max + 1] < threshold)[0]
        if len(below) == 0:
            continue
        tau = tau_min + int(below[0])
        while tau + 1 <= tau_max and normalized[f, tau + 1] < normalized[f, tau]:
            tau += 1
        if tau >= tau_max:
            continue
        a, b, c = normalized[f, tau - 1], normalized[f, tau], normalized[f, tau + 1]
        shift = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) != 0 else 0.0
        f0[f] = config.sample_rate / (tau + float(np.clip(shift, -1, 1)))
    return f0


def log_f0_rmse(
    reference_f0: np.ndarray, synthesized_f0: np.ndarray, path: list[tuple[int, int]] | None = None
) -> float:
    """RMSE in cents of log-F0 over aligned frame pairs voiced in both (NaN when none are).

    Args:
        reference_f0: F0 per frame of the recording (0 = unvoiced).
        synthesized_f0: F0 per frame of the synthesised audio.
        path: Frame pairs to compare (e.g. the MCD DTW path); default the diagonal of equal lengths.
    """
    if path is None:
        path = [(i, i) for i in range(min(len(reference_f0), len(synthesized_f0)))]
    pairs = [
        (reference_f0[i], synthesized_f0[j])
        for i, j in path
        if i < len(reference_f0) and j < len(synthesized_f0)
    ]
    voiced = [(r, s) for r, s in pairs if r > 0 and s > 0]
    if not voiced:
        return math.nan
    ref, syn = np.array(voiced).T
    return float(1200.0 * np.sqrt(np.mean(np.log2(syn / ref) ** 2)))


def cosine_similarity(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Cosine of the angle between two embedding vectors."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denominator) if denominator > 0 else math.nan
