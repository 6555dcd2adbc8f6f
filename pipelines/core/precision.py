"""The precision policy of training: which parameters live in which dtype, and what the compute runs in.

With bf16 compute (`precision: auto` on CUDA, or `precision: bf16` anywhere) the frozen weights of the
layers that autocast computes in bf16 anyway (Linear, convolutions, nn.MultiheadAttention) and the
embedding tables are cast to bf16 once, in place, so a frozen backbone costs half the memory and no
per-forward casts; trainable parameters (adapters, heads) stay float32 masters, and so does everything
autocast keeps in float32: norms (LayerNorm, RMSNorm, BatchNorm, GroupNorm), and the loose parameters
(position embeddings, class tokens, layer scales). Adapter parameters are never cast, frozen or not (a
frozen domain adapter under a task adapter is still saved in float32), nor is any parameter that was
trainable in an earlier `train` call (a head trained in stage 1 and frozen in stage 2). A parameter that
was cast while frozen and is trainable now goes back to float32 (its values keep their bf16 rounding).
In float32 compute nothing is cast, and parameters cast earlier go back to float32.

A model whose weights are bf16 cannot take float32 activations outside autocast, so the policy also
hooks the modules that hold cast weights: their outermost call (predictions after training, a reload
check, lab code) enters the same bf16 autocast; inside `train`, which enters it itself, the hooks do
nothing (a Ctrl-C inside such a call leaves autocast on until that module is called again). Parameters
are cast through `param.data`, so tied and shared parameters (a backbone shared by several candidate
models) stay one tensor, in one dtype.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["PrecisionPolicy", "resolve_policy", "apply_precision_policy", "policy_notes", "CAST_TYPES"]

CAST_TYPES = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.MultiheadAttention)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_CAST_FROM = "_precision_cast_from"  # attribute of a parameter this module cast: its original dtype
_TRAINED = "_precision_trained"  # attribute of a parameter that was trainable when a policy was applied
_AUTOCAST = "_precision_autocast"  # attribute of a hooked module: (device type, dtype) or None


@dataclass(frozen=True)
class PrecisionPolicy:
    """Where compute runs (None: float32, no autocast) and which dtype frozen weights are held in."""

    device_type: str
    compute_dtype: torch.dtype | None
    frozen_dtype: torch.dtype


def _name(dtype: torch.dtype | None) -> str:
    return str(dtype or torch.float32).removeprefix("torch.")


def resolve_policy(device_type: str, precision: str = "auto", frozen_dtype: str = "auto") -> PrecisionPolicy:
    """The policy of a `train` run's precision settings on a device type; raises when they conflict.

    Args:
        device_type: "cuda", "cpu", ... (the training device's type).
        precision: "auto" (bf16 on CUDA, float32 elsewhere), "bf16" or "fp32".
        frozen_dtype: "auto" (bfloat16 when the compute is bf16, else float32), "float32" or "bfloat16".
    """
    bf16 = precision == "bf16" or (precision == "auto" and device_type == "cuda")
    if bf16 and device_type == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision {precision} needs bf16, which this GPU lacks; set precision: fp32.")
    if frozen_dtype == "bfloat16" and not bf16:
        raise ValueError(
            f"frozen_dtype bfloat16 needs bf16 compute, but precision {precision} computes in float32 on "
            f"{device_type}; set precision: bf16, or frozen_dtype: auto."
        )
    if frozen_dtype not in ("auto", *DTYPES):
        raise ValueError(f"frozen_dtype {frozen_dtype!r} is not one of auto, float32, bfloat16.")
    frozen = torch.bfloat16 if frozen_dtype == "auto" and bf16 else DTYPES.get(frozen_dtype, torch.float32)
    return PrecisionPolicy(device_type, torch.bfloat16 if bf16 else None, frozen)


def _adapter_parameters(model: nn.Module) -> set[int]:
    from pipelines.core.peft.layers import AdaptedLayer  # core.peft imports nothing of this module

    return {
        id(p) for module in model.modules() if isinstance(module, AdaptedLayer)
        for p in module.adapters.parameters()
    }  # fmt: skip


def _castable(model: nn.Module) -> dict[int, nn.Parameter]:
    """The float32 (or earlier cast) parameters the policy decides about: weights of CAST_TYPES layers."""
    adapters = _adapter_parameters(model)
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if not isinstance(module, CAST_TYPES):
            continue
        for parameter in module.parameters(recurse=False):
            if id(parameter) in adapters:
                continue
            if parameter.dtype == torch.float32 or hasattr(parameter, _CAST_FROM):
                found[id(parameter)] = parameter
    return found


def apply_precision_policy(
    model: nn.Module, device_type: str = "cpu", precision: str = "auto", frozen_dtype: str = "auto"
) -> dict[str, Any]:
    """Casts the model's parameters in place as the policy says (see the module docstring); idempotent.

    The device type is an argument, not read from the tensors, so the CUDA policy can be checked on CPU
    tensors.

    Returns:
        The policy as the run report states it: compute_dtype, frozen_dtype, trainable_dtype (the dtypes
        of the trainable parameters), cast_parameters (frozen layer weight tensors held in bf16, tied ones
        once; those this call cast and those already bf16), cast_elements, and restored_parameters (cast
        earlier, float32 again now).
    """
    policy = resolve_policy(device_type, precision, frozen_dtype)
    restored = 0
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                setattr(parameter, _TRAINED, True)
        for parameter in _castable(model).values():
            frozen = not parameter.requires_grad and not hasattr(parameter, _TRAINED)
            target = policy.frozen_dtype if frozen else torch.float32
            original = getattr(parameter, _CAST_FROM, None)
            if target != torch.float32:
                if original is None:
                    setattr(parameter, _CAST_FROM, parameter.dtype)
                if parameter.dtype != target:  # also after a model.float() that undid an earlier cast
                    parameter.data = parameter.data.to(target)
            elif original is not None:
                restored += parameter.dtype != original
                parameter.data = parameter.data.to(original)
                delattr(parameter, _CAST_FROM)
    # Whoever made them bf16 (this policy, the loader, a deep copy, which drops the markers), bf16
    # layer weights need the autocast hooks.
    low = {
        id(p): p for module in model.modules() if isinstance(module, CAST_TYPES)
        for p in module.parameters(recurse=False) if p.dtype == policy.compute_dtype
    }  # fmt: skip
    _hook_modules(model, policy, set(low))
    cast = [p for p in low.values() if not p.requires_grad]
    trainable = sorted({_name(p.dtype) for p in model.parameters() if p.requires_grad})
    return {
        "compute_dtype": _name(policy.compute_dtype),
        "frozen_dtype": _name(policy.frozen_dtype),
        "trainable_dtype": "+".join(trainable) or "none",
        "cast_parameters": len(cast),
        "cast_elements": sum(p.numel() for p in cast),
        "restored_parameters": restored,
    }


def policy_notes(report: dict[str, Any]) -> list[str]:
    """The run-report note of a policy that cast or restored parameters (none when nothing changed)."""
    if not (report.get("cast_parameters") or report.get("restored_parameters")):
        return []
    note = (
        f"precision: compute in {report['compute_dtype']}, {report['cast_parameters']} frozen weight "
        f"tensors held in {report['frozen_dtype']}, trainable parameters in {report['trainable_dtype']}"
    )
    if report["restored_parameters"]:
        note += f"; {report['restored_parameters']} tensors cast earlier are float32 again (bf16-rounded)"
    return [note]


# -- autocast outside train --------------------------------------------------------------------------
_CALLS = threading.local()  # per thread: a stack of (module, the autocast context it entered, or None)


def _calls() -> list:
    stack = getattr(_CALLS, "stack", None)
    if stack is None:
        stack = _CALLS.stack = []
    return stack


def _enter(module: nn.Module, args: Any) -> None:
    setting = module.__dict__.get(_AUTOCAST)
    if setting is None:  # the module holds no cast weight (any more)
        return
    stack = _calls()
    if stack and stack[0][0] is module:  # a module is never inside itself: a Ctrl-C left this behind
        while stack:
            context = stack.pop()[1]
            if context is not None:
                context.__exit__(None, None, None)
    context = None
    # Only the outermost hooked call enters: inside one, autocast off means the code turned it off.
    if not stack and not torch.is_autocast_enabled(setting[0]):
        context = torch.autocast(setting[0], dtype=setting[1])
        context.__enter__()
    stack.append((module, context))


def _exit(module: nn.Module, args: Any, output: Any) -> None:
    stack = _calls()
    if stack and stack[-1][0] is module:
        context = stack.pop()[1]
        if context is not None:
            context.__exit__(None, None, None)


def _hook_modules(model: nn.Module, policy: PrecisionPolicy, cast: set[int]) -> None:
    """Turns the autocast hooks on for every module holding one of the `cast` parameters (itself or below),
    off for the others. Hooks stay registered (a deep copy keeps them, with the setting they read)."""
    setting = (policy.device_type, policy.compute_dtype or torch.bfloat16)
    for module in model.modules():
        if cast and any(id(p) in cast for p in module.parameters()):
            if not any(hook is _enter for hook in module._forward_pre_hooks.values()):
                module.register_forward_pre_hook(_enter)
                module.register_forward_hook(_exit, always_call=True)
            module.__dict__[_AUTOCAST] = setting
        elif module.__dict__.get(_AUTOCAST) is not None:
            module.__dict__[_AUTOCAST] = None
