"""Held-out perplexity against transformers' own causal-LM loss (``labels=input_ids``), and its intervals
against known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.clinical.backbones import load_backbone
from pipelines.clinical.metrics import held_out_perplexity, perplexity_change, perplexity_from_nll
from pipelines.clinical.model import ClinicalModel
from pipelines.clinical.tokens import LMBlocks

BLOCKS = torch.randint(3, 259, (5, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny-random-llama")


def _hf_loss(lm, blocks: torch.Tensor) -> float:
    """transformers' mean next-token cross-entropy over every predicted token of the blocks."""
    with torch.no_grad():
        return float(lm(input_ids=blocks, labels=blocks).loss)


@pytest.mark.parametrize("cached", [0, 1])
def test_perplexity_is_exp_of_transformers_loss_over_all_predicted_tokens(tiny, cached):
    model = ClinicalModel(tiny.model, outputs=1)
    model.cached_layers = cached
    prefix = LMBlocks.prefix_of(model, BLOCKS, batch_size=2) if cached else None
    result = held_out_perplexity(model, BLOCKS, batch_size=2, bootstrap=0, prefix=prefix)  # batches 2, 2, 1
    loss = _hf_loss(tiny.model, BLOCKS)  # transformers shifts the labels: 8 predicted tokens per block
    assert result["value"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["nll"] == pytest.approx(loss, rel=1e-5)
    assert result["tokens"] == 5 * 8 and result["blocks"] == 5
    per_block = [8 * _hf_loss(tiny.model, BLOCKS[i : i + 1]) for i in range(len(BLOCKS))]
    assert result["block_nll"] == pytest.approx(per_block, rel=1e-5)


def test_perplexity_weights_blocks_by_their_predicted_tokens():
    # two blocks of 4 predicted tokens with summed NLL 2 and 6: exp((2 + 6) / 8), not exp of mean per block
    result = perplexity_from_nll(np.array([2.0, 6.0]), 4, bootstrap=0)
    assert result["value"] == pytest.approx(math.exp(1.0)) and result["tokens"] == 8
    assert math.isnan(result["low"]) and math.isnan(result["high"])


def test_perplexity_interval_is_within_the_block_extremes_and_collapses_on_equal_blocks():
    result = perplexity_from_nll(np.array([4.0, 8.0, 12.0, 20.0]), 4, bootstrap=300, seed=1)
    # every resampled mean lies between the lowest and highest block NLL per token (1 and 5)
    assert math.exp(1.0) <= result["low"] <= result["value"] <= result["high"] <= math.exp(5.0)
    equal = perplexity_from_nll(np.full(6, 3.0), 3, bootstrap=300)
    assert equal["low"] == pytest.approx(math.e) and equal["high"] == pytest.approx(math.e)


def test_perplexity_change_is_the_mean_paired_difference_per_token():
    before = perplexity_from_nll(np.array([10.0, 20.0, 30.0, 40.0]), 10, bootstrap=0)
    after = perplexity_from_nll(np.array([8.0, 20.0, 29.0, 37.0]), 10, bootstrap=0)
    change = perplexity_change(before, after, bootstrap=200)
    assert change["value"] == pytest.approx((-0.2 + 0.0 - 0.1 - 0.3) / 4)
    assert -0.3 <= change["low"] <= change["value"] <= change["high"] <= 0.0
    assert change["ratio"] == pytest.approx(math.exp(94 / 40) / math.exp(100 / 40))
    shifted = perplexity_from_nll(np.array([9.0, 19.0, 29.0, 39.0]), 10, bootstrap=0)
    constant = perplexity_change(before, shifted, bootstrap=100)  # every block improves by 0.1 per token
    assert [constant[k] for k in ("value", "low", "high")] == pytest.approx([-0.1] * 3)
