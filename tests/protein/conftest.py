"""Fixtures of the protein tests: a tiny random ESM-2, toy records, and the FLIP mirror."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

MIRROR = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def flip_mirror(monkeypatch):
    """Point the data directory at the mirror; skip when it (or $PEFT_PIPELINES_DATA) lacks FLIP."""
    root = Path(os.environ["PEFT_PIPELINES_DATA"]) if os.environ.get("PEFT_PIPELINES_DATA") else MIRROR
    if not (root / "flip" / "gb1" / "three_vs_rest.csv").is_file():
        pytest.skip(f"FLIP is not in the data directory {root}; set PEFT_PIPELINES_DATA to the mirror")
    monkeypatch.setenv("PEFT_PIPELINES_DATA", str(root))
    return root


@pytest.fixture
def tiny_backbone():
    """A 2-layer, 32-wide random fair-esm ESM-2 (seed 0)."""
    from pipelines.protein.backbones import load_backbone

    return load_backbone("esm2_tiny_random")[0]
