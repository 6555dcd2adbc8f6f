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

import shutil
from pathlib import Path

from pipelines.core.peft import export_peft_with_head
from pipelines.imaging.head_facts import FACTS
from pipelines.imaging.model import HEAD

__all__ = ["export_peft"]

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def export_peft(source: str | Path, target: str | Path) -> Path:
    """Write the imaging adapter folder ``source`` (native format) to ``target`` in HF peft's layout."""
    source, target = Path(source), Path(target)
    export_peft_with_head(
        source, target, lambda extra: all(m == HEAD or m.endswith(f".{HEAD}") for m in extra),
        lambda head: ([HEAD], head), f"an imaging folder carries '{HEAD}'",
    )  # fmt: skip
    if (source / FACTS).is_file():
        shutil.copyfile(source / FACTS, target / FACTS)
    return target
