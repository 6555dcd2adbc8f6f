"""Recipe-level faults of the clinical pipeline give one line naming the file and a non-zero exit."""

from __future__ import annotations

import gzip
import re

import pandas as pd
import pytest
import yaml

from pipelines import cli
from pipelines.clinical.backbones import BackboneError, load_backbone
from pipelines.clinical.data import NotesError
from pipelines.clinical.notes_file import load_notes_file

SECRET = "PRIVATE"


@pytest.fixture
def notes_csv(tmp_path, synthetic_notes):
    """A good notes CSV (each text ends in a marker that must never reach a message)."""
    ids, texts, labels = synthetic_notes(n=40)
    path = tmp_path / "notes.csv"
    frame = pd.DataFrame({"note_id": ids, "text": [f"{t} {SECRET}" for t in texts], "label": labels})
    frame.to_csv(path, index=False)
    return path


def _recipe(tmp_path, dataset, backbone: str = "tiny-random-llama"):
    recipe = {
        "name": "tiny_errors",
        "pipeline": "clinical/two_stage",
        "backbone": {"name": backbone},
        "data": {"dataset": str(dataset), "task": "binary"},
        "stages": [{"name": "task", "objective": "classification",
                    "adapter": {"method": "lora", "r": 2, "targets": ["q_proj"]}, "trainable": ["task"],
                    "train": {"epochs": 1, "batch_size": 8}, "options": {"max_length": 16}}],
        "evaluation": {"bootstrap": 10},
        "output_dir": str(tmp_path / "runs"),
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _one_line_error(capsys, argv: list[str]) -> str:
    """Run the command line; assert it fails with exactly one line on stderr and return that line."""
    capsys.readouterr()
    assert cli.main(argv) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("peft-pipelines: error: "), lines
    assert SECRET not in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("{tmp}/no/such/folder", r"backbone path .*/no/such/folder does not exist; give a transformers model "
                                 r"folder \(with config.json\), a .gguf file, a hub id"),
        ("{tmp}/missing.gguf", r"backbone GGUF file .*/missing.gguf does not exist; give the path of an "
                               "existing .gguf file"),
        ("{tmp}/empty", r"backbone folder .*/empty has no config.json, so it is not a model folder"),
        ("{tmp}/weights.bin", r"backbone path .*/weights.bin is a file but not a .gguf file"),
        ("{tmp}/broken.gguf", r"backbone GGUF file .*/broken.gguf could not be read \(\w+\)"),
    ],
)  # fmt: skip
def test_a_missing_or_wrong_backbone_path_is_one_line_naming_it(tmp_path, notes_csv, capsys, name, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"x")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF cut short")
    name = name.format(tmp=tmp_path)
    with pytest.raises(BackboneError, match=expected):
        load_backbone(name)
    line = _one_line_error(capsys, ["run", str(_recipe(tmp_path, notes_csv, backbone=name))])
    assert name in line


def _truncated_gzip(path, notes_csv):
    packed = gzip.compress(notes_csv.read_bytes())
    path.write_bytes(packed[: len(packed) // 2])


def _truncated_csv(path, notes_csv):
    raw = notes_csv.read_bytes()
    cut = raw.rindex(b",", 0, len(raw) // 2)  # just before a label: the last row lacks it
    path.write_bytes(raw[:cut])


def _not_utf8(path, notes_csv):
    path.write_bytes(b"note_id,text,label\na,fine,1\nb,caf\xe9,0\n")


def _unclosed_quote(path, notes_csv):
    path.write_bytes(b'note_id,text,label\na,fine,1\nb,"cut in the quote')


def _empty(path, notes_csv):
    path.write_text("note_id,text,label\n")


def _zero_bytes(path, notes_csv):
    path.write_bytes(b"")


def _misnamed(path, notes_csv):
    pd.read_csv(notes_csv).rename(columns={"text": "note"}).to_csv(path, index=False)


@pytest.mark.parametrize(
    ("file", "make", "expected"),
    [
        ("notes.csv.gz", _truncated_gzip, r" is cut short \(its gzip stream ends before the end marker\)"),
        ("cut.csv", _truncated_csv, r" ends in the middle of a row \(its last row lacks column 'label' and "
                                    "has no line end\\), so it looks cut short"),
        ("latin1.csv", _not_utf8, r" is not UTF-8 text \(first invalid byte at offset 33, line 3\)"),
        ("quote.csv", _unclosed_quote, r" cannot be read as CSV near row \d+ \(ParserError\): a quoted field "
                                       "never closes"),
        ("empty.csv", _empty, r": no notes \(a header and no rows\); give one row per note"),
        ("zero.csv", _zero_bytes, r" is empty; give a header row and one row per note"),
        ("misnamed.csv", _misnamed, r": no column\(s\) \['text'\] \(its columns: \['note_id', 'note', "
                                    r"'label'\]\); set text_column"),
    ],
)  # fmt: skip
def test_a_broken_notes_file_is_one_line_naming_it(tmp_path, notes_csv, capsys, file, make, expected):
    path = tmp_path / file
    make(path, notes_csv)
    with pytest.raises(NotesError, match=re.escape(f"notes file {path}") + expected) as error:
        load_notes_file(path)
    assert SECRET not in str(error.value)
    line = _one_line_error(capsys, ["run", str(_recipe(tmp_path, path))])
    assert line == f"peft-pipelines: error: {error.value}"


def test_the_first_row_with_an_extra_field_is_refused_not_made_the_index(tmp_path):
    path = tmp_path / "extra.csv"
    path.write_text(f"text,label\n{SECRET} one,1,3\nb,0\n")
    with pytest.raises(NotesError, match="a row has more fields than the header") as error:
        load_notes_file(path)
    assert SECRET not in str(error.value)


def test_the_first_bad_byte_is_found_across_chunks(tmp_path):
    path = tmp_path / "big.csv.gz"
    head = b"text,label\n" + b"x,1\n" * 300_000  # over one read chunk
    with gzip.open(path, "wb") as handle:
        handle.write(head + "\u00e9".encode()[:1] + b",0\n")
    with pytest.raises(NotesError, match=f"first invalid byte at offset {len(head)}, line 300002"):
        load_notes_file(path)
