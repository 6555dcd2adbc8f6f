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
    """Packed token blocks; items are ``{"input_ids": (L,)}``."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index]}


class ClassificationSet(Dataset):
    """Tokenised notes with labels; items are ``{"input_ids": (T,), "labels": scalar or (k,)}``."""

    def __init__(self, token_lists: Sequence[Sequence[int]], labels: np.ndarray) -> None:
        if len(token_lists) != len(labels):
            raise ValueError(f"{len(token_lists)} tokenised notes but {len(labels)} labels")
        empty = [i for i, tokens in enumerate(token_lists) if len(tokens) == 0]
        if empty:
            raise ValueError(f"{len(empty)} notes have no tokens (positions {empty[:5]}); drop empty notes")
        self.tokens = [torch.tensor(t, dtype=torch.long) for t in token_lists]
        self.labels = torch.as_tensor(np.asarray(labels))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.labels[index]}


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
        if "labels" in items[0]:
            batch["labels"] = torch.stack([item["labels"] for item in items])
        return batch
