"""Mixed adapters in one batch: each example goes through its own adapter over one shared backbone.

Within `with adapter_routing(model, ["a", "b", "a", None]):` every adapted layer computes its base output
once for the whole batch, then, for each adapter named, the output of the examples routed to it with that
adapter alone (see layer_outputs.py); None keeps an example on the base model. So each example's output is
what running its group alone, with only its adapter, gives, for any model whose examples do not interact
(no BatchNorm in training mode). Every method that works example by example routes: LoRA (and DoRA), LoHa,
LoKr, VeRA, IA3, SSF, BitFit, bottlenecks and norm tuning. Prompt tuning cannot (its examples would grow by
its tokens and could not share one tensor with the others), nor can P-tuning and prefix tuning, which change
the whole model's call; a model holding one of these is refused. Adapted layers must see batch-first
activations (batch, ...), as transformers and torchvision layers do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .compose import active_composition
from .inject import adapter_names, wrappers
from .layer_outputs import alone, first, rewrites_call, shape_changing, with_first
from .layers import AdaptedLayer

_BATCH_NORM = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class RoutedForward:
    """One layer's computation under routing: example indices per adapter name (AdaptedLayer calls it)."""

    layer: str
    batch: int
    groups: dict[str, list[int]]

    def __call__(self, wrapper: AdaptedLayer, x, *args, **kwargs):
        base = wrapper.base_layer
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[0] != self.batch:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"adapter_routing names {self.batch} examples, but layer {self.layer!r} got an input of "
                f"shape {got}, whose first dimension is not the batch; pass one adapter name per example."
            )
        out = base(x, *args, **kwargs)
        routed = [(name, index) for name, index in self.groups.items() if name in wrapper.adapters]
        if not routed:
            return out
        if isinstance(base, _BATCH_NORM) and base.training:
            raise ValueError(
                f"Cannot route examples through {self.layer!r} in training mode: BatchNorm normalises with "
                "the whole batch's statistics, so each example would depend on the others; call model.eval()."
            )
        h = first(out)
        for name, index in routed:
            adapter = wrapper.adapters[name]
            rows = torch.tensor(index, device=h.device)
            sub_x, sub_h = x.index_select(0, rows.to(x.device)), h.index_select(0, rows)
            if adapter.kind == "delta":
                h = h.index_add(0, rows, adapter.delta(base, sub_x, sub_h))
            else:
                h = h.index_copy(0, rows, alone(adapter, base, sub_x, sub_h))
        return with_first(out, h)


def _check(model: nn.Module, names: Sequence[str | None]) -> dict[str, list[int]]:
    if isinstance(names, str) or not len(names):
        raise ValueError(
            "adapter_routing takes one adapter name (or None) per example, e.g. ['a', 'b', None], not "
            f"{names!r}."
        )
    known = adapter_names(model)
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        if name is not None and name not in known:
            raise ValueError(
                f"adapter_routing routes example {index} to {name!r}, which the model does not have; it has "
                f"{known}."
            )
        if name is not None:
            groups.setdefault(name, []).append(index)
    if active_composition(model) is not None:
        raise ValueError(
            "adapter_routing cannot route under a composition (Parallel or Fuse); compose(model, None) first."
        )
    for layer, wrapper in wrappers(model):
        for name, adapter in wrapper.adapters.items():
            if adapter.merged:
                raise ValueError(
                    f"Adapter {name!r} is merged into {layer!r}, so every example would get it; "
                    "unmerge(model) before routing."
                )
            if rewrites_call(adapter):
                raise ValueError(
                    f"Adapter {name!r} changes the whole model's call (P-tuning or prefix tuning: its "
                    "inputs, cache and mask), not one layer's output, so it cannot be routed per example nor "
                    f"kept from the other examples; remove_adapter(model, {name!r}) first."
                )
            if name in groups and shape_changing(adapter):
                raise ValueError(
                    f"Adapter {name!r} is prompt tuning, which cannot be routed per example: it inserts "
                    f"tokens at {layer!r}, so its examples would be longer than the others' and could not "
                    "share one batch; run them in a batch of their own."
                )
    return groups


@contextlib.contextmanager
def adapter_routing(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, example i of each batch goes through adapter `names[i]` alone (None: the base).

    The batch must have len(names) examples. Adapters must not be merged; no composition may be active.
    """
    groups = _check(model, names)
    layers = wrappers(model)
    previous = [wrapper.__dict__.get("composed") for _, wrapper in layers]
    for layer, wrapper in layers:
        wrapper.composed = RoutedForward(layer, len(names), groups)
    try:
        yield model
    finally:
        for (_, wrapper), state in zip(layers, previous, strict=True):
            if state is None:
                wrapper.__dict__.pop("composed", None)
            else:
                wrapper.composed = state
