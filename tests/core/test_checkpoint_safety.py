"""Checkpoints that survive damage and a full disk: `last` and `previous`, fallback, one-line errors."""

from __future__ import annotations

import errno
import json
import logging
import os

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from test_training import assert_same_run, run_six_steps

from pipelines.core import checkpoint_files
from pipelines.core.training import CheckpointError


def step_of(directory) -> int:
    return json.loads((directory / "trainer_state.json").read_text())["progress"]["step"]


def snapshot(directory) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def test_the_last_two_checkpoints_are_kept(tmp_path):
    run_six_steps(tmp_path, checkpoint_every=2)
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last", "previous"]
    assert (step_of(checkpoints / "last"), step_of(checkpoints / "previous")) == (6, 4)


def damage_by_truncating(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "truncated or corrupt: Error while deserializing header"


def damage_with_a_pickle(path):
    torch.save({"weight": torch.zeros(3)}, path)
    return "a pickle (torch.save) file, not safetensors"


@pytest.mark.parametrize("damage", [damage_by_truncating, damage_with_a_pickle])
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    reference = run_six_steps(tmp_path / "a", checkpoint_every=2)
    run_six_steps(tmp_path / "b", checkpoint_every=2)
    checkpoints = tmp_path / "b" / "checkpoints"
    reason = damage(checkpoints / "last" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="pipelines.core.checkpoint"):
        resumed = run_six_steps(tmp_path / "b", resume=True, checkpoint_every=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"checkpoint file {checkpoints / 'last' / 'model.safetensors'} is damaged ({reason}"
    )
    assert warnings[0].endswith(
        f"(moved to {checkpoints / '.last.damaged'}); resuming from the previous checkpoint "
        f"{checkpoints / 'previous'} (step 4)"
    )
    assert_same_run(reference, resumed)  # steps 5 and 6 ran again from step 4's state
    # the good checkpoint it resumed from is still the previous one; the damaged one is not
    assert (step_of(checkpoints / "last"), step_of(checkpoints / "previous")) == (6, 4)
    load_file(checkpoints / "last" / "model.safetensors")


def test_when_every_checkpoint_is_damaged_the_error_names_the_files(tmp_path):
    run_six_steps(tmp_path, checkpoint_every=2)
    last, previous = tmp_path / "checkpoints" / "last", tmp_path / "checkpoints" / "previous"
    damage_with_a_pickle(last / "optimizer.safetensors")
    (previous / "trainer_state.json").write_text('{"progress": {"st')
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError) as error:
        run_six_steps(tmp_path, resume=True, checkpoint_every=2)
    assert str(error.value) == (
        f"checkpoint file {last / 'optimizer.safetensors'} (a pickle (torch.save) file, not safetensors) and "
        f"{previous / 'trainer_state.json'} (truncated or corrupt: Unterminated string starting at: line 1 "
        "column 15 (char 14)) are damaged; run without --resume to start fresh"
    )
    assert snapshot(tmp_path) == before


def full_disk_after(calls: int, error: BaseException):
    real, seen = checkpoint_files.save_file, []

    def save_file(tensors, path):
        seen.append(path)
        if len(seen) > calls:
            with open(path, "wb") as handle:  # a partial file, as a full disk leaves one
                handle.write(b"\x00" * 8)
            raise error
        return real(tensors, path)

    return save_file


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
            'space left on device" })'
        ),  # fmt: skip
    ],
)
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, error):
    run_six_steps(tmp_path, checkpoint_every=2)
    checkpoints = tmp_path / "checkpoints"
    before = snapshot(checkpoints)
    # the next run's first checkpoint (step 2) writes its model, then the disk is full
    monkeypatch.setattr(checkpoint_files, "save_file", full_disk_after(1, error))
    with pytest.raises(CheckpointError) as raised:
        run_six_steps(tmp_path, checkpoint_every=2)
    assert str(raised.value) == (
        f"disk full while writing the checkpoint to {checkpoints / 'last'}: free space and resume"
    )
    assert snapshot(checkpoints) == before  # no temporary folder left, both checkpoints untouched
    assert sorted(os.listdir(checkpoints)) == ["last", "previous"]


def test_other_write_errors_also_remove_the_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_files, "save_file", full_disk_after(0, PermissionError(13, "denied")))
    with pytest.raises(PermissionError):
        run_six_steps(tmp_path, checkpoint_every=2)
    assert os.listdir(tmp_path / "checkpoints") == []


def test_checkpoint_and_log_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        run_six_steps(tmp_path, checkpoint_every=2)
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"metrics.jsonl", "trainer_state.json", "model.safetensors"}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o640)}
