"""Recipe options of the protein pipelines: backbone, data and per-stage options."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.protein.datasets import DataOptions

__all__ = ["BackboneOptions", "StageOptions", "ProteinOptions"]


class BackboneOptions(BaseModel):
    """The recipe's ``backbone.options``."""

    model_config = ConfigDict(extra="forbid")

    max_residues: int | None = Field(None, ge=1, description="Residue limit of the model (default 1022).")
    checkpoint_dir: str | None = Field(None, description="Folder with fair-esm <name>.pt files.")
    seed: int | None = Field(None, ge=0, description="Initialisation seed of a random backbone (default 0).")
    num_layers: int | None = Field(None, ge=1, description="Random backbone: transformer layers.")
    embed_dim: int | None = Field(None, ge=8, description="Random backbone: embedding size.")
    attention_heads: int | None = Field(None, ge=1, description="Random backbone: attention heads.")


class StageOptions(BaseModel):
    """The recipe's ``stages[i].options``."""

    model_config = ConfigDict(extra="forbid")

    last_n_layers: int | None = Field(None, ge=1, description="Adapt only the last N transformer layers.")
    pooling: Literal["mean", "bos"] = Field(
        "mean", description="Per-sequence pooling: mean or BOS/CLS token."
    )
    mask_probability: float = Field(0.15, gt=0, lt=1, description="masked_lm: fraction of residues masked.")
    sequences_path: str | None = Field(
        None, description="masked_lm: FASTA of family sequences (default: the task's training sequences)."
    )


class ProteinOptions(BaseModel):
    """Options of the protein pipelines (validated from the recipe's options sections)."""

    model_config = ConfigDict(extra="forbid")

    backbone: BackboneOptions = Field(default_factory=BackboneOptions, description="backbone.options")
    data: DataOptions = Field(default_factory=DataOptions, description="data.options")
    stages: list[StageOptions] = Field(default_factory=list, description="stages[i].options")

    def for_stage(self, index: int, recipe_stages: int) -> StageOptions:
        """The options of stage ``index`` of a recipe of ``recipe_stages`` stages (a later index, a compare
        entry's stage: the last stage's); the defaults unless every stage has options."""
        index = min(index, recipe_stages - 1)
        return self.stages[index] if len(self.stages) == recipe_stages else StageOptions()
