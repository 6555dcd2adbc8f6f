"""A native adapter folder that carries a task head, written in HF peft's layout: the adapter through
:func:`convert_adapter`, the head as peft's ``modules_to_save``, so ``PeftModel.from_pretrained`` on the
domain's model restores both. The domain says which head modules a folder may carry and how their
tensors map onto its model's module names (a rescaled output layer, say)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipelines.core.files import atomic_write

from .files import convert_adapter
from .peft_format import PEFT_PREFIX

__all__ = ["export_peft_with_head"]

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
HeadTensors = dict[str, torch.Tensor]


def export_peft_with_head(
    source: str | Path,
    target: str | Path,
    allowed: Callable[[list[str]], bool],
    convert_head: Callable[[HeadTensors], tuple[list[str], HeadTensors]],
    kind: str,
) -> Path:
    """Write ``source`` (native, from ``save_adapter(..., extra=[head])``) to ``target`` in peft's layout.

    Args:
        allowed: Whether a folder's ``extra_modules`` are a head this domain exports.
        convert_head: The head's native tensors -> (peft ``modules_to_save``, tensors by module path).
        kind: The end of the error naming what a folder of this domain carries ("a protein folder
            carries 'head'").
    """
    source, target = Path(source), Path(target)
    if not (source / CONFIG).is_file():
        raise FileNotFoundError(f"{source} has no {CONFIG}; pass a folder that save_adapter() or a run wrote")
    config = json.loads((source / CONFIG).read_text(encoding="utf-8"))
    if config.get("format") != "peft-pipelines":
        raise ValueError(f"{source} is already in HF peft's format; copy it as it is")
    if config.get("peft_blocker"):
        raise ValueError(f"{source} cannot be exported to HF peft's format: {config['peft_blocker']}")
    extra = config.get("extra_modules") or []
    if not allowed(extra):
        raise ValueError(f"{source} carries modules {extra}; {kind}")
    tensors = load_file(str(source / WEIGHTS))
    head = {key: tensors.pop(key) for key in list(tensors) if key.startswith(tuple(f"{m}." for m in extra))}
    with tempfile.TemporaryDirectory() as scratch:  # convert_adapter converts adapter tensors only
        plain = Path(scratch)
        save_file(tensors, str(plain / WEIGHTS), metadata={"format": "pt"})
        (plain / CONFIG).write_text(json.dumps({**config, "extra_modules": []}), encoding="utf-8")
        convert_adapter(plain, target, format="peft")
    if head:
        names, converted = convert_head(head)
        weights = load_file(str(target / WEIGHTS))
        weights.update({f"{PEFT_PREFIX}{key}": value.contiguous() for key, value in converted.items()})
        peft_config = json.loads((target / CONFIG).read_text(encoding="utf-8"))
        peft_config["modules_to_save"] = names
        atomic_write(target / WEIGHTS, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
        atomic_write(target / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(peft_config, indent=2)))
    return target
