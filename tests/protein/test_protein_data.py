"""Protein data: FASTA/CSV readers, checks that name the record, FLIP formats, length limits, the mirror."""

from __future__ import annotations

import pytest

from pipelines.protein.data import (
    IGNORE_INDEX,
    DataIssues,
    ProteinDataError,
    ProteinRecord,
    read_csv_records,
    read_fasta,
    read_fasta_records,
    records_from_lists,
)
from pipelines.protein.flip import load_flip_bind, load_flip_gb1, load_flip_secondary_structure
from pipelines.protein.splits import limit_length, split_records


def test_read_fasta_joins_wrapped_lines_and_rejects_text_before_a_header(tmp_path):
    path = tmp_path / "a.fasta"
    path.write_text(">p1 SET=train VALIDATION=True\nMKT\nAYI\n\n>p2 SET=test VALIDATION=False\nMKV\n")
    assert read_fasta(path) == [
        ("p1 SET=train VALIDATION=True", "MKTAYI"),
        ("p2 SET=test VALIDATION=False", "MKV"),
    ]
    records = read_fasta_records(path)
    assert [(r.id, r.sequence, r.split) for r in records] == [
        ("p1", "MKTAYI", "valid"),
        ("p2", "MKV", "test"),
    ]
    bad = tmp_path / "b.fasta"
    bad.write_text("MKT\n>p1\nMKT\n")
    with pytest.raises(ProteinDataError, match=r"b\.fasta line 1 comes before any '>' header"):
        read_fasta(bad)


def test_bad_letter_is_an_error_naming_record_or_a_counted_skip(tmp_path):
    path = tmp_path / "a.fasta"
    path.write_text(">good\nMKT\n>bad\nMK*T\n>empty\n")
    with pytest.raises(
        ProteinDataError, match=r"record 'bad' in .*a\.fasta has '\*' at residue 3, which is not"
    ):
        read_fasta_records(path)
    issues = DataIssues()
    records = read_fasta_records(path, on_invalid="skip", issues=issues)
    assert [r.id for r in records] == ["good"]
    assert issues.as_dict()["skipped"] == {"invalid sequence": 2}
    assert issues.examples["invalid sequence"] == ["bad", "empty"]


def test_csv_reader_flip_columns_and_bad_target(tmp_path):
    path = tmp_path / "gb1.csv"
    path.write_text(
        "sequence,target,set,validation\nMKT,1.5,train,\nMKV,0.5,train,True\nMKW,2,test,\nMKA,x,test,\n"
    )
    with pytest.raises(ProteinDataError, match=r"record 'row 5' in .*gb1\.csv has target 'x', not a number"):
        read_csv_records(path, split_column="set", validation_column="validation")
    issues = DataIssues()
    records = read_csv_records(
        path, split_column="set", validation_column="validation", on_invalid="skip", issues=issues
    )
    assert [(r.sequence, r.target, r.split) for r in records] == [
        ("MKT", 1.5, "train"),
        ("MKV", 0.5, "valid"),
        ("MKW", 2.0, "test"),
    ]
    assert issues.skipped["invalid record"] == 1
    with pytest.raises(ProteinDataError, match=r"has no column\(s\) \['fitness'\]"):
        read_csv_records(path, target_column="fitness")


def test_records_from_lists_checks_lengths_and_letters():
    records = records_from_lists(["MKT", "AY"], targets=[1, 2], residue_labels=[[0, 1, 2], [1, 1]])
    assert records[1] == ProteinRecord("sequence 1", "AY", 2.0, (1, 1))
    with pytest.raises(ProteinDataError, match="1 targets for 2 sequences"):
        records_from_lists(["MKT", "AY"], targets=[1])
    with pytest.raises(ProteinDataError, match="record 'sequence 1' has 1 residue labels for 2 residues"):
        records_from_lists(["MKT", "AY"], residue_labels=[[0, 1, 2], [1]])
    with pytest.raises(ProteinDataError, match=r"'sequence 0' in the given list has 'J' at residue 2"):
        records_from_lists(["MJ"])


def test_limit_length_crops_labels_refuses_or_skips():
    records = [ProteinRecord("a", "MKTAY", residue_labels=(0, 1, 2, 0, 1)), ProteinRecord("b", "MK")]
    issues = DataIssues()
    cropped = limit_length(records, 3, "crop", issues)
    assert cropped[0] == ProteinRecord("a", "MKT", residue_labels=(0, 1, 2)) and issues.cropped == 1
    assert [r.id for r in limit_length(records, 3, "skip", issues)] == ["b"]
    assert issues.skipped["longer than max_residues"] == 1
    with pytest.raises(ProteinDataError, match="record 'a' has 5 residues, more than the limit of 3"):
        limit_length(records, 3, "refuse")


def _flip_files(root, labels_line="HHEC"):
    (root / "flip" / "secondary_structure").mkdir(parents=True)
    folder = root / "flip" / "secondary_structure"
    (folder / "sequences.fasta").write_text(">p1\nMKTA\n>p2\nMK\n")
    (folder / "mask.fasta").write_text(">p1\n0111\n>p2\n11\n")
    (folder / "sampled.fasta").write_text(
        f">p1 SET=train VALIDATION=False\n{labels_line}\n>p2 SET=test VALIDATION=False\nCC\n"
    )
    return folder


def test_per_residue_labels_join_mask_and_check_length(tmp_path, monkeypatch):
    from pipelines.protein.data import read_residue_labels

    folder = _flip_files(tmp_path)
    decode = {"H": 0, "E": 1, "C": 2}
    args = (
        folder / "sampled.fasta",
        folder / "sequences.fasta",
        decode,
        "error",
        None,
        folder / "mask.fasta",
    )
    records = read_residue_labels(*args)
    assert records[0].residue_labels == (IGNORE_INDEX, 0, 1, 2) and records[1].split == "test"
    (folder / "sampled.fasta").write_text(">p1 SET=train VALIDATION=False\nHHE\n")
    with pytest.raises(
        ProteinDataError, match="record 'p1' in .* has a label line of 3 characters for a sequence of 4"
    ):
        read_residue_labels(*args)
    issues = DataIssues()
    assert (
        read_residue_labels(*args[:3], "skip", issues, args[5]) == []
        and issues.skipped["invalid record"] == 1
    )


def test_flip_gb1_from_mirror(flip_mirror):
    groups = split_records(load_flip_gb1("three_vs_rest"))
    assert {k: len(v) for k, v in groups.items()} == {"train": 2691, "valid": 299, "test": 5743}
    assert {len(r.sequence) for r in groups["test"]} == {265}
    with pytest.raises(ProteinDataError, match="unknown FLIP GB1 split 'four_vs_rest'"):
        load_flip_gb1("four_vs_rest")


def test_flip_secondary_structure_and_bind_from_mirror(flip_mirror):
    groups = split_records(load_flip_secondary_structure())
    assert {k: len(v) for k, v in groups.items()} == {"train": 9712, "valid": 1080, "test": 364}
    unresolved = sum(label == IGNORE_INDEX for r in groups["test"] for label in r.residue_labels)
    mask = (flip_mirror / "flip/secondary_structure/mask.fasta").read_text().split(">")[1:]
    test_ids = {r.id for r in groups["test"]}
    zeros = sum(entry.split("\n", 1)[1].count("0") for entry in mask if entry.split("\n", 1)[0] in test_ids)
    assert unresolved == zeros > 0
    issues = DataIssues()
    bind = split_records(load_flip_bind("one_vs_many", issues=issues))
    assert {k: len(v) for k, v in bind.items()} == {"train": 996, "valid": 114, "test": 250}
    assert issues.duplicate_ids == 46  # FLIP's one_vs_many lists 46 proteins twice
    metal = load_flip_bind("one_vs_many", ligand="metal")
    raw = dict(read_fasta(flip_mirror / "flip/bind/one_vs_many.fasta"))
    first = next(iter(raw.values()))
    assert list(metal[0].residue_labels) == [int(int(c) & 1) for c in first]


def test_split_values_val_and_validation_mean_valid_in_any_case_and_other_values_are_an_error(tmp_path):
    path = tmp_path / "mine.csv"
    rows = ["Train", "train", "val", "VALIDATION", "Valid", "test", "TEST", "dev", "dev", "fold1"]
    path.write_text("sequence,target,set\n" + "".join(f"MKT,{i},{s}\n" for i, s in enumerate(rows)))
    with pytest.raises(ProteinDataError) as error:
        read_csv_records(path, split_column="set")
    assert str(error.value) == (
        f"{path} has split value(s) 'dev' (2 records), 'fold1' (1 record) in column 'set'; accepted: train, "
        "valid (or val, validation), test, in any case; fix them, or set data.options.on_invalid: skip to "
        "drop those records"
    )
    issues = DataIssues()
    records = read_csv_records(path, split_column="set", on_invalid="skip", issues=issues)
    assert [r.split for r in records] == ["train", "train", "valid", "valid", "valid", "test", "test"]
    assert issues.as_dict()["skipped"] == {"unknown split value": 3}
    assert issues.as_dict()["skipped_total"] == 3
    fasta = tmp_path / "mine.fasta"
    fasta.write_text(">a set=Val\nMKT\n>b SET=holdout\nMKV\n")
    with pytest.raises(ProteinDataError, match=r"split value\(s\) 'holdout' \(1 record\) in the SET= header"):
        read_fasta_records(fasta)
    lab = [ProteinRecord("a", "MK", 1.0, split="val"), ProteinRecord("b", "MK", 1.0, split="Dev")]
    with pytest.raises(ProteinDataError, match=r"records have split value\(s\) 'Dev' \(1\); accepted"):
        split_records(lab)
    assert split_records(lab[:1])["valid"] == [ProteinRecord("a", "MK", 1.0, split="valid")]


def test_non_finite_targets_are_refused_at_load_time_naming_every_row(tmp_path):
    path = tmp_path / "fitness.csv"
    path.write_text(
        "sequence,target,set\nMKT,1.5,train\nMKV,nan,train\nMKW,2,test\nMKA,inf,test\nMKC,NaN,train\n"
    )
    with pytest.raises(ProteinDataError) as error:
        read_csv_records(path, split_column="set")
    assert str(error.value) == (
        f"record 'row 3' in {path} has target 'nan', not a finite number (3 bad records in all; also "
        "'row 5', 'row 6'); fix the records or set data.options.on_invalid: skip"
    )
    with pytest.raises(ProteinDataError, match=r"'sequence 1'; drop them or give them a value"):
        records_from_lists(["MKT", "MKV"], targets=[1.0, float("nan")])


def test_empty_header_only_and_truncated_csv_files_are_one_line_naming_the_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ProteinDataError, match=rf"^{empty} is empty; a protein CSV needs a header row"):
        read_csv_records(empty)
    header = tmp_path / "header.csv"
    header.write_text("sequence,target,set\n")
    with pytest.raises(ProteinDataError, match=rf"^{header} has a header row but no records"):
        read_csv_records(header, split_column="set")
    quote = tmp_path / "quote.csv"
    quote.write_text('sequence,target,set\nMKT,1,train\nMKV,"2')
    with pytest.raises(
        ProteinDataError, match=rf"^{quote} line 3 is not valid CSV \(.*\); is the file truncated"
    ):
        read_csv_records(quote, split_column="set")
    short = tmp_path / "short.csv"
    short.write_text("sequence,target,set\nMKT,1,train\nMKV")
    with pytest.raises(
        ProteinDataError, match=r"record 'row 3' in .*short\.csv has 1 fields for the header's 3"
    ):
        read_csv_records(short, split_column="set")
    (tmp_path / "empty.fasta").write_text("\n")
    with pytest.raises(ProteinDataError, match=r"empty\.fasta is empty: it holds no FASTA record"):
        read_fasta_records(tmp_path / "empty.fasta")


def test_fasta_headers_carry_per_sequence_targets_in_any_case(tmp_path):
    path = tmp_path / "fitness.fasta"
    path.write_text(
        ">a TARGET=0.53 SET=train VALIDATION=False\nMKT\n>b target=1e-1 set=TRAIN validation=true\nMKV\n"
        ">c Target=-2 SET=test\nMKW\n"
    )
    records = read_fasta_records(path, require_target=True)
    assert [(r.id, r.target, r.split) for r in records] == [
        ("a", 0.53, "train"), ("b", 0.1, "valid"), ("c", -2.0, "test"),
    ]  # fmt: skip
    path.write_text(">a TARGET=0.5\nMKT\n>b\nMKV\n>c TARGET=NaN\nMKW\n")
    with pytest.raises(ProteinDataError) as error:
        read_fasta_records(path, require_target=True)
    assert str(error.value).startswith(
        f"record 'b' in {path} has no TARGET= in its header (per-sequence FASTA: '>b TARGET=0.53 SET=train') "
        "(2 bad records in all; also 'c')"
    )
