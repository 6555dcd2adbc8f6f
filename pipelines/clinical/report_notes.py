"""The report's notes on a clinical run: what each causal-LM stage did to held-out perplexity, how the
perplexity was measured, what the notes files dropped or merged, and the backbone's test weights and
cached layers. Counts only: no note text goes into a report."""

from __future__ import annotations

from typing import Any

from pipelines.clinical.data import Notes
from pipelines.clinical.tokens import LMBlocks

__all__ = ["perplexity_change_note", "run_notes", "dataset_notes"]


def perplexity_change_note(stage: str, before: dict, after: dict, change: dict) -> str:
    """A causal-LM stage's held-out perplexity before and after it, with the paired change in NLL."""
    return (
        f"Stage '{stage}' changed held-out perplexity from {before['value']:.2f} to "
        f"{after['value']:.2f} (x{change['ratio']:.3f}; paired change in NLL {change['value']:+.4f} "
        f"[{change['low']:+.4f}, {change['high']:+.4f}] nats/token over the same blocks)."
    )


def run_notes(
    notes: Notes,
    backbone_info: dict[str, Any],
    cached_layers: int,
    held_out: LMBlocks | None,
    lm_sets: dict[tuple[int, int | None], LMBlocks],
) -> list[str]:
    """The notes of a run: the perplexity's ``held_out`` blocks and the first causal-LM stage's training
    blocks (``lm_sets``: (block length, max_blocks) -> blocks in stage order; none without a causal-LM
    stage), the dataset's drops, a random backbone, cached layers."""
    out = []
    if held_out is not None:
        blocks, length = held_out.blocks.shape
        trained = next(iter(lm_sets.values())).blocks.shape[0]
        out.append(
            f"Perplexity: {blocks} held-out blocks of {length} tokens packed from test-split notes (never "
            f"trained on); stage 1 trained on {trained} blocks from training-split "
            "notes."
        )
    out += dataset_notes(notes)
    if backbone_info.get("source") == "random":
        out.append("The backbone has random weights (a test model): the numbers say nothing clinical.")
    if cached_layers:
        out.append(
            f"The bottom {cached_layers} decoder layers hold no adapter; their outputs were computed once "
            "per note and reused by every stage and baseline (exact)."
        )
    return out


def dataset_notes(notes: Notes) -> list[str]:
    """What reading the notes dropped or merged (empty notes, repeated rows, notes without one class)."""
    counts = notes.counts
    out = []
    if counts.get("empty_dropped"):
        out.append(f"{counts['empty_dropped']} empty notes were dropped.")
    if counts.get("duplicate_rows_merged"):
        out.append(
            f"{counts['duplicate_rows_merged']} rows repeat another row's transcription (MTSamples files "
            "most reports under a specialty and a document type); they were merged into one note with all "
            "its labels, so no note is in two splits."
        )
    dropped = counts.get("no_class_dropped", 0) + counts.get("several_classes_dropped", 0)
    if dropped:
        out.append(f"{dropped} notes with none or several of the classes were dropped (multiclass).")
    return out
