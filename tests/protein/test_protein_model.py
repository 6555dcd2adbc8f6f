"""ProteinModel on a tiny random ESM-2: every task trains, padding is invisible, adapters round-trip."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from pipelines.core.peft import LoRA, add_adapter, load_adapter, save_adapter, set_trainable
from pipelines.protein.backbones import expand_targets, load_backbone
from pipelines.protein.batching import MaskedLMCollator, TaskCollator, pad_tokens
from pipelines.protein.data import IGNORE_INDEX, records_from_lists
from pipelines.protein.model import ProteinModel, target_statistics

SHORT, LONG = "MKVLAT", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIE"


def _toy(task):
    """Eight sequences; the label depends on carrying W (per sequence) or on the letter (per residue)."""
    rng = np.random.default_rng(0)
    letters = list("ACDEFGHIKLMNPQRSTVY")
    sequences = ["".join(rng.choice(letters, size=int(rng.integers(8, 20)))) for _ in range(8)]
    sequences = [s if i % 2 else s[:4] + "WW" + s[6:] for i, s in enumerate(sequences)]
    has_w = [float("W" in s) for s in sequences]
    if task == "residue":
        labels = [[int(c in "DEKR") for c in s] for s in sequences]
        return records_from_lists(sequences, residue_labels=labels)
    if task == "multiclass":
        return records_from_lists(sequences, targets=[(2 * w + i % 2) % 3 for i, w in enumerate(has_w)])
    return records_from_lists(sequences, targets=has_w)


def _model(task, pooling="mean", seed=0):
    backbone = load_backbone("esm2_tiny_random")[0]
    torch.manual_seed(seed)
    model = ProteinModel(backbone, task, num_classes=3 if task == "multiclass" else 2, pooling=pooling)
    add_adapter(model, LoRA(r=2, alpha=4, targets=expand_targets(backbone, ["q", "v", "fc1"])), name="task")
    set_trainable(model, ["task"], extra=["head"])
    return model


@pytest.mark.parametrize("task", ["regression", "binary", "multiclass", "residue"])
def test_each_task_trains(task):
    model = _model(task)
    batch = TaskCollator(model.vocabulary, task)(_toy(task))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def _randomise_adapter(model):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "task" in name:
                parameter.normal_(0, 0.3)


@pytest.mark.parametrize("task,pooling", [("regression", "mean"), ("binary", "bos"), ("residue", "mean")])
def test_padding_does_not_change_a_prediction(task, pooling):
    model = _model(task, pooling).eval()
    _randomise_adapter(model)
    records = records_from_lists(
        [SHORT, LONG], targets=[0, 1], residue_labels=[[0] * len(SHORT), [1] * len(LONG)]
    )
    collate = TaskCollator(model.vocabulary, task)
    together = model.predict_batch(collate([records[1], records[0]]))[1]
    alone = model.predict_batch(collate([records[0]]))[1]
    if task == "residue":
        together = together[len(LONG) :]  # the short sequence's residues come after the long one's
    np.testing.assert_allclose(together[-len(alone) :], alone, rtol=0, atol=1e-6)


def test_saved_adapter_and_head_reload_to_identical_predictions(tmp_path):
    model = _model("regression")
    model.head.target_mean.fill_(3.0)
    _randomise_adapter(model)
    batch = TaskCollator(model.vocabulary, "regression")(_toy("regression"))
    expected = model.eval().predict_batch(batch)[1]
    save_adapter(model, tmp_path / "task", name="task", extra=["head"])
    backbone = load_backbone("esm2_tiny_random")[0]
    torch.manual_seed(99)  # a different head initialisation, overwritten by the file
    fresh = ProteinModel(backbone, "regression")
    load_adapter(fresh, tmp_path / "task")
    np.testing.assert_array_equal(fresh.eval().predict_batch(batch)[1], expected)
    assert float(fresh.head.target_mean) == 3.0


def test_masked_lm_collator_masks_residues_only_and_is_reproducible():
    backbone = load_backbone("esm2_tiny_random")[0]
    vocabulary = backbone.vocabulary
    records = records_from_lists([LONG * 3, SHORT])
    first = MaskedLMCollator(vocabulary, seed=5)(records)
    second = MaskedLMCollator(vocabulary, seed=5)(records)
    assert torch.equal(first["tokens"], second["tokens"]) and torch.equal(first["labels"], second["labels"])
    chosen = first["labels"] != IGNORE_INDEX
    assert chosen.any(dim=1).all()  # the short sequence too
    assert not chosen[:, 0].any() and not chosen[0, len(LONG) * 3 + 1 :].any()  # never CLS, EOS, padding
    original = pad_tokens([vocabulary.encode(r.sequence) for r in records], vocabulary.padding_index)
    assert torch.equal(first["tokens"][~chosen], original[~chosen])
    assert (first["tokens"][chosen] == vocabulary.mask_index).float().mean() > 0.5
    logits = backbone.masked_lm_logits(first["tokens"])
    expected = torch.nn.functional.cross_entropy(logits[chosen], first["labels"][chosen])
    model = ProteinModel(backbone, "regression")
    torch.testing.assert_close(model.masked_lm_loss(first), expected)


def test_target_statistics_standardise_regression_targets_only():
    targets = [1.0, 2.0, 6.0]
    records = records_from_lists(["MK", "MKV", "MKVL"], targets=targets)
    expected = (statistics.mean(targets), statistics.pstdev(targets))
    assert target_statistics(records, "regression") == pytest.approx(expected)
    constant = records_from_lists(["MK", "MV"], targets=[3.0, 3.0])
    assert target_statistics(constant, "regression") == (3.0, 1.0)  # a zero spread would divide by zero
    assert target_statistics(records, "multiclass") == (0.0, 1.0)
