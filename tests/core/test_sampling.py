"""Low-data sampling (`data.fraction`, `data.shots_per_class`), written once in the core."""

from __future__ import annotations

from collections import Counter

import pytest

from pipelines.core.sampling import low_data_indices


def test_a_fraction_is_drawn_per_class_in_original_order_and_repeats_with_the_seed():
    labels = [0] * 90 + [1] * 10
    kept = low_data_indices(100, labels, fraction=0.2, seed=3)
    assert Counter(labels[i] for i in kept) == {0: 18, 1: 2}
    assert kept == sorted(kept) and kept == low_data_indices(100, labels, fraction=0.2, seed=3)
    assert kept != low_data_indices(100, labels, fraction=0.2, seed=4)


def test_every_class_keeps_one_and_shots_take_all_of_a_small_class():
    labels = ["a"] * 50 + ["b"] * 2
    assert Counter(labels[i] for i in low_data_indices(52, labels, fraction=0.01)) == {"a": 1, "b": 1}
    assert Counter(labels[i] for i in low_data_indices(52, labels, shots_per_class=5)) == {"a": 5, "b": 2}


def test_multilabel_rows_are_classes_by_label_set():
    labels = [(1, 0)] * 10 + [(0, 1)] * 10 + [(1, 1)] * 4
    kept = low_data_indices(24, labels, shots_per_class=3)
    assert Counter(labels[i] for i in kept) == {(1, 0): 3, (0, 1): 3, (1, 1): 3}


def test_regression_takes_a_plain_fraction_and_refuses_shots():
    kept = low_data_indices(200, None, fraction=0.25, seed=0)
    assert len(kept) == 50 and len(set(kept)) == 50
    assert low_data_indices(7, None) == list(range(7))
    with pytest.raises(ValueError, match="data.shots_per_class needs class labels"):
        low_data_indices(10, None, shots_per_class=2)


@pytest.mark.parametrize(
    ("fraction", "shots", "message"),
    [(0.0, None, "data.fraction must be in \\(0, 1\\], got 0.0"), (1.0, 0, "at least 1, got 0")],
)
def test_bad_values_are_refused(fraction, shots, message):
    with pytest.raises(ValueError, match=message):
        low_data_indices(10, [0] * 10, fraction=fraction, shots_per_class=shots)
