"""Reading HF peft adapter files: their configs as this package's specs, their tensor keys as native keys.

LoRA (PiSSA and OLoRA included: loading decomposes the base as peft does), LoHa, LoKr, VeRA, AdaLoRA (with its
rank_pattern), P-tuning and prefix tuning (whose file needs the model to find the token embedding).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .inject import _select
from .lora_init import is_residual_init
from .peft_format import (
    CONFIG,
    LAYER_TENSORS,
    PEFT_PREFIX,
    PEFT_TYPES,
    PROMPT_TENSOR,
    PROMPT_TYPES,
    SHARED_KEYS,
    WEIGHTS,
    adalora_spec_from_peft,
    prompt_spec_from_peft,
    spec_from_peft,
)
from .specs import LoRA

LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".lora_embedding_A", ".lora_embedding_B")

NEEDS_MODEL = (
    "a P-tuning or prefix adapter's HF peft file is its encoder's output, computed in its model; "
    "load_adapter(model, ...) and save_adapter(model, ..., format=...) instead."
)


def from_peft(
    config: dict, tensors: dict[str, torch.Tensor], directory: Path, model: nn.Module | None = None
):
    if config.get("peft_type") in PROMPT_TYPES.values():
        if model is None:
            raise ValueError(f"{directory}: {NEEDS_MODEL}")
        return _from_peft_prompt(config, tensors, directory, model)
    if config.get("peft_type") in PEFT_TYPES.values():
        return _from_peft_loha_lokr_vera(config, tensors, directory)
    if config.get("peft_type") == "ADALORA":
        return _from_peft_adalora(config, tensors, directory)
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{directory / CONFIG}: peft_type {config.get('peft_type')!r} is not supported; only LORA, LOHA, "
            "LOKR, VERA, ADALORA, P_TUNING and PREFIX_TUNING."
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{directory / CONFIG}: per-module {key} is not supported.")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(("corda", "loftq", "lora_ga")):
        raise ValueError(
            f"{directory / CONFIG}: init_lora_weights {init!r} changes the base weights in a way this "
            "package does not reproduce; re-save it with HF peft's path_initial_model_for_weight_conversion."
        )
    spec = LoRA(
        r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
        use_dora=bool(config.get("use_dora")), use_rslora=bool(config.get("use_rslora")),
        init=init if init == "gaussian" or is_residual_init(init) else "default",
    )  # fmt: skip
    renamed, paths = {}, []
    for key, value in tensors.items():
        key = key.removeprefix(PEFT_PREFIX).replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")
        for part in LORA_PARTS:
            if part in key:
                path = key.split(part)[0]
                if path not in paths:
                    paths.append(path)
        renamed[key] = value
    if not paths:
        raise ValueError(f"{directory / WEIGHTS} holds no LoRA tensors (lora_A, lora_B, lora_embedding_A/B).")
    return spec, paths, renamed


def _from_peft_loha_lokr_vera(config: dict, tensors: dict[str, torch.Tensor], directory: Path):
    spec = spec_from_peft(config, str(directory / CONFIG))
    layer_tensors = LAYER_TENSORS[spec.method]
    peft_keys = {peft: native for native, peft in SHARED_KEYS.items()} if spec.method == "vera" else {}
    renamed, paths = {}, []
    for key, value in tensors.items():
        key = peft_keys.get(key) or key.removeprefix(PEFT_PREFIX)
        path, _, last = key.rpartition(".")
        if last in layer_tensors and path not in paths:
            paths.append(path)
        renamed[key] = value
    if not paths:
        raise ValueError(
            f"{directory / WEIGHTS} holds no {spec.method} tensors ({', '.join(layer_tensors)})."
        )
    return spec, paths, renamed


def _from_peft_adalora(config: dict, tensors: dict[str, torch.Tensor], directory: Path):
    spec = adalora_spec_from_peft(config, str(directory / CONFIG))
    renamed, paths = {}, []
    for key, value in tensors.items():
        key = key.removeprefix(PEFT_PREFIX)
        path, _, last = key.rpartition(".")
        if last in ("lora_A", "lora_E", "lora_B") and path not in paths:
            paths.append(path)
        renamed[key] = value
    if not paths:
        raise ValueError(f"{directory / WEIGHTS} holds no AdaLoRA tensors (lora_A, lora_E, lora_B).")
    return spec, paths, renamed


def _from_peft_prompt(config: dict, tensors: dict[str, torch.Tensor], directory: Path, model: nn.Module):
    spec = prompt_spec_from_peft(config, str(directory / CONFIG))
    if set(tensors) != {PROMPT_TENSOR}:
        raise ValueError(
            f"{directory / WEIGHTS} should hold only {PROMPT_TENSOR!r}; it has {sorted(tensors)}."
        )
    hosts = [item.name for item in _select(model, list(spec.targets), f"The {spec.method} adapter")]
    if len(hosts) != 1:
        raise ValueError(
            f"{directory}: {type(model).__name__} has {len(hosts)} token embeddings ({hosts}); expected one."
        )
    return spec, hosts, {f"{hosts[0]}.embedding.weight": tensors[PROMPT_TENSOR]}
