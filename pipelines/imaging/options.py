"""Recipe options of ``imaging/classification``: backbone, data and per-stage options."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.imaging.backbones import BackboneOptions
from pipelines.imaging.data import TransformOptions

__all__ = ["DataOptions", "StageOptions", "ImagingOptions"]


class DataOptions(BaseModel):
    """The recipe's ``data.options``."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None, description="An .npz, a folder of class sub-folders or a CSV; overrides dataset."
    )
    spatial_dims: Literal[2, 3] | None = Field(None, description="2D or 3D images; default: the backbone's.")
    transforms: TransformOptions = Field(default_factory=TransformOptions, description="MONAI transforms.")
    max_train: int | None = Field(
        None, ge=1, description="Stratified cap on training images (after fraction)."
    )
    max_val: int | None = Field(None, ge=2, description="Stratified cap on validation images.")
    max_test: int | None = Field(
        None, ge=2, description="Stratified cap on test images (null: the full split)."
    )
    eval_batch_size: int = Field(128, ge=1, description="Batch size for validation and test predictions.")
    sweep_fractions: list[float] | None = Field(
        None, description="Training-set fractions to repeat every model at (low-data sweep); null: no sweep."
    )


class StageOptions(BaseModel):
    """The recipe's ``stages[i].options``."""

    model_config = ConfigDict(extra="forbid")

    head_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before the classification head.")
    full_finetune_lr_scale: float = Field(
        0.1, gt=0, description="The full_finetune baseline trains at this times the stage's lr."
    )
    linear_probe_lr_scale: float = Field(1.0, gt=0, description="The linear_probe baseline's lr factor.")
    update_batchnorm_stats: bool = Field(
        False,
        description="Let BatchNorm layers that are tuned (full fine-tuning, NormTuning) update their running "
        "statistics; off: every BatchNorm keeps its pretrained statistics (safer for short runs).",
    )
    checkpoint_baselines: bool = Field(
        False, description="Write training checkpoints for baselines too (full fine-tuning: ~4x the model)."
    )


class ImagingOptions(BaseModel):
    """Options of ``imaging/classification`` (validated from the recipe's options sections)."""

    model_config = ConfigDict(extra="forbid")

    backbone: BackboneOptions = Field(default_factory=BackboneOptions, description="backbone.options")
    data: DataOptions = Field(default_factory=DataOptions, description="data.options")
    stages: list[StageOptions] = Field(default_factory=list, description="stages[i].options")

    def for_stage(self, stages: list[Any], stage: Any) -> StageOptions:
        """The options of ``stage``, one of the recipe's ``stages``; a baseline's (a stage not among them)
        are those of the last stage, whose budget it trains on."""
        index = next((i for i, given in enumerate(stages) if given is stage), len(stages) - 1)
        return self.stages[index] if index < len(self.stages) else StageOptions()
