"""Fixtures of the protein tests: a tiny random ESM-2, toy records, and the FLIP mirror."""

from __future__ import annotations

import pytest


@pytest.fixture
def flip_mirror(data_mirror):
    """Point the data directory at the mirror; skip when it (or $PEFT_PIPELINES_DATA) lacks FLIP."""
    return data_mirror("flip/gb1/three_vs_rest.csv", "FLIP")


@pytest.fixture
def tiny_backbone():
    """A 2-layer, 32-wide random fair-esm ESM-2 (seed 0)."""
    from pipelines.protein.backbones import load_backbone

    return load_backbone("esm2_tiny_random")[0]
