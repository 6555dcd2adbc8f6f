"""What P-tuning and prefix tuning share: they change the call of the transformers model owning an embedding.

Their adapter sits, as every adapter does, in the wrapper of a layer (the model's token embedding), whose
output it leaves unchanged, so files, `set_trainable`, `disable_adapters` and `remove_adapter` treat it like
any other. A forward pre-hook on the owning model (the outermost supported transformers model above that
embedding) does the work while the adapter is attached and active: it rewrites the call's keyword arguments,
as HF peft's PeftModel does around the model, so callers pass the same inputs and mask as to the base model.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .layers import AdaptedLayer

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_REGISTRY = "_peft_model_call_adapters"  # the owner's prompt adapters, attached or not


def find_owner(model: nn.Module, host: str, what: str, supported: tuple[str, ...]) -> tuple[nn.Module, str]:
    """(the outermost module above `host` whose class is supported, host's path below it); else an error."""
    parts = host.split(".")
    chain = [(model, "")] + [(model.get_submodule(".".join(parts[:i])), ".".join(parts[:i]))
                             for i in range(1, len(parts))]  # fmt: skip
    for module, path in chain:
        module = module.base_layer if isinstance(module, AdaptedLayer) else module
        if type(module).__name__ in supported:
            return module, host[len(path) + 1 :] if path else host
    models = [type(m).__name__ for m, _ in chain if hasattr(m, "config")]
    owner = models[-1] if models else type(model).__name__
    raise ValueError(
        f"{what} cannot adapt {host!r}: it belongs to {owner}; it supports {', '.join(supported)} only."
    )


def attach(
    adapter: nn.Module, model: nn.Module, host: str, what: str, supported: tuple[str, ...]
) -> nn.Module:
    """Finds the owner of `host`, refuses a second prompt adapter there, registers `adapter.rewrite_call`."""
    owner, relative = find_owner(model, host, what, supported)
    embedding = owner.get_input_embeddings()
    embedding = embedding.base_layer if isinstance(embedding, AdaptedLayer) else embedding
    layer = owner.get_submodule(relative)
    layer = layer.base_layer if isinstance(layer, AdaptedLayer) else layer
    if layer is not embedding:
        raise ValueError(
            f"{what} targets the token embedding of {type(owner).__name__}; {host!r} is another layer."
        )
    for other in owner.__dict__.get(_REGISTRY, []):
        name = attached_name(other)
        if name is not None:
            raise ValueError(
                f"{type(owner).__name__} already has the prompt adapter {name!r} (P-tuning or prefix "
                "tuning); one at a time, as in HF peft: remove_adapter it first."
            )
    adapter.__dict__["owner"] = (owner, relative)  # not a submodule: the owner contains the adapter
    adapter.__dict__["hook"] = owner.register_forward_pre_hook(adapter.rewrite_call, with_kwargs=True)
    owner.__dict__[_REGISTRY] = [a for a in owner.__dict__.get(_REGISTRY, []) if attached_name(a)] + [adapter]
    return owner


def _wrapper(adapter: nn.Module) -> AdaptedLayer | None:
    owner, relative = adapter.__dict__["owner"]
    try:
        wrapper = owner.get_submodule(relative)
    except AttributeError:
        return None
    return wrapper if isinstance(wrapper, AdaptedLayer) else None


def attached_name(adapter: nn.Module) -> str | None:
    """The adapter's name in its embedding's wrapper, or None once removed (or never installed)."""
    wrapper = _wrapper(adapter) if "owner" in adapter.__dict__ else None
    return next((n for n, a in wrapper.adapters.items() if a is adapter), None) if wrapper else None


def in_use(adapter: nn.Module) -> bool:
    """Whether the hook should act: attached and active; a removed adapter's hook takes itself off."""
    wrapper = _wrapper(adapter)
    if wrapper is None or not any(a is adapter for a in wrapper.adapters.values()):
        adapter.__dict__["hook"].remove()
        return False
    return any(a is adapter for a in wrapper.active())


def keyword_call(owner: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments, all by name."""
    if not args:
        return dict(kwargs)
    names = [n for n, p in inspect.signature(owner.forward).parameters.items() if p.kind in _POSITIONAL]
    if len(args) > len(names):
        raise TypeError(
            f"{type(owner).__name__}.forward takes {len(names)} positional arguments, not {len(args)}."
        )
    return {**dict(zip(names, args, strict=False)), **kwargs}


def cache_argument(owner: nn.Module, call: dict[str, Any]) -> str:
    """The owner's name for its key-value cache (`cache` in transformers 5); `past_key_values` moves there."""
    parameters = inspect.signature(owner.forward).parameters
    name = "cache" if "cache" in parameters else "past_key_values"
    if name == "cache" and "past_key_values" in call:
        call["cache"] = call.pop("past_key_values")
    return name


def prepend(tensor: torch.Tensor | None, count: int, value: float) -> torch.Tensor | None:
    """`count` columns of `value` before a (batch, tokens, ...) tensor, or None for None."""
    if tensor is None:
        return None
    front = tensor.new_full((tensor.shape[0], count, *tensor.shape[2:]), value)
    return torch.cat([front, tensor], dim=1)


def batch_size(call: dict[str, Any]) -> int:
    inputs = call.get("input_ids") if call.get("input_ids") is not None else call.get("inputs_embeds")
    if inputs is None:
        raise ValueError("A prompt adapter needs input_ids or inputs_embeds in the model's call.")
    return inputs.shape[0]
