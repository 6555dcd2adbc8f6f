"""Bad imaging data is refused before training with one line naming the file or split and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipelines import cli
from pipelines.core.registry import create_pipeline
from pipelines.imaging.data import load_dataset_splits


def _png_folder(root, counts: dict[str, int]):
    for index, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8), 40 + 100 * index + i, np.uint8)).save(root / name / f"{i}.png")
    return root


def _recipe(tmp_path, dataset, tiny_vit) -> str:
    recipe = {
        "name": "faults", "pipeline": "imaging/classification", "seed": 0,
        "backbone": {"name": "timm:vit_tiny_patch16_224", "options": tiny_vit},
        "data": {"dataset": str(dataset), "task": "binary",
                 "options": {"transforms": {"image_size": 32, "augment": False}}},
        "stages": [{"name": "task", "objective": "classification", "adapter": {"method": "lora", "r": 2},
                    "train": {"max_steps": 1, "batch_size": 4}}],
        "evaluation": {"bootstrap": 0}, "output_dir": str(tmp_path / "runs"),
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return str(path)


def _one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("peft-pipelines: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_a_single_class_folder_is_refused_before_training_naming_the_split_and_counts(
    tmp_path, capsys, tiny_vit
):
    folder = _png_folder(tmp_path / "images", {"normal": 10})
    with pytest.raises(ValueError, match=r"split 'train' has images of one class only \(normal: 7\)"):
        load_dataset_splits(None, str(folder))
    err = _one_line_error(capsys, ["run", _recipe(tmp_path, folder, tiny_vit)])
    assert f"{folder}: split 'train' has images of one class only (normal: 7)" in err
    assert not list((tmp_path / "runs").rglob("metrics.jsonl"))  # nothing trained


def test_a_csv_split_of_one_class_or_none_is_refused_by_name(tmp_path):
    _png_folder(tmp_path / "images", {"a": 4, "b": 4})
    rows = ["image,label,split"] + [f"images/a/{i}.png,0,train" for i in range(2)]
    rows += [f"images/b/{i}.png,1,train" for i in range(2)] + ["images/a/2.png,0,val", "images/a/3.png,0,val"]
    (tmp_path / "labels.csv").write_text("\n".join(rows + ["images/b/2.png,1,test"]) + "\n")
    with pytest.raises(ValueError, match=r"split 'val' has images of one class only \(label 0: 2\)"):
        load_dataset_splits(None, str(tmp_path / "labels.csv"))
    (tmp_path / "labels.csv").write_text("\n".join(rows[:5]) + "\n")
    with pytest.raises(ValueError, match="split 'val' has no images"):
        load_dataset_splits(None, str(tmp_path / "labels.csv"))


def test_a_class_folder_without_images_is_named(tmp_path, capsys, tiny_vit):
    folder = _png_folder(tmp_path / "images", {"normal": 10, "pneumonia": 10})
    (folder / "empty").mkdir()
    (folder / "empty" / "notes.txt").write_text("no images here")
    err = _one_line_error(capsys, ["run", _recipe(tmp_path, folder, tiny_vit)])
    assert f"class folder {folder / 'empty'} has no images (.png" in err and "remove the folder" in err


def test_lab_fit_refuses_one_class_before_training(tiny_vit):
    records = [{"image": np.zeros((1, 8, 8), np.uint8), "label": 1} for _ in range(6)]
    pipe = create_pipeline("imaging/classification", backbone="timm:vit_tiny_patch16_224",
                           backbone_options=tiny_vit, adapter={"method": "lora", "r": 2})  # fmt: skip
    one_class = r"has images of one class only \(label 1: 6\)"
    with pytest.raises(ValueError, match=r"fit\(\): split 'train' " + one_class):
        pipe.fit(records)
    both = [{**r, "label": i % 2} for i, r in enumerate(records)]
    with pytest.raises(ValueError, match=r"fit\(\): split 'val' " + one_class):
        pipe.fit(both, records)
    assert pipe.model is None  # refused before a model was built
