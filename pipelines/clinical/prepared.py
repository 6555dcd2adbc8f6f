"""The notes as the stages read them: the recipe's notes and splits, the caps after the engine's low-data
draw, and the tokenised datasets (a classification set per split, packed causal-LM blocks per block
length, the held-out blocks of the perplexity), each with the cached layers' outputs when the backbone
caches some (see ``backbone.options.cached_layers``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.clinical.data import Notes, mtsamples_task, split_notes, stratified_subset
from pipelines.clinical.model import ClinicalModel
from pipelines.clinical.notes_file import load_notes_file
from pipelines.clinical.options import DataOptions
from pipelines.clinical.stages import StageError, classification_data, lm_data, stage_options
from pipelines.clinical.tokens import ClassificationSet, LMBlocks

__all__ = [
    "load_recipe_notes",
    "recipe_splits",
    "capped_splits",
    "dataset_info",
    "describe_notes",
    "validates",
    "lm_stages",
    "lm_key",
    "classification_sets",
    "lm_sets",
    "held_out_blocks",
]


def load_recipe_notes(pipe: Any) -> Notes:
    """Read the recipe's dataset: MTSamples (``data.options.task_name``) or a notes file."""
    recipe, data = pipe.recipe, pipe.options.data
    if recipe.data.dataset == "mtsamples":
        notes = mtsamples_task(data.task_name, num_classes=data.num_classes)
    else:
        notes = load_notes_file(recipe.data.dataset, task=recipe.data.task, **pipe.columns)
    if notes.task != pipe.task:
        raise StageError(
            f"data.task is '{recipe.data.task or 'unset (binary)'}' but the notes make a {notes.task} task "
            f"({recipe.data.dataset}, {data.task_name}); set data.task: {notes.task}"
        )
    return notes


def recipe_splits(notes: Notes, recipe: Any, data: DataOptions) -> dict[str, np.ndarray]:
    """The seeded stratified splits of ``data.options.split``; refuses a split without training or test
    notes, and ``data.shots_per_class`` on a multilabel task."""
    full = split_notes(notes, data.split, seed=recipe.seed)
    for name in ("train", "test"):
        if name not in full or len(full[name]) == 0:
            raise StageError(f"data.options.split gives no '{name}' notes; give it a positive fraction")
    if recipe.data.shots_per_class is not None and notes.task == "multilabel":
        raise StageError("data.shots_per_class is for binary and multiclass tasks; use data.fraction")
    return full


def capped_splits(
    notes: Notes, full: dict[str, np.ndarray], indices: list[int], data: DataOptions, seed: int
) -> dict[str, np.ndarray]:
    """The training notes the engine drew (``indices`` into ``full["train"]``), then the stratified caps
    of each split (``max_train``, ``max_test``, ``max_val``)."""
    train = full["train"][np.asarray(indices, dtype=np.int64)]
    used = {
        "train": stratified_subset(train, notes, data.max_train, seed),
        "test": stratified_subset(full["test"], notes, data.max_test, seed),
    }
    if "val" in full and len(full["val"]):
        used["val"] = stratified_subset(full["val"], notes, data.max_val, seed)
    return used


def dataset_info(recipe: Any, data: DataOptions, notes: Notes, full: dict[str, np.ndarray]) -> dict[str, Any]:
    """The report's ``dataset`` entry before the draw: name, task, classes, source and the full splits."""
    return {
        "name": recipe.data.dataset,
        "task_name": data.task_name if recipe.data.dataset == "mtsamples" else None,
        "class_names": notes.class_names, **notes.source,
        "full_splits": {k: int(len(v)) for k, v in full.items()}, "splits_file": "splits.json",
    }  # fmt: skip


def describe_notes(notes: Notes, splits: dict[str, np.ndarray]) -> dict[str, Any]:
    """Counts of a dataset for the report: splits, classes per split, drops; no text."""
    return {
        "splits": {name: int(len(idx)) for name, idx in splits.items()},
        "classes": {name: notes.subset(idx).class_counts() for name, idx in splits.items()},
        "counts": dict(notes.counts),
    }


def validates(stages: list[Any]) -> bool:
    """Whether any stage reads the validation split (eval_every or early stopping)."""
    return any(s.train.early_stopping_patience or s.train.eval_every for s in stages)


def lm_stages(stages: list[Any]) -> list[Any]:
    """The causal-LM stages, in order."""
    return [s for s in stages if s.objective == "causal_lm"]


def classification_sets(
    model: ClinicalModel, tokenizer: Any, splits: dict[str, Notes | None], max_length: int, batch_size: int
) -> dict[str, ClassificationSet]:
    """A classification set of each split that has notes (None: the split is not needed)."""
    return {
        name: classification_data(model, tokenizer, notes, max_length, batch_size)
        for name, notes in splits.items()
        if notes is not None
    }


def lm_key(stage: Any) -> tuple[int, int | None]:
    """The key of a causal-LM stage's blocks in :func:`lm_sets`: its block length and its cap."""
    options = stage_options(stage)
    return options.max_length, options.max_blocks


def lm_sets(
    model: ClinicalModel, tokenizer: Any, texts: list[str], stages: list[Any], batch_size: int
) -> dict[tuple[int, int | None], LMBlocks]:
    """Packed blocks of ``texts`` for each causal-LM stage's (block length, ``max_blocks``), in stage order,
    only as many as that stage reads (stages with the same pair share one set)."""
    sets: dict[tuple[int, int | None], LMBlocks] = {}
    for stage in lm_stages(stages):
        key = lm_key(stage)
        if key not in sets:
            sets[key] = lm_data(model, tokenizer, texts, key[0], key[1], batch_size)
    return sets


def held_out_blocks(model: ClinicalModel, tokenizer: Any, texts: list[str], stages: list[Any]) -> LMBlocks:
    """The perplexity's blocks of held-out ``texts``: the first causal-LM stage's block length, as many
    blocks as its ``eval_blocks``."""
    first = stage_options(lm_stages(stages)[0])
    return lm_data(model, tokenizer, texts, first.max_length, first.eval_blocks)
