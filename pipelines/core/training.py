"""The one training loop: AMP, gradient accumulation, clipping, schedules, early stopping,
safetensors checkpoints with exact resume, Ctrl-C and NaN handling, and DDP/FSDP under torchrun.

    result = train(model, train_data, loss_fn=lambda model, batch: model(**batch).loss,
                   config=TrainConfig(epochs=3, lr=1e-3), val_data=val, run_dir=Path("runs/x"))
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from pipelines.core import checkpoint as ckpt
from pipelines.core import distributed as D

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]
EvaluateFn = Callable[[nn.Module], Mapping[str, float]]
RESUME_HINT = "`peft-pipelines run RECIPE --resume` (or `train(..., resume=True)` with the same run_dir)"


class TrainConfig(BaseModel):
    """Training settings: the `stages[i].train` section of a recipe."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(1, ge=1, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimiser steps to run; overrides epochs.")
    batch_size: int = Field(8, ge=1, description="Samples per micro-batch per process.")
    grad_accum: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimiser step; global batch = batch_size x processes x grad_accum.",
    )
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(
        0.0,
        ge=0,
        description="Decoupled weight decay on parameters with 2+ dims "
        "(biases and norm weights never decay).",
    )
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Optimiser.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (unused by adamw).")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warmup, per optimiser step, to 0 at the last step."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps with linear warmup.")
    clip_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null: off.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, float32 on CPU; bf16 also autocasts on CPU."
    )
    eval_every: int | None = Field(None, ge=1, description="Evaluate every N steps; null: at each epoch end.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after N evaluations without improvement and restore the best state."
    )
    early_stopping_metric: str = Field("loss", description="Evaluation metric to watch (loss = val loss).")
    early_stopping_mode: Literal["min", "max"] = Field(
        "min", description="Whether lower or higher is better."
    )
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as better.")
    checkpoint_every: int | None = Field(
        None, ge=1, description="Checkpoint every N steps (always at the end)."
    )
    log_every: int = Field(10, ge=1, description="Write a metrics.jsonl row every N steps (mean loss).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="Multi-process wrapping under torchrun (auto = ddp); unused in one process."
    )
    tensorboard: bool = Field(False, description="Also log to run_dir/tensorboard (needs tensorboard).")
    device: str | None = Field(
        None,
        description="Device to train on; null: where the model is "
        "(cuda:LOCAL_RANK under torchrun with CUDA).",
    )


@dataclass
class TrainResult:
    """What `train` did. history holds the metrics.jsonl rows (train rows and `val_*` rows)."""

    steps: int
    epochs: float
    history: list[dict[str, Any]]
    best_metric: float | None
    best_step: int | None
    metric_name: str
    stopped_early: bool
    restored_best: bool
    wall_time_s: float
    peak_memory_bytes: int
    samples_per_second: float
    precision: str
    checkpoint: Path | None
    notes: list[str] = field(default_factory=list)


class TrainingInterrupted(RuntimeError):
    """Ctrl-C stopped training; a checkpoint was written and the message says how to resume."""

    def __init__(self, message: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; the last good checkpoint is kept."""

    def __init__(self, message: str, step: int, loss: float, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.loss, self.checkpoint = step, loss, checkpoint


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


@dataclass
class _Run:
    """Everything the loop functions share, so they take one argument instead of twelve."""

    config: TrainConfig
    model: nn.Module
    wrapped: nn.Module
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    amp_dtype: torch.dtype | None
    seed: int
    batches_per_epoch: int | None
    total_steps: int
    checkpoint_dir: Path | None
    progress: _Progress = field(default_factory=_Progress)
    best_state: dict[str, torch.Tensor] | None = None
    rng_at_boundary: dict[str, Any] | None = None
    saved_step: int | None = None


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
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("The model has no trainable parameters; add an adapter or call set_trainable first.")
    groups = [
        {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """Returns a per-step LambdaLR following `lr_factor` with warmup_ratio x total_steps warmup steps."""
    warmup = int(config.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, config.schedule)
    )


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
) -> TrainResult:
    """Trains the model's trainable parameters in place and returns what happened.

    Args:
        model: the module; only parameters with requires_grad are optimised and checkpointed.
        train_data: a map-style Dataset (the loop builds a seeded, resumable DataLoader) or a DataLoader.
        loss_fn: loss_fn(model, batch) -> scalar tensor; the batch is already on the training device.
        config: TrainConfig; defaults when None.
        val_data: evaluated with loss_fn (metric "loss") when evaluate_fn is None.
        evaluate_fn: evaluate_fn(model) -> dict of metrics; called on every process.
        run_dir: where metrics.jsonl and checkpoints/last go; None writes nothing.
        resume: continue from run_dir/checkpoints/last (starts fresh when there is none).
        collate_fn: passed to the DataLoaders the loop builds.
        seed: seeds torch, numpy, python random and the data order.
        progress: show a tqdm bar (rank 0 only).

    Raises:
        TrainingInterrupted: on Ctrl-C, after writing a checkpoint.
        NonFiniteLossError: on a NaN or infinite loss, keeping the last good checkpoint.
    """
    config = config or TrainConfig()
    run_dir = Path(run_dir) if run_dir is not None else None
    _check_arguments(config, train_data, val_data, evaluate_fn, run_dir, resume)
    D.setup_distributed()
    run = _prepare(model, train_data, loss_fn, config, run_dir, seed)
    if resume:
        _resume(run)
    log = RunLog(run_dir, run.progress, config.tensorboard, progress, run.total_steps)
    was_training = model.training
    model.train()
    try:
        _loop(run, train_data, val_data, evaluate_fn, collate_fn, log, time.perf_counter())
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
    if config.early_stopping_patience is not None and val_data is None and evaluate_fn is None:
        raise ValueError("early_stopping_patience needs val_data or evaluate_fn; pass one or unset it.")
    if run_dir is None and (resume or config.checkpoint_every is not None):
        raise ValueError("resume and checkpoint_every need a run_dir; pass run_dir=... to train().")
    if isinstance(train_data, DataLoader) and D.launched_distributed():
        if not isinstance(train_data.sampler, DistributedSampler):
            raise ValueError(
                "Under torchrun a train DataLoader needs a DistributedSampler; pass the Dataset "
                "instead and train() shards it."
            )


def _prepare(model, train_data, loss_fn, config, run_dir, seed) -> _Run:
    device = torch.device(config.device) if config.device else D.default_device(model)
    if config.device or D.world_size() > 1:
        model.to(device)
    ckpt.seed_everything(seed + D.rank())
    wrapped = D.wrap_model(model, config.strategy, device)
    optimizer = build_optimizer(model, config)
    batches = D.batches_per_epoch(train_data, config.batch_size)
    if batches is None and config.max_steps is None:
        raise ValueError("train_data has no length, so set max_steps in the train config.")
    steps_per_epoch = math.ceil(batches / config.grad_accum) if batches else None
    total = config.max_steps or config.epochs * steps_per_epoch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return _Run(
        config=config,
        model=model,
        wrapped=wrapped,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config, total),
        device=device,
        amp_dtype=_amp_dtype(config, device),
        seed=seed,
        batches_per_epoch=batches,
        total_steps=total,
        checkpoint_dir=run_dir / "checkpoints" / "last" if run_dir else None,
    )


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if config.precision == "fp32" or (config.precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"precision {config.precision!r} needs bf16 support, which {device} lacks; set precision: fp32."
        )
    return torch.bfloat16


def _windows(batches: Iterator[Any], size: int) -> Iterator[list[Any]]:
    window: list[Any] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _loop(run: _Run, train_data, val_data, evaluate_fn, collate_fn, log: RunLog, started: float) -> None:
    state = run.progress
    run.rng_at_boundary = ckpt.capture_rng(run.device)
    while state.step < run.total_steps and not state.stopped_early:
        step_before = state.step
        batches = D.epoch_batches(
            train_data,
            run.config.batch_size,
            run.seed,
            state.epoch,
            state.batch_in_epoch,
            collate_fn,
            run.config.num_workers,
            pin_memory=run.device.type == "cuda",
        )
        for window in _windows(batches, run.config.grad_accum):
            lr = run.optimizer.param_groups[0]["lr"]
            loss, grad_norm = _optimizer_step(run, window)
            state.step += 1
            state.batch_in_epoch += len(window)
            state.samples += sum(D.batch_size_of(batch) for batch in window) * D.world_size()
            state.elapsed_s += time.perf_counter() - started
            started = time.perf_counter()
            run.rng_at_boundary = ckpt.capture_rng(run.device)
            _after_step(run, loss, grad_norm, lr, val_data, evaluate_fn, collate_fn, log)
            if state.step >= run.total_steps or state.stopped_early:
                return
        if state.step == step_before and state.batch_in_epoch == 0:
            raise ValueError(f"train_data yielded no batches in epoch {state.epoch}; check the dataset.")
        state.epoch += 1
        state.batch_in_epoch = 0


def _after_step(run: _Run, loss, grad_norm, lr, val_data, evaluate_fn, collate_fn, log: RunLog) -> None:
    """Logs, evaluates (early stopping) and checkpoints after optimiser step `progress.step`."""
    config, state = run.config, run.progress
    last = state.step >= run.total_steps
    log.step(loss, lr)
    state.pending_losses.append(loss)
    if state.step % config.log_every == 0 or last:
        row = {"step": state.step, "epoch": _epoch_float(run), "loss": float(np.mean(state.pending_losses))}
        row |= {"lr": lr} | ({"grad_norm": grad_norm} if grad_norm is not None else {})
        state.pending_losses = []
        log.row(row)
    epoch_ends = run.batches_per_epoch is not None and state.batch_in_epoch >= run.batches_per_epoch
    due = (config.eval_every is not None and state.step % config.eval_every == 0) or (
        config.eval_every is None and epoch_ends
    )
    if (val_data is not None or evaluate_fn is not None) and (due or last):
        _evaluate_and_track(run, val_data, evaluate_fn, collate_fn, log)
    if (
        run.checkpoint_dir is not None
        and config.checkpoint_every
        and state.step % config.checkpoint_every == 0
    ):
        _save(run)


def _epoch_float(run: _Run) -> float:
    state = run.progress
    if not run.batches_per_epoch:
        return float(state.epoch)
    return round(state.epoch + min(state.batch_in_epoch / run.batches_per_epoch, 1.0), 4)


def _optimizer_step(run: _Run, window: list[Any]) -> tuple[float, float | None]:
    """Forward/backward over the micro-batches, then clip and step; returns (loss, grad norm)."""
    total = torch.zeros((), device=run.device)
    for index, batch in enumerate(window):
        with D.gradient_sync(run.wrapped, sync=index == len(window) - 1):
            with _autocast(run):
                loss = run.loss_fn(run.wrapped, D.move_to_device(batch, run.device))
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise TypeError(
                    f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                    f"{tuple(getattr(loss, 'shape', ()))}; reduce it with .mean()."
                )
            (loss / len(window)).backward()
        total += loss.detach().float()
    value = (D.all_reduce_sum(total / len(window)) / D.world_size()).item()
    if not math.isfinite(value):
        raise _non_finite(run, "loss", value)
    grad_norm = None
    if run.config.clip_grad_norm is not None:
        params = [p for p in run.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, run.config.clip_grad_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(grad_norm):
            raise _non_finite(run, "gradient norm", grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return value, grad_norm


def _autocast(run: _Run) -> contextlib.AbstractContextManager:
    if run.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=run.device.type, dtype=run.amp_dtype)


def _evaluate_and_track(run: _Run, val_data, evaluate_fn, collate_fn, log: RunLog) -> None:
    config, state = run.config, run.progress
    metrics = _evaluate(run, val_data, evaluate_fn, collate_fn)
    log.row({"step": state.step, "epoch": _epoch_float(run)} | {f"val_{k}": v for k, v in metrics.items()})
    name = config.early_stopping_metric
    if name not in metrics:
        if config.early_stopping_patience is None:
            return
        raise ValueError(
            f"early_stopping_metric {name!r} is not among the evaluation metrics "
            f"{sorted(metrics)}; set it to one of them."
        )
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


def _evaluate(run: _Run, val_data, evaluate_fn, collate_fn) -> dict[str, float]:
    """Returns rank 0's metrics on every rank; training RNG streams are left untouched."""
    target = D.unwrap_model(run.wrapped)
    target.eval()
    saved_rng = ckpt.capture_rng(run.device)
    try:
        if evaluate_fn is not None:
            metrics = {k: float(v) for k, v in evaluate_fn(target).items()}
        else:
            metrics = {"loss": _validation_loss(run, target, val_data, collate_fn)}
    finally:
        ckpt.restore_rng(saved_rng, run.device)
        target.train()
    return D.broadcast_from_main(metrics)


@torch.no_grad()
def _validation_loss(run: _Run, model: nn.Module, val_data, collate_fn) -> float:
    if not isinstance(val_data, DataLoader):
        val_data = DataLoader(
            Subset(val_data, D.shard_indices(len(val_data))),
            batch_size=run.config.batch_size,
            collate_fn=collate_fn,
        )
    total, count = 0.0, 0
    for batch in val_data:
        with _autocast(run):
            loss = run.loss_fn(model, D.move_to_device(batch, run.device))
        total += float(loss) * D.batch_size_of(batch)
        count += D.batch_size_of(batch)
    sums = torch.tensor([total, count], dtype=torch.float64, device=run.device)
    total, count = D.all_reduce_sum(sums).tolist()
    return total / max(count, 1)


def _save(run: _Run) -> None:
    """Writes run_dir/checkpoints/last; every rank calls this (FSDP gathers, RNG states gather)."""
    rngs = D.gather_to_all(ckpt.capture_rng(run.device))
    ckpt.save_training_checkpoint(
        run.checkpoint_dir, run.model, run.optimizer, _payload(run), rngs, run.best_state
    )
    D.barrier()
    run.saved_step = run.progress.step


def _payload(run: _Run) -> dict[str, Any]:
    return {
        "progress": asdict(run.progress),
        "scheduler": run.scheduler.state_dict(),
        "world_size": D.world_size(),
        "total_steps": run.total_steps,
    }


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
    return TrainingInterrupted(message, step, directory)


def _non_finite(run: _Run, what: str, value: float) -> NonFiniteLossError:
    step = run.progress.step + 1
    if run.saved_step is not None:
        where = f"the last good checkpoint is at {run.checkpoint_dir} (step {run.saved_step})"
    else:
        where = "no checkpoint was written before it (set checkpoint_every and a run_dir to keep one)"
    lr = run.optimizer.param_groups[0]["lr"]
    message = (
        f"Training stopped: the {what} at step {step} is {value}; {where}. Lower the learning rate "
        f"(lr is {lr:.3g}) or enable clip_grad_norm, then resume with {RESUME_HINT}."
    )
    return NonFiniteLossError(
        message, step, value, run.checkpoint_dir if run.saved_step is not None else None
    )


def _resume(run: _Run) -> None:
    loaded = ckpt.restore_training_checkpoint(
        run.checkpoint_dir, run.model, run.optimizer, run.scheduler, run.device
    )
    if loaded is None:
        logger.warning("resume: no checkpoint at %s, starting from step 0.", run.checkpoint_dir)
        return
    run.progress = _Progress(**loaded.state["progress"])
    run.best_state = loaded.best_model
    run.saved_step = run.progress.step
    if ckpt.rng_for_rank(loaded, D.rank()) is None:
        ckpt.seed_everything(run.seed + D.rank() + 1_000_003 * run.progress.step)


def _result(run: _Run, restored: bool) -> TrainResult:
    state = run.progress
    notes = []
    if state.stopped_early:
        notes.append(f"early stopping after {state.bad_evals} evaluations without improvement")
    if restored:
        notes.append(
            f"restored the best trainable state ({run.config.early_stopping_metric} "
            f"{state.best_metric:.6g} at step {state.best_step})"
        )
    return TrainResult(
        steps=state.step,
        epochs=_epoch_float(run),
        history=list(state.history),
        best_metric=state.best_metric,
        best_step=state.best_step,
        metric_name=run.config.early_stopping_metric,
        stopped_early=state.stopped_early,
        restored_best=restored,
        wall_time_s=state.elapsed_s,
        peak_memory_bytes=D.peak_memory_bytes(run.device),
        samples_per_second=state.samples / state.elapsed_s if state.elapsed_s > 0 else 0.0,
        precision="bf16" if run.amp_dtype is not None else "fp32",
        checkpoint=run.checkpoint_dir if run.saved_step is not None else None,
        notes=notes,
    )


class RunLog:
    """metrics.jsonl rows (appended to progress.history), optional TensorBoard and the tqdm bar."""

    def __init__(self, run_dir: Path | None, state: _Progress, tensorboard: bool, show: bool, total: int):
        self.state = state
        main = D.is_main_process()
        self.path = run_dir / "metrics.jsonl" if run_dir is not None and main else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # The checkpoint's history is the truth: rows logged after it (before a crash) are dropped.
            self.path.write_text("".join(json.dumps(row) + "\n" for row in state.history))
        self.writer = None
        if tensorboard and main and run_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    "tensorboard: true needs the tensorboard package; pip install tensorboard "
                    "or set tensorboard: false."
                ) from error
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.bar = tqdm(
            total=total,
            initial=state.step,
            disable=not (show and main),
            unit="step",
            desc="train",
            dynamic_ncols=True,
        )

    def step(self, loss: float, lr: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}", refresh=False)

    def row(self, row: dict[str, Any]) -> None:
        self.state.history.append(row)
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key not in {"step", "epoch"}:
                    self.writer.add_scalar(
                        key if key.startswith("val_") else f"train_{key}", value, row["step"]
                    )

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
