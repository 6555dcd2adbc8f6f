"""Clinical notes: the MTSamples dataset and its tasks, seeded stratified splits (ids only on disk) and
class weights; the user's own notes files are read by :mod:`pipelines.clinical.notes_file`.

Privacy: nothing here puts note text into a message, a repr or a file; only ids, column names and counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipelines.core.data import DatasetInfo, dataset_file, register_dataset

__all__ = [
    "MTSAMPLES",
    "MTSAMPLES_FILE",
    "MTSAMPLES_TASKS",
    "DOCUMENT_TYPES",
    "NotesError",
    "Notes",
    "load_mtsamples",
    "mtsamples_task",
    "split_notes",
    "stratified_subset",
    "write_splits",
    "read_splits",
    "class_weights",
]

MTSAMPLES_FILE = "mtsamples/mtsamples.csv.gz"
MTSAMPLES = register_dataset(
    DatasetInfo(
        name="mtsamples",
        files={MTSAMPLES_FILE: "54a8e65bdb9bc94776e839f5a501bed87adec0242025bdbdfac0e56a7bdd3a1d"},
        card="mtsamples",
        license="CC0-1.0",
        description="MTSamples: 4,999 transcribed medical reports in 40 specialties (from mtsamples.com)",
        homepage="https://github.com/kdpsingh/clinspacy (data/mtsamples.rda, written out as CSV + gzip) or "
        "https://www.kaggle.com/datasets/tboyle10/medicaltranscriptions",
    )
)
MTSAMPLES_TASKS = ("cardiopulmonary_vs_rest", "top_specialties", "specialties_multilabel")
CARDIOPULMONARY = "Cardiovascular / Pulmonary"
# MTSamples files most reports twice: under a clinical specialty and under a document type. Classes
# for the multiclass task are chosen among the specialties, not these.
DOCUMENT_TYPES = (
    "Surgery",
    "Consult - History and Phy.",
    "Radiology",
    "SOAP / Chart / Progress Notes",
    "Discharge Summary",
    "Office Notes",
    "Letters",
    "Emergency Room Reports",
    "IME-QME-Work Comp etc.",
    "General Medicine",
)
TaskType = Literal["binary", "multiclass", "multilabel"]


class NotesError(ValueError):
    """Notes or their labels are unusable as given."""


@dataclass
class Notes:
    """Labelled notes for one task.

    Attributes:
        ids: One string id per note.
        texts: The note texts (never printed: the repr shows counts only).
        labels: ``(n,)`` ints for binary / multiclass, ``(n, k)`` 0/1 ints for multilabel.
        task: ``binary``, ``multiclass`` or ``multilabel``.
        class_names: One name per class (binary: ``[negative, positive]``) or per label.
        counts: What was read, dropped and merged, for the report.
        source: Dataset name, file and sha256 where known.
    """

    ids: list[str]
    texts: list[str]
    labels: np.ndarray
    task: TaskType
    class_names: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.texts) == len(self.labels)):
            raise NotesError(
                f"notes have {len(self.ids)} ids, {len(self.texts)} texts and {len(self.labels)} labels; "
                "give one of each per note"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"Notes(n={len(self)}, task={self.task!r}, classes={self.class_names!r}, counts={self.counts!r})"
        )

    def subset(self, indices: np.ndarray | list[int]) -> Notes:
        """Return the notes at ``indices`` (same task, classes and source)."""
        indices = np.asarray(indices, dtype=np.int64)
        return Notes(
            ids=[self.ids[i] for i in indices],
            texts=[self.texts[i] for i in indices],
            labels=self.labels[indices],
            task=self.task,
            class_names=list(self.class_names),
            counts=dict(self.counts),
            source=dict(self.source),
        )

    def class_counts(self) -> dict[str, int]:
        """Return the number of notes (positives for multilabel) per class."""
        if self.task == "multilabel":
            return {name: int(self.labels[:, k].sum()) for k, name in enumerate(self.class_names)}
        return {name: int((self.labels == k).sum()) for k, name in enumerate(self.class_names)}


def load_mtsamples() -> tuple[Any, dict[str, int]]:
    """Read MTSamples and merge rows that share one transcription.

    Returns:
        A DataFrame with one row per distinct non-empty transcription: ``note_id`` (smallest id of its
        rows, as a string), ``text`` and ``specialties`` (sorted tuple), plus counts (rows, empty rows
        dropped, duplicate rows merged, notes).
    """
    import pandas as pd

    path = dataset_file("mtsamples", MTSAMPLES_FILE)
    frame = pd.read_csv(path, usecols=["note_id", "medical_specialty", "transcription"])
    text = frame["transcription"].fillna("").astype(str)
    empty = text.str.strip() == ""
    kept = frame.loc[~empty].assign(text=text[~empty], specialty=frame["medical_specialty"].str.strip())
    grouped = kept.groupby("text", sort=False).agg(
        note_id=("note_id", "min"), specialties=("specialty", lambda s: tuple(sorted(set(s))))
    )
    notes = grouped.reset_index().sort_values("note_id", kind="stable").reset_index(drop=True)
    notes["note_id"] = notes["note_id"].astype(str)
    counts = {
        "rows": len(frame),
        "empty_dropped": int(empty.sum()),
        "duplicate_rows_merged": int((~empty).sum() - len(notes)),
        "notes": len(notes),
    }
    return notes[["note_id", "text", "specialties"]], counts


def mtsamples_task(
    task: str = "cardiopulmonary_vs_rest", num_classes: int = 5, exclude: tuple[str, ...] = DOCUMENT_TYPES
) -> Notes:
    """Build one of the MTSamples tasks.

    Args:
        task: ``cardiopulmonary_vs_rest`` (binary: filed under Cardiovascular / Pulmonary or not),
            ``top_specialties`` (multiclass over the ``num_classes`` most frequent specialties not in
            ``exclude``; notes filed under none or several of them are dropped and counted) or
            ``specialties_multilabel`` (one label per such specialty; notes with none are kept).
        num_classes: Classes of the multiclass / multilabel tasks.
        exclude: Labels that name a document type rather than a specialty.

    Returns:
        The labelled notes.
    """
    if task not in MTSAMPLES_TASKS:
        raise NotesError(f"unknown MTSamples task '{task}'; pick one of {', '.join(MTSAMPLES_TASKS)}")
    frame, counts = load_mtsamples()
    source = {"dataset": "mtsamples", "file": MTSAMPLES_FILE, "sha256": MTSAMPLES.files[MTSAMPLES_FILE]}
    ids, texts, sets = list(frame["note_id"]), list(frame["text"]), list(frame["specialties"])
    if task == "cardiopulmonary_vs_rest":
        labels = np.array([int(CARDIOPULMONARY in s) for s in sets], dtype=np.int64)
        return Notes(ids, texts, labels, "binary", ["rest", CARDIOPULMONARY], counts, source)
    frequency: dict[str, int] = {}
    for specialties in sets:
        for name in specialties:
            frequency[name] = frequency.get(name, 0) + 1
    ranked = sorted((n for n in frequency if n not in exclude), key=lambda n: (-frequency[n], n))
    classes = ranked[:num_classes]
    if len(classes) < 2:
        raise NotesError(f"MTSamples task '{task}' needs num_classes >= 2 specialties, got {len(classes)}")
    member = np.array([[int(c in s) for c in classes] for s in sets], dtype=np.int64)
    if task == "specialties_multilabel":
        return Notes(ids, texts, member, "multilabel", classes, counts, source)
    hits = member.sum(axis=1)
    keep = np.flatnonzero(hits == 1)
    counts = {
        **counts,
        "no_class_dropped": int((hits == 0).sum()),
        "several_classes_dropped": int((hits > 1).sum()),
    }
    return Notes(
        [ids[i] for i in keep],
        [texts[i] for i in keep],
        member[keep].argmax(axis=1),
        "multiclass",
        classes,
        counts,
        source,
    )


def _strata(notes: Notes) -> np.ndarray:
    if notes.task != "multilabel":
        return np.asarray(notes.labels)
    keys = ["".join(map(str, row)) for row in notes.labels]
    values, inverse, sizes = np.unique(keys, return_inverse=True, return_counts=True)
    inverse = np.where(sizes[inverse] >= 3, inverse, -1)  # rare label sets share one stratum
    return inverse


def split_notes(
    notes: Notes, fractions: dict[str, float] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Split notes into named parts, stratified by label (label set for multilabel), reproducibly.

    Args:
        notes: The notes.
        fractions: Part name -> fraction, summing to 1; default train 0.7, val 0.1, test 0.2.
        seed: Seed of the shuffle within each stratum.

    Returns:
        Part name -> sorted indices into ``notes``.
    """
    fractions = dict(fractions or {"train": 0.7, "val": 0.1, "test": 0.2})
    if abs(sum(fractions.values()) - 1.0) > 1e-6 or min(fractions.values()) < 0:
        raise NotesError(f"split fractions {fractions} must be non-negative and sum to 1")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {name: [] for name in fractions}
    cuts = np.cumsum(list(fractions.values()))
    strata = _strata(notes)
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        bounds = np.round(cuts * len(members)).astype(int)
        for name, start, stop in zip(fractions, np.r_[0, bounds[:-1]], bounds, strict=True):
            parts[name].extend(members[start:stop].tolist())
    return {name: np.array(sorted(idx), dtype=np.int64) for name, idx in parts.items()}


def stratified_subset(indices: np.ndarray, notes: Notes, size: int | None, seed: int = 0) -> np.ndarray:
    """Return at most ``size`` of ``indices``, keeping class proportions (every class keeps at least one)."""
    indices = np.asarray(indices, dtype=np.int64)
    if size is None or size >= len(indices):
        return indices
    rng = np.random.default_rng(seed)
    strata = _strata(notes)[indices]
    chosen: list[int] = []
    for stratum in np.unique(strata):
        members = rng.permutation(indices[strata == stratum])
        take = max(1, int(round(size * len(members) / len(indices))))
        chosen.extend(members[:take].tolist())
    return np.array(sorted(chosen), dtype=np.int64)


def write_splits(run_dir: str | Path, notes: Notes, splits: dict[str, np.ndarray], seed: int) -> Path:
    """Write the ids of each split (and nothing else about the notes) to ``run_dir/splits.json``."""
    path = Path(run_dir) / "splits.json"
    payload = {
        "source": notes.source,
        "task": notes.task,
        "seed": seed,
        "sizes": {name: int(len(idx)) for name, idx in splits.items()},
        "ids": {name: [notes.ids[i] for i in idx] for name, idx in splits.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    return path


def read_splits(path: str | Path, notes: Notes) -> dict[str, np.ndarray]:
    """Read a ``splits.json`` back into indices of ``notes``; unknown ids raise."""
    payload = json.loads(Path(path).read_text())
    position = {note_id: i for i, note_id in enumerate(notes.ids)}
    splits = {}
    for name, ids in payload["ids"].items():
        unknown = [i for i in ids if i not in position]
        if unknown:
            raise NotesError(
                f"split '{name}' in {path} names {len(unknown)} ids not in the notes, e.g. {unknown[:3]}"
            )
        splits[name] = np.array(sorted(position[i] for i in ids), dtype=np.int64)
    return splits


def class_weights(labels: np.ndarray, task: TaskType) -> np.ndarray:
    """Return loss weights against class imbalance.

    Returns:
        binary: ``[negatives / positives]`` (BCE ``pos_weight``); multiclass: ``n / (k * count_k)`` per
        class (CE ``weight``); multilabel: ``negatives / positives`` per label. Absent classes get 1.
    """
    labels = np.asarray(labels)
    if task == "multiclass":
        k = int(labels.max()) + 1
        count = np.bincount(labels, minlength=k).astype(np.float64)
        return np.where(count > 0, len(labels) / (k * np.maximum(count, 1)), 1.0)
    matrix = labels.reshape(len(labels), -1).astype(np.float64)
    positives = matrix.sum(axis=0)
    negatives = len(labels) - positives
    return np.where(positives > 0, negatives / np.maximum(positives, 1), 1.0)
