"""Dataset registry: the files of each dataset, their checksums, official URLs and the data directory.

Domains register their datasets in their own ``data.py``; this module registers none. Files are looked
up under :func:`data_dir` (``$PEFT_PIPELINES_DATA``, else ``~/.cache/peft-pipelines/data``). A missing
file with an official URL is downloaded (unless ``$PEFT_PIPELINES_OFFLINE=1``) and every file is checked
against its sha256 once per process. A URL may name a member of a zip archive with a fragment:
``https://host/splits.zip#gb1/sampled.csv`` (for a folder, the fragment is the folder inside the zip).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DataError",
    "DatasetInfo",
    "register_dataset",
    "get_dataset",
    "list_datasets",
    "dataset_file",
    "dataset_dir",
    "data_dir",
    "verify_dataset",
    "sha256_file",
    "sha256_folder",
]

DATA_ENV = "PEFT_PIPELINES_DATA"
OFFLINE_ENV = "PEFT_PIPELINES_OFFLINE"
DEFAULT_DATA_DIR = Path("~/.cache/peft-pipelines/data")
_CHUNK = 1 << 20


class DataError(RuntimeError):
    """A dataset file is unknown, missing or does not match its checksum."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is made of and where it comes from.

    Attributes:
        name: Registry name, e.g. ``"pneumoniamnist"``.
        files: Relative path (under the data directory) -> sha256 of that file.
        folders: Relative folder -> (glob pattern, sha256 of all matching files concatenated in sorted
            name order), e.g. ``{"fsdd/recordings": ("*.wav", "ddb1...")}``.
        urls: Relative path (of a file or folder) -> official URL; ``url#member`` names a zip member.
        card: Name of the data card in ``data_cards/`` (without ``.md``).
        license: License of the data, e.g. ``"CC BY 4.0"``.
        description: One line.
        homepage: Where a person reads about the dataset and how to obtain it.
    """

    name: str
    files: dict[str, str] = field(default_factory=dict)
    folders: dict[str, tuple[str, str]] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    card: str | None = None
    license: str = ""
    description: str = ""
    homepage: str = ""


_DATASETS: dict[str, DatasetInfo] = {}
# (resolved path, size, mtime_ns) -> sha256, so each file is hashed once per process.
_VERIFIED: dict[tuple, str] = {}


def register_dataset(info: DatasetInfo, overwrite: bool = False) -> DatasetInfo:
    """Add a dataset to the registry; registering an identical entry again is a no-op.

    Returns:
        The registered info.
    """
    existing = _DATASETS.get(info.name)
    if existing is not None and existing != info and not overwrite:
        raise DataError(
            f"dataset '{info.name}' is already registered with different files; pick another name "
            "or pass overwrite=True"
        )
    unknown = set(info.urls) - set(info.files) - set(info.folders)
    if unknown:
        raise DataError(
            f"dataset '{info.name}' has URLs for {sorted(unknown)} that are neither in files nor folders; "
            "add their checksums or drop the URLs"
        )
    _DATASETS[info.name] = info
    return info


def unregister_dataset(name: str) -> None:
    """Remove a dataset from the registry (tests use this)."""
    _DATASETS.pop(name, None)


def get_dataset(name: str) -> DatasetInfo:
    """Return the registered info of a dataset, or raise DataError listing the known names."""
    try:
        return _DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(_DATASETS)) or "none"
        raise DataError(
            f"unknown dataset '{name}' (registered: {known}); import the domain that registers it, "
            "e.g. `import pipelines.imaging.data`"
        ) from None


def list_datasets(pattern: str = "*") -> list[str]:
    """Return the sorted names of registered datasets matching a shell pattern."""
    return sorted(n for n in _DATASETS if fnmatch.fnmatch(n, pattern))


def data_dir() -> Path:
    """Return the data directory: ``$PEFT_PIPELINES_DATA``, else ``~/.cache/peft-pipelines/data``."""
    value = os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else DEFAULT_DATA_DIR.expanduser()


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of one file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_members(folder: Path, pattern: str) -> list[Path]:
    return sorted((p for p in folder.glob(pattern) if p.is_file()), key=lambda p: p.name)


def sha256_folder(folder: Path, pattern: str = "*") -> str:
    """Return the sha256 of every file matching ``pattern`` concatenated in sorted name order."""
    digest = hashlib.sha256()
    for path in _folder_members(Path(folder), pattern):
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _where() -> str:
    if os.environ.get(DATA_ENV):
        return f"{data_dir()} (from ${DATA_ENV})"
    return f"{data_dir()} (the default; ${DATA_ENV} is unset)"


def _how_to_get(info: DatasetInfo, relpath: str) -> str:
    url = info.urls.get(relpath)
    source = f"download it from {url}" if url else f"obtain it as described in {info.homepage or 'its card'}"
    card = f" (data card: data_cards/{info.card}.md)" if info.card else ""
    return f"set ${DATA_ENV} to a folder that holds {relpath}, or {source}{card}"


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _fetch(url: str, target: Path) -> None:
    """Download ``url`` (optionally ``zip#member``) to ``target``; a folder member extracts a folder."""
    base, _, member = url.partition("#")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        download = Path(tmp) / "download"
        with urllib.request.urlopen(base, timeout=60) as response, open(download, "wb") as out:  # noqa: S310
            shutil.copyfileobj(response, out, _CHUNK)
        if not member:
            os.replace(download, target)
            return
        with zipfile.ZipFile(download) as archive:
            names = archive.namelist()
            if member in names:
                with archive.open(member) as src, open(Path(tmp) / "member", "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                os.replace(Path(tmp) / "member", target)
                return
            prefix = member.rstrip("/") + "/"
            inside = [n for n in names if n.startswith(prefix) and not n.endswith("/")]
            if not inside:
                raise OSError(f"the archive has no member '{member}'")
            staging = Path(tmp) / "folder"
            for name in inside:
                dest = staging / name[len(prefix) :]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(name) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)


def _missing(info: DatasetInfo, relpath: str, what: str, detail: str = "") -> DataError:
    extra = f" ({detail})" if detail else ""
    return DataError(
        f"dataset '{info.name}' {what} '{relpath}' is missing from {_where()}{extra}; "
        f"{_how_to_get(info, relpath)}"
    )


def _corrupt(info: DatasetInfo, relpath: str, path: Path, expected: str, actual: str) -> DataError:
    return DataError(
        f"dataset '{info.name}' file {path} has sha256 {actual} but {expected} was expected "
        f"(looked in {_where()}); replace it: {_how_to_get(info, relpath)}"
    )


def _ensure_present(info: DatasetInfo, relpath: str, path: Path, what: str) -> bool:
    """Download a missing path when possible; return whether a download happened."""
    if path.exists():
        return False
    url = info.urls.get(relpath)
    if not url:
        raise _missing(info, relpath, what)
    if _offline():
        raise _missing(info, relpath, what, f"no download: ${OFFLINE_ENV} is set")
    try:
        _fetch(url, path)
    except (OSError, zipfile.BadZipFile) as error:
        raise _missing(info, relpath, what, f"download from {url} failed: {error}") from error
    return True


def _check(info: DatasetInfo, relpath: str, path: Path, expected: str, actual: str, downloaded: bool) -> None:
    if actual == expected:
        return
    if downloaded and path.is_dir():  # never leave a bad download behind
        shutil.rmtree(path)
    elif downloaded:
        path.unlink()
    raise _corrupt(info, relpath, path, expected, actual)


def dataset_file(name: str, relpath: str) -> Path:
    """Return the verified path of one file of a registered dataset.

    Returns:
        The absolute path under :func:`data_dir`, checked against its sha256.

    Raises:
        DataError: The dataset or file is unknown, the file is missing (and could not be downloaded) or
            its checksum differs.
    """
    info = get_dataset(name)
    if relpath not in info.files:
        raise DataError(
            f"dataset '{name}' has no file '{relpath}' (its files: {', '.join(sorted(info.files)) or 'none'})"
        )
    path = data_dir() / relpath
    downloaded = _ensure_present(info, relpath, path, "file")
    if not path.is_file():
        raise _missing(info, relpath, "file", f"{path} is not a file")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = sha256_file(path)
    _check(info, relpath, path, info.files[relpath], _VERIFIED[key], downloaded)
    return path


def dataset_dir(name: str, relpath: str | None = None) -> Path:
    """Return the verified path of a folder of a registered dataset (e.g. FSDD's recordings).

    Args:
        name: Dataset name.
        relpath: Which folder; may be omitted when the dataset has exactly one.

    Returns:
        The absolute folder path; the files matching its pattern match the registered sha256.
    """
    info = get_dataset(name)
    if relpath is None:
        if len(info.folders) != 1:
            raise DataError(
                f"dataset '{name}' has {len(info.folders)} folders ({', '.join(sorted(info.folders))}); "
                "pass the one you want as relpath"
            )
        relpath = next(iter(info.folders))
    if relpath not in info.folders:
        raise DataError(
            f"dataset '{name}' has no folder '{relpath}' "
            f"(its folders: {', '.join(sorted(info.folders)) or 'none'})"
        )
    pattern, expected = info.folders[relpath]
    path = data_dir() / relpath
    downloaded = _ensure_present(info, relpath, path, "folder")
    members = _folder_members(path, pattern) if path.is_dir() else []
    if not members:
        raise _missing(info, relpath, "folder", f"no files match {pattern} in {path}")
    stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in members)
    key = (str(path.resolve()), pattern, stats)
    if key not in _VERIFIED:
        _VERIFIED[key] = sha256_folder(path, pattern)
    _check(info, relpath, path, expected, _VERIFIED[key], downloaded)
    return path


def verify_dataset(name: str, download: bool = False) -> list[str]:
    """Check every file and folder of a dataset.

    Args:
        name: Dataset name.
        download: Fetch missing parts from their URLs; otherwise a missing part is only reported.

    Returns:
        One message per problem; empty when the dataset is complete and intact.
    """
    info = get_dataset(name)
    problems = []
    parts = [(rel, dataset_file) for rel in info.files] + [(rel, dataset_dir) for rel in info.folders]
    for relpath, check in sorted(parts):
        if not download and not (data_dir() / relpath).exists():
            problems.append(str(_missing(info, relpath, "file" if check is dataset_file else "folder")))
            continue
        try:
            check(name, relpath)
        except DataError as error:
            problems.append(str(error))
    return problems
