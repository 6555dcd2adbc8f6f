from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.imaging.data import (
    TransformOptions,
    build_transforms,
    collate,
    csv_records,
    folder_records,
    load_dataset_splits,
    make_dataset,
    npz_records,
    split_records,
    subsample,
)

MIRROR = Path(os.environ.get("PEFT_PIPELINES_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def _records(n_per_class=(30, 10)):
    images = np.arange(sum(n_per_class) * 64, dtype=np.uint8).reshape(-1, 8, 8)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])[:, None]
    return npz_records(images, labels)


def test_npz_records_are_channel_first_with_int_labels():
    records = _records()
    assert records[0]["image"].shape == (1, 8, 8) and records[0]["label"] == 0 and records[-1]["label"] == 1
    rgb = npz_records(np.zeros((2, 8, 8, 3), np.uint8), np.array([[0], [1]]))
    assert rgb[0]["image"].shape == (3, 8, 8)
    volume = npz_records(np.zeros((2, 4, 8, 8), np.uint8), np.array([0, 1]), spatial_dims=3)
    assert volume[0]["image"].shape == (1, 4, 8, 8)
    multilabel = npz_records(np.zeros((2, 8, 8), np.uint8), np.array([[0, 1, 1], [1, 0, 0]]))
    assert multilabel[0]["label"].tolist() == [0.0, 1.0, 1.0]


def test_subsample_is_stratified_seeded_and_exact():
    records = _records((30, 10))
    kept = subsample(records, fraction=0.1, seed=0)
    assert Counter(r["label"] for r in kept) == {0: 3, 1: 1}
    assert kept == subsample(records, fraction=0.1, seed=0)
    shots = subsample(records, shots_per_class=4, seed=1)
    assert Counter(r["label"] for r in shots) == {0: 4, 1: 4}
    assert subsample(records) == records
    with pytest.raises(ValueError, match="data.fraction must be in"):
        subsample(records, fraction=0.0)


def test_split_records_is_stratified_and_disjoint():
    splits = split_records(_records((30, 10)), val=0.1, test=0.2, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 28, "val": 4, "test": 8}
    assert Counter(r["label"] for r in splits["test"]) == {0: 6, 1: 2}
    ids = [id(r) for split in splits.values() for r in split]
    assert len(ids) == len(set(ids)) == 40


def test_transforms_scale_resize_and_augment_only_for_training():
    record = {"image": np.full((1, 8, 8), 255, np.uint8), "label": 1}
    record["image"][0, 0, 0] = 0
    options = TransformOptions(image_size=16, rotate_degrees=30.0)
    evaluation = build_transforms(options, train=False)
    out = evaluation(dict(record))["image"]
    assert isinstance(out, torch.Tensor) and out.shape == (1, 16, 16) and out.dtype == torch.float32
    assert float(out.max()) == 1.0 and float(out.min()) == 0.0
    assert torch.equal(out, evaluation(dict(record))["image"])
    names = [type(t).__name__ for t in build_transforms(options, train=True).transforms]
    assert "RandAffined" in names and "RandAffined" not in [type(t).__name__ for t in evaluation.transforms]
    volume = build_transforms(TransformOptions(image_size=[4, 6, 6]), train=True, spatial_dims=3)
    assert volume({"image": np.zeros((1, 8, 8, 8), np.uint8)})["image"].shape == (1, 4, 6, 6)


def test_cache_dataset_and_collate_make_batches():
    dataset = make_dataset(_records((3, 3)), build_transforms(TransformOptions(image_size=12), False), 1.0)
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["image"].shape == (6, 1, 12, 12) and batch["label"].tolist() == [0, 0, 0, 1, 1, 1]
    assert batch["label"].dtype == torch.int64


def test_folder_and_csv_of_png_files_load_through_monai(tmp_path):
    from PIL import Image

    for name, value in (("normal", 20), ("pneumonia", 200)):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 12), value + i, np.uint8)).save(
                tmp_path / "images" / name / f"{i}.png"
            )
    records, classes = folder_records(tmp_path / "images")
    assert classes == ["normal", "pneumonia"] and [r["label"] for r in records] == [0, 0, 0, 1, 1, 1]
    transform = build_transforms(TransformOptions(image_size=16, intensity="range"), False, from_files=True)
    image = transform(dict(records[4]))["image"]
    assert image.shape == (1, 16, 16) and float(image.mean()) == pytest.approx(201 / 255, abs=1e-5)
    (tmp_path / "labels.csv").write_text("image,label\nimages/normal/0.png,0\nimages/pneumonia/2.png,1\n")
    rows = csv_records(tmp_path / "labels.csv")
    assert rows[1] == {"image": str(tmp_path / "images/pneumonia/2.png"), "label": 1}
    with pytest.raises(ValueError, match="has no column 'target'"):
        csv_records(tmp_path / "labels.csv", label_column="target")


def test_user_npz_without_val_and_test_is_split(tmp_path):
    path = tmp_path / "mine.npz"
    np.savez(path, train_images=np.zeros((20, 8, 8), np.uint8), train_labels=np.arange(20)[:, None] % 2)
    splits, info = load_dataset_splits(None, str(path))
    assert info["splits"] == {"train": 14, "val": 2, "test": 4} and len(info["sha256"]) == 64


def test_pneumoniamnist_from_the_mirror(monkeypatch):
    if not (MIRROR / "medmnist" / "pneumoniamnist.npz").is_file():
        pytest.skip(f"PneumoniaMNIST is not in the data mirror {MIRROR} (set PEFT_PIPELINES_DATA)")
    monkeypatch.setenv("PEFT_PIPELINES_DATA", str(MIRROR))
    splits, info = load_dataset_splits("pneumoniamnist")
    assert info["splits"] == {"train": 4707, "val": 524, "test": 624}
    assert Counter(r["label"] for r in splits["train"]) == {0: 1213, 1: 3494}
    assert Counter(r["label"] for r in splits["test"]) == {0: 234, 1: 390}
