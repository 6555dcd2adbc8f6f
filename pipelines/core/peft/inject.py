"""Adding named adapters to a model, choosing what trains, merging, and switching adapters off."""

from __future__ import annotations

import contextlib
import difflib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .affine import ChannelAffine
from .bottleneck import BottleneckAdapter
from .layers import AdaptedLayer
from .lora import SUPPORTED as LORA_TYPES
from .lora import LoRAAdapter
from .methods import BUILDERS, finish_build
from .norm import NormAdapter, unsupported_norm
from .prompt import PromptAdapter
from .specs import BOTTLENECK_PRESETS, AdapterSpec, Bottleneck, LoRA, PromptTuning

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class LogicalModule:
    """A module as the user names it (adapter wrappers are transparent), with where it is attached."""

    name: str
    module: nn.Module
    wrapper: AdaptedLayer | None
    parent: nn.Module
    attribute: str


def logical_modules(model: nn.Module) -> Iterator[LogicalModule]:
    """Every module under `model` by its original dotted name, looking through adapter wrappers."""

    def walk(module: nn.Module, prefix: str) -> Iterator[LogicalModule]:
        for attribute, child in module.named_children():
            name = f"{prefix}.{attribute}" if prefix else attribute
            if isinstance(child, AdaptedLayer):
                yield LogicalModule(name, child.base_layer, child, module, attribute)
                yield from walk(child.base_layer, name)
            else:
                yield LogicalModule(name, child, None, module, attribute)
                yield from walk(child, name)

    yield from walk(model, "")


def matches(target: str, name: str, module: nn.Module) -> bool:
    """A target is a name suffix ("q_proj"), a dotted path, "re:<regex>" (full match) or "type:<class>"."""
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    if target.startswith("type:"):
        return type(module).__name__ == target[5:]
    return name == target or name.endswith("." + target)


def _default_targets(spec: AdapterSpec) -> list[str]:
    if spec.method == "bitfit":
        return ["__has_bias__"]
    if spec.method == "norm":
        return ["__is_norm__"]
    return []


def _hits(target: str, item: LogicalModule) -> bool:
    module = item.module
    if target == "__has_bias__":
        return isinstance(getattr(module, "bias", None), nn.Parameter)
    if target == "__is_norm__":  # the norms norm tuning can reproduce, with something to tune
        return unsupported_norm(module) is None
    return matches(target, item.name, module)


def _select(
    model: nn.Module, targets: list[str], what: str, optional: tuple[str, ...] = ()
) -> list[LogicalModule]:
    """The modules any target selects; a target (not in `optional`) that selects nothing is warned about."""
    found, used = [], set()
    for item in logical_modules(model):
        hit = [target for target in targets if _hits(target, item)]
        if hit:
            found.append(item)
            used.update(hit)
    unused = [t for t in targets if t not in used and not t.startswith("__") and t not in optional]
    if found and unused:
        warnings.warn(f"{what}: target {unused[0]!r} matches no module (the others do); is it misspelt?",
                      stacklevel=3)  # fmt: skip
    if not found and all(t.startswith("type:") for t in targets):
        types = sorted({type(item.module).__name__ for item in logical_modules(model)})
        raise ValueError(
            f"{what} targets {targets} match no module of {type(model).__name__}; "
            f"its layer types: {', '.join(types[:20])}."
        )
    if not found:
        names = [item.name for item in logical_modules(model)]
        keys = [t for t in targets if not t.startswith(("re:", "type:", "__"))] or targets
        # Leaf names too: a typo of "q_proj" is far from "model.layers.0.self_attn.q_proj" as a whole.
        candidates = sorted({n.rsplit(".", 1)[-1] for n in names}) + names
        close = sorted({n for k in keys for n in difflib.get_close_matches(k, candidates, n=5, cutoff=0.3)})
        close += sorted({n.rsplit(".", 1)[-1] for n in names if any(k in n for k in keys)})[:5]
        close = list(dict.fromkeys(close))
        hint = f"; closest module names: {', '.join(close[:8])}" if close else ""
        raise ValueError(f"{what} targets {targets} match no module of {type(model).__name__}{hint}.")
    return found


def _build(spec: AdapterSpec, module: nn.Module, name: str) -> nn.Module:
    if spec.method in BUILDERS:  # LoHa, LoKr, VeRA (methods.py)
        return BUILDERS[spec.method](module, spec, name)
    if isinstance(spec, LoRA):
        if not isinstance(module, LORA_TYPES):
            raise ValueError(
                f"LoRA cannot adapt {name!r} ({type(module).__name__}); it supports Linear, Embedding, "
                "Conv1d, Conv2d, Conv3d and ConvTranspose1d layers."
            )
        return LoRAAdapter(module, spec, name)
    if isinstance(spec, Bottleneck):
        return BottleneckAdapter(module, spec, name)
    if isinstance(spec, PromptTuning):
        return PromptAdapter(module, spec, name)
    if spec.method == "norm":
        return NormAdapter(module, name)
    return ChannelAffine(module, spec.method, name)


def _must_be_first(adapter: nn.Module) -> bool:
    # Norm tuning replaces the layer's computation and DoRA rescales by the base weight's norm; after
    # another adapter on the same layer, neither would compose in order, so merging would change outputs.
    return adapter.kind == "forward" or hasattr(adapter, "lora_magnitude_vector")


def adapter_specs(model: nn.Module) -> dict[str, AdapterSpec]:
    """The specs of the model's adapters, by name, in the order they were added."""
    return model.__dict__.setdefault("_peft_adapter_specs", {})


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the model's adapters in the order they were added."""
    return list(adapter_specs(model))


def wrappers(model: nn.Module) -> list[tuple[str, AdaptedLayer]]:
    """Every adapted layer of the model with its original dotted name."""
    return [(item.name, item.wrapper) for item in logical_modules(model) if item.wrapper is not None]


def add_adapter(model: nn.Module, spec: AdapterSpec, name: str = "default") -> nn.Module:
    """Adds adapter `name` to every layer `spec.targets` selects; freezes the base, trains the new adapter.

    Adapters added earlier keep their trainable state. Returns the model (changed in place).
    """
    if not _NAME.match(name):
        raise ValueError(
            f"Adapter name {name!r} must be letters, digits, '_' or '-', starting with a letter or '_'."
        )
    specs = adapter_specs(model)
    if name in specs:
        raise ValueError(f"The model already has an adapter named {name!r}; choose another name.")
    targets = list(spec.targets) or _default_targets(spec)
    if isinstance(spec, Bottleneck) and spec.preset:
        targets += BOTTLENECK_PRESETS[spec.preset]
    if not targets:
        raise ValueError(
            f"The {spec.method} adapter {name!r} needs targets (module names, re:..., type:...)."
        )
    presets = tuple(BOTTLENECK_PRESETS[spec.preset]) if isinstance(spec, Bottleneck) and spec.preset else ()
    selected = _select(model, targets, f"The {spec.method} adapter {name!r}", optional=presets)
    built = [
        (item, _build(spec, item.module, item.name)) for item in selected
    ]  # fail before changing anything
    finish_build(spec, built, model)  # VeRA's shared projections; P-tuning and prefix hook their model
    for item, adapter in built:
        if item.wrapper is not None and len(item.wrapper.adapters) and _must_be_first(adapter):
            what = "DoRA" if getattr(spec, "use_dora", False) else spec.method
            existing = next(iter(item.wrapper.adapters))
            raise ValueError(
                f"The {what} adapter {name!r} recomputes {item.name!r} from its base weights, so it must be "
                f"the first adapter there, but {item.name!r} already has {existing!r}."
            )
    adapter_ids = {id(p) for _, w in wrappers(model) for p in w.adapters.parameters()}
    for parameter in model.parameters():
        if id(parameter) not in adapter_ids:
            parameter.requires_grad_(False)
    for item, adapter in built:
        wrapper = item.wrapper
        if wrapper is None:
            wrapper = AdaptedLayer(item.module)
            setattr(item.parent, item.attribute, wrapper)
        reference = next(item.module.parameters(), None)
        adapter.to(device=reference.device if reference is not None else None)
        adapter.train(model.training)
        wrapper.adapters[name] = adapter
    specs[name] = spec
    return model


def _require_adapters(model: nn.Module, names: list[str]) -> None:
    known = adapter_names(model)
    for name in names:
        if name not in known:
            raise ValueError(f"The model has no adapter named {name!r}; it has {known}.")


def set_trainable(model: nn.Module, names: list[str], extra: list[str] | None = None) -> nn.Module:
    """Only the named adapters, and every parameter of modules matching `extra` targets, get gradients."""
    _require_adapters(model, names)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for _, wrapper in wrappers(model):
        for name in names:
            if name in wrapper.adapters:
                wrapper.adapters[name].requires_grad_(True)
    if extra:
        for item in _select(model, list(extra), "set_trainable extra"):
            item.module.requires_grad_(True)
    return model


def _plan(model: nn.Module, names: list[str] | None, merging: bool) -> list[tuple[AdaptedLayer, list[str]]]:
    wanted = adapter_names(model) if names is None else names
    _require_adapters(model, wanted)
    plan = []
    for layer_name, wrapper in wrappers(model):
        order = list(wrapper.adapters)
        chosen = [n for n in order if n in wanted and wrapper.adapters[n].merged != merging]
        for n in chosen:
            index = order.index(n)
            if merging and hasattr(wrapper.adapters[n], "check_mergeable"):
                wrapper.adapters[n].check_mergeable(wrapper.base_layer)  # before anything is merged
            if merging and not wrapper.adapters[n].mergeable:
                raise ValueError(
                    f"Adapter {n!r} on {layer_name!r} ({wrapper.adapters[n].kind}) cannot be merged: "
                    f"{type(wrapper.adapters[n]).__name__} is not a linear change of the layer's weights."
                )
            # Adapters compose in order, so only a prefix can be folded into the weights.
            others = order[:index] if merging else order[index + 1 :]
            blocking = [o for o in others if wrapper.adapters[o].merged != merging and o not in chosen]
            if blocking:
                verb = "merge" if merging else "unmerge"
                raise ValueError(
                    f"Cannot {verb} {n!r} on {layer_name!r} before {blocking[0]!r}; {verb} them together."
                )
        plan.append((wrapper, chosen if merging else chosen[::-1]))
    return plan


def merge(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Folds the named adapters (default: all) into the base weights; outputs stay the same."""
    for wrapper, chosen in _plan(model, names, merging=True):
        for n in chosen:
            wrapper.adapters[n].merge_into(wrapper.base_layer)
            wrapper.adapters[n].merged = True
    return model


def unmerge(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Takes merged adapters back out of the base weights."""
    for wrapper, chosen in _plan(model, names, merging=False):
        for n in chosen:
            wrapper.adapters[n].unmerge_from(wrapper.base_layer)
            wrapper.adapters[n].merged = False
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merges every adapter and puts the plain base layers back: inference costs exactly the base model."""
    merge(model)
    for item in list(logical_modules(model)):
        if item.wrapper is not None:
            setattr(item.parent, item.attribute, item.wrapper.base_layer)
    adapter_specs(model).clear()
    return model


def remove_adapter(model: nn.Module, name: str) -> nn.Module:
    """Deletes an unmerged adapter; layers left with no adapter get their plain base layer back."""
    _require_adapters(model, [name])
    for item in list(logical_modules(model)):
        wrapper = item.wrapper
        if wrapper is not None and name in wrapper.adapters:
            if wrapper.adapters[name].merged:
                raise ValueError(
                    f"Adapter {name!r} is merged on {item.name!r}; unmerge it before removing it."
                )
            del wrapper.adapters[name]
            if not len(wrapper.adapters):
                setattr(item.parent, item.attribute, wrapper.base_layer)
    del adapter_specs(model)[name]
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes exactly as its base (adapters must not be merged)."""
    layers = [w for _, w in wrappers(model)]
    merged = [n for w in layers for n, a in w.adapters.items() if a.merged]
    if merged:
        raise ValueError(
            f"Adapter {merged[0]!r} is merged into the weights; unmerge(model) before disabling."
        )
    previous = [w.disabled for w in layers]
    for w in layers:
        w.disabled = True
    try:
        yield model
    finally:
        for w, state in zip(layers, previous, strict=True):
            w.disabled = state


@dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameter counts, and the trainable fraction."""

    trainable: int
    total: int
    fraction: float

    def to_dict(self) -> dict[str, float]:
        return {"trainable": self.trainable, "total": self.total, "fraction": self.fraction}


def count_parameters(model: nn.Module) -> ParameterCount:
    """Counts parameters (shared ones once); the total includes the adapters."""
    unique = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in unique)
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    return ParameterCount(trainable, total, trainable / total if total else 0.0)
