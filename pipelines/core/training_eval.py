"""Evaluation inside the training loop: validation loss or the caller's metrics, early stopping, autocast.

`run` is the loop's `training._Run` (config, model, data, device, progress); these functions read it and
update its early-stopping state.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from pipelines.core import checkpoint as ckpt
from pipelines.core import distributed as D
from pipelines.core.run_log import RunLog


def autocast(run: Any) -> contextlib.AbstractContextManager:
    """bf16 autocast when the run trains in bf16, else nothing."""
    if run.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=run.device.type, dtype=run.amp_dtype)


def evaluate_and_track(run: Any, log: RunLog, epoch: float) -> None:
    """Evaluates, logs the `val_*` row and updates the early-stopping state (best, patience)."""
    config, state = run.config, run.progress
    metrics = _evaluate(run)
    log.row({"step": state.step, "epoch": epoch} | {f"val_{k}": v for k, v in metrics.items()})
    name = config.early_stopping_metric
    if name not in metrics:
        if config.early_stopping_patience is None:
            return
        raise ValueError(f"early_stopping_metric {name!r} is not among the evaluation metrics "
                         f"{sorted(metrics)}; set it to one of them.")  # fmt: skip
    value, best = metrics[name], state.best_metric
    sign = 1.0 if config.early_stopping_mode == "min" else -1.0
    if best is None or sign * (best - value) > config.early_stopping_min_delta:
        state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
        if config.early_stopping_patience is not None:
            run.best_state = ckpt.trainable_state(run.model)
        return
    state.bad_evals += 1
    if config.early_stopping_patience is not None and state.bad_evals >= config.early_stopping_patience:
        state.stopped_early = True


def _evaluate(run: Any) -> dict[str, float]:
    """Returns rank 0's metrics on every rank; the training RNG streams are left untouched."""
    target = run.model
    target.eval()
    saved_rng = ckpt.capture_rng(run.device)
    try:
        if run.evaluate_fn is not None:
            metrics = {key: float(value) for key, value in run.evaluate_fn(target).items()}
        else:
            metrics = {"loss": _validation_loss(run, target)}
    finally:
        ckpt.restore_rng(saved_rng, run.device)
        target.train()
    return D.broadcast_from_main(metrics)


@torch.no_grad()
def _validation_loss(run: Any, model: nn.Module) -> float:
    """Returns the sample-weighted mean of loss_fn over val_data (sharded across DDP processes)."""
    val_data = run.val_data
    if not isinstance(val_data, DataLoader):
        # FSDP forwards are collective, so every rank must run the same batches: no sharding there.
        indices = range(len(val_data)) if D.is_sharded(run.model) else D.shard_indices(len(val_data))
        val_data = DataLoader(
            Subset(val_data, indices), batch_size=run.config.batch_size, collate_fn=run.collate_fn
        )
    total, count = 0.0, 0
    for batch in val_data:
        with autocast(run):
            loss = run.loss_fn(model, D.move_to_device(batch, run.device))
        total += float(loss) * D.batch_size_of(batch)
        count += D.batch_size_of(batch)
    sums = torch.tensor([total, count], dtype=torch.float64, device=run.device)
    total, count = D.all_reduce_sum(sums).tolist()
    return total / max(count, 1)
