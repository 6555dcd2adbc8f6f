"""Speech metrics against independent computations: WORLD/SPTK by hand, brute-force DTW, analytic cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pipelines.speech.metrics import (
    cosine_similarity,
    dtw_path,
    log_mel_cepstral_distance,
    mcd_db,
    world_features,
)
from pipelines.speech.pitch import (
    gross_pitch_error,
    harvest_f0,
    log_f0_rmse,
    voiced_coverage,
    voicing_decision_error,
)

pyworld = pytest.importorskip("pyworld")
pysptk = pytest.importorskip("pysptk")

RATE = 16000
DB = 10.0 / math.log(10.0)


def _voice(seconds: float = 0.5, f0: float = 120.0, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """A harmonic tone with a slow vibrato (harvest voices it) and a little noise."""
    t = np.arange(int(seconds * rate)) / rate
    pitch = f0 * (1 + 0.1 * np.sin(2 * np.pi * 2 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    wav = sum(np.sin(k * phase) / k for k in range(1, 40) if k * pitch.max() < rate / 2)
    return wav * 0.3 + 1e-3 * np.random.default_rng(seed).standard_normal(len(t))


def _tone(f0: float, seconds: float = 0.4) -> np.ndarray:
    """Two harmonics and faint noise (harvest leaves a noiseless periodic signal unvoiced)."""
    t = np.arange(int(RATE * seconds)) / RATE
    noise = 1e-3 * np.random.default_rng(int(f0)).standard_normal(len(t))
    return 0.5 * np.sin(2 * np.pi * f0 * t) + 0.2 * np.sin(2 * np.pi * 2 * f0 * t) + noise


def _brute_force_dtw_cost(cost: np.ndarray) -> float:
    """Minimum total cost over every monotonic path, enumerated (small matrices only)."""
    n, m = cost.shape
    best = math.inf
    # a path is a sequence of steps (1,0), (0,1), (1,1) from (0,0) to (n-1,m-1)
    for length in range(max(n, m) - 1, n + m - 1):
        for steps in itertools.product(((1, 0), (0, 1), (1, 1)), repeat=length):
            i = j = 0
            total = cost[0, 0]
            for di, dj in steps:
                i, j = i + di, j + dj
                if i >= n or j >= m:
                    break
                total += cost[i, j]
            else:
                if (i, j) == (n - 1, m - 1):
                    best = min(best, total)
    return best


def _loop_dtw(cost: np.ndarray) -> list[tuple[int, int]]:
    """Textbook DTW with two Python loops and a trace back that prefers the diagonal."""
    n, m = cost.shape
    total = [[math.inf] * (m + 1) for _ in range(n + 1)]
    total[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            total[i][j] = cost[i - 1][j - 1] + min(total[i - 1][j - 1], total[i - 1][j], total[i][j - 1])
    path, i, j = [], n, m
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        options = [total[i - 1][j - 1], total[i - 1][j], total[i][j - 1]]
        move = options.index(min(options))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    return path[::-1]


def _hand_mcd(reference: np.ndarray, synthesized: np.ndarray, rate: int) -> float:
    """MCD computed here from pyworld and pysptk directly, with the loop DTW."""
    alpha = pysptk.util.mcepalpha(rate)
    cepstra = []
    for wav in (reference, synthesized):
        x = np.ascontiguousarray(wav, dtype=np.float64)
        f0, times = pyworld.harvest(x, rate, frame_period=5.0)
        cepstra.append(pysptk.sp2mc(pyworld.cheaptrick(x, f0, times, rate), order=24, alpha=alpha)[:, 1:])
    a, b = cepstra
    cost = np.array([[math.sqrt(((a[i] - b[j]) ** 2).sum()) for j in range(len(b))] for i in range(len(a))])
    path = _loop_dtw(cost)
    return float(np.mean([DB * math.sqrt(2.0 * ((a[i] - b[j]) ** 2).sum()) for i, j in path]))


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_dtw_finds_the_brute_force_minimum(seed):
    rng = np.random.default_rng(seed)
    cost = rng.random((int(rng.integers(1, 6)), int(rng.integers(1, 6))))
    path = dtw_path(cost)
    assert tuple(path[0]) == (0, 0) and tuple(path[-1]) == (cost.shape[0] - 1, cost.shape[1] - 1)
    steps = {tuple(s) for s in np.diff(path, axis=0)}
    assert steps <= {(1, 0), (0, 1), (1, 1)}
    assert cost[path[:, 0], path[:, 1]].sum() == pytest.approx(_brute_force_dtw_cost(cost), rel=1e-12)


def test_vectorised_dtw_equals_the_loop_dtw_on_larger_random_costs():
    rng = np.random.default_rng(7)
    for shape in ((30, 41), (57, 23), (1, 9), (12, 1)):
        cost = rng.random(shape)
        assert [tuple(p) for p in dtw_path(cost)] == _loop_dtw(cost)


def test_mcd_equals_a_hand_computation_with_pyworld_and_pysptk():
    reference = _voice(0.3, 120.0)
    synthesized = np.convolve(_voice(0.35, 135.0, seed=1), [1.0, -0.6], mode="same")
    expected = _hand_mcd(reference, synthesized, RATE)
    assert mcd_db(reference, synthesized, RATE) == pytest.approx(expected, rel=1e-9)
    assert expected > 1.0


def test_mcd_of_a_known_tilt_in_c1_and_of_a_gain_change():
    # Filtering by G(w) = exp(delta * cos(w~)), w~ the all-pass warped frequency, adds delta to the
    # mel-cepstral c1 only: MCD = 10 / ln 10 * sqrt(2) * |delta|. A gain moves c0 only: MCD 0.
    x = _voice(0.5)
    alpha = pysptk.util.mcepalpha(RATE)
    w = np.linspace(0.0, np.pi, len(x) // 2 + 1)
    warped = w + 2.0 * np.arctan(alpha * np.sin(w) / (1.0 - alpha * np.cos(w)))
    for delta in (0.1, 0.4):
        y = np.fft.irfft(np.fft.rfft(x) * np.exp(delta * np.cos(warped)), len(x))
        assert mcd_db(x, y, RATE) == pytest.approx(DB * math.sqrt(2.0) * delta, rel=0.02)
    assert mcd_db(x, 0.25 * x, RATE) < 0.01
    assert mcd_db(x, x, RATE) == 0.0


def test_mcd_of_two_real_takes_of_one_digit_is_in_the_range_of_papers(data_mirror):
    root = data_mirror("fsdd/recordings/3_yweweler_0.wav", "FSDD")
    import soundfile

    reference, rate = soundfile.read(root / "fsdd/recordings/3_yweweler_0.wav")
    other, other_rate = soundfile.read(root / "fsdd/recordings/3_yweweler_2.wav")
    assert rate == other_rate == 8000
    value = mcd_db(reference, other, rate)
    assert 2.0 < value < 15.0
    assert value == pytest.approx(_hand_mcd(reference, other, rate), rel=1e-9)


def test_harvest_f0_is_pyworld_harvest_on_the_mcd_frames_and_finds_the_tone():
    tone = _tone(150.0)
    f0 = harvest_f0(tone, RATE)
    expected, times = pyworld.harvest(tone.astype(np.float64), RATE, frame_period=5.0)
    np.testing.assert_array_equal(f0, expected)
    np.testing.assert_allclose(times[:3], [0.0, 0.005, 0.01])
    np.testing.assert_array_equal(world_features(tone, RATE).f0, expected)
    assert np.all(np.abs(f0[5:-5] - 150.0) < 1.5)
    assert not harvest_f0(np.zeros(RATE // 4), RATE).any()


def test_gpe_vde_and_log_f0_rmse_on_tones_of_known_pitch():
    at_150, at_160, at_200 = (harvest_f0(_tone(f), RATE) for f in (150.0, 160.0, 200.0))
    middle = slice(5, -5)  # harvest's first and last frames see the edges
    assert gross_pitch_error(at_150[middle], at_200[middle]) == 1.0
    assert gross_pitch_error(at_150[middle], at_160[middle]) == 0.0
    assert log_f0_rmse(at_150[middle], at_160[middle]) == pytest.approx(1200 * math.log2(160 / 150), abs=3)
    assert voicing_decision_error(at_150[middle], at_160[middle]) == 0.0
    half = _tone(150.0)
    half[len(half) // 2 :] = 1e-3 * np.random.default_rng(1).standard_normal(len(half) - len(half) // 2)
    vde = voicing_decision_error(at_150, harvest_f0(half, RATE))
    assert vde == pytest.approx(0.5, abs=0.05)
    assert voiced_coverage(at_150, harvest_f0(half, RATE)) == pytest.approx(0.5, abs=0.05)


def test_f0_measures_count_frames_by_hand():
    reference = np.array([100.0, 100.0, 0.0, 200.0, 100.0])
    synthesized = np.array([200.0, 110.0, 150.0, 0.0, 0.0])
    # voiced in both: frames 0 (an octave, 1200 cents, a gross error) and 1 (10%, not gross)
    assert log_f0_rmse(reference, synthesized) == pytest.approx(
        math.sqrt((1200.0**2 + (1200 * math.log2(1.1)) ** 2) / 2)
    )
    assert gross_pitch_error(reference, synthesized) == 0.5
    assert voicing_decision_error(reference, synthesized) == 3 / 5
    assert voiced_coverage(reference, synthesized) == 2 / 5
    path = np.array([[0, 1], [1, 1], [2, 2], [3, 2], [4, 2]])  # pairs (ref, syn)
    assert voicing_decision_error(reference, synthesized, path) == 1 / 5
    assert gross_pitch_error(reference, synthesized, path) == 0.5  # 110 vs 100 ok; 150 vs 200 off by 25%
    assert math.isnan(log_f0_rmse(np.zeros(3), synthesized[:3]))
    assert math.isnan(gross_pitch_error(np.zeros(3), synthesized[:3]))


def test_log_mel_cepstral_distance_is_the_rms_db_difference_of_a_smooth_level_free_change():
    bins, frames = 62, 5
    rng = np.random.default_rng(0)
    reference = rng.normal(-4.0, 1.0, (frames, bins))
    n = np.arange(bins)
    amplitudes = rng.normal(0, 0.3, 5)
    change = sum(amplitudes[k - 1] * np.cos(np.pi * k * (n + 0.5) / bins) for k in range(1, 6))
    expected = 20.0 / math.log(10.0) * math.sqrt(np.mean(change**2))  # no DCT: the RMS over bins in dB
    assert log_mel_cepstral_distance(reference, reference + change) == pytest.approx(expected, rel=1e-9)
    assert log_mel_cepstral_distance(reference, reference + 1.7) == pytest.approx(0.0, abs=1e-9)
    wide = np.concatenate([reference, np.zeros((frames, 18))], axis=1)
    assert log_mel_cepstral_distance(wide, wide + np.pad(change, (0, 18)), num_bins=bins) == pytest.approx(
        expected, rel=1e-9
    )


def test_cosine_similarity():
    assert cosine_similarity([1.0, 0.0], [1.0, 0.0]) == 1.0
    assert cosine_similarity([1.0, 0.0], [0.0, 2.0]) == 0.0
