"""The one training loop: AMP, gradient accumulation, clipping, schedules, early stopping,
safetensors checkpoints with exact resume, Ctrl-C and NaN handling, and DDP/FSDP under torchrun.

    result = train(model, train_data, loss_fn=lambda model, batch: model(**batch).loss,
                   config=TrainConfig(epochs=3, lr=1e-3), val_data=val, run_dir=Path("runs/x"))
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pipelines.core import checkpoint as ckpt
from pipelines.core import distributed as D
from pipelines.core.optim import build_optimizer, build_scheduler, lr_factor
from pipelines.core.precision import apply_precision_policy, policy_notes
from pipelines.core.run_log import RunLog
from pipelines.core.train_config import (
    CheckpointError,
    NonFiniteLossError,
    TrainCallback,
    TrainConfig,
    TrainingInterrupted,
    TrainResult,
)
from pipelines.core.training_eval import autocast, evaluate_and_track

__all__ = [
    "CheckpointError", "NonFiniteLossError", "TrainCallback", "TrainConfig", "TrainResult",
    "TrainingInterrupted", "build_optimizer", "build_scheduler", "lr_factor", "train",
]  # fmt: skip

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]
EvaluateFn = Callable[[nn.Module], Mapping[str, float]]
RESUME_HINT = "`peft-pipelines run RECIPE --resume` (or `train(..., resume=True)` with the same run_dir)"


@dataclass
class _Progress:
    """Loop counters, saved in trainer_state.json; they change only at optimiser-step boundaries."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    elapsed_s: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    pending_losses: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)


class _LossStep(nn.Module):
    """The model and loss_fn as one module: DistributedDataParallel wraps this, so its forward runs
    loss_fn on the plain model (whose methods stay reachable) and still synchronises gradients."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


@dataclass
class _Run:
    """Everything the loop functions share, so each takes one argument instead of a dozen."""

    config: TrainConfig
    model: nn.Module
    wrapped: nn.Module  # a _LossStep, wrapped by DDP under torchrun; calling it returns the loss
    loss_fn: LossFn
    train_data: Dataset | DataLoader
    val_data: Dataset | DataLoader | None
    evaluate_fn: EvaluateFn | None
    collate_fn: Callable | None
    seed: int
    device: torch.device
    checkpoint_dir: Path | None
    callbacks: list[Any] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None  # set by _prepare, like the fields below
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    amp_dtype: torch.dtype | None = None  # bf16 autocast, or None: float32 (core.precision's policy)
    precision_policy: dict[str, Any] = field(default_factory=dict)
    batches_per_epoch: int | None = None
    total_steps: int = 0
    progress: _Progress = field(default_factory=_Progress)
    best_state: dict[str, torch.Tensor] | None = None
    rng_at_boundary: dict[str, Any] | None = None  # RNG states right after the last completed step
    saved_step: int | None = None


def train(
    model: nn.Module,
    train_data: Dataset | DataLoader,
    loss_fn: LossFn,
    config: TrainConfig | None = None,
    val_data: Dataset | DataLoader | None = None,
    evaluate_fn: EvaluateFn | None = None,
    run_dir: Path | str | None = None,
    resume: bool = False,
    collate_fn: Callable | None = None,
    seed: int = 0,
    progress: bool = True,
    callbacks: Sequence[TrainCallback] = (),
) -> TrainResult:
    """Trains the model's trainable parameters in place and returns what happened.

    Args:
        model: the module; only parameters with requires_grad are optimised and checkpointed.
        train_data: a map-style Dataset (the loop builds a seeded, resumable DataLoader) or a DataLoader.
        loss_fn: loss_fn(model, batch) -> scalar tensor; the batch is already on the training device and
            the model is the plain module, under torchrun too.
        config: TrainConfig; defaults when None.
        val_data: evaluated with loss_fn (metric "loss") when evaluate_fn is None.
        evaluate_fn: evaluate_fn(model) -> dict of metrics; called on every process.
        run_dir: where metrics.jsonl and checkpoints/last go; None writes nothing.
        resume: continue from run_dir/checkpoints/last, or from checkpoints/previous when last is damaged
            (starts fresh when there is none).
        collate_fn: passed to the DataLoaders the loop builds.
        seed: seeds torch, numpy, python random and the data order.
        progress: show a tqdm bar (rank 0 only).
        callbacks: TrainCallback hooks, called in order; the callbacks the model's adapters need (AdaLoRA's
            rank schedule, core.peft.training_callbacks) run first without being passed. The logged loss
            includes their extra_loss terms.

    Raises:
        TrainingInterrupted: on Ctrl-C, after writing a checkpoint.
        NonFiniteLossError: on a NaN or infinite loss, keeping the last good checkpoint.
        CheckpointError: the disk filled up while checkpointing, or every checkpoint to resume is damaged.
    """
    config = config or TrainConfig()
    run_dir = Path(run_dir) if run_dir is not None else None
    _check_arguments(config, train_data, val_data, evaluate_fn, run_dir, resume)
    D.setup_distributed()
    device = torch.device(config.device) if config.device else D.default_device(model)
    if config.device or D.world_size() > 1:
        model.to(device)
    ckpt.seed_everything(seed + D.rank())
    # Before wrapping: FSDP shards the parameters in the dtype they have then.
    policy = apply_precision_policy(model, device.type, config.precision, config.frozen_dtype)
    if config.strategy == "fsdp":  # FSDP shards the model in place; DDP wraps the loss step
        wrapped = _LossStep(D.wrap_model(model, config.strategy, device), loss_fn)
    else:
        wrapped = D.wrap_model(_LossStep(model, loss_fn), config.strategy, device)
    run = _Run(config, model, wrapped, loss_fn, train_data, val_data, evaluate_fn, collate_fn, seed, device,
               run_dir / "checkpoints" / "last" if run_dir is not None else None)  # fmt: skip
    run.precision_policy = policy
    from pipelines.core.peft import training_callbacks  # core.peft does not import this module

    run.callbacks = [*training_callbacks(model), *callbacks]
    run.amp_dtype = torch.bfloat16 if policy["compute_dtype"] == "bfloat16" else None
    _prepare(run)
    if resume:
        _resume(run)
    _call(run, "on_train_begin", run.total_steps)
    log = RunLog(run_dir, run.progress, config.tensorboard, progress, run.total_steps)
    was_training = model.training
    model.train()
    try:
        _loop(run, log)
    except KeyboardInterrupt:
        raise _interrupted(run) from None
    finally:
        log.close()
        model.train(was_training)
    if run.checkpoint_dir is not None and run.saved_step != run.progress.step:
        _save(run)
    restored = run.best_state is not None and config.early_stopping_patience is not None
    if restored:
        ckpt.load_trainable_state(run.model, run.best_state, "best state in memory")
    return _result(run, restored)


def _check_arguments(config, train_data, val_data, evaluate_fn, run_dir, resume) -> None:
    for name in ("early_stopping_patience", "eval_every"):  # nothing to evaluate: not silently skipped
        if getattr(config, name) is not None and val_data is None and evaluate_fn is None:
            raise ValueError(f"{name} needs val_data or evaluate_fn; pass one or unset it.")
    if run_dir is None and (resume or config.checkpoint_every is not None):
        raise ValueError("resume and checkpoint_every need a run_dir; pass run_dir=... to train().")
    sampler = getattr(train_data, "sampler", None)
    if (
        D.launched_distributed()
        and isinstance(train_data, DataLoader)
        and not isinstance(sampler, DistributedSampler)
    ):
        raise ValueError(
            "Under torchrun a train DataLoader needs a DistributedSampler; pass the Dataset instead."
        )


def _prepare(run: _Run) -> None:
    """Builds the optimiser (after wrapping: FSDP replaces parameters), the schedule and the step count."""
    config = run.config
    run.optimizer = build_optimizer(run.model, config)
    run.batches_per_epoch = D.batches_per_epoch(run.train_data, config.batch_size)
    if run.batches_per_epoch is None and config.max_steps is None:
        raise ValueError("train_data has no length, so set max_steps in the train config.")
    run.total_steps = config.max_steps or config.epochs * math.ceil(run.batches_per_epoch / config.grad_accum)
    run.scheduler = build_scheduler(run.optimizer, config, run.total_steps)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)


def _windows(batches: Iterator[Any], size: int) -> Iterator[list[Any]]:
    window: list[Any] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _loop(run: _Run, log: RunLog) -> None:
    state, config = run.progress, run.config
    run.rng_at_boundary = ckpt.capture_rng(run.device)
    started = time.perf_counter()
    while state.step < run.total_steps and not state.stopped_early:
        step_before = state.step
        batches = D.epoch_batches(run.train_data, config.batch_size, run.seed, state.epoch,
                                  state.batch_in_epoch, run.collate_fn, config.num_workers,
                                  pin_memory=run.device.type == "cuda")  # fmt: skip
        for window in _windows(batches, config.grad_accum):
            lr = run.optimizer.param_groups[0]["lr"]
            loss, grad_norm = _optimizer_step(run, window)
            state.step += 1
            state.batch_in_epoch += len(window)
            state.samples += sum(D.batch_size_of(batch) for batch in window) * D.world_size()
            state.elapsed_s += time.perf_counter() - started
            started = time.perf_counter()
            run.rng_at_boundary = ckpt.capture_rng(run.device)
            _after_step(run, log, loss, grad_norm, lr)
            if state.step >= run.total_steps or state.stopped_early:
                return
        if state.step == step_before and state.batch_in_epoch == 0:
            raise ValueError(f"train_data yielded no batches in epoch {state.epoch}; check the dataset.")
        state.epoch += 1
        state.batch_in_epoch = 0


def _after_step(run: _Run, log: RunLog, loss: float, grad_norm: float | None, lr: float) -> None:
    """Logs, evaluates (tracking early stopping) and checkpoints after optimiser step `progress.step`."""
    config, state = run.config, run.progress
    last = state.step >= run.total_steps
    log.step(loss, lr)
    state.pending_losses.append(loss)
    if state.step % config.log_every == 0 or last:
        row = {"step": state.step, "epoch": _epoch_float(run), "loss": float(np.mean(state.pending_losses))}
        log.row(row | {"lr": lr} | ({"grad_norm": grad_norm} if grad_norm is not None else {}))
        state.pending_losses = []
    epoch_ends = run.batches_per_epoch is not None and state.batch_in_epoch >= run.batches_per_epoch
    due = state.step % config.eval_every == 0 if config.eval_every else epoch_ends
    if (run.val_data is not None or run.evaluate_fn is not None) and (due or last):
        evaluate_and_track(run, log, _epoch_float(run))
    if run.checkpoint_dir and config.checkpoint_every and state.step % config.checkpoint_every == 0:
        _save(run)


def _epoch_float(run: _Run) -> float:
    state = run.progress
    if not run.batches_per_epoch:
        return float(state.epoch)
    return round(state.epoch + min(state.batch_in_epoch / run.batches_per_epoch, 1.0), 4)


def _optimizer_step(run: _Run, window: list[Any]) -> tuple[float, float | None]:
    """Forward/backward over the micro-batches, then clip and step; returns (loss, grad norm)."""
    total = torch.zeros((), device=run.device)
    ddp = isinstance(run.wrapped, nn.parallel.DistributedDataParallel)
    for index, batch in enumerate(window):
        with D.gradient_sync(run.wrapped if ddp else run.model, sync=index == len(window) - 1):
            with autocast(run):
                loss = run.wrapped(D.move_to_device(batch, run.device))
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                shape = tuple(getattr(loss, "shape", ()))
                raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} {shape}; "
                                "reduce it with .mean().")  # fmt: skip
            extras = [c.extra_loss(run.model) for c in run.callbacks if hasattr(c, "extra_loss")]
            loss = sum((extra for extra in extras if extra is not None), loss)
            (loss / len(window)).backward()
        total += loss.detach().float()
    _call(run, "on_after_backward", run.progress.step)
    value = (D.all_reduce_sum(total / len(window)) / D.world_size()).item()
    if not math.isfinite(value):
        raise _non_finite(run, "loss", value)
    grad_norm = None
    if run.config.clip_grad_norm is not None:
        params = [p for p in run.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, run.config.clip_grad_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        if not math.isfinite(grad_norm):
            raise _non_finite(run, "gradient norm", grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    _call(run, "on_step_end", run.progress.step)
    run.optimizer.zero_grad(set_to_none=True)
    return value, grad_norm


def _call(run: _Run, hook: str, *args: Any) -> None:
    """Calls `hook(model, *args)` on every callback that defines it."""
    for callback in run.callbacks:
        method = getattr(callback, hook, None)
        if method is not None:
            method(run.model, *args)


def _save(run: _Run) -> None:
    """Writes run_dir/checkpoints/last; every rank calls this (FSDP gathers, RNG states gather)."""
    rngs = D.gather_to_all(ckpt.capture_rng(run.device))
    ckpt.save_training_checkpoint(
        run.checkpoint_dir, run.model, run.optimizer, _payload(run), rngs, run.best_state
    )
    D.barrier()
    run.saved_step = run.progress.step


def _payload(run: _Run) -> dict[str, Any]:
    return {"progress": asdict(run.progress), "scheduler": run.scheduler.state_dict(),
            "world_size": D.world_size(), "total_steps": run.total_steps}  # fmt: skip


def _interrupted(run: _Run) -> TrainingInterrupted:
    """Checkpoints the last completed step without collectives (other ranks may already be gone)."""
    step, directory = run.progress.step, run.checkpoint_dir
    if directory is None:
        where = "no checkpoint was written because train() got no run_dir"
    elif D.is_sharded(run.model):
        where = f"an FSDP run cannot checkpoint after Ctrl-C, the last checkpoint is {directory}"
    else:
        if D.is_main_process():
            rngs = [run.rng_at_boundary] if run.rng_at_boundary else []
            ckpt.save_training_checkpoint(
                directory, run.model, run.optimizer, _payload(run), rngs, run.best_state
            )
        where = f"checkpoint written to {directory}"
    message = f"Training interrupted after step {step}/{run.total_steps}; {where}. Resume with {RESUME_HINT}."
    return TrainingInterrupted(message, step, directory, run.total_steps)


def _non_finite(run: _Run, what: str, value: float) -> NonFiniteLossError:
    step, saved = run.progress.step + 1, run.saved_step is not None
    if saved:
        where = f"the last good checkpoint is at {run.checkpoint_dir} (step {run.saved_step})"
    else:
        where = "no checkpoint was written before it (set checkpoint_every and a run_dir to keep one)"
    lr = run.optimizer.param_groups[0]["lr"]
    message = (f"Training stopped: the {what} at step {step} is {value}; {where}. Lower the learning rate "
               f"(lr is {lr:.3g}) or enable clip_grad_norm, then resume with {RESUME_HINT}.")  # fmt: skip
    return NonFiniteLossError(message, step, value, run.checkpoint_dir if saved else None)


def _resume(run: _Run) -> None:
    loaded = ckpt.restore_training_checkpoint(run.checkpoint_dir, run.model, run.optimizer, run.scheduler,
                                              run.device)  # fmt: skip
    if loaded is None:  # a stage the interrupted run had not reached yet
        logger.info("resume: no checkpoint at %s yet, this training starts at step 0", run.checkpoint_dir)
        return
    run.progress = _Progress(**loaded.state["progress"])
    run.best_state = loaded.best_model
    run.saved_step = run.progress.step
    if ckpt.rng_for_rank(loaded, D.rank()) is None:  # after Ctrl-C in a multi-process run
        ckpt.seed_everything(run.seed + D.rank() + 1_000_003 * run.progress.step)


def _result(run: _Run, restored: bool) -> TrainResult:
    state, metric = run.progress, run.config.early_stopping_metric
    notes = (
        [f"stopped early: {state.bad_evals} evaluations without improvement"] if state.stopped_early else []
    )
    if restored:
        notes.append(
            f"restored the best trainable state ({metric} {state.best_metric:.6g} at step {state.best_step})"
        )
    notes += policy_notes(run.precision_policy)
    return TrainResult(
        steps=state.step, epochs=_epoch_float(run), history=list(state.history),
        best_metric=state.best_metric, best_step=state.best_step, metric_name=metric,
        stopped_early=state.stopped_early, restored_best=restored, wall_time_s=state.elapsed_s,
        peak_memory_bytes=D.peak_memory_bytes(run.device),
        samples_per_second=state.samples / state.elapsed_s if state.elapsed_s > 0 else 0.0,
        precision="bf16" if run.amp_dtype is not None else "fp32",
        checkpoint=run.checkpoint_dir if run.saved_step is not None else None, notes=notes,
        precision_policy=dict(run.precision_policy),
    )  # fmt: skip
