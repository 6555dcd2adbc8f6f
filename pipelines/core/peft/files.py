"""Adapter files: safetensors tensors plus `adapter_config.json`, in our native layout or HF peft's.

Native: keys `<module path>.<adapter tensor>` (e.g. `model.layers.0.self_attn.q_proj.lora_A.weight`) and, for
`extra` head modules, their own state-dict keys; the config records the spec, the exact module paths and
the head modules, so loading needs no target matching; VeRA's shared projections are `vera_A`, `vera_B`.
HF peft (LoRA, LoHa, LoKr, VeRA): keys `base_model.model.<module path>.lora_A.weight` (`.hada_w1_a`, ...) and
that method's config JSON (see peft_format.py); P-tuning and prefix tuning: `prompt_embeddings`, the encoder's
output, which needs the model to write or read. SCT files record the chosen channels (`channel_index`, and
`selected` in the spec). Files are written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.core.files import atomic_write

from .inject import _select, adapter_names, adapter_specs, add_adapter, remove_adapter, wrappers
from .methods import PROMPT_METHODS, load_shared, shared_keys, shared_tensors
from .peft_format import (
    LAYER_TENSORS,
    PEFT_TYPES,
    PROMPT_TENSOR,
    PROMPT_TYPES,
    SHARED_KEYS,
    peft_blocker,
    peft_config,
    prompt_files,
    prompt_spec_from_peft,
    spec_from_peft,
)
from .specs import SCT, LoRA, spec_from_dict, spec_to_dict

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PICKLES = ("adapter_model.bin", "pytorch_model.bin", ".pt", ".pth", ".ckpt", ".pkl")
PEFT_PREFIX = "base_model.model."
LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".lora_embedding_A", ".lora_embedding_B")


def _layer_adapters(model: nn.Module, name: str) -> list[nn.Module]:
    return [wrapper.adapters[name] for _, wrapper in wrappers(model) if name in wrapper.adapters]


def _adapter_tensors(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    tensors, paths, spec = {}, [], adapter_specs(model)[name]
    for path, wrapper in wrappers(model):
        if name in wrapper.adapters:
            adapter = wrapper.adapters[name]
            if adapter.merged:
                raise ValueError(f"Adapter {name!r} is merged on {path!r}; unmerge(model) before saving it.")
            if isinstance(spec, SCT) and not adapter.calibrated:
                raise ValueError(
                    f"SCT adapter {name!r} on {path!r} has not chosen its channels yet; run "
                    f"{spec.calibration_batches} training batches or select_salient_channels first."
                )
            paths.append(path)
            for key, value in adapter.state_dict().items():
                tensors[f"{path}.{key}"] = value.detach().contiguous()
    return tensors, paths


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    name: str | None = None,
    format: str = "native",
    extra: list[str] | None = None,
) -> Path:
    """Writes adapter `name` (the only one if None) and the `extra` head modules into `directory`."""
    names = adapter_names(model)
    if name is None:
        if len(names) != 1:
            raise ValueError(f"The model has adapters {names}; name the one to save.")
        name = names[0]
    if name not in names:
        raise ValueError(f"The model has no adapter named {name!r}; it has {names}.")
    spec = adapter_specs(model)[name]
    tensors, paths = _adapter_tensors(model, name)
    tensors.update(shared_tensors(spec, _layer_adapters(model, name)))
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if format == "peft":
        if extra:
            raise ValueError("format='peft' saves adapter weights only; save heads in the native format.")
        blocker = _peft_blocker(model, spec, name, paths)
        if blocker:
            raise ValueError(blocker)
        if spec.method in PROMPT_METHODS:
            tensors, config = prompt_files(spec, _layer_adapters(model, name)[0], base_name)
        else:
            tensors, config = _peft_files(spec, tensors, paths, base_name)
    elif format == "native":
        heads = []
        for item in _select(model, list(extra), "save_adapter extra") if extra else []:
            heads.append(item.name)
            for key, value in item.module.state_dict().items():
                tensors[f"{item.name}.{key}"] = value.detach().contiguous()
        if isinstance(spec, SCT):  # the config states the chosen channels
            chosen = [a.channel_index.tolist() for a in _layer_adapters(model, name)]
            spec = dataclasses.replace(spec, selected=dict(zip(paths, chosen, strict=True)))
        config = {"format": "peft-pipelines", "name": name, "spec": spec_to_dict(spec), "modules": paths,
                  "extra_modules": heads, "peft_blocker": _peft_blocker(model, spec, name, paths),
                  "base_model_name_or_path": base_name}  # fmt: skip
    else:
        raise ValueError(f"Unknown adapter format {format!r}; use 'native' or 'peft'.")
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return directory


def _peft_blocker(model: nn.Module, spec, name: str, paths: list[str]) -> str | None:
    """Why adapter `name` cannot be written in HF peft's format, or None when it can."""
    if spec.method in PROMPT_METHODS:
        if len(paths) != 1:
            return f"HF peft holds one prompt per model; adapter {name!r} has {len(paths)}."
        return None
    if spec.method in PEFT_TYPES:
        layers = [(path, w.base_layer) for path, w in wrappers(model) if path in paths]
        return next((r for r in (peft_blocker(spec, path, base) for path, base in layers) if r), None)
    if not isinstance(spec, LoRA):
        return (
            f"Adapter {name!r} is {spec.method}; the HF peft format is written for LoRA, LoHa, LoKr, VeRA, "
            "P-tuning and prefix tuning only."
        )
    for path, wrapper in wrappers(model):
        if path in paths:
            base = wrapper.base_layer
            if not isinstance(base, nn.Linear | nn.Embedding | nn.Conv1d | nn.Conv2d | nn.Conv3d) or (
                getattr(base, "groups", 1) != 1 or any(d != 1 for d in getattr(base, "dilation", (1,)))
            ):
                return (
                    f"HF peft computes LoRA on {path!r} ({type(base).__name__}) differently; "
                    "export it in the native format."
                )
    return None


def _peft_files(spec, tensors, paths, base_name) -> tuple[dict[str, torch.Tensor], dict]:
    if spec.method in PEFT_TYPES:
        renamed = {SHARED_KEYS.get(key, PEFT_PREFIX + key): value for key, value in tensors.items()}
        return renamed, peft_config(spec, paths, base_name)
    renamed = {}
    for key, value in tensors.items():
        key = key.replace(".lora_magnitude_vector", ".lora_magnitude_vector.weight")
        renamed[PEFT_PREFIX + key] = value
    config = {
        "peft_type": "LORA", "task_type": None, "r": spec.r, "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout, "target_modules": paths, "use_dora": spec.use_dora,
        "use_rslora": spec.use_rslora, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True if spec.init == "default" else spec.init, "modules_to_save": None,
        "inference_mode": True, "base_model_name_or_path": base_name,
    }  # fmt: skip
    return renamed, config


_NEEDS_MODEL = (
    "a P-tuning or prefix adapter's HF peft file is its encoder's output, computed in its model; "
    "load_adapter(model, ...) and save_adapter(model, ..., format=...) instead."
)


def convert_adapter(source: str | Path, target: str | Path, format: str) -> Path:
    """Rewrites a saved adapter in the other format ("native" <-> "peft") without needing its model."""
    source, target = Path(source), Path(target)
    config, tensors = _read(source)
    native = config.get("format") == "peft-pipelines"
    if format == "peft" and native:
        if config.get("peft_blocker") or config.get("extra_modules"):
            reason = config.get("peft_blocker") or "it holds head modules, which HF peft files do not carry."
            raise ValueError(f"{source} cannot be converted to the HF peft format: {reason}")
        spec = spec_from_dict(config["spec"])
        if spec.method in PROMPT_METHODS:
            raise ValueError(f"{source}: {_NEEDS_MODEL}")
        tensors, config = _peft_files(spec, tensors, config["modules"], config.get("base_model_name_or_path"))
    elif format == "native" and not native:
        spec, paths, tensors = _from_peft(config, tensors, source)
        config = {"format": "peft-pipelines", "name": "default", "spec": spec_to_dict(spec), "modules": paths,
                  "extra_modules": [], "peft_blocker": None,
                  "base_model_name_or_path": config.get("base_model_name_or_path")}  # fmt: skip
    elif format not in ("native", "peft"):
        raise ValueError(f"Unknown adapter format {format!r}; use 'native' or 'peft'.")
    target.mkdir(parents=True, exist_ok=True)
    atomic_write(target / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(target / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return target


def _read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if directory.is_file() and directory.name.endswith(PICKLES):
        raise ValueError(
            f"{directory} is a pickle file, which is never loaded; re-save the adapter as safetensors "
            "(HF peft: save_pretrained(..., safe_serialization=True))."
        )
    if directory.is_file():
        raise ValueError(
            f"{directory} is a file; pass the adapter directory that holds {WEIGHTS} and {CONFIG}."
        )
    if not directory.is_dir():
        raise FileNotFoundError(f"Adapter directory {directory} does not exist.")
    pickles = [p.name for p in directory.iterdir() if p.name.endswith(PICKLES)]
    if not (directory / WEIGHTS).exists():
        if pickles:
            raise ValueError(
                f"{directory / pickles[0]} is a pickle file, which is never loaded; re-save the adapter "
                "as safetensors (HF peft: save_pretrained(..., safe_serialization=True))."
            )
        raise FileNotFoundError(f"{directory} has no {WEIGHTS}; it is not an adapter directory.")
    if not (directory / CONFIG).exists():
        raise FileNotFoundError(f"{directory} has {WEIGHTS} but no {CONFIG}.")
    try:
        config = json.loads((directory / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{directory / CONFIG} is not valid JSON ({error}); re-save the adapter.") from None
    try:
        return config, load_file(str(directory / WEIGHTS))
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise ValueError(
            f"{directory / WEIGHTS} is damaged or not a safetensors file ({error}); re-save the adapter."
        ) from None


def _from_peft(
    config: dict, tensors: dict[str, torch.Tensor], directory: Path, model: nn.Module | None = None
):
    if config.get("peft_type") in PROMPT_TYPES.values():
        if model is None:
            raise ValueError(f"{directory}: {_NEEDS_MODEL}")
        return _from_peft_prompt(config, tensors, directory, model)
    if config.get("peft_type") in PEFT_TYPES.values():
        return _from_peft_loha_lokr_vera(config, tensors, directory)
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{directory / CONFIG}: peft_type {config.get('peft_type')!r} is not supported; only LORA, LOHA, "
            "LOKR, VERA, P_TUNING and PREFIX_TUNING."
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{directory / CONFIG}: per-module {key} is not supported.")
    init = config.get("init_lora_weights", True)
    spec = LoRA(
        r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
        use_dora=bool(config.get("use_dora")), use_rslora=bool(config.get("use_rslora")),
        init="gaussian" if init == "gaussian" else "default",
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


def _check_tensors(
    model: nn.Module, name: str, tensors: dict[str, torch.Tensor], heads: list[str], directory: Path
) -> tuple[dict, dict]:
    expected = _adapter_tensors(model, name)[0]
    head_state = {}
    for item in _select(model, [f"re:{re.escape(h)}" for h in heads], "heads") if heads else []:
        head_state.update({f"{item.name}.{k}": (item.module, k) for k in item.module.state_dict()})
    missing = sorted((set(expected) | set(head_state)) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - set(head_state))
    if missing or unexpected:
        what = f"lacks {missing[0]!r}" if missing else f"has {unexpected[0]!r}, which the model does not"
        raise ValueError(f"{directory / WEIGHTS} {what}; was it saved from this model?")
    for key, value in tensors.items():
        target = expected.get(key)
        if target is None:
            module, sub = head_state[key]
            target = module.state_dict()[sub]
        if target.shape != value.shape:
            raise ValueError(
                f"{directory / WEIGHTS}: tensor {key!r} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(target.shape)}."
            )
    return expected, head_state


def load_adapter(model: nn.Module, directory: str | Path, name: str | None = None) -> str:
    """Adds the adapter saved in `directory` (native or HF peft format) to the model; returns its name."""
    directory = Path(directory)
    config, tensors = _read(directory)
    if config.get("format") == "peft-pipelines":
        spec, paths, heads = (
            spec_from_dict(config["spec"]),
            config["modules"],
            config.get("extra_modules", []),
        )
        name = name or config["name"]
    else:
        spec, paths, tensors = _from_peft(config, tensors, directory, model)
        heads, name = [], name or "default"
    shared = {key: tensors.pop(key) for key in shared_keys(spec) if key in tensors}
    exact = [f"re:{re.escape(p)}" for p in paths]
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    add_adapter(model, type(spec)(**{**spec_to_dict(spec), "targets": exact}), name=name)
    try:
        expected, head_state = _check_tensors(model, name, tensors, heads, directory)
        load_shared(spec, _layer_adapters(model, name), shared, str(directory / WEIGHTS))
    except ValueError:  # a refused file leaves the model as it was
        remove_adapter(model, name)
        for parameter in model.parameters():
            parameter.requires_grad_(requires_grad[id(parameter)])
        raise
    for path, wrapper in wrappers(model):
        if name in wrapper.adapters:
            adapter = wrapper.adapters[name]
            adapter.load_state_dict(
                {key: tensors[f"{path}.{key}"] for key in adapter.state_dict()}, strict=True
            )
    for key, (module, sub) in head_state.items():
        with torch.no_grad():
            module.state_dict()[sub].copy_(tensors[key])
    return name
