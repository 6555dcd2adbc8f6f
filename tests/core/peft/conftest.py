"""Every PEFT test runs seeded, in float32, on one thread; the fixtures the test modules share."""

from __future__ import annotations

import pytest
import torch
from peft_testing import llama_input_ids, make_tiny_llama

from pipelines.core.peft.lora import LoRAAdapter


@pytest.fixture(autouse=True)
def _seeded_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_llama():
    """One tiny LLaMA per test module, drawn from seed 0; tests adapt copies of it."""
    torch.manual_seed(0)
    return make_tiny_llama()


@pytest.fixture
def input_ids():
    return llama_input_ids()


@pytest.fixture
def fused_calls(monkeypatch):
    """The input dtype of every adapter forward that takes the fused LoRA path (a stack: one per adapter)."""
    calls = []
    original = LoRAAdapter.fused_forward

    def counting(self, base, x, stack=()):
        calls.extend([x.dtype] * (1 + len(stack)))  # one entry per adapter the Function computes
        return original(self, base, x, stack)

    monkeypatch.setattr(LoRAAdapter, "fused_forward", counting)
    return calls
