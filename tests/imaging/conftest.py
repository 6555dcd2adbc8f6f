"""Shared fixtures of the imaging tests: a private weights cache, tiny backbone options."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("PEFT_PIPELINES_CACHE", str(tmp_path_factory.getbasetemp() / "imaging-cache"))


@pytest.fixture
def tiny_vit() -> dict:
    """Options of a 2-block, 32-wide timm ViT on 32x32 images (patch 16)."""
    return {
        "pretrained": False,
        "img_size": 32,
        "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2},
    }


@pytest.fixture
def tiny_densenet() -> dict:
    """Options of a two-block MONAI DenseNet with 8 initial features."""
    return {
        "pretrained": False,
        "model_kwargs": {"init_features": 8, "growth_rate": 4, "block_config": [2, 2]},
    }
