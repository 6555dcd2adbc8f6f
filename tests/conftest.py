"""Fixtures every test shares: one torch thread (tiny models, shared machines) and the data mirror.

A rule of this suite: a metric's test never computes its expected value with the same formula as the
code under test, since a wrong formula would then pass. It compares with an independent implementation
(scikit-learn, scipy, transformers' own loss, pysptk/pyworld) or with an analytic known answer (hand
counts, a degenerate case whose value is obvious); a bootstrap is checked against a loop written in
the test over the same resample indices, or by what it resamples (whole proteins, blocks).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

MIRROR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _domains_registered():
    """Every domain imported, so registered, before any test swaps the registry for one of its own: a domain
    first imported inside such a test registers there and is unknown after it (its module stays imported)."""
    from pipelines.core.registry import import_domains

    import_domains()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data_mirror(monkeypatch) -> Callable[[str, str], Path]:
    """A function (file, dataset) that points the data directory at the mirror, or skips without `file`."""

    def use(relative_file: str, dataset: str) -> Path:
        root = Path(os.environ["PEFT_PIPELINES_DATA"]) if os.environ.get("PEFT_PIPELINES_DATA") else MIRROR
        if not (root / relative_file).is_file():
            pytest.skip(
                f"{dataset} is not in the data directory {root}; set PEFT_PIPELINES_DATA to the mirror"
            )
        monkeypatch.setenv("PEFT_PIPELINES_DATA", str(root))
        return root

    return use
