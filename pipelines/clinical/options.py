"""The recipe options of ``clinical/two_stage`` (``backbone.options``, ``data.options``,
``stages[i].options``), validated by pydantic with ``extra="forbid"``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BackboneOptions", "DataOptions", "StageOptions", "ClinicalOptions"]


class BackboneOptions(BaseModel):
    """The recipe's ``backbone.options``."""

    model_config = ConfigDict(extra="forbid")

    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    cached_layers: int = Field(
        0,
        ge=0,
        description="Bottom decoder layers that hold no adapter: their outputs are computed once per note "
        "and reused by every stage and baseline (exact; saves most of the compute when adapters sit "
        "in the top layers). 0: off.",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Weights dtype for hub ids and folders (bfloat16 halves memory of large models on a GPU; "
        "adapters and the head stay float32).",
    )
    device: str | None = Field(
        None, description="Where the model runs (cpu, cuda, cuda:1); null: cuda when available, else cpu."
    )
    tiny: dict[str, int] = Field(
        default_factory=dict,
        description="Sizes of the tiny-random-llama test backbone (hidden_size, layers, heads, kv_heads).",
    )


class DataOptions(BaseModel):
    """The recipe's ``data.options``."""

    model_config = ConfigDict(extra="forbid")

    task_name: str = Field(
        "cardiopulmonary_vs_rest",
        description="MTSamples task: cardiopulmonary_vs_rest, top_specialties or specialties_multilabel.",
    )
    num_classes: int = Field(5, ge=2, description="Classes of top_specialties / specialties_multilabel.")
    text_column: str = Field("text", description="Notes file: the column holding the note text.")
    label_columns: str | list[str] = Field(
        "label", description="Notes file: one label column, or several 0/1 columns (multilabel)."
    )
    id_column: str | None = Field(
        None, description="Notes file: the column of note ids (default: row number)."
    )
    split: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.7, "val": 0.1, "test": 0.2},
        description="Seeded stratified split fractions (train, val, test).",
    )
    max_train: int | None = Field(None, ge=2, description="Stratified cap on labelled training notes.")
    max_val: int | None = Field(None, ge=2, description="Stratified cap on validation notes.")
    max_test: int | None = Field(None, ge=2, description="Stratified cap on test notes (null: whole split).")
    eval_batch_size: int = Field(16, ge=1, description="Batch size for predictions and perplexity.")


class StageOptions(BaseModel):
    """The recipe's ``stages[i].options``; which fields apply depends on the stage's objective."""

    model_config = ConfigDict(extra="forbid")

    max_length: int = Field(
        512,
        ge=2,
        description="causal_lm: tokens per packed block; classification: tokens kept from the start of "
        "each note.",
    )
    max_blocks: int | None = Field(
        None, ge=1, description="causal_lm: cap on training blocks (from the training split's notes)."
    )
    eval_blocks: int = Field(
        64, ge=0, description="causal_lm: held-out blocks (from the test split's notes) for perplexity."
    )
    pooling: Literal["last", "mean"] = Field(
        "last", description="classification: pool the last real token's state or the mean over tokens."
    )
    class_weights: bool = Field(False, description="classification: weight the loss against imbalance.")


class ClinicalOptions(BaseModel):
    """Options of ``clinical/two_stage``."""

    model_config = ConfigDict(extra="forbid")

    backbone: BackboneOptions = Field(default_factory=BackboneOptions, description="backbone.options")
    data: DataOptions = Field(default_factory=DataOptions, description="data.options")
    stages: list[StageOptions] = Field(default_factory=list, description="stages[i].options")


def as_model(model: type[BaseModel], value: Any) -> BaseModel:
    """Return ``value`` validated as ``model`` (None gives the defaults)."""
    if isinstance(value, model):
        return value
    return model.model_validate(dict(value or {}))
