"""Dataset registry: lookup, checksums (files and folders), downloads and the error messages."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from pipelines.core import data
from pipelines.core.data import (
    DataError,
    DatasetInfo,
    data_dir,
    dataset_dir,
    dataset_file,
    get_dataset,
    list_datasets,
    register_dataset,
    sha256_file,
    sha256_folder,
    verify_dataset,
)

MIRROR = Path(__file__).resolve().parents[3] / "shared" / "data"


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@pytest.fixture
def root(tmp_path, monkeypatch):
    """An empty data directory, set through the environment; the registry is restored afterwards."""
    folder = tmp_path / "data"
    folder.mkdir()
    monkeypatch.setenv("PEFT_PIPELINES_DATA", str(folder))
    monkeypatch.delenv("PEFT_PIPELINES_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_DATASETS", {})
    monkeypatch.setattr(data, "_VERIFIED", {})
    return folder


def _write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_data_dir_from_environment_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_PIPELINES_DATA", str(tmp_path / "x"))
    assert data_dir() == tmp_path / "x"
    monkeypatch.delenv("PEFT_PIPELINES_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_dir() == tmp_path / ".cache" / "peft-pipelines" / "data"


def test_dataset_file_returns_verified_path(root):
    _write(root / "toy" / "a.csv", b"x,y\n1,2\n")
    register_dataset(DatasetInfo("toy", files={"toy/a.csv": _sha(b"x,y\n1,2\n")}))
    assert dataset_file("toy", "toy/a.csv") == root / "toy" / "a.csv"
    assert list_datasets() == ["toy"] and list_datasets("t*") == ["toy"] and list_datasets("z*") == []


def test_missing_file_message_names_file_place_and_fix(root):
    register_dataset(DatasetInfo("toy", files={"toy/a.csv": "0" * 64}, card="toy"))
    with pytest.raises(DataError) as error:
        dataset_file("toy", "toy/a.csv")
    assert str(error.value) == (
        f"dataset 'toy' file 'toy/a.csv' is missing from {root} (from $PEFT_PIPELINES_DATA); "
        "set $PEFT_PIPELINES_DATA to a folder that holds toy/a.csv, or obtain it as described in its card "
        "(data card: data_cards/toy.md)"
    )


def test_missing_file_offline_names_the_url(root, monkeypatch):
    monkeypatch.setenv("PEFT_PIPELINES_OFFLINE", "1")
    url = "https://example.org/a.csv"
    register_dataset(DatasetInfo("toy", files={"toy/a.csv": "0" * 64}, urls={"toy/a.csv": url}))
    with pytest.raises(DataError, match="no download: \\$PEFT_PIPELINES_OFFLINE is set") as error:
        dataset_file("toy", "toy/a.csv")
    assert str(error.value).endswith(f"or download it from {url}")
    assert "\n" not in str(error.value)


def test_corrupt_file_message_has_both_sums(root):
    path = _write(root / "toy" / "a.csv", b"tampered")
    expected = _sha(b"original")
    register_dataset(DatasetInfo("toy", files={"toy/a.csv": expected}))
    with pytest.raises(DataError) as error:
        dataset_file("toy", "toy/a.csv")
    message = str(error.value)
    assert message.startswith(
        f"dataset 'toy' file {path} has sha256 {_sha(b'tampered')} but {expected} was expected"
    )
    assert "set $PEFT_PIPELINES_DATA to a folder that holds toy/a.csv" in message


def test_checksum_is_computed_once_per_path_size_and_mtime(root, monkeypatch):
    path = _write(root / "toy" / "a.csv", b"abc")
    register_dataset(DatasetInfo("toy", files={"toy/a.csv": _sha(b"abc")}))
    calls = []
    monkeypatch.setattr(data, "sha256_file", lambda p: calls.append(p) or _sha(Path(p).read_bytes()))
    dataset_file("toy", "toy/a.csv")
    dataset_file("toy", "toy/a.csv")
    assert len(calls) == 1
    stat = path.stat()
    path.write_bytes(b"abd")  # same size; a new mtime makes it check again and catch the change
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match="but .* was expected"):
        dataset_file("toy", "toy/a.csv")
    assert len(calls) == 2


def test_folder_checksum_is_over_sorted_names(root):
    folder = root / "speech" / "clips"
    for name, content in [("b.wav", b"BB"), ("a.wav", b"A"), ("c.wav", b"CCC"), ("notes.txt", b"skip")]:
        _write(folder / name, content)
    expected = _sha(b"A" + b"BB" + b"CCC")
    assert sha256_folder(folder, "*.wav") == expected
    register_dataset(DatasetInfo("clips", folders={"speech/clips": ("*.wav", expected)}))
    assert dataset_dir("clips") == folder
    _write(folder / "d.wav", b"D")
    data._VERIFIED.clear()
    with pytest.raises(DataError, match=f"but {expected} was expected"):
        dataset_dir("clips")


def test_empty_or_missing_folder_is_reported(root):
    register_dataset(DatasetInfo("clips", folders={"speech/clips": ("*.wav", "0" * 64)}))
    with pytest.raises(
        DataError, match="folder 'speech/clips' is missing from .*; set \\$PEFT_PIPELINES_DATA"
    ):
        dataset_dir("clips")
    (root / "speech" / "clips").mkdir(parents=True)
    with pytest.raises(DataError, match="folder 'speech/clips' is missing from .*\\(no files match \\*.wav"):
        dataset_dir("clips")


def test_download_from_url_then_verify(root, tmp_path):
    source = _write(tmp_path / "upstream" / "a.csv", b"1,2\n")
    register_dataset(
        DatasetInfo("toy", files={"toy/a.csv": _sha(b"1,2\n")}, urls={"toy/a.csv": source.as_uri()})
    )
    assert dataset_file("toy", "toy/a.csv").read_bytes() == b"1,2\n"


def test_bad_download_is_removed_and_reported(root, tmp_path):
    source = _write(tmp_path / "upstream" / "a.csv", b"changed upstream")
    register_dataset(DatasetInfo("toy", files={"toy/a.csv": _sha(b"x")}, urls={"toy/a.csv": source.as_uri()}))
    with pytest.raises(DataError, match=f"has sha256 {_sha(b'changed upstream')} but {_sha(b'x')}"):
        dataset_file("toy", "toy/a.csv")
    assert not (root / "toy" / "a.csv").exists()


def test_download_zip_member_and_zip_folder(root, tmp_path):
    archive = tmp_path / "splits.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("gb1/sampled.csv", b"s,t\n")
        handle.writestr("recs/1.wav", b"one")
        handle.writestr("recs/0.wav", b"zero")
    register_dataset(
        DatasetInfo(
            "zipped",
            files={"z/sampled.csv": _sha(b"s,t\n")},
            folders={"z/recs": ("*.wav", _sha(b"zero" + b"one"))},
            urls={
                "z/sampled.csv": f"{archive.as_uri()}#gb1/sampled.csv",
                "z/recs": f"{archive.as_uri()}#recs",
            },
        )
    )
    assert dataset_file("zipped", "z/sampled.csv").read_bytes() == b"s,t\n"
    assert sorted(p.name for p in dataset_dir("zipped", "z/recs").iterdir()) == ["0.wav", "1.wav"]
    assert verify_dataset("zipped") == []


def test_unknown_names_are_listed(root):
    register_dataset(DatasetInfo("toy", files={"toy/a.csv": "0" * 64}))
    with pytest.raises(DataError, match="unknown dataset 'tyo' \\(registered: toy\\)"):
        get_dataset("tyo")
    with pytest.raises(DataError, match="dataset 'toy' has no file 'toy/b.csv' \\(its files: toy/a.csv\\)"):
        dataset_file("toy", "toy/b.csv")


def test_registration_conflicts_and_urls_without_checksums(root):
    info = DatasetInfo("toy", files={"toy/a.csv": "0" * 64})
    assert register_dataset(info) == register_dataset(DatasetInfo("toy", files={"toy/a.csv": "0" * 64}))
    assert list_datasets() == ["toy"]
    with pytest.raises(DataError, match="already registered with different files"):
        register_dataset(DatasetInfo("toy", files={"toy/a.csv": "1" * 64}))
    with pytest.raises(DataError, match="URLs for \\['toy/b.csv'\\] that are neither in files nor folders"):
        register_dataset(DatasetInfo("other", files={}, urls={"toy/b.csv": "https://x"}))


def test_verify_dataset_reports_each_problem(root):
    _write(root / "toy" / "a.csv", b"bad")
    register_dataset(DatasetInfo("toy", files={"toy/a.csv": _sha(b"good"), "toy/b.csv": _sha(b"b")}))
    problems = verify_dataset("toy")
    assert len(problems) == 2
    assert "has sha256" in problems[0] and "'toy/b.csv' is missing" in problems[1]


@pytest.mark.skipif(not (MIRROR / "SHA256SUMS").is_file(), reason=f"data mirror not found at {MIRROR}")
def test_mirror_matches_its_sha256sums(monkeypatch):
    monkeypatch.setenv("PEFT_PIPELINES_DATA", str(MIRROR))
    monkeypatch.setattr(data, "_DATASETS", {})
    files, folders = {}, {}
    for line in (MIRROR / "SHA256SUMS").read_text().splitlines():
        digest, relpath = line.split(maxsplit=1)
        if "*" in relpath:  # "fsdd/recordings/*.wav (concatenated in sorted name order)"
            pattern_path = relpath.split()[0]
            folders[str(Path(pattern_path).parent)] = (Path(pattern_path).name, digest)
        else:
            files[relpath] = digest
    register_dataset(DatasetInfo("mirror", files=files, folders=folders))
    assert folders == {"fsdd/recordings": ("*.wav", folders["fsdd/recordings"][1])}
    assert verify_dataset("mirror") == []
    assert (
        sha256_file(dataset_file("mirror", "mtsamples/mtsamples.csv.gz"))
        == files["mtsamples/mtsamples.csv.gz"]
    )
