"""Reading a user's image data files: MedMNIST ``.npz``, folders of class sub-folders, CSVs of image paths
(plain or ``.csv.gz``) and the image files themselves, each refused with one line naming the file.

A damaged or cut-short file, a CSV row with missing fields, a label that is not a class index or a path that
does not exist, a class folder without images, an image file that cannot be read (a text file named
``.png``, a truncated PNG): each is a ``ValueError`` naming the file (and row) and the fix, raised where the
file is read, not deep inside MONAI (whose transform errors wrap it; :class:`FileDataset` unwraps them).
"""

from __future__ import annotations

import csv
import gzip
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFileError",
    "load_npz_splits",
    "folder_records",
    "csv_records",
    "ReadImage",
    "FileDataset",
    "image_file_errors",
]

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".dcm",
    ".nii",
    ".nii.gz",
    ".nrrd",
    ".mha",
)


SPLITS = ("train", "val", "test")


class ImageFileError(ValueError):
    """An image file that cannot be read; the message names it (the command line prints one line)."""


def load_npz_splits(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read a MedMNIST ``.npz`` (``{split}_images``, ``{split}_labels``) as split -> (images, labels)."""
    write = "numpy.savez(path, train_images=..., train_labels=..., ...)"
    try:
        archive = np.load(path)  # allow_pickle stays False: a pickle is never loaded
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError(f"{path} holds a single array (.npy format), not an .npz; write it with {write}")
        with archive:
            keys = set(archive.files)
            splits = {
                split: (archive[f"{split}_images"], archive[f"{split}_labels"])
                for split in ("train", "val", "test")
                if f"{split}_images" in keys and f"{split}_labels" in keys
            }
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        if str(error).startswith(str(path)):
            raise
        raise ValueError(
            f"{path} is not a valid .npz file ({type(error).__name__}); copy it again if it was cut short, "
            f"or write it with {write}"
        ) from error
    if "train" not in splits:
        raise ValueError(
            f"{path} has no train_images/train_labels arrays (keys: {sorted(keys)}); not a MedMNIST file"
        )
    return splits


def folder_records(root: Path, classes: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """Records from ``root/<class name>/<image files>``.

    Args:
        root: The folder of class sub-folders.
        classes: The class names of a trained model (label ``i`` is ``classes[i]``); every sub-folder must
            be one of them. None: the sorted sub-folder names.

    Returns:
        (records with file paths, class names).
    """
    root = Path(root)
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not found:
        raise ValueError(f"{root} has no class sub-folders; lay images out as {root}/<class>/<image>")
    unknown = [name for name in found if classes is not None and name not in classes]
    if unknown:
        raise ValueError(
            f"{root} has class folders {unknown} the model was not trained on (its classes: {classes}); "
            "rename or remove them"
        )
    classes = list(classes) if classes is not None else found
    records = []
    for name in found:
        index = classes.index(name)
        images = [p for p in sorted((root / name).rglob("*")) if p.is_file() and _is_image_name(p)]
        if not images:
            raise ValueError(
                f"class folder {root / name} has no images ({', '.join(IMAGE_EXTENSIONS)}); add its images "
                "or remove the folder"
            )
        records += [{"image": str(path), "label": index} for path in images]
    return records, classes


def _is_image_name(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_EXTENSIONS)


def csv_records(path: Path, image_column: str = "image", label_column: str = "label") -> list[dict]:
    """Records from a CSV (or ``.csv.gz``) with an image path column (relative to the CSV's folder) and an
    integer label; a ``split`` column (train, val or test in every row), when present, is kept in each
    record."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as handle:
            return _csv_rows(path, csv.reader(handle), image_column, label_column)
    except (EOFError, OSError, UnicodeDecodeError, zlib.error, csv.Error) as error:
        raise ValueError(
            f"{path} could not be read as a UTF-8 CSV{' (gzip)' if opener is gzip.open else ''} "
            f"({type(error).__name__}); copy it again if it was cut short, or save it as UTF-8"
        ) from error


def _csv_rows(path: Path, reader: Any, image_column: str, label_column: str) -> list[dict]:
    header = next(reader, [])
    for column in (image_column, label_column):
        if column not in header:
            raise ValueError(f"{path} has no column '{column}' (columns: {header})")
    records = []
    for values in reader:
        if not values:
            continue
        line = f"{path} line {reader.line_num}"
        if len(values) != len(header):
            raise ValueError(
                f"{line} has {len(values)} fields, the header {len(header)}; the file may be cut short: "
                "fix or remove the row"
            )
        row = dict(zip(header, values, strict=True))
        try:
            label = int(row[label_column])
        except ValueError:
            raise ValueError(
                f"{line}: {label_column} '{row[label_column]}' is not an integer class index; fix the row"
            ) from None
        image = Path(row[image_column])
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise ValueError(f"{line}: image file {image} does not exist; fix the path (relative to the CSV)")
        split = {"split": row["split"]} if "split" in row else {}
        if split and split["split"] not in SPLITS:
            raise ValueError(f"{line}: split '{split['split']}' is not {', '.join(SPLITS)}; fix the row")
        records.append({"image": str(image), "label": label, **split})
    return records


class ReadImage:
    """MONAI's ``LoadImaged``, raising one :class:`ImageFileError` that names a file it cannot read."""

    def __init__(self, keys: list[str]):
        from monai import transforms as mt

        self.load = mt.LoadImaged(keys, image_only=True)

    def __call__(self, record: dict) -> dict:
        try:
            return self.load(record)
        except FileNotFoundError as error:
            raise ImageFileError(f"image file {record['image']} does not exist; fix its path") from error
        except Exception as error:  # every reader (PIL, ITK, nibabel, pydicom) has its own error types
            raise ImageFileError(
                f"image file {record['image']} could not be read ({type(error).__name__}); it is cut short "
                "or not an image of its extension: replace it or remove it from the data"
            ) from error


@contextmanager
def image_file_errors():
    """Re-raise the :class:`ImageFileError` that MONAI wrapped in its ``applying transform`` RuntimeErrors."""
    try:
        yield
    except RuntimeError as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, ImageFileError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise ImageFileError(str(cause)) from cause.__cause__


class FileDataset:
    """A MONAI dataset of image files whose unreadable file is one :class:`ImageFileError`."""

    def __init__(self, dataset: Any):
        self.dataset, self.data = dataset, dataset.data

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        with image_file_errors():
            return self.dataset[index]
