"""Choosing SCT's salient channels: each target's output-channel L2 norms on a few batches, the top K kept."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .inject import _select
from .sct import layer_width, squares_except, top_channels, tuned_count
from .specs import SCT


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def select_salient_channels(
    model: nn.Module, spec: SCT, batches: Iterable[Any], labels: Iterable[torch.Tensor] | None = None
) -> SCT:
    """Measures each target layer's output-channel L2 norms on `batches` and returns `spec` with `selected`.

    A batch is the model's input (a tensor, a tuple of positional inputs or a dict of keyword inputs); the
    model runs in eval mode without gradients. With `labels` (one tensor of class labels per batch), a
    channel's salience is the mean over classes of its norm within each class, as in the paper.
    """
    if not spec.targets:
        raise ValueError(
            "select_salient_channels needs an SCT spec with targets (module names, re:..., type:...)."
        )
    items = _select(model, list(spec.targets), "select_salient_channels")
    sums: dict[str, dict[Any, torch.Tensor]] = {}
    current: dict[str, Any] = {"labels": None}
    hooks = []
    for item in items:
        width, dim = layer_width(item.module, spec, item.name)
        tuned_count(spec, width, item.name)

        def record(module, inputs, out, name=item.name, dim=dim) -> None:
            out = out[0] if isinstance(out, tuple) else out
            channel = dim % out.ndim
            per_class = sums.setdefault(name, {})
            if current["labels"] is None:
                total = squares_except(out, (channel,)).double()
                per_class[None] = per_class.get(None, 0) + total.cpu()
                return
            if channel == 0:
                raise ValueError(
                    f"select_salient_channels: {name!r} has its channels on the batch dimension."
                )
            per_sample = squares_except(out, (0, channel)).double().cpu()
            for label in current["labels"].unique().tolist():
                chosen = per_sample[current["labels"].cpu() == label].sum(dim=0)
                per_class[label] = per_class.get(label, 0) + chosen

        hooks.append((item.wrapper or item.module).register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            label_batches = iter(labels) if labels is not None else None
            for batch in batches:
                current["labels"] = next(label_batches) if label_batches is not None else None
                _call(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    selected = dict(spec.selected)
    for item in items:
        if item.name not in sums:
            raise ValueError(f"select_salient_channels: {item.name!r} did not run on the given batches.")
        norms = torch.stack([value.sqrt() for value in sums[item.name].values()]).mean(dim=0)
        width = layer_width(item.module, spec, item.name)[0]
        selected[item.name] = top_channels(norms, tuned_count(spec, width, item.name)).tolist()
    return dataclasses.replace(spec, selected=selected)
