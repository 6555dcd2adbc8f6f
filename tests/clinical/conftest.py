"""Fixtures of the clinical tests: a tiny random Llama with a byte tokenizer, synthetic notes, the mirror."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def mirror(data_mirror):
    """Point the data directory at the mirror; skip when it (or $PEFT_PIPELINES_DATA) lacks MTSamples."""
    return data_mirror("mtsamples/mtsamples.csv.gz", "MTSamples")


WORDS = {
    1: "chest pain dyspnea echocardiogram ejection fraction coronary stent lung wheeze".split(),
    0: "knee fracture arthroscopy cataract lens colonoscopy polyp biopsy skin rash".split(),
}


def _synthetic_notes(n: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.array([i % 2 for i in range(n)], dtype=np.int64)
    texts = [" ".join(rng.choice(WORDS[int(y)], size=int(rng.integers(6, 14)))) for y in labels]
    return [f"n{i}" for i in range(n)], texts, labels


@pytest.fixture
def synthetic_notes():
    """A function (n, seed) -> (ids, texts, labels) of short fake notes whose words depend on the label."""
    return _synthetic_notes
