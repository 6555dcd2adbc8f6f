"""Adapter files: safetensors tensors plus `adapter_config.json`, in our native layout or HF peft's.

Native: keys `<module path>.<adapter tensor>` (e.g. `model.layers.0.self_attn.q_proj.lora_A.weight`) and, for
`extra` head modules, their own state-dict keys; the config records the spec, the exact module paths and
the head modules, so loading needs no target matching; VeRA's shared projections are `vera_A`, `vera_B`.
HF peft (LoRA, LoHa, LoKr, VeRA): keys `base_model.model.<module path>.lora_A.weight` (`.hada_w1_a`, ...) and
that method's config JSON (see peft_format.py); P-tuning and prefix tuning: `prompt_embeddings`, the encoder's
output, which needs the model to write or read. SCT files record the chosen channels (`channel_index`, and
`selected` in the spec). A PiSSA or OLoRA LoRA's native file holds its initial factors too, its HF peft file
the equivalent rank-2r plain LoRA (lora_init.py); AdaLoRA's native file holds every rank and `rank_mask`, its
HF peft file the kept ranks and `rank_pattern` (peft_format.py); peft_read.py reads HF peft files. Files are
written atomically.
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
from .lora_init import INITIAL, as_plain_lora, given_factors, is_residual_init, plain_lora_config
from .methods import PROMPT_METHODS, load_shared, shared_keys, shared_tensors
from .peft_format import (
    CONFIG,
    PEFT_PREFIX,
    PEFT_TYPES,
    SHARED_KEYS,
    WEIGHTS,
    adalora_files,
    peft_blocker,
    peft_config,
    prompt_files,
)
from .peft_read import NEEDS_MODEL, from_peft
from .specs import SCT, AdaLoRA, LoRA, spec_from_dict, spec_to_dict

PICKLES = ("adapter_model.bin", "pytorch_model.bin", ".pt", ".pth", ".ckpt", ".pkl")


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
            training_only = getattr(adapter, "training_state", ())  # AdaLoRA's importance statistics
            for key, value in adapter.state_dict().items():
                if key not in training_only:
                    tensors[f"{path}.{key}"] = value.detach().contiguous()
    return tensors, paths


def _total_step(model: nn.Module, name: str) -> int | None:
    """The schedule length an AdaLoRA adapter last trained with (HF peft's config records it)."""
    return next((getattr(a, "total_step", None) for a in _layer_adapters(model, name)), None)


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
            where = f"AdaLoRA adapter {name!r}"
            tensors, config = _peft_files(spec, tensors, paths, base_name, _total_step(model, name), where)
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
        if isinstance(spec, AdaLoRA):
            config["total_step"] = _total_step(model, name)
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
    if spec.method in PEFT_TYPES or isinstance(spec, AdaLoRA):
        layers = [(path, w.base_layer) for path, w in wrappers(model) if path in paths]
        return next((r for r in (peft_blocker(spec, path, base) for path, base in layers) if r), None)
    if not isinstance(spec, LoRA):
        return (
            f"Adapter {name!r} is {spec.method}; the HF peft format is written for LoRA, LoHa, LoKr, VeRA, "
            "AdaLoRA, P-tuning and prefix tuning only."
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


def _peft_files(spec, tensors, paths, base_name, total_step, where) -> tuple[dict[str, torch.Tensor], dict]:
    if spec.method in PEFT_TYPES:
        renamed = {SHARED_KEYS.get(key, PEFT_PREFIX + key): value for key, value in tensors.items()}
        return renamed, peft_config(spec, paths, base_name)
    if isinstance(spec, AdaLoRA):
        return adalora_files(spec, tensors, paths, total_step, base_name, where)
    if is_residual_init(spec.init):  # the trained change as a plain LoRA of the original base
        tensors = as_plain_lora(tensors, paths)
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
    if is_residual_init(spec.init):
        config.update(plain_lora_config(spec))
    return renamed, config


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
            raise ValueError(f"{source}: {NEEDS_MODEL}")
        tensors, config = _peft_files(spec, tensors, config["modules"], config.get("base_model_name_or_path"),
                                      config.get("total_step"), str(source))  # fmt: skip
    elif format == "native" and not native:
        total_step = config.get("total_step")
        spec, paths, tensors = from_peft(config, tensors, source)
        if isinstance(spec, LoRA) and is_residual_init(spec.init):
            raise ValueError(
                f"{source} is an HF peft {spec.init} adapter of a decomposed base, which only its base model "
                "can rebuild; load_adapter(model, ...) and save_adapter(model, ...) instead."
            )
        if isinstance(spec, AdaLoRA):  # every rank in the file is kept
            tensors.update({f"{p}.rank_mask": torch.ones(len(tensors[f"{p}.lora_E"]), dtype=torch.bool)
                            for p in paths})  # fmt: skip
        config = {"format": "peft-pipelines", "name": "default", "spec": spec_to_dict(spec), "modules": paths,
                  "extra_modules": [], "peft_blocker": None,
                  "base_model_name_or_path": config.get("base_model_name_or_path")}  # fmt: skip
        if isinstance(spec, AdaLoRA):
            config["total_step"] = total_step
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
    native = config.get("format") == "peft-pipelines"
    if native:
        spec, paths, heads = (
            spec_from_dict(config["spec"]),
            config["modules"],
            config.get("extra_modules", []),
        )
        name = name or config["name"]
    else:
        spec, paths, tensors = from_peft(config, tensors, directory, model)
        heads, name = [], name or "default"
    shared = {key: tensors.pop(key) for key in shared_keys(spec) if key in tensors}
    exact = [f"re:{re.escape(p)}" for p in paths]
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    residual = isinstance(spec, LoRA) and is_residual_init(spec.init)
    # PiSSA and OLoRA change the base weights as they are added; a refused file puts them back.
    originals = (
        {p: p.detach().to("cpu", copy=True) for p in _target_weights(model, exact)} if residual else {}
    )
    factors = {path: tuple(tensors[f"{path}.{key}"] for key in INITIAL) for path in paths
               if all(f"{path}.{key}" in tensors for key in INITIAL)}  # fmt: skip
    with given_factors(factors if native else {}):
        add_adapter(model, type(spec)(**{**spec_to_dict(spec), "targets": exact}), name=name)
    if not native:  # what HF peft files do not carry: rank masks (all kept) and the factors just computed
        built = _adapter_tensors(model, name)[0]
        tensors.update({k: v for k, v in built.items() if k.endswith(_DERIVED) and k not in tensors})
    try:
        expected, head_state = _check_tensors(model, name, tensors, heads, directory)
        load_shared(spec, _layer_adapters(model, name), shared, str(directory / WEIGHTS))
    except ValueError:  # a refused file leaves the model as it was
        remove_adapter(model, name)
        for parameter in model.parameters():
            parameter.requires_grad_(requires_grad[id(parameter)])
        with torch.no_grad():
            for parameter, original in originals.items():
                parameter.copy_(original)
        raise
    for path, wrapper in wrappers(model):
        if name in wrapper.adapters:
            adapter = wrapper.adapters[name]
            training_only = getattr(adapter, "training_state", ())
            adapter.load_state_dict(
                {key: tensors[f"{path}.{key}"] for key in adapter.state_dict() if key not in training_only},
                strict=not training_only,
            )
    for key, (module, sub) in head_state.items():
        with torch.no_grad():
            module.state_dict()[sub].copy_(tensors[key])
    return name


_DERIVED = (".rank_mask", *(f".{key}" for key in INITIAL))


def _target_weights(model: nn.Module, exact: list[str]) -> list[torch.Tensor]:
    return [
        item.module.weight for item in _select(model, exact, "load_adapter") if hasattr(item.module, "weight")
    ]
