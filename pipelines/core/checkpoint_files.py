"""A checkpoint directory on disk: pickle-free files, written atomically, read back or passed over.

Checkpoints hold tensors in safetensors files and everything else in JSON. A checkpoint directory
(`run_dir/checkpoints/last/`) holds:

- `model.safetensors`: trainable parameters, plus buffers of modules that own a trainable parameter
  (e.g. BatchNorm statistics under norm tuning), keyed by their names in the model.
- `best_model.safetensors`: the same for the best evaluation so far (only with early stopping).
- `optimizer.safetensors`: optimiser state tensors as `state.<param_index>.<key>` (e.g.
  `state.0.exp_avg`); `optimizer.json`: parameter names in index order, param groups, scalar state.
- `rng.safetensors`: torch RNG states as uint8 tensors (`rank<r>.torch`, `rank<r>.cuda`).
- `trainer_state.json`: step, epoch, data position, scheduler state, numpy and python RNG states,
  early-stopping state and the metrics history.

Directories are written to a temporary sibling and renamed into place, so a crash never leaves a
half-written `last`; the checkpoint it replaces is kept as `checkpoints/previous/`, which a resume reads
when `last` is damaged (a truncated file, a pickle named `.safetensors`). A full disk removes the
temporary folder and leaves both in place.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipelines.core.files import apply_umask, write_text_atomic
from pipelines.core.train_config import CheckpointError

MODEL_FILE = "model.safetensors"
BEST_MODEL_FILE = "best_model.safetensors"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_JSON_FILE = "optimizer.json"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
LAST, PREVIOUS = "last", "previous"


@dataclass
class Checkpoint:
    """The contents of a checkpoint directory, loaded into memory."""

    directory: Path
    model: dict[str, torch.Tensor]
    best_model: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    state: dict[str, Any]
    rng: dict[str, torch.Tensor]
    damaged: list[tuple[Path, str]] = field(default_factory=list)  # (file, what is wrong), passed over


def save_checkpoint(
    directory: Path,
    model_state: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    state: dict[str, Any],
    rng_by_rank: list[dict[str, Any] | None],
    best_model: dict[str, torch.Tensor] | None = None,
) -> None:
    """Writes a checkpoint directory atomically; the one it replaces becomes its `previous`.

    Raises:
        CheckpointError: the disk is full; the temporary folder is removed and earlier checkpoints stay.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write_files(tmp, model_state, optimizer, state, rng_by_rank, best_model)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(error):
            raise CheckpointError(
                f"disk full while writing the checkpoint to {directory}: free space and resume"
            ) from error
        raise
    _swap_into_place(tmp, directory)


def _write_files(
    tmp: Path,
    model_state: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    state: dict[str, Any],
    rng_by_rank: list[dict[str, Any] | None],
    best_model: dict[str, torch.Tensor] | None,
) -> None:
    _save_tensors(tmp / MODEL_FILE, model_state)
    if best_model is not None:
        _save_tensors(tmp / BEST_MODEL_FILE, best_model)
    tensors, scalars = {}, {}
    for index, values in optimizer["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    _save_tensors(tmp / OPTIMIZER_TENSORS_FILE, tensors)
    groups = [{key: _jsonable(value) for key, value in group.items()} for group in optimizer["param_groups"]]
    _write_json(
        tmp / OPTIMIZER_JSON_FILE,
        {"param_names": optimizer["param_names"], "param_groups": groups, "scalar_state": scalars},
    )
    rng_tensors, rng_json = {}, {}
    for process, rng in enumerate(rng_by_rank):
        if rng is None:
            continue
        for key in ("torch", "cuda"):
            if key in rng:
                rng_tensors[f"rank{process}.{key}"] = rng[key]
        rng_json[str(process)] = {"numpy": rng["numpy"], "python": rng["python"]}
    _save_tensors(tmp / RNG_FILE, rng_tensors)
    _write_json(tmp / STATE_FILE, state | {"rng": rng_json})


def previous_dir(directory: Path) -> Path:
    """Returns where the checkpoint before `directory` is kept (`checkpoints/previous` beside `last`)."""
    directory = Path(directory)
    return directory.with_name(PREVIOUS if directory.name == LAST else f"{directory.name}.previous")


def find_checkpoints(run_dir: Path) -> list[Path]:
    """Returns every checkpoint directory under `run_dir` (any `checkpoints/<name>/`), newest first."""
    found = [
        candidate
        for folder in Path(run_dir).rglob("checkpoints")
        if folder.is_dir()
        for candidate in folder.iterdir()
        if (not candidate.name.startswith(".") or candidate.name.endswith(".old"))
        and (candidate / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda candidate: (candidate / STATE_FILE).stat().st_mtime, reverse=True)


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """Reads the newest readable checkpoint: `directory`, else its `previous`; None when there is none.

    A damaged checkpoint (a truncated file, a pickle named `.safetensors`) is passed over for the previous
    one and listed in `Checkpoint.damaged`.

    Raises:
        CheckpointError: every checkpoint there is damaged; the message names the files.
        ValueError: a checkpoint holds pickle files.
    """
    directory = Path(directory)
    # `.<name>.old` is where versions before `previous` parked the old checkpoint between two renames.
    candidates = [directory, directory.parent / f".{directory.name}.old", previous_dir(directory)]
    candidates = [candidate for candidate in candidates if candidate.is_dir()]
    damaged: list[tuple[Path, str]] = []
    for candidate in candidates:
        try:
            loaded = _read_checkpoint(candidate)
        except _Damaged as problem:
            damaged.append((problem.path, problem.reason))
            continue
        loaded.damaged = damaged
        return loaded
    if not damaged:
        return None
    files = " and ".join(f"{path} ({reason})" for path, reason in damaged)
    earlier = "are damaged" if len(damaged) > 1 else "is damaged and there is no earlier checkpoint"
    raise CheckpointError(f"checkpoint file {files} {earlier}; run without --resume to start fresh")


class _Damaged(Exception):
    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _read_checkpoint(directory: Path) -> Checkpoint:
    pickles = [p.name for p in directory.iterdir() if p.suffix in {".pt", ".pth", ".bin", ".pkl", ".ckpt"}]
    if pickles:
        raise ValueError(
            f"Checkpoint {directory} contains pickle files {pickles}, which this package refuses to load; "
            "start a new run_dir."
        )
    state = _read_json(directory / STATE_FILE, ("progress", "scheduler", "world_size"))
    meta = _read_json(directory / OPTIMIZER_JSON_FILE, ("param_names", "param_groups", "scalar_state"))
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in _read_tensors(directory / OPTIMIZER_TENSORS_FILE).items():
        _, index, name = key.split(".", 2)
        opt_state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalar_state"].items():
        opt_state.setdefault(int(index), {}).update(values)
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
        for group in meta["param_groups"]
    ]
    best = directory / BEST_MODEL_FILE
    return Checkpoint(
        directory=directory,
        model=_read_tensors(directory / MODEL_FILE),
        best_model=_read_tensors(best) if best.exists() else None,
        optimizer={"state": opt_state, "param_groups": groups, "param_names": meta["param_names"]},
        state=state,
        rng=_read_tensors(directory / RNG_FILE),
    )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise _Damaged(path, _damage(path, error)) from error


def _read_json(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _Damaged(path, _damage(path, error)) from error
    missing = [key for key in keys if not isinstance(value, dict) or key not in value]
    if missing:
        raise _Damaged(path, f"it has no {missing[0]!r}")
    return value


def _damage(path: Path, error: BaseException) -> str:
    """Says what is wrong with a checkpoint file that failed to load."""
    if isinstance(error, FileNotFoundError):
        return "missing"
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        head = b""
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip, or a bare pickle
        return "a pickle (torch.save) file, not safetensors"
    return f"truncated or corrupt: {str(error).splitlines()[0] if str(error) else type(error).__name__}"


def _disk_full(error: BaseException) -> bool:
    """Whether a write failed for want of space (safetensors reports it as text, Python as an errno)."""
    if isinstance(error, OSError) and error.errno in {errno.ENOSPC, errno.EDQUOT}:
        return True
    text = str(error)
    return any(sign in text for sign in ("No space left on device", "Disk quota exceeded", "StorageFull"))


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # Clones break storage sharing (tied weights), which safetensors refuses. safetensors creates its
    # files 0600 whatever the umask, so the mode is set as open() would have set it.
    save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}, str(path))
    apply_umask(path)
    _fsync(path)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1))


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"Optimiser setting of type {type(value).__name__} cannot be written to optimizer.json.")


def _swap_into_place(tmp: Path, directory: Path) -> None:
    # rename() cannot replace a non-empty directory: the current checkpoint becomes `previous` (the one
    # before it goes), then the new one moves in. A crash between the two renames leaves no `last`, and
    # load_checkpoint reads `previous`, the newest complete checkpoint.
    if directory.exists():
        previous = previous_dir(directory)
        if previous.exists():
            shutil.rmtree(previous)
        os.replace(directory, previous)
    os.replace(tmp, directory)
