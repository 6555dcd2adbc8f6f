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


@pytest.fixture
def transformers_esm(tmp_path):
    """A folder with a tiny random transformers ``EsmModel`` (2 layers, 32 wide) and the ESM vocabulary."""
    pytest.importorskip("transformers")
    import torch
    from esm.data import Alphabet
    from transformers import EsmConfig, EsmModel, EsmTokenizer

    folder = tmp_path / "esm_model"
    folder.mkdir()
    alphabet = Alphabet.from_architecture("ESM-1b")
    (folder / "vocab.txt").write_text("\n".join(alphabet.all_toks) + "\n")
    config = EsmConfig(
        vocab_size=len(alphabet.all_toks), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, position_embedding_type="rotary", token_dropout=True,
        pad_token_id=alphabet.padding_idx, mask_token_id=alphabet.mask_idx, max_position_embeddings=1026,
        architectures=["EsmModel"],
    )  # fmt: skip
    torch.manual_seed(0)
    EsmModel(config).save_pretrained(folder)
    EsmTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder
