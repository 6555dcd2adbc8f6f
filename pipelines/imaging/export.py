"""HF peft export of an imaging adapter folder: the adapter's tensors in peft's names, the head as
``modules_to_save``, so ``peft.PeftModel.from_pretrained(ImageClassifier(backbone, outputs, task), folder)``
restores adapter and head.

The core's ``convert_adapter`` renames the adapter tensors (methods peft has); the head's are written the way
peft (0.21, ``utils/save_and_load.py``) saves a ``modules_to_save`` module: ``base_model.model.head.weight``
and ``.bias``. peft matches ``modules_to_save`` names as suffixes of module paths, as the core's
``save_adapter(extra=["head"])`` does, so both also take a backbone module whose path ends in ``head``
(timm's unused ``head`` in a ViT, an ``nn.Identity``: no tensors, and its copy computes what it did).
``imaging_head.json`` (the operating point) is copied along.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from pipelines.core.files import atomic_write
from pipelines.core.peft import convert_adapter
from pipelines.imaging.head_facts import FACTS
from pipelines.imaging.model import HEAD

__all__ = ["export_peft"]

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def export_peft(source: str | Path, target: str | Path) -> Path:
    """Write the imaging adapter folder ``source`` (native format) to ``target`` in HF peft's layout."""
    source, target = Path(source), Path(target)
    if not (source / CONFIG).is_file():
        raise FileNotFoundError(f"{source} has no {CONFIG}; pass a folder that save_adapter() or a run wrote")
    config = json.loads((source / CONFIG).read_text(encoding="utf-8"))
    if config.get("format") != "peft-pipelines":
        raise ValueError(f"{source} is already in HF peft's format; copy it as it is")
    if config.get("peft_blocker"):
        raise ValueError(f"{source} cannot be exported to HF peft's format: {config['peft_blocker']}")
    extra = config.get("extra_modules") or []
    if any(module != HEAD and not module.endswith(f".{HEAD}") for module in extra):
        raise ValueError(f"{source} carries modules {extra}; an imaging folder carries '{HEAD}'")
    tensors = load_file(str(source / WEIGHTS))
    head = {key: tensors.pop(key) for key in list(tensors) if key.startswith(tuple(f"{m}." for m in extra))}
    with tempfile.TemporaryDirectory() as scratch:  # the core converts adapter tensors only
        plain = Path(scratch)
        save_file(tensors, str(plain / WEIGHTS), metadata={"format": "pt"})
        (plain / CONFIG).write_text(json.dumps({**config, "extra_modules": []}), encoding="utf-8")
        convert_adapter(plain, target, format="peft")
    if head:
        weights = load_file(str(target / WEIGHTS))
        weights.update({f"{PEFT_PREFIX}{key}": value.contiguous() for key, value in head.items()})
        peft_config = json.loads((target / CONFIG).read_text(encoding="utf-8"))
        peft_config["modules_to_save"] = [HEAD]
        atomic_write(target / WEIGHTS, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
        atomic_write(target / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(peft_config, indent=2)))
    if (source / FACTS).is_file():
        shutil.copyfile(source / FACTS, target / FACTS)
    return target
