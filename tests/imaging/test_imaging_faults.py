"""Bad imaging data is refused before training with one line naming the file or split and the fix."""

from __future__ import annotations

import json
import re

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


def _npz(path):
    arrays = {f"{s}_{k}": np.zeros((8, 8, 8), np.uint8) if k == "images" else np.arange(8)[:, None] % 2
              for s in ("train", "val", "test") for k in ("images", "labels")}  # fmt: skip
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("damage", ["truncated", "text"])
def test_a_damaged_npz_is_named_and_never_called_pickled(tmp_path, capsys, tiny_vit, damage):
    path = _npz(tmp_path / "mine.npz")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text("not numpy")
    err = _one_line_error(capsys, ["run", _recipe(tmp_path, path, tiny_vit)])
    assert f"{path} is not a valid .npz file (" in err and "copy it again" in err and "pickle" not in err
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(ValueError, match=r"one.npz holds a single array \(.npy format\), not an .npz"):
        load_dataset_splits(None, str(tmp_path / "one.npz"))


def _labels_csv(tmp_path, rows: int = 40) -> list[str]:
    _png_folder(tmp_path / "images", {"a": rows // 2, "b": rows // 2})
    return ["image,label"] + [f"images/{'ab'[i % 2]}/{i // 2}.png,{i % 2}" for i in range(rows)]


def test_a_cut_short_csv_and_csv_gz_are_named_with_the_fix(tmp_path, capsys, tiny_vit):
    import gzip

    lines = _labels_csv(tmp_path)
    text = "\n".join(lines) + "\n"
    (tmp_path / "labels.csv").write_text(text[: text.index(lines[-1]) + 6])  # the last row cut in its path
    err = _one_line_error(capsys, ["run", _recipe(tmp_path, tmp_path / "labels.csv", tiny_vit)])
    assert f"{tmp_path / 'labels.csv'} line 41 has 1 fields, the header 2; the file may be cut short" in err
    packed = gzip.compress(text.encode())
    (tmp_path / "labels.csv.gz").write_bytes(packed[: len(packed) // 2])
    err = _one_line_error(capsys, ["run", _recipe(tmp_path, tmp_path / "labels.csv.gz", tiny_vit)])
    assert f"{tmp_path / 'labels.csv.gz'} could not be read as a UTF-8 CSV (gzip) (EOFError)" in err
    (tmp_path / "labels.csv.gz").write_bytes(packed)  # whole, it reads
    assert len(load_dataset_splits(None, str(tmp_path / "labels.csv.gz"))[0]["train"]) == 28


@pytest.mark.parametrize(
    "row,message",
    [
        ("images/a/0.png,x", "line 2: label 'x' is not an integer class index"),
        ("images/a/99.png,0", "line 2: image file {root}/images/a/99.png does not exist"),
        ("images/a/0.png,0,validation", "line 2: split 'validation' is not train, val, test"),
    ],
)
def test_a_bad_csv_row_is_named(tmp_path, row, message):
    from pipelines.imaging.data import csv_records

    _labels_csv(tmp_path, 2)
    header = "image,label,split" if row.count(",") == 2 else "image,label"
    (tmp_path / "labels.csv").write_text(f"{header}\n{row}\n")
    with pytest.raises(ValueError, match=re.escape(message.format(root=tmp_path))):
        csv_records(tmp_path / "labels.csv")


@pytest.mark.parametrize("damage", ["text", "truncated"])
def test_an_unreadable_png_is_named_in_one_line_not_a_monai_traceback(tmp_path, capsys, tiny_vit, damage):
    from pipelines.imaging.data import ImageFileError, TransformOptions, build_transforms, make_dataset

    folder = _png_folder(tmp_path / "images", {"normal": 6, "pneumonia": 6})
    bad = folder / "pneumonia" / "3.png"
    if damage == "text":
        bad.write_text("this is not a PNG")
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:400])
    err = _one_line_error(capsys, ["run", _recipe(tmp_path, folder, tiny_vit)])
    assert f"image file {bad} could not be read (" in err and "replace it or remove it" in err
    records = [{"image": str(bad), "label": 1}]
    transform = build_transforms(TransformOptions(image_size=8), False, from_files=True)
    dataset = make_dataset(records, transform, cache_rate=0.0)  # read while training: the same one line
    with pytest.raises(ImageFileError, match=f"image file {re.escape(str(bad))} could not be read"):
        dataset[0]


def test_hf_references_to_missing_folders_say_so(tmp_path):
    from pipelines.imaging.backbones import load_backbone

    with pytest.raises(FileNotFoundError, match=r"backbone folder ./no/such/model does not exist; give a"):
        load_backbone("hf:./no/such/model", pretrained=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="backbone folder .*empty has no config.json"):
        load_backbone(f"hf:{tmp_path / 'empty'}", pretrained=False)
    with pytest.raises(ValueError, match=r"imaging data 'hf:org/chest' names a hub dataset; .* local files"):
        load_dataset_splits("hf:org/chest")
