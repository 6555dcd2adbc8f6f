"""The optimiser and the learning-rate schedule of the training loop."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipelines.core.train_config import TrainConfig


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Returns the multiplier of the peak lr used by optimiser step `step` (0-based).

    Warmup rises linearly as (step + 1) / warmup_steps; then cosine 0.5 * (1 + cos(pi * p)), linear 1 - p
    or constant 1, with p = (step - warmup_steps) / (total_steps - warmup_steps).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    done = min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
    return 1.0 - done if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Returns the optimiser over the model's trainable parameters (no decay on 0/1-dim tensors)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("The model has no trainable parameters; add an adapter or call set_trainable first.")
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """Returns a per-step LambdaLR following `lr_factor` with warmup_ratio x total_steps warmup steps."""
    warmup = int(config.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, config.schedule)
    )
