"""Protein data: records, FASTA/CSV readers with checks, FLIP loaders and the registered FLIP datasets.

Bad input (a letter that is not an amino acid, an empty sequence, a label line of the wrong length) is a
``ProteinDataError`` naming the file and record; with ``on_invalid="skip"`` the record is dropped and
counted in a ``DataIssues`` the report shows. FLIP files are read as published (J-SNACKKB/FLIP splits):
GB1 CSV ``sequence,target,set,validation``; secondary structure and binding-site FASTA label files with
``>ID SET=train|test VALIDATION=True|False`` headers, joined to ``sequences.fasta`` by ID.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from pipelines.core.data import DatasetInfo, dataset_file, register_dataset

__all__ = [
    "ProteinDataError",
    "ProteinRecord",
    "DataIssues",
    "IGNORE_INDEX",
    "SS3_CLASSES",
    "BIND_BITS",
    "GB1_SPLITS",
    "BIND_SPLITS",
    "read_fasta",
    "read_fasta_records",
    "read_csv_records",
    "read_residue_labels",
    "records_from_lists",
    "load_flip_gb1",
    "load_flip_secondary_structure",
    "load_flip_bind",
    "limit_length",
    "split_records",
]

ALLOWED_RESIDUES = frozenset("ACDEFGHIKLMNPQRSTVWYXBZUO")
IGNORE_INDEX = -100  # per-residue label of padding and unresolved residues (PyTorch's cross-entropy default)
SS3_CLASSES = ("H", "E", "C")  # helix, strand, coil: label indices 0, 1, 2
# FLIP bind labels are bit flags in the order SNM: 4 small molecule, 2 nucleic acid, 1 metal ion.
BIND_BITS = {"small_molecule": 4, "nucleic_acid": 2, "metal": 1}
GB1_SPLITS = ("one_vs_rest", "two_vs_rest", "three_vs_rest", "low_vs_high", "sampled")
BIND_SPLITS = ("one_vs_many", "two_vs_many", "from_publication", "one_vs_sm", "one_vs_mn", "one_vs_sn")
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


def _invalid(
    message: str, record_id: str, reason: str, on_invalid: OnInvalid, issues: DataIssues | None
) -> None:
    if on_invalid == "error":
        raise ProteinDataError(f"{message}; fix the record or set the recipe's on_invalid: skip")
    if issues is not None:
        issues.skip(reason, record_id)


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


def read_fasta(path: str | Path) -> list[tuple[str, str]]:
    """Read a FASTA file (sequences may span several lines) as ``(header without '>', body)`` pairs."""
    path = Path(path)
    entries: list[tuple[str, list[str]]] = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            if line.startswith(">"):
                entries.append((line[1:].strip(), []))
            elif not entries:
                raise ProteinDataError(f"{path} line {line_number} comes before any '>' header; is it FASTA?")
            else:
                entries[-1][1].append(line)
    return [(header, "".join(body)) for header, body in entries]


def _flip_header(header: str, path: Path) -> tuple[str, str | None]:
    """Split a FLIP header ``ID SET=train VALIDATION=False`` into the ID and train/valid/test."""
    parts = header.split()
    if not parts:
        raise ProteinDataError(f"{path} has a record with an empty header")
    fields = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    split = fields.get("SET")
    if split is not None and split not in ("train", "test"):
        raise ProteinDataError(f"record '{parts[0]}' in {path} has SET={split}; expected train or test")
    if split == "train" and fields.get("VALIDATION", "False") == "True":
        split = "valid"
    return parts[0], split


def read_fasta_records(
    path: str | Path, on_invalid: OnInvalid = "error", issues: DataIssues | None = None
) -> list[ProteinRecord]:
    """Read protein sequences from FASTA; FLIP ``SET=``/``VALIDATION=`` header fields set the split."""
    path = Path(path)
    records = []
    for header, sequence in read_fasta(path):
        record_id, split = _flip_header(header, path)
        problem = _check_sequence(sequence, record_id, str(path))
        if problem:
            _invalid(problem, record_id, "invalid sequence", on_invalid, issues)
            continue
        records.append(ProteinRecord(record_id, sequence, split=split))
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
) -> list[ProteinRecord]:
    """Read sequences (and numeric targets) from a CSV file with a header row.

    ``split_column`` holds train/valid/test; a ``validation_column`` value ``True`` on a train row
    makes it a validation row (FLIP's convention).
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [
            c for c in (sequence_column, target_column, split_column, id_column, validation_column) if c
        ]
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ProteinDataError(f"{path} has no column(s) {missing}; its columns: {reader.fieldnames}")
        records = []
        for row_number, row in enumerate(reader, start=2):
            record_id = row[id_column] if id_column else f"row {row_number}"
            sequence = row[sequence_column].strip()
            problem = _check_sequence(sequence, record_id, str(path))
            target = None
            if not problem and target_column:
                try:
                    target = float(row[target_column])
                except ValueError:
                    problem = (
                        f"record '{record_id}' in {path} has target {row[target_column]!r}, not a number"
                    )
            if problem:
                _invalid(problem, record_id, "invalid record", on_invalid, issues)
                continue
            split = row[split_column].strip() if split_column else None
            if validation_column and split == "train" and row[validation_column].strip() == "True":
                split = "valid"
            records.append(ProteinRecord(record_id, sequence, target=target, split=split))
    return records


def records_from_lists(
    sequences: list[str],
    targets: list[float] | None = None,
    residue_labels: list[list[int]] | None = None,
    ids: list[str] | None = None,
) -> list[ProteinRecord]:
    """Build records from plain lists (lab code); a bad sequence is an error naming its index."""
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
    return records


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


def split_records(records: list[ProteinRecord]) -> dict[str, list[ProteinRecord]]:
    """Group records by split (``train``, ``valid``, ``test``)."""
    groups: dict[str, list[ProteinRecord]] = {"train": [], "valid": [], "test": []}
    for record in records:
        groups.setdefault(record.split or "train", []).append(record)
    return groups


# -- FLIP ------------------------------------------------------------------------------------------


def load_flip_gb1(
    split: str = "three_vs_rest", on_invalid: OnInvalid = "error", issues: DataIssues | None = None
) -> list[ProteinRecord]:
    """Load a FLIP GB1 split (``set`` train/test, ``validation=True`` marks the validation part)."""
    if split not in GB1_SPLITS:
        raise ProteinDataError(f"unknown FLIP GB1 split '{split}'; choose one of {', '.join(GB1_SPLITS)}")
    path = dataset_file("flip_gb1", f"flip/gb1/{split}.csv")
    return read_csv_records(
        path, split_column="set", validation_column="validation", on_invalid=on_invalid, issues=issues
    )


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
    sequences = {h.split()[0]: s for h, s in read_fasta(sequence_path) if h.split()}
    masks = {h.split()[0]: s for h, s in read_fasta(mask_path) if h.split()} if mask_path else {}
    seen: set[str] = set()
    records = []
    for header, label_line in read_fasta(label_path):
        record_id, split = _flip_header(header, label_path)
        if record_id in seen and issues is not None:
            issues.duplicate_ids += 1
        seen.add(record_id)
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
            _invalid(problem, record_id, "invalid record", on_invalid, issues)
            continue
        labels = [decode[c] for c in label_line]
        if mask is not None:
            labels = [label if m == "1" else IGNORE_INDEX for label, m in zip(labels, mask, strict=True)]
        records.append(ProteinRecord(record_id, sequence, residue_labels=tuple(labels), split=split))
    return records


def load_flip_secondary_structure(
    on_invalid: OnInvalid = "error", issues: DataIssues | None = None
) -> list[ProteinRecord]:
    """Load FLIP's ``sampled`` 3-state secondary structure split; unresolved residues are not scored."""
    folder = "flip/secondary_structure"
    return read_residue_labels(
        dataset_file("flip_secondary_structure", f"{folder}/sampled.fasta"),
        dataset_file("flip_secondary_structure", f"{folder}/sequences.fasta"),
        {c: i for i, c in enumerate(SS3_CLASSES)},
        on_invalid,
        issues,
        mask_path=dataset_file("flip_secondary_structure", f"{folder}/mask.fasta"),
    )


def load_flip_bind(
    split: str = "one_vs_many",
    ligand: Literal["any", "small_molecule", "nucleic_acid", "metal"] = "any",
    on_invalid: OnInvalid = "error",
    issues: DataIssues | None = None,
) -> list[ProteinRecord]:
    """Load a FLIP binding-site split as per-residue binary labels (binds ``ligand`` or not)."""
    if split not in BIND_SPLITS:
        raise ProteinDataError(f"unknown FLIP bind split '{split}'; choose one of {', '.join(BIND_SPLITS)}")
    if ligand != "any" and ligand not in BIND_BITS:
        raise ProteinDataError(f"unknown ligand '{ligand}'; choose any or one of {', '.join(BIND_BITS)}")
    bit = 7 if ligand == "any" else BIND_BITS[ligand]
    decode = {str(v): int(bool(v & bit)) for v in range(8)}
    return read_residue_labels(
        dataset_file("flip_bind", f"flip/bind/{split}.fasta"),
        dataset_file("flip_bind", "flip/bind/sequences.fasta"),
        decode,
        on_invalid,
        issues,
    )


_FLIP_HOME = "https://github.com/J-SNACKKB/FLIP (splits/<task>/splits.zip, commit 62cace87)"
_GB1_SUMS = {
    "low_vs_high.csv": "190217d19cdafec40d8a961fce2dcbfd9fc89c9f4c6fa994aa90861b06e073fa",
    "one_vs_rest.csv": "e901db7f88f5851f6d5177ca78d8ba9c7b01b4712cd553cb309f29a34f569d02",
    "sampled.csv": "19bcb946fb9f8fe5ac1d5ed0aa85d4a85848b44744560d9684cc278935f3bd16",
    "three_vs_rest.csv": "b8aa60cc061013a5c2e6f4070593c82976b1d9e5c9058a66ad57c6e9c3cec023",
    "two_vs_rest.csv": "b368e4564e10e33735f897c9b63f1be7030082e565c6d4e1368d6f1641a310de",
}
_SS_SUMS = {
    "mask.fasta": "6ffafb87ab0d40781103594d3a8fa202d1db741fd49cc00fe6220797bf55897f",
    "sampled.fasta": "d74173c6ecd35339e9455565b45160f7285d401a1fc05e814af67bcb7bb83ad1",
    "sequences.fasta": "cc69cb36650161fa08874c7a3a2ceceb9c3bbab1b6394cb875647c1b8b4a4b03",
}
_BIND_SUMS = {
    "from_publication.fasta": "8b000abee7f98633cdf3683aa9ef9311ddddd41c1be9845992c2af5f8a550e4d",
    "one_vs_many.fasta": "00c885369dcb92f2c9cee4a645ed4b8a23a135cf9a05ef5760916592133a3226",
    "one_vs_mn.fasta": "bfb89809e662e7fcff2d3861da8668be4174bfbe55dc8e80645fa41bb04a2ed1",
    "one_vs_sm.fasta": "a6716a11fcf5ba3431dacf0a8b7ead2a7a27b31ea0e75ffde2a38e35f896140c",
    "one_vs_sn.fasta": "0a11de0c900bfeea3e9f58ffc88d48f92ba9c44eada85df5e769324d753d8f5c",
    "sequences.fasta": "09487b43f207164acef3c491bf59e9ba83f3fcc2d19f011f2bab1ddfc0b9d924",
    "two_vs_many.fasta": "9002f9c5735d772a35b97cca8756194fc04446297dfd56ec5e3241a7db2bd235",
}


def _files(folder: str, sums: dict[str, str]) -> dict[str, str]:
    return {f"{folder}/{name}": digest for name, digest in sums.items()}


register_dataset(
    DatasetInfo(
        name="flip_gb1",
        files=_files("flip/gb1", _GB1_SUMS),
        card="flip_gb1",
        license="splits AFL-3.0, raw data CC BY 4.0",
        description="FLIP GB1: 8,733 variants of a 265-residue construct, fitness regression (Spearman)",
        homepage=_FLIP_HOME,
    )
)
register_dataset(
    DatasetInfo(
        name="flip_secondary_structure",
        files=_files("flip/secondary_structure", _SS_SUMS),
        card="flip_secondary_structure",
        license="AFL-3.0",
        description="FLIP secondary structure (sampled split): 11,156 proteins, 3-state labels per residue",
        homepage=_FLIP_HOME,
    )
)
register_dataset(
    DatasetInfo(
        name="flip_bind",
        files=_files("flip/bind", _BIND_SUMS),
        card="flip_bind",
        license="AFL-3.0",
        description="FLIP binding sites: 1,360 proteins, per-residue small-molecule/nucleic-acid/metal flags",
        homepage=_FLIP_HOME,
    )
)
