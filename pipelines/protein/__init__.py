"""Protein pipelines: LoRA on ESM-2 protein language models (fair-esm or transformers checkpoints).

Modules: ``backbones`` (load ESM-2, LoRA target names), ``data`` (FASTA/CSV/FLIP readers, checks),
``batching`` (tokenising and padding), ``model`` (backbone + task head), ``metrics`` (per-residue
metrics), ``baselines`` (one-hot and frozen-probe baselines), ``pipeline`` (the registered pipelines).
Nothing heavy is imported here.
"""

from __future__ import annotations
