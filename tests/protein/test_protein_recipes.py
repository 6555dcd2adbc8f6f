"""Protein recipes on the user's own files: faults stop the run with one line, splits cut when missing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from pipelines import cli
from pipelines.core.runner import run_recipe
from pipelines.protein.data import ProteinDataError
from pipelines.protein.datasets import DataOptions, load_splits


def _sequences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), int(rng.integers(8, 16)))) for _ in range(n)]


def _recipe_file(tmp_path, path, task="regression", options=None, dataset=None, compare=("one_hot",)):
    recipe = {
        "name": "mine", "pipeline": "protein/sequence", "seed": 0, "backbone": {"name": "esm2_tiny_random"},
        "data": {"dataset": dataset or str(path), "task": task,
                 "options": {**({"path": str(path)} if dataset else {}), **(options or {})}},
        "stages": [{"name": "task", "objective": "regression" if task == "regression" else "classification",
                    "adapter": {"method": "lora", "r": 2, "targets": ["q", "v"]},
                    "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3}}],
        "evaluation": {"bootstrap": 10}, "compare": list(compare), "output_dir": str(tmp_path / "runs"),
    }  # fmt: skip
    file = tmp_path / "mine.yaml"
    file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return file


def _run_fails(capsys, recipe_file) -> str:
    """Run through the command line; return its one error line."""
    assert cli.main(["run", str(recipe_file)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("peft-pipelines: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0].removeprefix("peft-pipelines: error: ")


def _report(tmp_path) -> dict:
    (report,) = (tmp_path / "runs" / "mine").glob("*/report.json")  # a failed run leaves a folder
    return json.loads(report.read_text())


def test_unknown_split_values_stop_the_run_and_skipped_ones_are_counted(tmp_path, capsys):
    splits = ["train"] * 20 + ["Train"] * 10 + ["val"] * 6 + ["TEST"] * 8 + ["dev"] * 5 + ["fold 2"]
    rows = [f"{s},{i % 5},{split}" for i, (s, split) in enumerate(zip(_sequences(50), splits, strict=True))]
    path = tmp_path / "mine.csv"
    path.write_text("sequence,target,set\n" + "\n".join(rows) + "\n")
    message = _run_fails(capsys, _recipe_file(tmp_path, path))
    assert message == (
        f"{path} has split value(s) 'dev' (5 records), 'fold 2' (1 record) in column 'set'; accepted: train, "
        "valid (or val, validation), test, in any case; fix them, or set data.options.on_invalid: skip to "
        "drop those records"
    )
    assert cli.main(["run", str(_recipe_file(tmp_path, path, options={"on_invalid": "skip"}))]) == 0
    dataset = _report(tmp_path)["dataset"]
    assert dataset["sizes"] == {"train": 30, "valid": 6, "test": 8}
    assert dataset["issues"]["skipped"] == {"unknown split value": 6}
    assert dataset["issues"]["skipped_total"] == 6


@pytest.mark.parametrize("split", ["test", "train"])
def test_a_one_class_split_of_a_classification_task_is_refused_before_training(tmp_path, capsys, split):
    sequences = _sequences(40)
    labels = [i % 2 for i in range(30)] + [0] * 10 if split == "test" else [1] * 30 + [0, 1] * 5
    rows = [
        f"{s},{y},{'test' if i >= 30 else 'train'}"
        for i, (s, y) in enumerate(zip(sequences, labels, strict=True))
    ]
    path = tmp_path / "binding.csv"
    path.write_text("sequence,target,set\n" + "\n".join(rows) + "\n")
    message = _run_fails(capsys, _recipe_file(tmp_path, path, task="binary"))
    found = "class 0: 10 records" if split == "test" else "class 1: 27 records"  # 3 of 30 held out as valid
    assert message.startswith(f"the {split} split of {path} holds one class only ({found}); a binary task ")
    (run_dir,) = (tmp_path / "runs" / "mine").iterdir()
    assert not (run_dir / "train").exists() and not (run_dir / "report.json").exists()


@pytest.mark.parametrize(
    "content,expected",
    [
        ("", "{path} is empty; a protein CSV needs a header row (sequence,target,set)"),
        ("sequence,target,set\n", "{path} has a header row but no records"),
        ("sequence,target,set\nMKT,1,train\nMKV,2,train\n", "{path} has no test records (train 2, valid 0, "),
        ("sequence,target,set\nMKT,1,train\nMKV,nan,test\nMKW,2,test\n", "record 'row 3' in {path} has "
         "target 'nan', not a finite number; fix the records"),
        ('sequence,target,set\nMKT,1,train\nMKV,2,test\nMKW,"3', "{path} line 4 is not valid CSV"),
        ("sequence,target,set\nMKT,1,train\nMKV,2,test\nMKW", "record 'row 4' in {path} has 1 fields for the "
         "header's 3 (is the file truncated"),
    ],
    ids=["empty", "header-only", "no-test", "nan-target", "open-quote", "truncated"],
)  # fmt: skip
def test_faults_in_the_users_file_are_one_line_naming_that_file(tmp_path, capsys, content, expected):
    path = tmp_path / "fitness.csv"
    path.write_text(content)
    message = _run_fails(capsys, _recipe_file(tmp_path, path, dataset="flip_gb1"))  # copied from gb1_lora
    assert message.startswith(expected.format(path=path)) and "flip_gb1" not in message


def test_fasta_with_targets_and_no_split_is_split_automatically_with_the_ids_in_splits_json(tmp_path):
    sequences = _sequences(60)
    path = tmp_path / "fitness.fasta"
    path.write_text("".join(f">p{i} TARGET={s.count('W') + 0.5}\n{s}\n" for i, s in enumerate(sequences)))
    run_dir = run_recipe(_recipe_file(tmp_path, path, options={"test_fraction": 0.2}))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["dataset"]["sizes"] == {"train": 43, "valid": 5, "test": 12}  # 20% of 60, then 10% of 48
    assert report["dataset"]["cut"] == {
        "test": "0.2 of all records (seed 0)", "valid": "0.1 of the training records (seed 0)"
    }  # fmt: skip
    assert (
        "The data has no test split, so the pipeline cut one: 0.2 of all records (seed 0)." in report["notes"]
    )
    assert "The record ids of each split are in splits.json in the run folder." in report["notes"]
    written = json.loads((run_dir / "splits.json").read_text())
    ids = written["ids"]
    assert sorted(ids["train"] + ids["valid"] + ids["test"], key=lambda i: int(i[1:])) == [
        f"p{i}" for i in range(60)
    ]
    assert written["sizes"] == report["dataset"]["sizes"] and written["seed"] == 0


def test_csv_without_a_set_column_is_split_by_class_for_classification_and_the_same_for_a_seed(tmp_path):
    sequences = _sequences(80)
    labels = [int(i % 4 == 0) for i in range(80)]  # 20 positives, 60 negatives
    path = tmp_path / "binding.csv"
    path.write_text(
        "sequence,target\n" + "".join(f"{s},{y}\n" for s, y in zip(sequences, labels, strict=True))
    )
    options = DataOptions(path=str(path), test_fraction=0.25, valid_fraction=0.2)
    groups, info, _ = load_splits(str(path), options, "sequence", 1022, seed=3, stratify=True)
    positives = {k: sum(r.target for r in v) for k, v in groups.items()}
    assert {k: len(v) for k, v in groups.items()} == {"train": 48, "valid": 12, "test": 20}
    assert positives == {"train": 12, "valid": 3, "test": 5}  # a quarter of each split, as in the file
    again, _, _ = load_splits(str(path), options, "sequence", 1022, seed=3, stratify=True)
    assert {k: [r.id for r in v] for k, v in again.items()} == {
        k: [r.id for r in v] for k, v in groups.items()
    }
    other, _, _ = load_splits(str(path), options, "sequence", 1022, seed=4, stratify=True)
    assert [r.id for r in other["test"]] != [r.id for r in groups["test"]]
    with pytest.raises(ProteinDataError, match=r"has no column\(s\) \['fold'\]"):  # a named column must exist
        load_splits(str(path), DataOptions(path=str(path), split_column="fold"), "sequence", 1022)


def test_an_own_csv_in_flip_layout_keeps_its_validation_rows(tmp_path):
    path = tmp_path / "aav.csv"
    sequences = _sequences(12)
    flags = ["True", "False", "False", "True", "False", "False", "False", "False", "", "", "", ""]
    sets = ["train"] * 8 + ["test"] * 4
    rows = [
        f"{s},{i},{split},{flag}"
        for i, (s, split, flag) in enumerate(zip(sequences, sets, flags, strict=True))
    ]
    path.write_text("sequence,target,set,validation\n" + "\n".join(rows) + "\n")
    groups, info, _ = load_splits(str(path), DataOptions(), "sequence", 1022)
    assert [r.id for r in groups["valid"]] == ["row 2", "row 5"] and info["cut"] == {}
    assert {k: len(v) for k, v in groups.items()} == {"train": 6, "valid": 2, "test": 4}


def test_stage_objectives_out_of_order_are_refused_at_validate_with_their_yaml_path(tmp_path, capsys):
    file = _recipe_file(tmp_path, tmp_path / "unused.csv")
    recipe = yaml.safe_load(file.read_text())
    task = recipe["stages"][0]
    recipe["stages"] = [{**task, "name": "first"}, {**task, "objective": "classification"}]
    file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert cli.main(["validate", str(file)]) == 2
    out = capsys.readouterr().out
    assert "stages.0.objective" in out and "stage 'first' comes before the task stage" in out
    assert "stages.1.objective" in out and "must be 'regression' for task 'regression'" in out
