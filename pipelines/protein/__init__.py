"""Protein pipelines: LoRA on ESM-2 protein language models (fair-esm or transformers checkpoints).

Modules: ``backbones`` (load ESM-2, LoRA target names), ``data`` (records, FASTA/CSV readers, checks),
``flip`` (the FLIP datasets), ``datasets`` (a recipe's data section to splits), ``splits`` (automatic
splits, caps, class checks, splits.json), ``batching`` (tokenising and padding), ``model`` (backbone +
task head), ``metrics`` (per-residue metrics), ``baselines`` (one-hot and frozen-probe baselines),
``experiment`` (the core engine's hooks), ``adapters`` (head facts, reloading, HF peft export) and
``pipeline`` (the registered pipelines). Nothing heavy is imported here.
"""

from __future__ import annotations
