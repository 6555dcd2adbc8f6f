"""The baselines an imaging recipe's ``compare`` names, each one stage the engine trains on a new model.

A baseline copies the last recipe stage (its objective, data and budget). ``linear_probe`` trains the head
alone and ``full_finetune`` every parameter, each at the stage's lr times its scale (the last stage's
``linear_probe_lr_scale``, ``full_finetune_lr_scale``); a method's name (``lora``, ``ssf``, ...) trains
that method's default adapter on this backbone (:func:`pipelines.imaging.methods.default_spec`). Baselines
write training checkpoints only with ``checkpoint_baselines``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.imaging.backbones import Backbone
from pipelines.imaging.methods import default_spec
from pipelines.imaging.options import StageOptions

__all__ = ["SCRATCH_BASELINES", "StageRole", "baseline_stage"]

SCRATCH_BASELINES = ("linear_probe", "full_finetune")  # no adapter: the head alone, or every parameter


@dataclass(frozen=True)
class StageRole:
    """How one stage trains beyond its section: every parameter, a scaled lr, checkpoints."""

    full: bool = False
    lr_scale: float = 1.0
    checkpoint: bool = True

    def train_config(self, config: Any) -> Any:
        """The stage's training settings (a TrainConfig) with this role's lr scale applied."""
        if self.lr_scale == 1.0:
            return config
        return config.model_copy(update={"lr": config.lr * self.lr_scale})


def baseline_stage(name: str, last: Any, options: StageOptions, backbone: Backbone) -> tuple[Any, StageRole]:
    """The baseline ``name`` as a copy of the recipe's ``last`` stage (``options``: that stage's options).

    Returns:
        (the StageSection the engine trains, how it trains).
    """
    if name in SCRATCH_BASELINES:
        full = name == "full_finetune"
        scale = options.full_finetune_lr_scale if full else options.linear_probe_lr_scale
        update = {"adapter": None, "trainable": []}
        role = StageRole(full=full, lr_scale=scale, checkpoint=options.checkpoint_baselines)
    else:
        update = {"adapter": default_spec(name, backbone), "trainable": [name]}
        role = StageRole(checkpoint=options.checkpoint_baselines)
    return last.model_copy(update={"name": name, **update}), role
