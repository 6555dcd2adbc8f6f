"""The training loop's settings (a recipe's `train:` section), its callbacks, its result and its errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainConfig(BaseModel):
    """Training settings: the `stages[i].train` section of a recipe."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(1, ge=1, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimiser steps to run; overrides epochs.")
    batch_size: int = Field(8, ge=1, description="Samples per micro-batch per process.")
    grad_accum: int = Field(
        1, ge=1, description="Micro-batches per optimiser step; global batch = batch_size x processes x this."
    )
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay, on 2+ dim parameters only.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Optimiser.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (unused by adamw).")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warmup, per optimiser step, to 0 at the last step."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps with linear warmup.")
    clip_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null: off.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Compute dtype. auto: bf16 autocast on CUDA, float32 elsewhere; bf16: bf16 "
        "autocast on any device (CPU included); fp32: float32, no autocast.",
    )
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Dtype of the frozen weights of Linear, convolution and embedding layers. auto: "
        "bfloat16 when the compute is bf16 (cast once, in place: half the memory of a frozen backbone), "
        "else float32; float32 keeps them float32 under bf16 autocast. Trainable parameters, adapters and "
        "norms stay float32 either way; bfloat16 needs bf16 compute.",
    )
    eval_every: int | None = Field(None, ge=1, description="Evaluate every N steps; null: at each epoch end.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after N evaluations without improvement; restore the best state."
    )
    early_stopping_metric: str = Field("loss", description="Evaluation metric to watch (loss: val loss).")
    early_stopping_mode: Literal["min", "max"] = Field(
        "min", description="Whether a lower (min) or higher (max) metric is better."
    )
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as better.")
    checkpoint_every: int | None = Field(None, ge=1, description="Checkpoint every N steps (and at the end).")
    log_every: int = Field(10, ge=1, description="Write a metrics.jsonl row every N steps (mean loss).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="Model wrapping under torchrun (auto: ddp); unused in a single process."
    )
    tensorboard: bool = Field(False, description="Also log to run_dir/tensorboard (needs tensorboard).")
    device: str | None = Field(
        None, description="Device to train on; null: the model's (cuda:LOCAL_RANK under torchrun)."
    )

    @model_validator(mode="after")
    def _frozen_dtype_needs_bf16(self) -> TrainConfig:
        if self.frozen_dtype == "bfloat16" and self.precision == "fp32":
            raise ValueError(
                "frozen_dtype bfloat16 needs bf16 compute; set precision: bf16 (or auto on CUDA)."
            )
        return self

    @model_validator(mode="after")
    def _no_unread_settings(self) -> TrainConfig:
        """momentum changed from its default under an optimiser that does not read it is refused, not
        ignored. (The early-stopping metric, mode and min_delta are read without patience too: they pick the
        best evaluation, reported as each stage's ``best``.)"""
        if self.optimizer != "sgd" and self.momentum != 0.9:
            raise ValueError(f"momentum is SGD's; optimizer {self.optimizer} does not read it: remove it")
        return self


class TrainCallback:
    """Hooks into `train`'s loop. Each method here does nothing; a callback overrides (or just defines) some.

    `step` counts optimiser steps from 0: the step being taken. The model is the plain module (under DDP too).
    """

    def on_train_begin(self, model: Any, total_steps: int) -> None:
        """Before the first step (after a resume too), with the run's total optimiser steps."""

    def extra_loss(self, model: Any) -> Any:
        """A scalar tensor added to each micro-batch's loss before backward (outside autocast), or None."""
        return None

    def on_after_backward(self, model: Any, step: int) -> None:
        """After the step's last backward, before clipping: the gradients are complete."""

    def on_step_end(self, model: Any, step: int) -> None:
        """After the optimiser and scheduler step, before the gradients are zeroed."""


@dataclass
class TrainResult:
    """What `train` did. history holds the metrics.jsonl rows (train rows and `val_*` rows);
    precision_policy is what `core.precision.apply_precision_policy` reported for the run."""

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
    precision_policy: dict[str, Any] = field(default_factory=dict)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; a checkpoint was written and the message says how to resume.

    A KeyboardInterrupt, so that a caller's `except Exception` (a demo that goes on to the next domain,
    a pipeline that reports a failed baseline) does not swallow the user's Ctrl-C.
    """

    def __init__(self, message: str, step: int, checkpoint: Path | None, total_steps: int | None = None):
        super().__init__(message)
        self.step, self.checkpoint, self.total_steps = step, checkpoint, total_steps


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; the last good checkpoint is kept."""

    def __init__(self, message: str, step: int, loss: float, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.loss, self.checkpoint = step, loss, checkpoint


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written (disk full) or read (damaged files); the message names the path."""
