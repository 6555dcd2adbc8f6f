"""A small on-disk cache for models this package trains itself (the FSDD base model, the evaluators).

Entries live in ``$PEFT_PIPELINES_CACHE/speech/<kind>-<key>/`` (default ``~/.cache/peft-pipelines``):
``model.safetensors`` (the state dict) and ``meta.json`` (config, training facts, provenance). The key is
a hash of everything that determines the weights (config, training settings, data checksum, version), so
changing a setting trains a new entry instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["cache_root", "cache_key", "entry_dir", "save_entry", "load_entry"]

CACHE_ENV = "PEFT_PIPELINES_CACHE"


def cache_root() -> Path:
    """``$PEFT_PIPELINES_CACHE/speech``, else ``~/.cache/peft-pipelines/speech``."""
    base = os.environ.get(CACHE_ENV)
    return (Path(base).expanduser() if base else Path("~/.cache/peft-pipelines").expanduser()) / "speech"


def cache_key(settings: dict) -> str:
    """First 12 hex digits of the sha256 of the settings as canonical JSON."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def entry_dir(kind: str, settings: dict) -> Path:
    """Folder of the cache entry of a kind (e.g. ``fsdd_multispeaker``) for these settings."""
    return cache_root() / f"{kind}-{cache_key(settings)}"


def save_entry(folder: Path, model: torch.nn.Module, meta: dict) -> Path:
    """Write the model's state dict (safetensors) and its metadata atomically; returns the folder."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(Path(tmp) / "model.safetensors"))
        (Path(tmp) / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        if folder.exists():  # another process won the race; keep its entry
            return folder
        os.replace(tmp, folder)
        Path(tmp).mkdir()  # TemporaryDirectory expects to remove something
    return folder


def load_entry(folder: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The state dict and metadata of an entry, or None when it does not exist."""
    from safetensors.torch import load_file

    weights, meta = folder / "model.safetensors", folder / "meta.json"
    if not (weights.is_file() and meta.is_file()):
        return None
    return load_file(str(weights)), json.loads(meta.read_text())
