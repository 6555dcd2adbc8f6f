"""Turning protein records into padded token batches (task batches and masked-LM batches).

Tokens are ``[CLS] residues [EOS]`` padded on the right with the vocabulary's padding index. Per-residue
labels are aligned with the tokens, with ``IGNORE_INDEX`` at CLS, EOS, padding and unresolved residues.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from pipelines.protein.backbones import Vocabulary
from pipelines.protein.data import IGNORE_INDEX, ProteinRecord

__all__ = ["ProteinDataset", "TaskCollator", "MaskedLMCollator", "pad_tokens"]


class ProteinDataset(Dataset):
    """A list of records as a torch Dataset (items are the records themselves)."""

    def __init__(self, records: list[ProteinRecord]):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ProteinRecord:
        return self.records[index]


def pad_tokens(encoded: list[list[int]], padding_index: int) -> torch.Tensor:
    """Stack token lists into a (batch, longest) tensor padded on the right."""
    longest = max(len(t) for t in encoded)
    out = torch.full((len(encoded), longest), padding_index, dtype=torch.long)
    for row, tokens in enumerate(encoded):
        out[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out


class TaskCollator:
    """Collate records into ``{"tokens", "target"}`` (per sequence) or ``{"tokens", "labels"}`` (per residue).

    Args:
        vocabulary: The backbone's vocabulary.
        task: ``regression``, ``binary``, ``multiclass`` or ``residue``.
    """

    def __init__(self, vocabulary: Vocabulary, task: str):
        self.vocabulary = vocabulary
        self.task = task

    def __call__(self, records: list[ProteinRecord]) -> dict[str, Any]:
        encoded = [self.vocabulary.encode(r.sequence) for r in records]
        batch: dict[str, Any] = {"tokens": pad_tokens(encoded, self.vocabulary.padding_index)}
        if self.task == "residue":
            labels = torch.full(batch["tokens"].shape, IGNORE_INDEX, dtype=torch.long)
            for row, record in enumerate(records):
                if record.residue_labels is None:
                    raise ValueError(f"record '{record.id}' has no residue labels for a per-residue task")
                labels[row, 1 : 1 + len(record.residue_labels)] = torch.tensor(record.residue_labels)
            batch["labels"] = labels
        elif all(r.target is not None for r in records):
            dtype = torch.float32 if self.task == "regression" else torch.long
            batch["target"] = torch.tensor([r.target for r in records], dtype=dtype)
        return batch


class MaskedLMCollator:
    """BERT-style masking of residue tokens: of the chosen 15%, 80% become MASK, 10% a random residue.

    Args:
        vocabulary: The backbone's vocabulary.
        probability: Fraction of residues chosen for the loss.
        seed: When given, masks come from a private generator (same masks on every run, for validation);
            otherwise from torch's global generator, which the training loop seeds.
    """

    def __init__(self, vocabulary: Vocabulary, probability: float = 0.15, seed: int | None = None):
        self.vocabulary = vocabulary
        self.probability = probability
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.residues = torch.tensor(vocabulary.residue_indices())

    def __call__(self, records: list[ProteinRecord]) -> dict[str, Any]:
        v = self.vocabulary
        tokens = pad_tokens([v.encode(r.sequence) for r in records], v.padding_index)
        is_residue = (tokens != v.padding_index) & (tokens != v.cls_index) & (tokens != v.eos_index)
        draw = torch.rand(tokens.shape, generator=self.generator)
        chosen = is_residue & (draw < self.probability)
        # make sure every sequence contributes at least one residue to the loss
        for row in torch.nonzero(~chosen.any(dim=1)).flatten().tolist():
            candidates = torch.nonzero(is_residue[row]).flatten()
            pick = torch.randint(len(candidates), (1,), generator=self.generator)
            chosen[row, candidates[pick]] = True
        labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))
        action = torch.rand(tokens.shape, generator=self.generator)
        masked = tokens.clone()
        masked[chosen & (action < 0.8)] = v.mask_index
        randomise = chosen & (action >= 0.8) & (action < 0.9)
        replacement = self.residues[torch.randint(len(self.residues), tokens.shape, generator=self.generator)]
        masked[randomise] = replacement[randomise]
        return {"tokens": masked, "labels": labels}
