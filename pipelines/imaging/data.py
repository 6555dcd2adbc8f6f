"""Imaging data: MedMNIST ``.npz`` files, folders and CSVs of image files, through MONAI transforms.

Every source (read by :mod:`pipelines.imaging.readers`) becomes a list of records ``{"image": array or
path, "label": int | list}``, split into train/val/test, each split of at least two classes;
:func:`build_transforms` makes the MONAI chain (load, channel first, intensity scaling to [0, 1], resize,
augmentation for training only) and :func:`make_dataset` wraps records in a MONAI ``Dataset`` or
``CacheDataset``. Grey images stay one channel here; the backbone repeats the channel when
its network wants three.

Augmentation draws from NumPy's global generator, which the training loop seeds, saves in checkpoints and
PyTorch seeds per DataLoader worker: the same recipe and seed give the same augmented batches, a resumed
run continues the stream exactly, and workers do not repeat each other (MONAI's default generators are
seeded from the operating system, so every run differed, and copied into every worker).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipelines.core.data import DatasetInfo, dataset_file, register_dataset, sha256_file
from pipelines.core.sampling import low_data_indices
from pipelines.imaging.readers import (
    FileDataset,
    ImageFileError,
    ReadImage,
    csv_records,
    folder_records,
    image_file_errors,
    load_npz_splits,
)

__all__ = [
    "PNEUMONIAMNIST",
    "ImageFileError",
    "TransformOptions",
    "load_npz_splits",
    "npz_records",
    "folder_records",
    "csv_records",
    "path_records",
    "label_key",
    "class_counts",
    "check_classes",
    "subsample",
    "split_records",
    "build_transforms",
    "make_dataset",
    "collate",
    "load_dataset_splits",
]

PNEUMONIAMNIST = register_dataset(
    DatasetInfo(
        name="pneumoniamnist",
        files={
            "medmnist/pneumoniamnist.npz": "8821e51f95ef260032fbdc2a85ab2d41017ef1ea16ebdaa2f75c06f55635766b"
        },
        # No download URL: the official file (https://zenodo.org/records/10519652/files/pneumoniamnist.npz)
        # has 4,708 training images, the mirror's rebuilt train split 4,707, so their checksums differ.
        # A user with the official file passes it as data.options.path instead.
        card="pneumoniamnist",
        license="CC BY 4.0",
        description="PneumoniaMNIST (MedMNIST v2): 28x28 grey chest X-rays, normal (0) vs pneumonia (1)",
        homepage="https://zenodo.org/records/10519652",
    )
)
MEDMNIST_FILES = {"pneumoniamnist": "medmnist/pneumoniamnist.npz"}


class TransformOptions(BaseModel):
    """MONAI transform settings (the pipeline options' ``transforms`` section)."""

    model_config = ConfigDict(extra="forbid")

    image_size: int | list[int] = Field(
        70, description="Resize target: one side for every axis, or per axis."
    )
    intensity: Literal["range", "minmax"] = Field(
        "range", description="'range' maps intensity_range linearly to [0, 1] and clips; 'minmax' per image."
    )
    intensity_range: tuple[float, float] = Field(
        (0.0, 255.0), description="Input range for 'range' (e.g. CT HU)."
    )
    augment: bool = Field(True, description="Random affine (and flips if flip_prob > 0) for training only.")
    rotate_degrees: float = Field(10.0, description="Largest random rotation in degrees.")
    zoom: float = Field(0.1, description="Largest random zoom change (0.1: 0.9x-1.1x).")
    flip_prob: float = Field(0.0, description="Left-right flip probability (off: anatomy is not symmetric).")
    cache_rate: float = Field(1.0, description="Share of records whose deterministic transforms are cached.")


def npz_records(images: np.ndarray, labels: np.ndarray, spatial_dims: int = 2) -> list[dict]:
    """Turn MedMNIST arrays into channel-first records.

    Args:
        images: (N, H, W) grey, (N, H, W, 3) colour, or (N, D, H, W) volumes when ``spatial_dims=3``.
        labels: (N,) or (N, 1) class indices, or (N, K) multilabel 0/1.
        spatial_dims: 2 or 3.

    Returns:
        Records ``{"image": (C, *spatial) array, "label": int or float32 array}``.
    """
    if images.ndim == spatial_dims + 1:
        images = images[:, None]
    elif spatial_dims == 2 and images.ndim == 4 and images.shape[-1] in (1, 3):
        images = np.moveaxis(images, -1, 1)
    else:
        raise ValueError(
            f"images of shape {images.shape} are not {spatial_dims}D grey or RGB; check spatial_dims"
        )
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim == 1:
        return [{"image": image, "label": int(label)} for image, label in zip(images, labels, strict=True)]
    return [
        {"image": image, "label": label.astype(np.float32)}
        for image, label in zip(images, labels, strict=True)
    ]


def class_counts(records: list[dict], classes: list[str] | None = None) -> dict[str, int]:
    """Images per class, by class name when ``classes`` is given (else ``label <i>``), in label order."""
    counts = Counter(label_key(record) for record in records)
    return {(classes[k] if classes else f"label {k}"): counts[k] for k in sorted(counts)}


def check_classes(split: str, records: list[dict], where: str, classes: list[str] | None = None) -> None:
    """Refuse a split with no images, or with images of one class only (a classifier cannot learn or be
    scored on it), naming the split and its class counts."""
    if not records:
        raise ValueError(f"{where}: split '{split}' has no images; every split needs images of each class")
    if not isinstance(records[0]["label"], (int, np.integer)):
        return  # multilabel rows: every row may carry several labels
    counts = class_counts(records, classes)
    if len(counts) < 2:
        shown = ", ".join(f"{name}: {n}" for name, n in counts.items())
        raise ValueError(
            f"{where}: split '{split}' has images of one class only ({shown}); a classifier needs at least "
            "two classes in every split: add images (a class sub-folder) of the other classes"
        )


def path_records(
    path: str | Path, spatial_dims: int = 2, classes: list[str] | None = None
) -> tuple[dict[str, list[dict]] | list[dict], list[str] | None]:
    """The records of a folder of class sub-folders, a CSV (``.csv.gz``) or an ``.npz`` (lab code's data).

    Returns:
        (split -> records for a file that has splits: a CSV with a ``split`` column, an ``.npz``; or one
        list of records: a folder, a CSV without ``split``), and a folder's class names (``classes``,
        when given, fixes their order: see :func:`folder_records`), else None.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return folder_records(path, classes)
    if path.name.endswith((".csv", ".csv.gz")):
        records = csv_records(path)
        if not records or "split" not in records[0]:
            return records, None
        splits = {s: [r for r in records if r["split"] == s] for s in ("train", "val", "test")}
        return {s: kept for s, kept in splits.items() if kept}, None
    if path.suffix == ".npz":
        return {s: npz_records(x, y, spatial_dims) for s, (x, y) in load_npz_splits(path).items()}, None
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; give a folder of class sub-folders, a CSV or an .npz"
        )
    raise ValueError(f"{path} is neither a folder of class sub-folders, a .csv (.csv.gz) nor an .npz")


def label_key(record: dict) -> Any:
    """A record's class as a hashable key: the int, or a tuple of a multi-label row."""
    label = record["label"]
    return label if isinstance(label, int) else tuple(np.asarray(label).tolist())


def subsample(
    records: list[dict], fraction: float = 1.0, shots_per_class: int | None = None, seed: int = 0
) -> list[dict]:
    """Keep a stratified share of the records (low-data experiments), in their original order.

    Args:
        records: Records with a ``label``.
        fraction: Share kept per class (at least one record per class).
        shots_per_class: Exact count per class instead of a fraction (all of a class when it has fewer).
        seed: Seed of the draw.

    Returns:
        The kept records.
    """
    labels = [label_key(record) for record in records]
    return [records[i] for i in low_data_indices(len(records), labels, fraction, shots_per_class, seed)]


def split_records(records: list[dict], val: float = 0.1, test: float = 0.2, seed: int = 0) -> dict[str, list]:
    """Split records into train/val/test, stratified by label; a ``split`` field in a record wins."""
    if all("split" in r for r in records):
        return {s: [r for r in records if r["split"] == s] for s in ("train", "val", "test")}
    by_class: dict[Any, list[dict]] = defaultdict(list)
    for record in records:
        by_class[label_key(record)].append(record)
    rng = random.Random(seed)
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    for key in sorted(by_class, key=str):
        members = list(by_class[key])
        rng.shuffle(members)
        n_test, n_val = round(test * len(members)), round(val * len(members))
        splits["test"] += members[:n_test]
        splits["val"] += members[n_test : n_test + n_val]
        splits["train"] += members[n_test + n_val :]
    return splits


def build_transforms(options: TransformOptions, train: bool, spatial_dims: int = 2, from_files: bool = False):
    """Return the MONAI ``Compose`` of dictionary transforms for one split.

    Args:
        options: Transform settings.
        train: Add augmentation (training split only).
        spatial_dims: 2 or 3.
        from_files: Records hold file paths (adds ``LoadImaged``); otherwise channel-first arrays.
    """
    from monai import transforms as mt

    keys = ["image"]
    size = options.image_size
    spatial = [size] * spatial_dims if isinstance(size, int) else list(size)
    if len(spatial) != spatial_dims:
        raise ValueError(f"transforms.image_size {size} does not have {spatial_dims} axes")
    chain: list = []
    if from_files:
        chain += [ReadImage(keys), mt.EnsureChannelFirstd(keys)]
    if options.intensity == "range":
        low, high = options.intensity_range
        chain.append(mt.ScaleIntensityRanged(keys, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
    else:
        chain.append(mt.ScaleIntensityd(keys, minv=0.0, maxv=1.0))
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    chain.append(mt.Resized(keys, spatial_size=spatial, mode=mode))
    if train and options.augment:
        if options.flip_prob > 0:
            chain.append(mt.RandFlipd(keys, prob=options.flip_prob, spatial_axis=spatial_dims - 1))
        if options.rotate_degrees > 0 or options.zoom > 0:
            radians = np.deg2rad(options.rotate_degrees)
            chain.append(
                mt.RandAffined(
                    keys,
                    prob=0.8,
                    rotate_range=[radians] * (1 if spatial_dims == 2 else 3),
                    scale_range=[options.zoom] * spatial_dims,
                    padding_mode="border",
                    mode="bilinear",
                )
            )
    chain.append(mt.EnsureTyped(keys, dtype=np.float32, track_meta=False))
    compose = mt.Compose(chain)
    for transform in compose.transforms:  # see the module docstring
        if isinstance(transform, mt.Randomizable):
            transform.set_random_state(state=np.random.mtrand._rand)
    return compose


def make_dataset(records: list[dict], transform, cache_rate: float = 0.0):
    """Wrap records in a MONAI ``CacheDataset`` (deterministic transforms cached) or a plain ``Dataset``;
    records of image files also in a :class:`FileDataset`, which names a file that cannot be read."""
    from monai.data import CacheDataset, Dataset

    with image_file_errors():
        if cache_rate > 0:
            dataset = CacheDataset(records, transform, cache_rate=cache_rate, num_workers=0, progress=False)
        else:
            dataset = Dataset(records, transform)
    return FileDataset(dataset) if records and isinstance(records[0]["image"], str) else dataset


def collate(batch: list[dict]) -> dict:
    """Stack ``image`` and ``label`` into tensors (labels int64 for classes, float32 for multilabel)."""
    import torch

    images = torch.stack([torch.as_tensor(item["image"]) for item in batch])
    labels = [item["label"] for item in batch]
    if isinstance(labels[0], (int, np.integer)) or np.ndim(labels[0]) == 0:
        label_tensor = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    else:
        label_tensor = torch.as_tensor(np.stack([np.asarray(x, dtype=np.float32) for x in labels]))
    return {"image": images, "label": label_tensor}


def load_dataset_splits(
    dataset: str | None, path: str | None = None, spatial_dims: int = 2, seed: int = 0
) -> tuple[dict[str, list], dict]:
    """Records per split and the dataset's provenance for a registered name, an ``.npz``, a folder or a CSV.

    Returns:
        (split -> records, info dict with name, source, file or folder and sha256 where it is one file).
    """
    hub = next((given for given in (path, dataset) if given and given.startswith("hf:")), None)
    if hub is not None:
        local = "; drop the hf: prefix" if Path(hub[3:]).expanduser().exists() else ""
        raise ValueError(
            f"imaging data '{hub}' names a hub dataset; imaging/classification reads local files only: give "
            f"an .npz, a folder of class sub-folders or a CSV{local}"
        )
    if path is None:
        if dataset not in MEDMNIST_FILES:
            raise ValueError(
                f"imaging dataset '{dataset}' is unknown (known: {sorted(MEDMNIST_FILES)}); "
                "or set data.options.path to an .npz, a folder of class sub-folders, or a CSV"
            )
        source = dataset_file(dataset, MEDMNIST_FILES[dataset])
    else:
        source = Path(path).expanduser()
        if not source.exists():
            raise FileNotFoundError(
                f"data.options.path {source} does not exist; point it at an .npz, folder or CSV"
            )
    info: dict = {"name": dataset or source.stem, "path": str(source)}
    if source.is_file():
        info["sha256"] = sha256_file(source)
    if source.suffix == ".npz":
        arrays = load_npz_splits(source)
        splits = {name: npz_records(x, y, spatial_dims) for name, (x, y) in arrays.items()}
        if "test" not in splits or "val" not in splits:
            splits = split_records(splits["train"], seed=seed)
        info["kind"] = "npz"
    elif source.is_dir():
        records, classes = folder_records(source)
        splits, info["classes"], info["kind"] = split_records(records, seed=seed), classes, "folder"
    elif source.name.endswith((".csv", ".csv.gz")):
        splits, info["kind"] = split_records(csv_records(source), seed=seed), "csv"
    else:
        raise ValueError(f"data.options.path {source} is neither an .npz, a folder nor a .csv (.csv.gz)")
    for name in ("train", "val", "test"):
        check_classes(name, splits.get(name, []), str(source), info.get("classes"))
    info["splits"] = {name: len(records) for name, records in splits.items()}
    return splits, info
