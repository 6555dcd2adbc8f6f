"""Fusion files: a fusion's query, key and value weights (safetensors) and `fusion_config.json`.

Keys are `<module path>.<tensor>` (e.g. `model.layers.0.self_attn.q_proj.query_weight`); the config holds
the fused adapters' names, the temperature and the exact module paths. The adapters themselves are saved
apart, with `save_adapter`; loading a fusion needs a model that already has them. Files are written
atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.core.files import atomic_write

from .compose import Fuse, active_composition, active_fusion, compose, fusions
from .inject import adapter_names, wrappers

FUSION_WEIGHTS = "fusion_model.safetensors"
FUSION_CONFIG = "fusion_config.json"
FORMAT = "peft-pipelines-fusion"


def _layers(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    return [
        (path, w.fusions[name])
        for path, w in wrappers(model)
        if "fusions" in w._modules and name in w.fusions
    ]


def _require_fusion(model: nn.Module, name: str) -> Fuse:
    if name not in fusions(model):
        raise ValueError(f"The model has no fusion named {name!r}; it has {list(fusions(model))}.")
    return fusions(model)[name]


def save_fusion(model: nn.Module, directory: str | Path, name: str = "fusion") -> Path:
    """Writes fusion `name` (its weights, not the fused adapters) into `directory`; returns it."""
    fuse = _require_fusion(model, name)
    layers = _layers(model, name)
    tensors = {
        f"{path}.{key}": value.detach().contiguous()
        for path, layer in layers
        for key, value in layer.state_dict().items()
    }
    config = {"format": FORMAT, "name": name, "adapters": list(fuse.adapters),
              "temperature": fuse.temperature, "modules": [path for path, _ in layers]}  # fmt: skip
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / FUSION_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / FUSION_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return directory


def _read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not directory.is_dir():
        raise FileNotFoundError(f"Fusion directory {directory} does not exist.")
    for file in (FUSION_CONFIG, FUSION_WEIGHTS):
        if not (directory / file).exists():
            raise FileNotFoundError(f"{directory} has no {file}; it is not a fusion directory (save_fusion).")
    try:
        config = json.loads((directory / FUSION_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{directory / FUSION_CONFIG} is not valid JSON ({error}); re-save the fusion."
        ) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{directory / FUSION_CONFIG} is not a fusion config (format {FORMAT!r}).")
    try:
        return config, load_file(str(directory / FUSION_WEIGHTS))
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise ValueError(
            f"{directory / FUSION_WEIGHTS} is damaged or not a safetensors file ({error}); re-save the "
            "fusion."
        ) from None


def load_fusion(model: nn.Module, directory: str | Path, name: str | None = None) -> str:
    """Builds the fusion saved in `directory` on the model (which has its adapters) and switches it on.

    Only the fusion's parameters are left trainable. Returns its name.
    """
    directory = Path(directory)
    config, tensors = _read(directory)
    name = name or config["name"]
    missing = [a for a in config["adapters"] if a not in adapter_names(model)]
    if missing:
        raise ValueError(
            f"{directory} fuses adapter {missing[0]!r}, which the model does not have (it has "
            f"{adapter_names(model)}); load_adapter the fused adapters first."
        )
    previous = active_fusion(model) or active_composition(model)
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    compose(model, Fuse(list(config["adapters"]), float(config["temperature"])), name=name)
    try:
        _check_tensors(model, name, config, tensors, directory)
    except ValueError:  # a refused file leaves the model as it was
        remove_fusion(model, name)
        compose(model, previous)
        for parameter in model.parameters():
            parameter.requires_grad_(requires_grad[id(parameter)])
        raise
    for path, layer in _layers(model, name):
        layer.load_state_dict({key: tensors[f"{path}.{key}"] for key in layer.state_dict()}, strict=True)
    return name


def _check_tensors(model, name: str, config: dict, tensors: dict, directory: Path) -> None:
    layers = _layers(model, name)
    paths = [path for path, _ in layers]
    if paths != list(config["modules"]):
        extra = sorted(set(paths) ^ set(config["modules"]))
        raise ValueError(
            f"{directory / FUSION_CONFIG} fuses at modules {config['modules'][:3]}..., this model at "
            f"{paths[:3]}... (first difference {extra[0] if extra else 'in order'!r}); was it saved from it?"
        )
    expected = {f"{path}.{key}" for path, layer in layers for key in layer.state_dict()}
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise ValueError(f"{directory / FUSION_WEIGHTS} has {unexpected[0]!r}, which the fusion does not.")
    for path, layer in layers:
        for key, value in layer.state_dict().items():
            saved = tensors.get(f"{path}.{key}")
            if saved is None:
                raise ValueError(f"{directory / FUSION_WEIGHTS} lacks {path}.{key!s}; re-save the fusion.")
            if saved.shape != value.shape:
                raise ValueError(
                    f"{directory / FUSION_WEIGHTS}: tensor '{path}.{key}' has shape {tuple(saved.shape)}, "
                    f"the model expects {tuple(value.shape)}."
                )


def remove_fusion(model: nn.Module, name: str) -> nn.Module:
    """Deletes fusion `name`; when it was switched on, the model returns to the default stack."""
    _require_fusion(model, name)
    if active_fusion(model) == name:
        compose(model, None)
    for _, wrapper in wrappers(model):
        if "fusions" in wrapper._modules and name in wrapper.fusions:
            del wrapper.fusions[name]
    del fusions(model)[name]
    return model
