"""How a protein recipe's stages train, as the engine's stage plans: a masked-LM stage and the task stage.

A ``masked_lm`` stage (evotuning) trains its adapter on BERT-style masked residues of the training
sequences, or of the FASTA in its ``sequences_path`` (held to the residue limit as ``data.options``
``long_sequences`` says, like the task's records); the report gives the validation perplexity before and
after it (fixed masks, :func:`pipelines.protein.metrics.masked_lm_perplexity`). The task stage trains its
adapter and the head on the task loss, with the task's validation metrics when there is a validation split.
"""

from __future__ import annotations

from typing import Any

from pipelines.core.experiment import StagePlan
from pipelines.protein.adapters import HEAD
from pipelines.protein.batching import MaskedLMCollator, ProteinDataset, TaskCollator
from pipelines.protein.data import DataIssues, ProteinRecord, read_fasta_records
from pipelines.protein.datasets import DataOptions
from pipelines.protein.metrics import masked_lm_perplexity
from pipelines.protein.model import ProteinModel
from pipelines.protein.options import StageOptions
from pipelines.protein.splits import limit_length

__all__ = ["masked_lm_stage", "task_stage"]


def masked_lm_stage(
    model: ProteinModel,
    name: str,
    spec: Any,
    options: StageOptions,
    splits: dict[str, list],
    data: DataOptions,
    limit: int | None = None,
) -> tuple[StagePlan, dict[str, Any]]:
    """The plan of the masked-LM stage ``name`` (``spec``: its resolved adapter; ``options``: the stage's,
    ``data``: the recipe's data options; ``limit``: the residue limit the FASTA of ``sequences_path`` is
    held to, by ``data.long_sequences``) and its report facts.

    Returns:
        (the plan, {objective, sequences, valid_perplexity_before, mask_probability and, with
        ``sequences_path``, sequences_issues: its records skipped or cropped}); the perplexity after
        training is the caller's to add.
    """
    if spec is None:
        raise ValueError(f"the masked_lm stage '{name}' needs an adapter (e.g. LoRA) to train")
    sequences, issues = splits["train"], None
    if options.sequences_path:
        issues = DataIssues()
        sequences = read_fasta_records(options.sequences_path, data.on_invalid, issues)
        if limit is not None:
            sequences = limit_length(sequences, limit, data.long_sequences, issues)
    valid, probability = splits["valid"], options.mask_probability
    facts = {
        "objective": "masked_lm", "sequences": len(sequences),
        "valid_perplexity_before": masked_lm_perplexity(model, valid, probability),
        "mask_probability": probability,
    }  # fmt: skip
    if issues is not None:
        facts["sequences_issues"] = issues.as_dict()
    plan = StagePlan(
        ProteinDataset(sequences), lambda m, batch: m.masked_lm_loss(batch), spec,
        collate_fn=MaskedLMCollator(model.vocabulary, probability),
        val_data=ProteinDataset(valid) if valid else None,
    )  # fmt: skip
    return plan, facts


def task_stage(
    model: ProteinModel, spec: Any, train: list[ProteinRecord], model_task: str, evaluate_fn: Any = None
) -> StagePlan:
    """The plan of the task stage: ``spec`` (None: the head alone) and the head on ``train``'s task loss
    (``model_task``: the head's task, ``residue`` for per-residue labels), ``evaluate_fn`` on validation."""
    return StagePlan(
        ProteinDataset(train), lambda m, batch: m.loss(batch), spec, extra_trainable=[HEAD],
        collate_fn=TaskCollator(model.vocabulary, model_task), evaluate_fn=evaluate_fn,
    )  # fmt: skip
