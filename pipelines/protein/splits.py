"""Cutting protein records into train/valid/test: published splits, automatic seeded cuts, caps, the
residue limit, the class checks of classification tasks, and the ``splits.json`` a run writes.

A file without splits (a CSV without its split column, a FASTA without ``SET=`` fields) is cut
automatically: ``test_fraction`` of all records to test, then ``valid_fraction`` of the rest to valid;
seeded by the recipe's seed and, for per-sequence classification, stratified by class (each class with
at least two records gives at least one to the held-out part and keeps at least one).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipelines.protein.data import (
    ACCEPTED_SPLITS,
    IGNORE_INDEX,
    SPLIT_NAMES,
    DataIssues,
    ProteinDataError,
    ProteinRecord,
)

__all__ = ["split_records", "limit_length", "cap_records", "hold_out", "check_classes", "write_splits"]


def split_records(records: list[ProteinRecord]) -> dict[str, list[ProteinRecord]]:
    """Group records by split (``train``, ``valid``, ``test``; records without a split are train).

    Split values are read as in files (``val`` is ``valid``, any case); any other value is an error.
    """
    groups: dict[str, list[ProteinRecord]] = {"train": [], "valid": [], "test": []}
    unknown: Counter = Counter()
    for record in records:
        split = "train" if record.split is None else SPLIT_NAMES.get(record.split.strip().lower())
        if split is None:
            unknown[record.split] += 1
        else:
            groups[split].append(record if record.split == split else replace(record, split=split))
    if unknown:
        values = ", ".join(f"{value!r} ({n})" for value, n in unknown.most_common())
        raise ProteinDataError(f"records have split value(s) {values}; accepted: {ACCEPTED_SPLITS}")
    return groups


def limit_length(
    records: list[ProteinRecord],
    max_residues: int,
    policy: Literal["crop", "refuse", "skip"] = "refuse",
    issues: DataIssues | None = None,
) -> list[ProteinRecord]:
    """Apply the residue limit: crop to the first ``max_residues``, refuse (error), or skip (counted)."""
    kept = []
    for record in records:
        if len(record.sequence) <= max_residues:
            kept.append(record)
        elif policy == "refuse":
            raise ProteinDataError(
                f"record '{record.id}' has {len(record.sequence)} residues, more than the limit of "
                f"{max_residues}; set long_sequences: crop or skip in the recipe, or drop the record"
            )
        elif policy == "skip":
            if issues is not None:
                issues.skip("longer than max_residues", record.id)
        else:
            labels = record.residue_labels[:max_residues] if record.residue_labels is not None else None
            kept.append(replace(record, sequence=record.sequence[:max_residues], residue_labels=labels))
            if issues is not None:
                issues.cropped += 1
    return kept


def cap_records(records: list[ProteinRecord], cap: int | None, seed: int) -> list[ProteinRecord]:
    """A seeded draw of at most ``cap`` records, in their original order (all when ``cap`` is None)."""
    if cap is None or len(records) <= cap:
        return records
    keep = np.sort(np.random.default_rng(seed).choice(len(records), size=cap, replace=False))
    return [records[i] for i in keep]


def hold_out(
    records: list[ProteinRecord], fraction: float, seed: int, stratify: bool = False
) -> tuple[list[ProteinRecord], list[ProteinRecord]]:
    """``(kept, held)``: a seeded share of the records held out, both in their original order.

    Without ``stratify``: ``max(1, round(fraction * n))`` records. With it (per-sequence classes): per
    class ``round(fraction * n_class)``, at least 1 and at most ``n_class - 1``; a class of one stays.
    """
    rng = np.random.default_rng(seed)
    if not stratify:
        order = rng.permutation(len(records))
        held = set(order[: max(1, int(round(fraction * len(order))))].tolist())
    else:
        by_class: dict[float, list[int]] = defaultdict(list)
        for index, record in enumerate(records):
            by_class[record.target].append(index)
        held = set()
        for label in sorted(by_class, key=str):
            members = by_class[label]
            take = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
            held.update(rng.permutation(members)[:take].tolist())
    kept = [r for i, r in enumerate(records) if i not in held]
    return kept, [r for i, r in enumerate(records) if i in held]


def _class_counts(records: list[ProteinRecord], level: str) -> Counter:
    if level == "residue":
        return Counter(label for r in records for label in (r.residue_labels or ()) if label != IGNORE_INDEX)
    return Counter(int(r.target) for r in records if r.target is not None)


def check_classes(
    splits: dict[str, list[ProteinRecord]], task: str, level: str, source: str, num_classes: int | None = None
) -> None:
    """Refuse a classification split that cannot be trained or scored, before any training.

    Per-sequence targets must be class indices (0 and 1 for binary, 0..C-1 for multiclass); the train
    and test splits (those given) must each hold at least two classes.
    """
    if task == "regression":
        return
    limit = 2 if task == "binary" else num_classes
    if level == "sequence":
        bad = [
            r.id for part in splits.values() for r in part
            if r.target is None or r.target != int(r.target) or r.target < 0 or (limit and r.target >= limit)
        ]  # fmt: skip
        if bad:
            shown = ", ".join(f"'{record_id}'" for record_id in bad[:5]) + (", ..." if len(bad) > 5 else "")
            wanted = "0 or 1" if task == "binary" else f"0..{limit - 1}" if limit else "an index 0, 1, ..."
            raise ProteinDataError(
                f"{len(bad)} record(s) of {source} have a target that is not {wanted}, which a {task} task "
                f"needs: {shown}; fix the targets, or use task: regression for continuous values"
            )
    unit = "residues" if level == "residue" else "records"
    for name in ("train", "test"):
        counts = _class_counts(splits.get(name, []), level)
        if name in splits and len(counts) < 2:
            found = ", ".join(f"class {c}: {n} {unit}" for c, n in sorted(counts.items())) or f"no {unit}"
            raise ProteinDataError(
                f"the {name} split of {source} holds one class only ({found}); a {task} task needs at least "
                "two classes in train and in test (AUROC and MCC are undefined with one): change the split, "
                "or its size (data.options.test_fraction, max_train, max_test)"
            )


def write_splits(run_dir: str | Path, splits: dict[str, list[ProteinRecord]], facts: dict[str, Any]) -> Path:
    """Write the record ids of each split, with how they were cut, to ``run_dir/splits.json``."""
    path = Path(run_dir) / "splits.json"
    payload = {
        **facts,
        "sizes": {name: len(records) for name, records in splits.items()},
        "ids": {name: [r.id for r in records] for name, records in splits.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return path
