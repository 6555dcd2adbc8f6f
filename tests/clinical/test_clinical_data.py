from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipelines.clinical.data import (
    Notes,
    NotesError,
    class_weights,
    load_mtsamples,
    mtsamples_task,
    read_splits,
    split_notes,
    stratified_subset,
    write_splits,
)
from pipelines.clinical.notes_file import load_notes_file, notes_from_frame


def test_mtsamples_counts_and_merged_duplicates(mirror):
    frame, counts = load_mtsamples()
    assert counts == {"rows": 4999, "empty_dropped": 33, "duplicate_rows_merged": 2609, "notes": 2357}
    assert frame["note_id"].is_unique and len(frame) == 2357
    assert list(frame.columns) == ["note_id", "text", "specialties"]


def test_mtsamples_binary_task_labels_every_copy_of_a_note(mirror):
    notes = mtsamples_task("cardiopulmonary_vs_rest")
    assert notes.task == "binary" and notes.class_names == ["rest", "Cardiovascular / Pulmonary"]
    assert len(notes) == 2357 and int(notes.labels.sum()) == 371
    assert notes.source["sha256"].startswith("54a8e65b")


def test_mtsamples_multiclass_drops_ambiguous_notes(mirror):
    notes = mtsamples_task("top_specialties", num_classes=4)
    assert notes.class_names == ["Cardiovascular / Pulmonary", "Orthopedic", "Gastroenterology", "Neurology"]
    kept = notes.counts["notes"] - notes.counts["no_class_dropped"] - notes.counts["several_classes_dropped"]
    assert len(notes) == kept and set(np.unique(notes.labels)) == {0, 1, 2, 3}
    multilabel = mtsamples_task("specialties_multilabel", num_classes=4)
    assert multilabel.labels.shape == (2357, 4)
    assert multilabel.labels.sum(axis=0).tolist() == [371, 355, 224, 223]


def test_unknown_mtsamples_task_names_the_choices():
    with pytest.raises(NotesError, match="unknown MTSamples task 'x'; pick one of cardiopulmonary_vs_rest"):
        mtsamples_task("x")


def test_repr_and_errors_never_show_note_text():
    notes = Notes(["a", "b"], ["SECRET NOTE", "OTHER"], np.array([0, 1]), "binary", ["0", "1"])
    assert "SECRET" not in repr(notes) and "n=2" in repr(notes)
    frame = pd.DataFrame({"text": ["SECRET NOTE", "x"], "label": [None, 1], "id": ["p1", "p2"]})
    with pytest.raises(NotesError) as error:
        notes_from_frame(frame, id_column="id")
    assert "SECRET" not in str(error.value) and "['p1']" in str(error.value)


def test_frame_loader_infers_binary_multiclass_multilabel():
    frame = pd.DataFrame(
        {
            "text": ["a", "b", " ", "c", "d"],
            "y": ["no", "yes", "yes", "no", "yes"],
            "kind": ["x", "z", "y", "y", "x"],
            "l1": [0, 1, 1, 0, 1],
            "l2": [1, 1, 0, 0, 0],
        }
    )
    binary = notes_from_frame(frame, label_columns="y")
    assert binary.task == "binary" and binary.class_names == ["no", "yes"]
    assert binary.labels.tolist() == [0, 1, 0, 1] and binary.ids == ["0", "1", "3", "4"]
    assert binary.counts == {"rows": 5, "empty_dropped": 1, "notes": 4}
    multiclass = notes_from_frame(frame, label_columns="kind")
    assert multiclass.task == "multiclass" and multiclass.labels.tolist() == [0, 2, 1, 0]
    multilabel = notes_from_frame(frame, label_columns=["l1", "l2"])
    assert multilabel.task == "multilabel" and multilabel.labels.tolist() == [[0, 1], [1, 1], [0, 0], [1, 0]]
    missing = r"the notes: no column\(s\) \['note'\] \(its columns: \['text', 'y'"
    with pytest.raises(NotesError, match=missing):
        notes_from_frame(frame, text_column="note", label_columns="y")


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_file_loader_round_trips(tmp_path, suffix):
    frame = pd.DataFrame({"note_id": ["a", "b", "c"], "text": ["x y", "z", "w"], "label": [1, 0, 1]})
    path = tmp_path / f"notes.{suffix}"
    frame.to_csv(path, index=False) if suffix == "csv" else frame.to_json(path, orient="records", lines=True)
    notes = load_notes_file(path, id_column="note_id")
    assert notes.ids == ["a", "b", "c"] and notes.labels.tolist() == [1, 0, 1] and notes.task == "binary"
    assert len(notes.source["sha256"]) == 64
    with pytest.raises(NotesError, match="is not .csv, .csv.gz, .jsonl or .parquet"):
        (tmp_path / "n.txt").write_text("x")
        load_notes_file(tmp_path / "n.txt")


def test_splits_are_seeded_stratified_disjoint_and_written_as_ids(tmp_path, synthetic_notes):
    ids, texts, labels = synthetic_notes(n=100)
    notes = Notes(ids, texts, labels, "binary", ["0", "1"])
    splits = split_notes(notes, seed=3)
    again = split_notes(notes, seed=3)
    assert all(np.array_equal(splits[k], again[k]) for k in splits)
    assert not np.array_equal(splits["train"], split_notes(notes, seed=4)["train"])
    assert [len(splits[k]) for k in ("train", "val", "test")] == [70, 10, 20]
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(100))
    assert int(labels[splits["test"]].sum()) == 10
    path = write_splits(tmp_path, notes, splits, seed=3)
    text = path.read_text()
    assert texts[0] not in text and json.loads(text)["sizes"] == {"train": 70, "val": 10, "test": 20}
    back = read_splits(path, notes)
    assert all(np.array_equal(back[k], splits[k]) for k in splits)
    subset = stratified_subset(splits["train"], notes, 20, seed=0)
    assert len(subset) == 20 and int(labels[subset].sum()) == 10 and set(subset) <= set(splits["train"])


def test_class_weights():
    assert class_weights(np.array([0, 0, 0, 1]), "binary").tolist() == [3.0]
    assert class_weights(np.array([0, 0, 1, 2]), "multiclass").tolist() == pytest.approx(
        [4 / 6, 4 / 3, 4 / 3]
    )
    assert class_weights(np.array([[1, 0], [0, 0], [1, 1], [0, 0]]), "multilabel").tolist() == [1.0, 3.0]
