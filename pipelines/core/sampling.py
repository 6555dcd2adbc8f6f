"""Low-data sampling of a training split: ``data.fraction`` and ``data.shots_per_class``, the same in every
pipeline.

With labels the draw is stratified: each class keeps ``max(1, round(fraction * n_class))`` examples, or
exactly ``shots_per_class`` (all of a class that has fewer). Without labels (regression) a fraction is a
plain seeded draw of ``max(1, round(fraction * n))`` examples, and shots are refused. The kept indices come
back in their original order, so the same recipe and seed always give the same subset.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Hashable, Sequence

__all__ = ["low_data_indices"]


def low_data_indices(
    count: int,
    labels: Sequence[Hashable] | None = None,
    fraction: float = 1.0,
    shots_per_class: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Indices of the training examples a low-data run keeps.

    Args:
        count: Examples in the training split.
        labels: One hashable class per example (tuples for multi-label rows); None for regression.
        fraction: Share kept (per class when labelled), in (0, 1].
        shots_per_class: Exact count per class instead of a fraction.
        seed: Seed of the draw (``random.Random``).

    Returns:
        Sorted indices; all of them when fraction is 1 and no shots are asked for.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data.fraction must be in (0, 1], got {fraction}")
    if shots_per_class is not None and shots_per_class < 1:
        raise ValueError(f"data.shots_per_class must be at least 1, got {shots_per_class}")
    if fraction == 1.0 and shots_per_class is None:
        return list(range(count))
    rng = random.Random(seed)
    if labels is None:
        if shots_per_class is not None:
            raise ValueError("data.shots_per_class needs class labels; a regression task takes data.fraction")
        return sorted(rng.sample(range(count), max(1, round(fraction * count))))
    if len(labels) != count:
        raise ValueError(f"low_data_indices got {len(labels)} labels for {count} examples")
    by_class: dict[Hashable, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    kept: list[int] = []
    for key in sorted(by_class, key=str):
        members = by_class[key]
        take = shots_per_class if shots_per_class is not None else max(1, round(fraction * len(members)))
        kept.extend(rng.sample(members, min(take, len(members))))
    return sorted(kept)
