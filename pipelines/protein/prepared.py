"""A protein recipe's splits made ready to train: read, cut and checked, then the training split the
engine's low-data draw kept, capped (``data.options.max_train``) and held to the residue limit.

:func:`prepare_splits` reads the whole training split (the draw comes first, so the residue limit's counts
are those of the records used); :meth:`PreparedSplits.keep_training` applies the draw, the cap and the limit,
checks the classes again and writes ``splits.json`` (the record ids of each split) to the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.protein.data import DataIssues, ProteinRecord
from pipelines.protein.datasets import DataOptions, load_splits, residue_classes
from pipelines.protein.splits import cap_records, check_classes, limit_length, write_splits

__all__ = ["PreparedSplits", "prepare_splits"]


@dataclass
class PreparedSplits:
    """The splits and what the report says of them.

    Attributes:
        splits: ``train``, ``valid`` and ``test`` records.
        info: The report's ``dataset`` entry (``datasets.load_splits``' info; sizes and issues kept current).
        issues: Records skipped or cropped so far.
        task, level: The task (regression, binary, multiclass) and ``sequence`` or ``residue``.
        num_classes: Classes of a classification task when known (given, or the residue dataset's).
        stratified: Per-sequence classification: held-out splits and low-data draws keep class shares.
    """

    splits: dict[str, list[ProteinRecord]]
    info: dict[str, Any]
    issues: DataIssues
    task: str
    level: str
    num_classes: int | None
    stratified: bool

    def train_labels(self) -> list[Any] | None:
        """Each training record's class, or None where the draw is not stratified."""
        return [record.target for record in self.splits["train"]] if self.stratified else None

    def keep_training(self, indices: list[int], options: DataOptions, seed: int, run_dir: Path) -> None:
        """Train on the records at ``indices`` only: capped, held to the residue limit and class-checked."""
        train = cap_records([self.splits["train"][i] for i in indices], options.max_train, seed)
        limit = self.info["residue_limit"]
        self.splits["train"] = limit_length(train, limit, options.long_sequences, self.issues)
        check_classes(
            {"train": self.splits["train"]}, self.task, self.level, self.info["name"], self.num_classes
        )
        self.info.update(issues=self.issues.as_dict(), sizes={k: len(v) for k, v in self.splits.items()})
        facts = {"source": self.info["name"], "seed": seed, "cut": self.info["cut"]}
        write_splits(run_dir, self.splits, facts)
        self.info["splits_file"] = "splits.json"


def prepare_splits(
    dataset: str, options: DataOptions, task: str, level: str, max_residues: int, seed: int,
    num_classes: int | None,
) -> PreparedSplits:  # fmt: skip
    """Read ``dataset`` (``options``: the recipe's data options) and cut and check its splits, the training
    split whole (:meth:`PreparedSplits.keep_training` caps it)."""
    uncapped = options.model_copy(update={"max_train": None})
    stratified = task != "regression" and level == "sequence"
    splits, info, issues = load_splits(
        dataset, uncapped, level, max_residues, seed=seed, limit_train=False, stratify=stratified
    )
    if level == "residue" and num_classes is None:
        num_classes = residue_classes(dataset, options)
    check_classes(splits, task, level, info["name"], num_classes)
    return PreparedSplits(splits, info, issues, task, level, num_classes, stratified)
