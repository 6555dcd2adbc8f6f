"""F0 by WORLD harvest and the F0 measures of TTS papers over aligned frame pairs.

F0 comes from ``pyworld.harvest`` (71-800 Hz) on the 5 ms frames of the MCD (:mod:`pipelines.speech.metrics`),
so the MCD's DTW path pairs F0 frames too. Over the aligned pairs (reference frame, synthesised frame):

- ``log_f0_rmse``: RMSE of the log-F0 difference in cents, over pairs voiced in both;
- ``gross_pitch_error`` (GPE): share of the pairs voiced in both whose F0 differs by more than 20% of the
  reference F0;
- ``voicing_decision_error`` (VDE): share of all pairs whose voiced/unvoiced decisions differ;
- ``voiced_coverage``: share of all pairs voiced in both (what log-F0 RMSE and GPE are computed on).

log-F0 RMSE and GPE are NaN when no pair is voiced in both; every measure is NaN for an empty path.
"""

from __future__ import annotations

import math

import numpy as np

from pipelines.speech.metrics import FRAME_PERIOD_MS, import_world

__all__ = [
    "harvest_f0",
    "log_f0_rmse",
    "gross_pitch_error",
    "voicing_decision_error",
    "voiced_coverage",
]


def harvest_f0(
    wav: np.ndarray,
    sample_rate: int,
    frame_period: float = FRAME_PERIOD_MS,
    f0_floor: float = 71.0,
    f0_ceil: float = 800.0,
) -> np.ndarray:
    """F0 in Hz per frame (0 where unvoiced) by WORLD harvest; frame i is centred at i * frame_period ms."""
    pyworld, _ = import_world()
    x = np.ascontiguousarray(np.asarray(wav, dtype=np.float64).ravel())
    if x.size == 0:
        return np.zeros(0)
    f0, _ = pyworld.harvest(x, sample_rate, f0_floor=f0_floor, f0_ceil=f0_ceil, frame_period=frame_period)
    return f0


def _pairs(
    reference_f0: np.ndarray, synthesized_f0: np.ndarray, path: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    reference = np.asarray(reference_f0, dtype=np.float64)
    synthesized = np.asarray(synthesized_f0, dtype=np.float64)
    if path is None:
        index = np.arange(min(len(reference), len(synthesized)))
        return reference[index], synthesized[index]
    path = np.asarray(path, dtype=int).reshape(-1, 2)
    return reference[path[:, 0]], synthesized[path[:, 1]]


def log_f0_rmse(
    reference_f0: np.ndarray, synthesized_f0: np.ndarray, path: np.ndarray | None = None
) -> float:
    """RMSE in cents of log-F0 over aligned pairs voiced in both (NaN when none are).

    Args:
        reference_f0: F0 per frame of the recording (0 = unvoiced).
        synthesized_f0: F0 per frame of the synthesised audio.
        path: (k, 2) frame pairs to compare (the MCD's DTW path); default the diagonal.
    """
    reference, synthesized = _pairs(reference_f0, synthesized_f0, path)
    both = (reference > 0) & (synthesized > 0)
    if not both.any():
        return math.nan
    return float(1200.0 * np.sqrt(np.mean(np.log2(synthesized[both] / reference[both]) ** 2)))


def gross_pitch_error(
    reference_f0: np.ndarray,
    synthesized_f0: np.ndarray,
    path: np.ndarray | None = None,
    tolerance: float = 0.2,
) -> float:
    """Share of aligned pairs voiced in both whose F0 is off by more than ``tolerance`` (NaN when none)."""
    reference, synthesized = _pairs(reference_f0, synthesized_f0, path)
    both = (reference > 0) & (synthesized > 0)
    if not both.any():
        return math.nan
    return float(np.mean(np.abs(synthesized[both] - reference[both]) > tolerance * reference[both]))


def voicing_decision_error(
    reference_f0: np.ndarray, synthesized_f0: np.ndarray, path: np.ndarray | None = None
) -> float:
    """Share of aligned pairs whose voiced/unvoiced decisions differ (NaN for no pairs)."""
    reference, synthesized = _pairs(reference_f0, synthesized_f0, path)
    if reference.size == 0:
        return math.nan
    return float(np.mean((reference > 0) != (synthesized > 0)))


def voiced_coverage(
    reference_f0: np.ndarray, synthesized_f0: np.ndarray, path: np.ndarray | None = None
) -> float:
    """Share of aligned pairs voiced in both (NaN for no pairs)."""
    reference, synthesized = _pairs(reference_f0, synthesized_f0, path)
    if reference.size == 0:
        return math.nan
    return float(np.mean((reference > 0) & (synthesized > 0)))
