"""Lab code's fit / evaluate take a folder of class sub-folders, a CSV or an .npz path, as recipes do."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipelines.core.registry import create_pipeline


def _folder(root, counts: dict[str, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    for index, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            base = 60 if name == "normal" else 180
            image = np.clip(rng.normal(base, 30, (12, 12)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / name / f"{index}_{i}.png")
    return root


def _pipe(tiny_vit):
    return create_pipeline(
        "imaging/classification", backbone="timm:vit_tiny_patch16_224", backbone_options=tiny_vit,
        adapter={"method": "lora", "r": 2}, transforms={"image_size": 32, "augment": False},
        train={"epochs": 1, "batch_size": 4}, bootstrap=10,
    )  # fmt: skip


def test_fit_and_evaluate_take_folders_and_keep_the_class_order(tmp_path, tiny_vit):
    train = _folder(tmp_path / "train", {"normal": 6, "pneumonia": 6})
    val = _folder(tmp_path / "val", {"normal": 3, "pneumonia": 3}, seed=1)
    pipe = _pipe(tiny_vit)
    result = pipe.fit(str(train), val)
    assert result.steps == 3 and pipe.classes == ["normal", "pneumonia"]
    assert pipe.operating_point["examples"] == 6
    _folder(tmp_path / "only_pneumonia", {"pneumonia": 4}, seed=2)
    y_true, _ = pipe.predict(tmp_path / "only_pneumonia")  # label 1, as in training, not 0
    assert y_true.tolist() == [1, 1, 1, 1]
    assert pipe.evaluate(val).n_examples == 6
    saved = pipe.save_adapter(tmp_path / "adapter")
    assert json.loads((saved / "imaging_head.json").read_text())["classes"] == ["normal", "pneumonia"]
    _folder(tmp_path / "other", {"effusion": 2, "normal": 2})
    with pytest.raises(ValueError, match=r"class folders \['effusion'\] the model was not trained on"):
        pipe.evaluate(tmp_path / "other")


def test_a_csv_with_a_split_column_gives_train_val_and_test(tmp_path, tiny_vit):
    _folder(tmp_path / "images", {"normal": 8, "pneumonia": 8})
    rows = ["image,label,split"]
    for i in range(16):
        name, label = ("normal", 0) if i < 8 else ("pneumonia", 1)
        split = ["train"] * 4 + ["val"] * 2 + ["test"] * 2
        rows.append(f"images/{name}/{label}_{i % 8}.png,{label},{split[i % 8]}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    pipe = _pipe(tiny_vit)
    assert pipe.fit(tmp_path / "labels.csv").steps == 2  # the 8 train rows, batches of 4
    assert pipe.operating_point["split"] == "val" and pipe.operating_point["examples"] == 4
    assert pipe.evaluate(tmp_path / "labels.csv").n_examples == 4  # the test rows


def test_fit_takes_an_npz_and_its_val_arrays(tmp_path, tiny_vit):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 8), ("val", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 12, 12)).astype(np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2)[:, None]
    np.savez(tmp_path / "mine.npz", **arrays)
    pipe = _pipe(tiny_vit)
    pipe.fit(tmp_path / "mine.npz")
    assert pipe.operating_point["examples"] == 6
    with pytest.raises(ValueError, match=r"mine.npz has no test split \(it has train, val\); give the test"):
        pipe.evaluate(tmp_path / "mine.npz")
