"""Protein metrics against scikit-learn: Q3 and per-residue AUROC on the flattened scored residues, the
masked-LM perplexity (log loss), and the protein-level bootstrap against a loop over whole proteins."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from torch.utils.data import DataLoader

from pipelines.core.evaluation import evaluate
from pipelines.protein.backbones import load_backbone
from pipelines.protein.batching import MaskedLMCollator, ProteinDataset, TaskCollator
from pipelines.protein.data import IGNORE_INDEX, records_from_lists
from pipelines.protein.metrics import (
    masked_lm_perplexity,
    protein_bootstrap,
    protein_interval,
    register_protein_metrics,
)
from pipelines.protein.model import ProteinModel

register_protein_metrics()


def _records(num_classes: int, seed: int = 0):
    """Twelve proteins of 5 to 24 residues (so batches pad), about a fifth of residues unresolved."""
    rng = np.random.default_rng(seed)
    sequences = [
        "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), int(rng.integers(5, 25)))) for _ in range(12)
    ]
    labels = [
        [IGNORE_INDEX if rng.random() < 0.2 else int(rng.integers(0, num_classes)) for _ in s]
        for s in sequences
    ]
    return records_from_lists(sequences, residue_labels=labels)


def _oracle(model: ProteinModel, records) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Per protein, alone (no padding): drop CLS/EOS and unresolved residues, then flatten in order."""
    truths, scores, counts = [], [], []
    with torch.no_grad():
        for record in records:
            tokens = torch.tensor([model.vocabulary.encode(record.sequence)])
            probabilities = model(tokens)[0, 1:-1].softmax(-1).numpy()
            labels = np.asarray(record.residue_labels)
            keep = labels != IGNORE_INDEX
            truths.append(labels[keep])
            scores.append(probabilities[keep])
            counts.append(int(keep.sum()))
    return np.concatenate(truths), np.concatenate(scores), counts


@pytest.fixture(scope="module")
def residue_model():
    def build(num_classes: int) -> ProteinModel:
        torch.manual_seed(0)
        model = ProteinModel(load_backbone("esm2_tiny_random")[0], "residue", num_classes=num_classes)
        return model.eval()

    return build


@pytest.mark.parametrize("num_classes", [2, 3])
def test_q3_and_per_residue_auroc_match_sklearn_on_the_scored_residues(residue_model, num_classes):
    model, records = residue_model(num_classes), _records(num_classes)
    collate = TaskCollator(model.vocabulary, "residue")
    y_true, y_score = model.predict(DataLoader(ProteinDataset(records), batch_size=5, collate_fn=collate))
    truth, probabilities, counts = _oracle(model, records)
    assert len(y_true) == sum(counts) < sum(len(r.sequence) for r in records)  # unresolved left out
    np.testing.assert_array_equal(y_true, truth)
    predicted = probabilities.argmax(1)
    if num_classes == 2:
        report = evaluate("binary", y_true, y_score, ["accuracy", "auroc"], bootstrap=0)
        assert report["auroc"].value == pytest.approx(roc_auc_score(truth, probabilities[:, 1]), abs=1e-6)
        assert report["accuracy"].value == pytest.approx(accuracy_score(truth, predicted))
    else:
        report = evaluate("multiclass", y_true, y_score, ["q3", "auroc"], bootstrap=0)
        expected = roc_auc_score(truth, probabilities, multi_class="ovr", average="macro")
        assert report["auroc"].value == pytest.approx(expected, abs=1e-6)
        assert report["q3"].value == pytest.approx(accuracy_score(truth, predicted))


def _loop_interval(truths, predictions, resamples, seed):
    """The documented scheme written out: numpy's generator draws whole proteins, scikit-learn scores."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        chosen = rng.integers(0, len(truths), len(truths))
        y = np.concatenate([truths[i] for i in chosen])
        if len(y):
            values.append(accuracy_score(y, np.concatenate([predictions[i] for i in chosen])))
    return tuple(np.percentile(values, [2.5, 97.5]))


def test_protein_bootstrap_matches_a_loop_over_whole_proteins():
    rng = np.random.default_rng(2)
    lengths = [3, 40, 7, 1, 25, 12, 0, 9]  # very unequal, one protein with no scored residue
    truths = [rng.integers(0, 3, n) for n in lengths]
    predictions = [np.where(rng.random(n) < 0.3 + 0.08 * i, t, (t + 1) % 3) for i, (n, t) in
                   enumerate(zip(lengths, truths, strict=True))]  # fmt: skip
    y, p = np.concatenate(truths), np.concatenate(predictions)
    low, high = protein_bootstrap(accuracy_score, y, p, lengths, resamples=300, seed=5)
    assert (low, high) == pytest.approx(_loop_interval(truths, predictions, 300, 5))


def test_protein_bootstrap_resamples_whole_proteins():
    lengths = [2, 5, 3]
    y = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])  # every label names its protein
    seen = []

    def record(y_true, y_input):
        seen.append(np.bincount(y_true, minlength=3))
        return 0.0

    protein_bootstrap(record, y, y, lengths, resamples=50, seed=0)
    assert len(seen) == 50
    for counts in seen:  # each protein appears whole, some number of times
        assert all(c % n == 0 for c, n in zip(counts, lengths, strict=True)) and counts.sum() > 0


def test_report_interval_resamples_proteins_of_the_scored_residues(residue_model):
    model, records = residue_model(3), _records(3, seed=4)
    collate = TaskCollator(model.vocabulary, "residue")
    y_true, y_score = model.predict(DataLoader(ProteinDataset(records), batch_size=4, collate_fn=collate))
    interval = protein_interval("q3", records, y_true, y_score, 200)
    truth, probabilities, counts = _oracle(model, records)
    starts = np.cumsum([0, *counts])
    truths = [truth[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
    predictions = [probabilities.argmax(1)[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
    assert interval["resamples"] == 200
    assert (interval["low"], interval["high"]) == pytest.approx(_loop_interval(truths, predictions, 200, 0))


def test_masked_lm_perplexity_is_exp_of_sklearn_log_loss_over_every_masked_residue(residue_model):
    model, records = residue_model(3), _records(3, seed=5)
    collate = MaskedLMCollator(model.vocabulary, 0.15, seed=0)  # the same fixed masks, batch by batch
    truths, probabilities = [], []
    with torch.no_grad():
        for start in range(0, len(records), 5):  # batches of 5, 5 and 2 with unequal masked counts
            batch = collate(records[start : start + 5])
            logits = model.backbone.masked_lm_logits(batch["tokens"]).double()
            keep = batch["labels"] != IGNORE_INDEX
            truths.append(batch["labels"][keep].numpy())
            probabilities.append(logits.softmax(-1)[keep].numpy())
    vocabulary = np.arange(probabilities[0].shape[1])
    expected = np.exp(log_loss(np.concatenate(truths), np.concatenate(probabilities), labels=vocabulary))
    got = masked_lm_perplexity(model, records, 0.15, batch_size=5)
    assert got == pytest.approx(expected, rel=1e-5)
