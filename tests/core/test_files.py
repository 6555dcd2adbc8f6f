"""Atomic writes with the user's umask (pipelines.core.files)."""

from __future__ import annotations

import os
import stat
import tempfile

import pytest

from pipelines.core.files import (
    apply_umask,
    atomic_write,
    current_umask,
    write_bytes_atomic,
    write_text_atomic,
)


@pytest.fixture
def umask():
    """Sets a umask for one test and restores the old one."""
    saved = os.umask(0o022)
    os.umask(saved)

    def use(mask: int) -> None:
        os.umask(mask)

    yield use
    os.umask(saved)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_atomic_files_get_the_mode_open_would_give(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_text_atomic(tmp_path / "report.md", "# report\n")
    write_bytes_atomic(tmp_path / "adapter.bin", b"\x00\x01")
    assert mode(tmp_path / "report.md") == mode(tmp_path / "adapter.bin") == mode(plain) == 0o666 & ~mask
    assert (tmp_path / "report.md").read_text() == "# report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.bin", "plain.txt", "report.md"]


def test_mkstemp_files_are_private_until_apply_umask(tmp_path, umask):
    umask(0o022)
    handle, name = tempfile.mkstemp(dir=tmp_path)
    os.close(handle)
    assert mode(name) == 0o600  # why the helper exists
    apply_umask(name)
    assert mode(name) == 0o644


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    (tmp_path / "report.json").write_text("old")

    def fails(temporary: str) -> None:
        with open(temporary, "w") as handle:
            handle.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(tmp_path / "report.json", fails)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    assert (tmp_path / "report.json").read_text() == "old"


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_reports_and_adapter_files_follow_the_umask(tmp_path, umask, mask):
    import torch

    from pipelines.core.evaluation import RunResult, write_report
    from pipelines.core.peft import LoRA, add_adapter, save_adapter

    umask(mask)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    add_adapter(model, LoRA(r=2, targets=["0"]), name="task")
    folder = save_adapter(model, tmp_path / "adapter", name="task")
    result = RunResult("toy", "toy/x", "regression", "mse", "m", {"m": {"mse": 1.0}})
    written = write_report(tmp_path / "run", result)
    files = [p for p in [*folder.iterdir(), *written] if p.is_file()]
    assert files and {mode(p) for p in files} == {0o666 & ~mask}
