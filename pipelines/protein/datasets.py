"""From a recipe's ``data`` section to train/valid/test records: FLIP datasets or the user's own files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.core.data import get_dataset, sha256_file
from pipelines.protein.data import (
    ACCEPTED_SPLITS,
    DataIssues,
    ProteinDataError,
    ProteinRecord,
    check_targets,
    read_csv_records,
    read_fasta_records,
    read_residue_labels,
)
from pipelines.protein.flip import (
    BIND_SPLITS,
    GB1_SPLITS,
    SS3_CLASSES,
    load_flip_bind,
    load_flip_gb1,
    load_flip_secondary_structure,
)
from pipelines.protein.splits import cap_records, hold_out, limit_length, split_records

__all__ = ["DataOptions", "RESIDUE_DATASETS", "SEQUENCE_DATASETS", "cap_records", "load_splits"]

SEQUENCE_DATASETS = ("flip_gb1",)
RESIDUE_DATASETS = ("flip_secondary_structure", "flip_bind")


class DataOptions(BaseModel):
    """The recipe's ``data.options`` of the protein pipelines."""

    model_config = ConfigDict(extra="forbid")

    split: str | None = Field(
        None,
        description="FLIP split: GB1 one_vs_rest ... sampled (default three_vs_rest), bind one_vs_many ...",
    )
    ligand: Literal["any", "small_molecule", "nucleic_acid", "metal"] = Field(
        "any", description="FLIP bind: which ligand class counts as binding."
    )
    path: str | None = Field(
        None,
        description="Own data: a CSV (sequence, target and optional set columns); a FASTA with the target "
        "in each header (>id TARGET=0.53 SET=train VALIDATION=False, field names in any case); or a FASTA "
        "of residue labels (with sequences_path).",
    )
    sequences_path: str | None = Field(None, description="Own per-residue data: the FASTA of sequences.")
    label_classes: str | None = Field(None, description="Own per-residue data: label letters in class order.")
    sequence_column: str = Field("sequence", description="CSV column with the sequence.")
    target_column: str = Field("target", description="CSV column with the target.")
    split_column: str | None = Field(
        "set",
        description="CSV column with the split: train, valid (or val, validation), test, in any case; any "
        "other value is an error (on_invalid: skip drops and counts those rows). null, or the default 'set' "
        "absent from the file: split automatically (test_fraction, valid_fraction; ids in splits.json). A "
        "FLIP-style 'validation' column (True) makes train rows validation rows.",
    )
    on_invalid: Literal["error", "skip"] = Field(
        "error", description="A bad record is an error naming it, or skipped and counted in the report."
    )
    long_sequences: Literal["crop", "refuse", "skip"] = Field(
        "refuse",
        description="Sequences longer than max_residues: crop to the first residues, refuse, or skip.",
    )
    max_residues: int | None = Field(None, ge=1, description="Residue limit (default: the backbone's, 1022).")
    valid_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Held out of train when there is no valid split (seeded; stratified "
        "by class for per-sequence classification).",
    )
    test_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Held out of all records as test when the data has no split (a CSV "
        "without its split column, a FASTA without SET=); seeded, stratified like valid_fraction.",
    )
    max_train: int | None = Field(None, ge=2, description="Seeded cap on training records (after fraction).")
    max_valid: int | None = Field(None, ge=2, description="Seeded cap on validation records.")
    max_test: int | None = Field(None, ge=2, description="Seeded cap on test records (null: the full split).")
    eval_batch_size: int = Field(64, ge=1, description="Batch size for validation and test predictions.")


def _flip(dataset: str, options: DataOptions, issues: DataIssues) -> tuple[list[ProteinRecord], str | None]:
    if dataset == "flip_gb1":
        split = options.split or "three_vs_rest"
        return load_flip_gb1(split, options.on_invalid, issues), split
    if dataset == "flip_secondary_structure":
        if options.split not in (None, "sampled"):
            raise ProteinDataError(
                f"FLIP secondary structure has only the 'sampled' split, not '{options.split}'"
            )
        return load_flip_secondary_structure(options.on_invalid, issues), "sampled"
    split = options.split or "one_vs_many"
    return load_flip_bind(split, options.ligand, options.on_invalid, issues), split


def _own(options: DataOptions, level: str, issues: DataIssues) -> list[ProteinRecord]:
    path = Path(options.path).expanduser()
    if not path.is_file():
        raise ProteinDataError(
            f"data file {path} does not exist; set data.options.path to a CSV or FASTA file"
        )
    if path.suffix.lower() in (".csv", ".tsv"):
        if level == "residue":
            raise ProteinDataError(
                f"{path} is a CSV, but per-residue labels come as FASTA: path = the label FASTA, "
                "sequences_path = the sequence FASTA (FLIP's layout)"
            )
        optional = ("validation",) + (() if "split_column" in options.model_fields_set else ("set",))
        return read_csv_records(
            path, options.sequence_column, options.target_column, options.split_column,
            validation_column="validation" if options.split_column else None,
            on_invalid=options.on_invalid, issues=issues, optional=optional,
        )  # fmt: skip
    if level == "residue":
        if not options.sequences_path or not options.label_classes:
            raise ProteinDataError(
                f"per-residue labels in {path} need data.options.sequences_path (the sequence FASTA) and "
                "label_classes (the label letters in class order, e.g. HEC)"
            )
        decode = {c: i for i, c in enumerate(options.label_classes)}
        return read_residue_labels(
            path, Path(options.sequences_path).expanduser(), decode, options.on_invalid, issues
        )
    return read_fasta_records(path, options.on_invalid, issues, require_target=True)


OWN_SUFFIXES = (".csv", ".tsv", ".fasta", ".fa")


def own_file(dataset: str, path: str | None) -> str | None:
    """The user's own data file: ``data.options.path``, else ``data.dataset`` written as a path (a '/' or
    a data suffix); None for a registered FLIP dataset."""
    if path:
        return path
    return dataset if "/" in dataset or dataset.endswith(OWN_SUFFIXES) else None


def load_splits(
    dataset: str,
    options: DataOptions,
    level: str,
    max_residues: int,
    seed: int = 0,
    records: list[ProteinRecord] | None = None,
    limit_train: bool = True,
    stratify: bool = False,
) -> tuple[dict[str, list[ProteinRecord]], dict[str, Any], DataIssues]:
    """Load a dataset's records and cut them into train/valid/test.

    Args:
        dataset: A registered FLIP dataset, a path to the user's own file, or any name when
            ``options.path`` (or ``records``) is given.
        options: The recipe's data options.
        level: ``sequence`` or ``residue``.
        max_residues: The residue limit (``options.max_residues`` wins when set).
        seed: Seed of the subsampling and of the hold-outs.
        records: Records given directly (lab code); their split field decides the split (none: cut).
        limit_train: Apply the residue limit to the training split too (off when the caller draws a
            subset first and applies it to the records it keeps, so the counts are theirs).
        stratify: Hold out valid and test per class (per-sequence classification).

    Returns:
        ``(splits, dataset_info, issues)``; dataset_info has the name, split name, file checksums, sizes
        and ``cut`` (how the pipeline cut the splits the data did not have).
    """
    issues = DataIssues()
    split_name, files, replaces = None, {}, None
    if not options.path and own_file(dataset, None):
        options = options.model_copy(update={"path": dataset})  # data.dataset names the user's own file
    if records is not None:
        source = "the given records"
        check_targets(records, source)
    elif options.path:
        path = Path(options.path).expanduser()
        source, replaces = str(path), dataset if dataset != options.path else None
        records = _own(options, level, issues)
        files = {str(path): sha256_file(path)}
        if options.sequences_path:
            sequences = Path(options.sequences_path).expanduser()
            files[str(sequences)] = sha256_file(sequences)
    else:
        source = f"dataset '{dataset}'"
        _check_flip(dataset, options, level)
        records, split_name = _flip(dataset, options, issues)
        files = {rel: digest for rel, digest in get_dataset(dataset).files.items() if _used(rel, split_name)}
    if not records:
        raise ProteinDataError(f"{source} has no usable record: all were skipped ({dict(issues.skipped)})")
    groups, cut = _cut(records, options, seed, stratify, source)
    groups["train"] = cap_records(groups["train"], options.max_train, seed)
    groups["valid"] = cap_records(groups["valid"], options.max_valid, seed + 1)
    groups["test"] = cap_records(groups["test"], options.max_test, seed + 2)
    limit = options.max_residues or max_residues  # applied to the records used, so the counts are theirs
    for key in ("train", "valid", "test") if limit_train else ("valid", "test"):
        groups[key] = limit_length(groups[key], limit, options.long_sequences, issues)
    info = {
        "name": source if options.path else dataset,
        "split": split_name,
        "sizes": {k: len(v) for k, v in groups.items() if k in ("train", "valid", "test")},
        "sha256": files,
        "residue_limit": limit,
        "long_sequences": options.long_sequences,
        "issues": issues.as_dict(),
        "cut": cut,
    }
    if replaces:
        info["recipe_dataset"] = replaces  # data.dataset, which data.options.path replaced
    return groups, info, issues


def _check_flip(dataset: str, options: DataOptions, level: str) -> None:
    wanted = RESIDUE_DATASETS if level == "residue" else SEQUENCE_DATASETS
    if dataset not in wanted:
        raise ProteinDataError(
            f"dataset '{dataset}' is not a {level}-level protein dataset (choose {', '.join(wanted)}, or "
            "give your own file in data.options.path)"
        )
    known = GB1_SPLITS if dataset == "flip_gb1" else BIND_SPLITS if dataset == "flip_bind" else ("sampled",)
    if options.split is not None and options.split not in known:
        raise ProteinDataError(
            f"dataset '{dataset}' has no split '{options.split}'; choose {', '.join(known)}"
        )


def _cut(
    records: list[ProteinRecord], options: DataOptions, seed: int, stratify: bool, source: str
) -> tuple[dict[str, list[ProteinRecord]], dict[str, str]]:
    """Group by the records' splits; cut test (when none has a split) and valid (when none is valid)."""
    with_split = sum(r.split is not None for r in records)
    cut: dict[str, str] = {}
    how = f"seed {seed}{', stratified by class' if stratify else ''}"
    if with_split == 0:
        train, test = hold_out(records, options.test_fraction, seed + 3, stratify)
        groups = {"train": train, "valid": [], "test": test}
        cut["test"] = f"{options.test_fraction:g} of all records ({how})"
    elif with_split < len(records):
        example, without = next(r.id for r in records if r.split is None), len(records) - with_split
        raise ProteinDataError(
            f"{source}: {without} of {len(records)} records have no split (e.g. '{example}'); "
            f"give every record one ({ACCEPTED_SPLITS}) or none (then they are split automatically)"
        )
    else:
        groups = split_records(records)
        if not groups["test"]:
            sizes = ", ".join(f"{k} {len(v)}" for k, v in groups.items())
            raise ProteinDataError(
                f"{source} has no test records ({sizes}); mark some as test in its split column or SET= "
                "fields, or leave the split out entirely to have it split automatically"
            )
    if not groups["valid"] and len(groups["train"]) > 1:
        groups["train"], groups["valid"] = hold_out(groups["train"], options.valid_fraction, seed, stratify)
        cut["valid"] = f"{options.valid_fraction:g} of the training records ({how})"
    if not groups["train"] or not groups["valid"]:
        raise ProteinDataError(
            f"{source} leaves {len(groups['train'])} training and {len(groups['valid'])} validation "
            "records; give it more records, or mark more of them train"
        )
    return groups, cut


def _used(relpath: str, split: str | None) -> bool:
    name = Path(relpath).stem
    return name in ("sequences", "mask") or name == split


def residue_classes(dataset: str, options: DataOptions) -> int:
    """Number of per-residue classes of a dataset: 3 for secondary structure, 2 for binding sites."""
    if options.label_classes:
        return len(options.label_classes)
    return len(SS3_CLASSES) if dataset == "flip_secondary_structure" else 2
