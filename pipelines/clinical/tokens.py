"""Token tensors for the two objectives: packed blocks for causal-LM training and padded batches of
notes for classification."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["encode_notes", "pack_blocks", "LMBlocks", "ClassificationSet", "PadCollate"]


def encode_notes(
    tokenizer: Any, texts: Sequence[str], max_tokens: int | None = None, chars_per_token: int = 8
) -> list[list[int]]:
    """Tokenise notes without special tokens.

    Args:
        tokenizer: A transformers tokenizer.
        texts: The notes.
        max_tokens: Keep at most this many tokens of each note (its beginning). Texts are cut to
            ``max_tokens * chars_per_token`` characters first, so long notes cost little.
        chars_per_token: Upper bound on characters per token used for that cut.

    Returns:
        One list of token ids per note.
    """
    if max_tokens is not None:
        texts = [text[: max_tokens * chars_per_token] for text in texts]
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(row[:max_tokens]) if max_tokens is not None else list(row) for row in ids]


def pack_blocks(
    token_lists: Sequence[Sequence[int]], block_length: int, eos_id: int, max_blocks: int | None = None
) -> torch.Tensor:
    """Concatenate notes, each followed by EOS, and cut the stream into equal blocks.

    The tail shorter than a block is dropped, so every block is full and needs no mask.

    Returns:
        A ``(blocks, block_length)`` int64 tensor.
    """
    if block_length < 2:
        raise ValueError(f"block_length must be at least 2 tokens, got {block_length}")
    stream: list[int] = []
    limit = None if max_blocks is None else max_blocks * block_length
    for tokens in token_lists:
        stream.extend(tokens)
        stream.append(eos_id)
        if limit is not None and len(stream) >= limit:
            break
    usable = len(stream) // block_length
    if max_blocks is not None:
        usable = min(usable, max_blocks)
    return torch.tensor(stream[: usable * block_length], dtype=torch.long).view(usable, block_length)


class LMBlocks(Dataset):
    """Packed token blocks; items are ``{"input_ids": (L,)}``, plus ``"prefix": (L, hidden)`` when
    cached prefix states are given."""

    def __init__(self, blocks: torch.Tensor, prefix: torch.Tensor | None = None) -> None:
        self.blocks = blocks
        self.prefix = prefix

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.prefix is None:
            return {"input_ids": self.blocks[index]}
        return {"input_ids": self.blocks[index], "prefix": self.prefix[index]}

    @staticmethod
    @torch.no_grad()
    def prefix_of(model: Any, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Return ``model.prefix_states`` of full blocks ``(n, L, hidden)``."""
        device = next(model.parameters()).device
        parts = [
            model.prefix_states(blocks[i : i + batch_size].to(device)).cpu()
            for i in range(0, len(blocks), batch_size)
        ]
        return torch.cat(parts) if parts else torch.zeros(0)


class ClassificationSet(Dataset):
    """Tokenised notes with labels; items are ``{"input_ids": (T,), "labels": scalar or (k,)}``, plus
    ``"prefix": (T, hidden)`` once :meth:`attach_prefix` has stored cached prefix states."""

    def __init__(self, token_lists: Sequence[Sequence[int]], labels: np.ndarray) -> None:
        if len(token_lists) != len(labels):
            raise ValueError(f"{len(token_lists)} tokenised notes but {len(labels)} labels")
        empty = [i for i, tokens in enumerate(token_lists) if len(tokens) == 0]
        if empty:
            raise ValueError(f"{len(empty)} notes have no tokens (positions {empty[:5]}); drop empty notes")
        self.tokens = [torch.tensor(t, dtype=torch.long) for t in token_lists]
        self.labels = torch.tensor(np.array(labels))
        self.prefix: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.tokens[index], "labels": self.labels[index]}
        if self.prefix is not None:
            item["prefix"] = self.prefix[index]
        return item

    @torch.no_grad()
    def attach_prefix(self, model: Any, batch_size: int = 8) -> None:
        """Compute ``model.prefix_states`` of every note once (batched, no padding kept) and store them."""
        collate = PadCollate(0)
        states: list[torch.Tensor] = []
        for start in range(0, len(self), batch_size):
            items = [{"input_ids": t} for t in self.tokens[start : start + batch_size]]
            batch = collate(items)
            device = next(model.parameters()).device
            hidden = model.prefix_states(
                batch["input_ids"].to(device), batch["attention_mask"].to(device)
            ).cpu()
            states.extend(
                hidden[row, : len(t)].clone() for row, t in enumerate(self.tokens[start : start + batch_size])
            )
        self.prefix = states


class PadCollate:
    """Right-pad ``input_ids`` to the longest item and add ``attention_mask`` (picklable for workers)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = int(pad_id)

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(int(item["input_ids"].shape[0]) for item in items)
        input_ids = torch.full((len(items), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            length = int(item["input_ids"].shape[0])
            input_ids[row, :length] = item["input_ids"]
            mask[row, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if "prefix" in items[0]:  # cached hidden states (T, hidden), padded with zeros like the tokens
            width = int(items[0]["prefix"].shape[-1])
            prefix = torch.zeros((len(items), longest, width), dtype=items[0]["prefix"].dtype)
            for row, item in enumerate(items):
                prefix[row, : item["prefix"].shape[0]] = item["prefix"]
            batch["prefix"] = prefix
        if "labels" in items[0]:
            batch["labels"] = torch.stack([item["labels"] for item in items])
        return batch
