"""Protein data: records and the FASTA/CSV readers that check them, naming the file and record.

Bad input (a letter that is not an amino acid, an empty sequence, a target that is not a finite number, a
label line of the wrong length, a row cut short) is a ``ProteinDataError``. A file is read to the end
first, so the error names the first bad record in full and the ids of the others; with
``on_invalid="skip"`` each bad record is dropped and counted in a ``DataIssues`` the report shows.

Splits: ``train``, ``valid`` and ``test``, in any case; ``val`` and ``validation`` mean ``valid``. Any
other split value is an error naming the values with their counts (or, with ``on_invalid="skip"``, a
counted skip). FASTA headers carry fields in FLIP's convention, ``>ID TARGET=0.53 SET=train
VALIDATION=False`` (field names in any case; ``VALIDATION=True`` on a train record makes it a validation
record). The FLIP datasets themselves are in :mod:`pipelines.protein.flip`.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = [
    "ProteinDataError", "ProteinRecord", "DataIssues", "IGNORE_INDEX", "SPLIT_NAMES", "read_fasta",
    "read_fasta_records", "read_csv_records", "read_residue_labels", "records_from_lists", "check_targets",
]  # fmt: skip

ALLOWED_RESIDUES = frozenset("ACDEFGHIKLMNPQRSTVWYXBZUO")
IGNORE_INDEX = -100  # per-residue label of padding and unresolved residues (PyTorch's cross-entropy default)
# Split values as written in files (compared in lower case) -> the split they mean.
SPLIT_NAMES = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid", "test": "test"}
ACCEPTED_SPLITS = "train, valid (or val, validation), test, in any case"
OnInvalid = Literal["error", "skip"]


class ProteinDataError(ValueError):
    """A protein data file or record that cannot be used as it is."""


@dataclass(frozen=True)
class ProteinRecord:
    """One protein: its sequence and either a per-sequence target or per-residue labels.

    ``split`` is ``"train"``, ``"valid"`` or ``"test"`` (or None when the source has no split).
    ``residue_labels`` has one integer per residue, ``IGNORE_INDEX`` where a residue is not scored.
    """

    id: str
    sequence: str
    target: float | None = None
    residue_labels: tuple[int, ...] | None = None
    split: str | None = None


@dataclass
class DataIssues:
    """Records skipped or changed while loading, counted by reason, with a few example IDs."""

    skipped: Counter = field(default_factory=Counter)
    cropped: int = 0
    duplicate_ids: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, record_id: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(record_id)

    def as_dict(self) -> dict:
        return {
            "skipped": dict(self.skipped),
            "skipped_total": sum(self.skipped.values()),
            "cropped": self.cropped,
            "duplicate_ids": self.duplicate_ids,
            "examples": self.examples,
        }


def _counts(values: Counter, noun: str = "record") -> str:
    return ", ".join(f"{value!r} ({n} {noun}{'s' * (n != 1)})" for value, n in values.most_common())


class _Reading:
    """The problems of one file: raised together once it is read, or skipped and counted."""

    def __init__(self, path: Path | str, on_invalid: OnInvalid, issues: DataIssues | None):
        self.path, self.on_invalid, self.issues = path, on_invalid, issues
        self.problems: list[tuple[str, str]] = []
        self.unknown_splits: Counter = Counter()

    def refuse(self, message: str, record_id: str, reason: str = "invalid record") -> None:
        if self.on_invalid == "skip":
            if self.issues is not None:
                self.issues.skip(reason, record_id)
        else:
            self.problems.append((record_id, message))

    def split(
        self, raw: str | None, record_id: str, validation: str | None = None
    ) -> tuple[bool, str | None]:
        """``(usable, split)``: the record's split, None when it has none; unusable when unknown."""
        if raw is None:
            return True, None
        split = SPLIT_NAMES.get(raw.strip().lower())
        if split is None:
            if self.on_invalid == "skip":
                self.refuse("", record_id, "unknown split value")
            else:
                self.unknown_splits[raw] += 1
            return False, None
        if split == "train" and (validation or "").strip().lower() == "true":
            split = "valid"
        return True, split

    def finish(self, where: str) -> None:
        """Raise the file's problems (unknown split values first) as one error."""
        if self.unknown_splits:
            raise ProteinDataError(
                f"{self.path} has split value(s) {_counts(self.unknown_splits)} in {where}; accepted: "
                f"{ACCEPTED_SPLITS}; fix them, or set data.options.on_invalid: skip to drop those records"
            )
        if self.problems:
            first = self.problems[0][1]
            more = ""
            if len(self.problems) > 1:
                others = ", ".join(f"'{record_id}'" for record_id, _ in self.problems[1:6])
                etc = ", ..." if len(self.problems) > 6 else ""
                more = f" ({len(self.problems)} bad records in all; also {others}{etc})"
            raise ProteinDataError(f"{first}{more}; fix the records or set data.options.on_invalid: skip")


def _check_sequence(sequence: str, record_id: str, source: str) -> str | None:
    """Return None when the sequence is usable, else a sentence saying why not."""
    if not sequence:
        return f"record '{record_id}' in {source} has an empty sequence"
    for position, letter in enumerate(sequence, start=1):
        if letter not in ALLOWED_RESIDUES:
            return (
                f"record '{record_id}' in {source} has {letter!r} at residue {position}, which is not an "
                "amino-acid letter (allowed: the 20 standard one-letter codes and X, B, Z, U, O)"
            )
    return None


def _target(raw: str | None, record_id: str, source: str) -> tuple[float | None, str | None]:
    """``(target, None)``, or ``(None, why not)`` for a value that is not a finite number."""
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None, f"record '{record_id}' in {source} has target {raw!r}, not a number"
    if not math.isfinite(value):
        return None, f"record '{record_id}' in {source} has target {raw!r}, not a finite number"
    return value, None


def read_fasta(path: str | Path) -> list[tuple[str, str]]:
    """Read a FASTA file (sequences may span several lines) as ``(header without '>', body)`` pairs."""
    path = Path(path)
    entries: list[tuple[str, list[str]]] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                line = line.strip()
                if not line:
                    continue
                if line.startswith(">"):
                    entries.append((line[1:].strip(), []))
                elif not entries:
                    raise ProteinDataError(
                        f"{path} line {line_number} comes before any '>' header; is it FASTA?"
                    )
                else:
                    entries[-1][1].append(line)
    except UnicodeDecodeError as error:
        raise ProteinDataError(f"{path} is not UTF-8 text (byte {error.start}); is it FASTA?") from None
    return [(header, "".join(body)) for header, body in entries]


def _fasta_entries(path: Path) -> list[tuple[str, str]]:
    entries = read_fasta(path)
    if not entries:
        raise ProteinDataError(f"{path} is empty: it holds no FASTA record (no line starts with '>')")
    return entries


def _header(header: str, path: Path) -> tuple[str, dict[str, str]]:
    """Split ``ID KEY=value ...`` into the ID and its fields (keys in upper case)."""
    parts = header.split()
    if not parts:
        raise ProteinDataError(f"{path} has a record with an empty header")
    fields = {}
    for part in parts[1:]:
        if "=" in part:
            key, value = part.split("=", 1)
            fields[key.upper()] = value
    return parts[0], fields


def read_fasta_records(
    path: str | Path,
    on_invalid: OnInvalid = "error",
    issues: DataIssues | None = None,
    require_target: bool = False,
) -> list[ProteinRecord]:
    """Read protein sequences from FASTA; header fields ``TARGET=``, ``SET=``, ``VALIDATION=`` are used.

    Args:
        path: The FASTA file.
        on_invalid: Bad records are an error, or skipped and counted in ``issues``.
        issues: Where skips are counted.
        require_target: Every record needs ``TARGET=<number>`` in its header (per-sequence data).
    """
    path = Path(path)
    reading, records = _Reading(path, on_invalid, issues), []
    for header, sequence in _fasta_entries(path):
        record_id, fields = _header(header, path)
        usable, split = reading.split(fields.get("SET"), record_id, fields.get("VALIDATION"))
        if not usable:
            continue
        problem = _check_sequence(sequence, record_id, str(path))
        if problem:
            reading.refuse(problem, record_id, "invalid sequence")
            continue
        target = None
        if "TARGET" in fields:
            target, problem = _target(fields["TARGET"], record_id, str(path))
        elif require_target:
            problem = (
                f"record '{record_id}' in {path} has no TARGET= in its header (per-sequence FASTA: "
                f"'>{record_id} TARGET=0.53 SET=train')"
            )
        if problem:
            reading.refuse(problem, record_id)
            continue
        records.append(ProteinRecord(record_id, sequence, target=target, split=split))
    reading.finish("the SET= header fields")
    return records


def read_csv_records(
    path: str | Path,
    sequence_column: str = "sequence",
    target_column: str | None = "target",
    split_column: str | None = None,
    id_column: str | None = None,
    validation_column: str | None = None,
    on_invalid: OnInvalid = "error",
    issues: DataIssues | None = None,
    optional: tuple[str, ...] = (),
) -> list[ProteinRecord]:
    """Read sequences (and numeric targets) from a CSV file with a header row.

    ``split_column`` holds the split (see the module docstring); a ``validation_column`` value ``True``
    on a train row makes it a validation row (FLIP's convention). Columns named in ``optional`` may be
    absent (no split column: records without a split). Records are ``row <line number>`` unless
    ``id_column``.
    """
    path = Path(path)
    reading, records, rows, reader = _Reading(path, on_invalid, issues), [], 0, None
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, strict=True)
            names = reader.fieldnames
            if not names:
                raise ProteinDataError(
                    f"{path} is empty; a protein CSV needs a header row ({sequence_column},"
                    f"{target_column or 'target'},set) and one row per protein"
                )
            split_column = None if split_column in optional and split_column not in names else split_column
            if validation_column in optional and validation_column not in names:
                validation_column = None
            columns = [c for c in (sequence_column, target_column, split_column, id_column, validation_column)
                       if c]  # fmt: skip
            missing = [c for c in columns if c not in names]
            if missing:
                raise ProteinDataError(f"{path} has no column(s) {missing}; its columns: {names}")
            for row_number, row in enumerate(reader, start=2):
                rows += 1
                record_id = (row.get(id_column) if id_column else None) or f"row {row_number}"
                if None in row or any(row.get(c) is None for c in names):
                    given = len(names) - sum(row.get(c) is None for c in names) + len(row.get(None) or [])
                    reading.refuse(
                        f"record '{record_id}' in {path} has {given} fields for the header's {len(names)}"
                        " (is the file truncated, or a sequence split by a comma?)",
                        record_id,
                    )
                    continue
                usable, split = reading.split(
                    row[split_column] if split_column else None, record_id,
                    row[validation_column] if validation_column else None,
                )  # fmt: skip
                if not usable:
                    continue
                sequence = row[sequence_column].strip()
                problem = _check_sequence(sequence, record_id, str(path))
                target = None
                if not problem and target_column:
                    target, problem = _target(row[target_column], record_id, str(path))
                if problem:
                    reading.refuse(problem, record_id)
                    continue
                records.append(ProteinRecord(record_id, sequence, target=target, split=split))
    except csv.Error as error:
        line = (reader.line_num if reader is not None else 0) + 1  # lines read before the bad record
        raise ProteinDataError(
            f"{path} line {line} is not valid CSV ({error}); is the file truncated, or a quote left open?"
        ) from None
    except UnicodeDecodeError as error:
        raise ProteinDataError(
            f"{path} is not UTF-8 text (byte {error.start}); save it as a UTF-8 CSV"
        ) from None
    if not rows:
        raise ProteinDataError(f"{path} has a header row but no records; add one row per protein")
    reading.finish(f"column '{split_column}'")
    return records


def read_residue_labels(
    label_path: Path,
    sequence_path: Path,
    decode: dict[str, int],
    on_invalid: OnInvalid,
    issues: DataIssues | None,
    mask_path: Path | None = None,
) -> list[ProteinRecord]:
    """Join a FLIP-style label FASTA (one label letter per residue) to its sequence FASTA by record ID.

    ``decode`` maps label letters to class indices; a mask FASTA (``1`` resolved, ``0`` not) turns
    unresolved residues into ``IGNORE_INDEX``.
    """
    sequences = {h.split()[0]: s for h, s in _fasta_entries(Path(sequence_path)) if h.split()}
    masks = {h.split()[0]: s for h, s in read_fasta(mask_path) if h.split()} if mask_path else {}
    seen: set[str] = set()
    reading, records = _Reading(label_path, on_invalid, issues), []
    for header, label_line in _fasta_entries(Path(label_path)):
        record_id, fields = _header(header, label_path)
        if record_id in seen and issues is not None:
            issues.duplicate_ids += 1
        seen.add(record_id)
        usable, split = reading.split(fields.get("SET"), record_id, fields.get("VALIDATION"))
        if not usable:
            continue
        sequence = sequences.get(record_id)
        problem = None
        if sequence is None:
            problem = f"record '{record_id}' in {label_path} has no sequence in {sequence_path}"
        else:
            problem = _check_sequence(sequence, record_id, str(sequence_path))
        if not problem and len(label_line) != len(sequence):
            problem = (
                f"record '{record_id}' in {label_path} has a label line of {len(label_line)} characters for "
                f"a sequence of {len(sequence)} residues"
            )
        bad = sorted(set(label_line) - set(decode)) if not problem else []
        if bad:
            problem = f"record '{record_id}' in {label_path} has label(s) {bad}; expected {sorted(decode)}"
        mask = masks.get(record_id)
        if not problem and mask_path and (mask is None or len(mask) != len(sequence)):
            problem = f"record '{record_id}' has no resolved-residue mask of matching length in {mask_path}"
        if problem:
            reading.refuse(problem, record_id)
            continue
        labels = [decode[c] for c in label_line]
        if mask is not None:
            labels = [label if m == "1" else IGNORE_INDEX for label, m in zip(labels, mask, strict=True)]
        records.append(ProteinRecord(record_id, sequence, residue_labels=tuple(labels), split=split))
    reading.finish("the SET= header fields")
    return records


def check_targets(records: list[ProteinRecord], source: str = "the given records") -> None:
    """Refuse targets that are not finite numbers (NaN, infinity), naming the records."""
    bad = [r.id for r in records if r.target is not None and not math.isfinite(r.target)]
    if bad:
        shown = ", ".join(f"'{record_id}'" for record_id in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ProteinDataError(
            f"{len(bad)} record(s) in {source} have a target that is not a finite number (NaN or infinity): "
            f"{shown}; drop them or give them a value"
        )


def records_from_lists(
    sequences: list[str],
    targets: list[float] | None = None,
    residue_labels: list[list[int]] | None = None,
    ids: list[str] | None = None,
) -> list[ProteinRecord]:
    """Build records from plain lists (lab code); a bad sequence or target is an error naming its index."""
    ids = ids or [f"sequence {i}" for i in range(len(sequences))]
    for name, values in (("targets", targets), ("residue_labels", residue_labels), ("ids", ids)):
        if values is not None and len(values) != len(sequences):
            raise ProteinDataError(
                f"{len(values)} {name} for {len(sequences)} sequences; give one per sequence"
            )
    records = []
    for i, sequence in enumerate(sequences):
        problem = _check_sequence(sequence, ids[i], "the given list")
        if problem:
            raise ProteinDataError(problem)
        labels = None
        if residue_labels is not None:
            labels = tuple(int(x) for x in residue_labels[i])
            if len(labels) != len(sequence):
                raise ProteinDataError(
                    f"record '{ids[i]}' has {len(labels)} residue labels for {len(sequence)} residues"
                )
        target = None if targets is None else float(targets[i])
        records.append(ProteinRecord(ids[i], sequence, target=target, residue_labels=labels))
    check_targets(records, "the given list")
    return records
