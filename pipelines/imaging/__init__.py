"""Medical imaging pipelines: ViT and CNN adapters on MONAI data."""

from __future__ import annotations
