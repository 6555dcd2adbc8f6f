"""HF peft's adapter_config.json and tensor keys for LoHa, LoKr, VeRA, AdaLoRA, P-tuning, prefix (files.py).

Per-layer tensors keep their names under `base_model.model.<module path>.`; VeRA's shared projections
are `base_model.vera_A` and `base_model.vera_B` (written when `save_projection` is set). A P-tuning or prefix
file holds one tensor, `prompt_embeddings`: the encoder's output (what HF peft's get_peft_model_state_dict
writes and, in inference mode, uses as the prompt), so it loads here as PTuning(encoder="none") or
PrefixTuning(prefix_projection=False), which compute the same. AdaLoRA files keep `lora_A`, `lora_E`, `lora_B`
of the kept ranks only, and `rank_pattern` (`<path>.lora_E` -> kept of init_r) in the config, as peft does.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .adalora import kept_of_init
from .loha import PARAMETERS as LOHA_PARAMETERS
from .lokr import PARAMETERS as LOKR_PARAMETERS
from .prefix import key_value_shape
from .specs import AdaLoRA, AdapterSpec, LoHa, LoKr, PrefixTuning, PTuning, VeRA
from .vera import PARAMETERS as VERA_PARAMETERS
from .vera import PROJECTIONS

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
PEFT_TYPES = {"loha": "LOHA", "lokr": "LOKR", "vera": "VERA"}
LAYER_TENSORS = {"loha": LOHA_PARAMETERS, "lokr": LOKR_PARAMETERS, "vera": VERA_PARAMETERS}
SHARED_KEYS = {key: f"base_model.{key}" for key in PROJECTIONS}  # native key -> peft key
PROMPT_TYPES = {"ptuning": "P_TUNING", "prefix": "PREFIX_TUNING"}
PROMPT_TENSOR = "prompt_embeddings"
_COMMON = {"task_type": None, "modules_to_save": None, "init_weights": True, "layers_to_transform": None,
           "layers_pattern": None, "inference_mode": True}  # fmt: skip


def peft_config(spec: AdapterSpec, paths: list[str], base_name: str | None) -> dict[str, Any]:
    """The adapter_config.json HF peft reads for this spec, targeting exactly `paths`."""
    config = {"peft_type": PEFT_TYPES[spec.method], **_COMMON, "target_modules": paths,
              "base_model_name_or_path": base_name}  # fmt: skip
    if isinstance(spec, VeRA):
        config.update(r=spec.r, projection_prng_key=spec.projection_prng_key, vera_dropout=spec.dropout,
                      save_projection=spec.save_projection, d_initial=spec.d_initial, fan_in_fan_out=False,
                      bias="none")  # fmt: skip
        return config
    config.update(r=spec.r, alpha=spec.alpha, rank_dropout=0.0, module_dropout=0.0, rank_pattern={},
                  alpha_pattern={}, exclude_modules=None,
                  use_effective_conv2d=spec.use_effective_conv2d)  # fmt: skip
    if isinstance(spec, LoKr):
        config.update(decompose_both=spec.decompose_both, decompose_factor=spec.decompose_factor,
                      rank_dropout_scale=False)  # fmt: skip
    return config


def spec_from_peft(config: dict[str, Any], where: str) -> AdapterSpec:
    """The spec of a LOHA, LOKR or VERA adapter_config.json (defaults as HF peft's); `where` is the file."""
    kind = config["peft_type"]
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{where}: per-module {key} is not supported.")
    if kind == "VERA":
        if config.get("fan_in_fan_out") or config.get("bias", "none") != "none":
            raise ValueError(f"{where}: VeRA with fan_in_fan_out or a trained bias is not supported.")
        return VeRA(
            r=config.get("r", 256), projection_prng_key=config.get("projection_prng_key", 0),
            d_initial=config.get("d_initial", 0.1), save_projection=config.get("save_projection", True),
            dropout=config.get("vera_dropout", 0.0),
        )  # fmt: skip
    dropped = [k for k in ("rank_dropout", "module_dropout") if config.get(k)]
    if dropped:
        warnings.warn(f"{where}: {dropped[0]} is not implemented here; the adapter computes the same, but "
                      "further training runs without it.", stacklevel=3)  # fmt: skip
    common = {"r": config.get("r", 8), "alpha": config.get("alpha", 8),
              "use_effective_conv2d": bool(config.get("use_effective_conv2d"))}  # fmt: skip
    if kind == "LOHA":
        return LoHa(**common)
    return LoKr(**common, decompose_both=bool(config.get("decompose_both")),
                decompose_factor=config.get("decompose_factor", -1))  # fmt: skip


def peft_blocker(spec: AdapterSpec, path: str, base: nn.Module) -> str | None:
    """Why HF peft would compute this method on this layer differently, or None."""
    if getattr(base, "padding_mode", "zeros") != "zeros":
        return (
            f"HF peft computes {type(spec).__name__} on {path!r} without its padding_mode "
            f"{base.padding_mode!r}; export it in the native format."
        )
    return None


def prompt_files(spec: AdapterSpec, adapter: nn.Module, base_name: str | None) -> tuple[dict, dict[str, Any]]:
    """HF peft's tensors and config of an attached P-tuning or prefix adapter (its encoder's output)."""
    owner = adapter.__dict__["owner"][0]
    config = owner.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    task = "CAUSAL_LM" if type(owner).__name__.endswith("ForCausalLM") else "FEATURE_EXTRACTION"
    common = {"peft_type": PROMPT_TYPES[spec.method], "task_type": task, "inference_mode": True,
              "num_virtual_tokens": spec.num_tokens, "num_transformer_submodules": 1, "num_layers": layers,
              "modules_to_save": None, "base_model_name_or_path": base_name, "revision": None}  # fmt: skip
    if isinstance(spec, PTuning):
        common.update(token_dim=adapter.embedding.embedding_dim, num_attention_heads=heads,
                      encoder_reparameterization_type="LSTM" if spec.encoder == "lstm" else "MLP",
                      encoder_hidden_size=adapter.hidden_size, encoder_num_layers=spec.encoder_num_layers,
                      encoder_dropout=spec.encoder_dropout)  # fmt: skip
    else:
        _, kv_heads, head_width = key_value_shape(config)
        common.update(token_dim=kv_heads * head_width, num_attention_heads=kv_heads, init_weights=None,
                      encoder_hidden_size=adapter.encoder_hidden_size, prefix_projection=False)  # fmt: skip
    return {PROMPT_TENSOR: adapter.exported()}, common


def prompt_spec_from_peft(config: dict[str, Any], where: str) -> AdapterSpec:
    """The spec of a P_TUNING or PREFIX_TUNING adapter_config.json, computing what its file holds."""
    if config.get("num_transformer_submodules") not in (None, 1):
        raise ValueError(
            f"{where}: prompts for encoder-decoder models (num_transformer_submodules 2) are not supported."
        )
    tokens = config.get("num_virtual_tokens")
    if not isinstance(tokens, int):
        raise ValueError(f"{where} has no integer num_virtual_tokens; it is not a complete HF peft config.")
    if config["peft_type"] == "P_TUNING":
        return PTuning(num_tokens=tokens, encoder="none")
    return PrefixTuning(num_tokens=tokens, prefix_projection=False)


def adalora_files(
    spec: AdaLoRA,
    tensors: dict[str, torch.Tensor],
    paths: list[str],
    total_step: int | None,
    base_name: str | None,
    where: str,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """HF peft's ADALORA tensors (the kept ranks only) and config from native tensors (rank_mask included)."""
    total_step = spec.total_step or total_step
    if total_step is None:
        raise ValueError(
            f"{where} has no total_step for HF peft's AdaLoRA config, which needs one; set total_step in the "
            "adapter spec or train the adapter first."
        )
    renamed, pattern = {}, {}
    for path in paths:
        keep = tensors[f"{path}.rank_mask"]
        pattern[f"{path}.lora_E"] = kept_of_init(spec.rank_pattern.get(path, [True] * spec.init_r), keep)
        for key in ("lora_A", "lora_E", "lora_B"):
            tensor = tensors[f"{path}.{key}"]
            renamed[f"{PEFT_PREFIX}{path}.{key}"] = (
                tensor[:, keep] if key == "lora_B" else tensor[keep]
            ).contiguous()
    pruned = any(not all(kept) for kept in pattern.values())
    config = {"peft_type": "ADALORA", **_COMMON, "target_modules": paths,
              "base_model_name_or_path": base_name, "init_lora_weights": True, "r": 8,
              "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "fan_in_fan_out": False,
              "bias": "none", "use_rslora": False, "use_dora": False,
              "init_r": spec.init_r, "target_r": spec.target_r, "tinit": spec.tinit, "tfinal": spec.tfinal,
              "deltaT": spec.delta_t, "beta1": spec.beta1, "beta2": spec.beta2,
              "orth_reg_weight": spec.orth_reg_weight, "total_step": total_step,
              "rank_pattern": pattern if pruned or spec.rank_pattern else None}  # fmt: skip
    del config["init_weights"]
    return renamed, config


def adalora_spec_from_peft(config: dict[str, Any], where: str) -> AdaLoRA:
    """The spec of an ADALORA adapter_config.json; its rank_pattern keys become layer paths."""
    if config.get("fan_in_fan_out") or config.get("bias", "none") != "none" or config.get("use_rslora"):
        raise ValueError(
            f"{where}: AdaLoRA with fan_in_fan_out, a trained bias or use_rslora is not supported."
        )
    if config.get("alpha_pattern"):
        raise ValueError(f"{where}: per-module alpha_pattern is not supported.")
    pattern = {
        key.split(".lora_E")[0]: list(kept) for key, kept in (config.get("rank_pattern") or {}).items()
    }
    return AdaLoRA(
        init_r=config.get("init_r", 12), target_r=config.get("target_r", 8),
        alpha=config.get("lora_alpha", 8), dropout=config.get("lora_dropout", 0.0),
        tinit=config.get("tinit", 0), tfinal=config.get("tfinal", 0), delta_t=config.get("deltaT", 1),
        beta1=config.get("beta1", 0.85), beta2=config.get("beta2", 0.85),
        orth_reg_weight=config.get("orth_reg_weight", 0.5), total_step=config.get("total_step"),
        rank_pattern=pattern,
    )  # fmt: skip
