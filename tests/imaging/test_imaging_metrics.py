from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.imaging.metrics import bootstrap_threshold_metrics, threshold_metrics, youden_threshold


def test_threshold_metrics_exact_counts():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.05])
    # threshold 0.5: tp=2 fn=1 fp=1 tn=3
    got = threshold_metrics(y, s, 0.5)
    assert got == pytest.approx({"sensitivity": 2 / 3, "specificity": 3 / 4, "accuracy": 5 / 7, "f1": 4 / 6})


def test_threshold_metrics_without_positives_is_nan():
    got = threshold_metrics(np.zeros(4), np.array([0.1, 0.2, 0.8, 0.9]), 0.5)
    assert math.isnan(got["sensitivity"]) and got["specificity"] == 0.5


def test_youden_threshold_matches_brute_force():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.clip(0.3 * y + rng.normal(0.4, 0.2, 300), 0, 1)
    best = max(
        np.unique(s), key=lambda t: sum(threshold_metrics(y, s, t)[k] for k in ("sensitivity", "specificity"))
    )
    j = lambda t: threshold_metrics(y, s, t)["sensitivity"] + threshold_metrics(y, s, t)["specificity"]  # noqa: E731
    assert j(youden_threshold(y, s)) == pytest.approx(j(best))


def test_youden_threshold_single_class_is_half():
    assert youden_threshold(np.ones(5), np.linspace(0, 1, 5)) == 0.5


def test_bootstrap_interval_contains_point_and_is_seeded():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.clip(0.4 * y + rng.normal(0.3, 0.2, 200), 0, 1)
    a = bootstrap_threshold_metrics(y, s, 0.5, resamples=200, seed=3)
    b = bootstrap_threshold_metrics(y, s, 0.5, resamples=200, seed=3)
    assert a == b
    for entry in a.values():
        assert entry["low"] <= entry["value"] <= entry["high"]
