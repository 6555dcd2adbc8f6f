"""What a protein report says beside its scores: the backbone's weights, the data's provenance and issues."""

from __future__ import annotations

__all__ = ["report_notes"]


def report_notes(provenance: dict, dataset_info: dict, level: str) -> list[str]:
    """The notes of a protein report (``dataset_info``: what ``datasets.load_splits`` returned)."""
    notes = []
    if provenance.get("pretrained") is False:
        arch = provenance.get("architecture", {})
        notes.append(
            f"The backbone is a randomly initialised ESM-2 architecture ({arch.get('num_layers')} layers, "
            f"{arch.get('embed_dim')} wide; seed {provenance.get('init_seed')}), NOT pretrained weights: no "
            "protein language model weights are available offline. Its numbers show the pipeline works, "
            "not what ESM-2 can do; expect the one-hot baseline to be strong."
        )
    else:
        notes.append(f"Backbone weights: {provenance.get('weights')}.")
    if dataset_info.get("recipe_dataset"):
        notes.append(
            f"The data is the user's file {dataset_info['name']} (data.options.path), not the recipe's "
            f"data.dataset '{dataset_info['recipe_dataset']}'."
        )
    for split, how in (dataset_info.get("cut") or {}).items():
        notes.append(f"The data has no {split} split, so the pipeline cut one: {how}.")
    if dataset_info.get("cut"):
        notes.append("The record ids of each split are in splits.json in the run folder.")
    counts = dataset_info["issues"]
    if counts["cropped"]:
        notes.append(
            f"{counts['cropped']} sequences were cropped to their first {dataset_info['residue_limit']} "
            "residues (data.options.long_sequences: crop)."
        )
    if counts["skipped_total"]:
        notes.append(f"{counts['skipped_total']} records were skipped: {counts['skipped']}.")
    if counts["duplicate_ids"]:
        notes.append(
            f"The split file lists {counts['duplicate_ids']} protein IDs more than once (kept as published)."
        )
    if level == "residue":
        notes.append(
            "Per-residue intervals in the table resample residues as if independent; "
            "extra.protein_level_interval resamples whole proteins (wider, more honest)."
        )
    return notes
