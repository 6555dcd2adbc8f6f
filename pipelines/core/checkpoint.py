"""What a training run keeps in its run_dir: pickle-free checkpoints and the metrics log.

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
half-written `last`. `RunLog` writes `run_dir/metrics.jsonl` (and TensorBoard) and draws the progress bar.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from pipelines.core.distributed import is_main_process, is_sharded, rank, world_size

MODEL_FILE = "model.safetensors"
BEST_MODEL_FILE = "best_model.safetensors"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_JSON_FILE = "optimizer.json"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"


@dataclass
class Checkpoint:
    """The contents of a checkpoint directory, loaded into memory."""

    directory: Path
    model: dict[str, torch.Tensor]
    best_model: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    state: dict[str, Any]
    rng: dict[str, torch.Tensor]


def trainable_names(model: nn.Module) -> list[str]:
    """Returns the names of trainable parameters and of buffers of modules owning one, in model order."""
    names: list[str] = []
    for module_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not any(param.requires_grad for _, param in own):
            continue
        prefix = f"{module_name}." if module_name else ""
        names += [prefix + name for name, param in own if param.requires_grad]
        persistent = [
            n for n, _ in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set
        ]
        names += [prefix + name for name in persistent]
    return names


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Returns CPU copies of the trainable tensors (see `trainable_names`).

    For FSDP-sharded models every rank must call this; only rank 0 receives the tensors.
    """
    names = trainable_names(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {name: full[name].clone() for name in names if name in full}
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {name: tensors[name].detach().to("cpu", copy=True).contiguous() for name in names}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copies `tensors` into the model's trainable tensors, checking names and shapes first."""
    expected = trainable_names(model)
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in set(expected)]
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {source} does not match the model's trainable tensors (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); resume with the same adapter and trainable settings, "
            "or start a new run_dir."
        )
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    current = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name in expected:
            if current[name].shape != tensors[name].shape:
                raise ValueError(
                    f"Checkpoint {source} holds {name} with shape {tuple(tensors[name].shape)} but the "
                    f"model's is {tuple(current[name].shape)}; resume with the same model configuration."
                )
            current[name].copy_(tensors[name])


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Returns the optimiser state keyed by parameter index, plus `param_names` in index order.

    For FSDP-sharded models every rank must call this; only rank 0 receives the state.
    """
    names_by_id = {id(param): name for name, param in model.named_parameters()}
    names = [names_by_id[id(param)] for group in optimizer.param_groups for param in group["params"]]
    if not is_sharded(model):
        state = optimizer.state_dict()
        return {"state": state["state"], "param_groups": state["param_groups"], "param_names": names}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    index = {name: i for i, name in enumerate(names)}
    groups = [
        group | {"params": [index[name] for name in group["params"]]}
        for group in full.get("param_groups", [])
    ]
    state = {index[name]: value for name, value in full.get("state", {}).items()}
    return {"state": state, "param_groups": groups, "param_names": names}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Loads a state produced by `optimizer_state` (as read back by `load_checkpoint`)."""
    names_by_id = {id(param): name for name, param in model.named_parameters()}
    names = [names_by_id[id(param)] for group in optimizer.param_groups for param in group["params"]]
    if names != saved["param_names"]:
        raise ValueError(
            "The checkpoint's optimiser covers different parameters than this run's "
            f"({len(saved['param_names'])} vs {len(names)}); resume with the same trainable settings and "
            "weight_decay, or start a new run_dir."
        )
    if not is_sharded(model):
        optimizer.load_state_dict({"state": saved["state"], "param_groups": saved["param_groups"]})
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = {names[i]: value for i, value in saved["state"].items()}
    groups = [group | {"params": [names[i] for i in group["params"]]} for group in saved["param_groups"]]
    set_optimizer_state_dict(
        model,
        optimizer,
        {"state": state, "param_groups": groups},
        options=StateDictOptions(full_state_dict=True),
    )


def seed_everything(seed: int) -> None:
    """Seeds python random, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng(device: torch.device) -> dict[str, Any]:
    """Returns this process's RNG states: torch (CPU and the CUDA device in use), numpy, python."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Restores RNG states captured by `capture_rng`."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(
    directory: Path,
    model_state: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    state: dict[str, Any],
    rng_by_rank: list[dict[str, Any] | None],
    best_model: dict[str, torch.Tensor] | None = None,
) -> None:
    """Writes a checkpoint directory atomically (temporary sibling, then rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
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
    _swap_into_place(tmp, directory)


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """Reads a checkpoint directory; returns None when there is none (refuses pickle files)."""
    directory = Path(directory)
    if not directory.exists():
        backup = directory.parent / f".{directory.name}.old"
        if not backup.exists():
            return None
        directory = backup
    pickles = [p.name for p in directory.iterdir() if p.suffix in {".pt", ".pth", ".bin", ".pkl", ".ckpt"}]
    if pickles:
        raise ValueError(
            f"Checkpoint {directory} contains pickle files {pickles}, which this package refuses to load; "
            "start a new run_dir."
        )
    state = json.loads((directory / STATE_FILE).read_text())
    meta = json.loads((directory / OPTIMIZER_JSON_FILE).read_text())
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(directory / OPTIMIZER_TENSORS_FILE).items():
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
        model=load_file(directory / MODEL_FILE),
        best_model=load_file(best) if best.exists() else None,
        optimizer={"state": opt_state, "param_groups": groups, "param_names": meta["param_names"]},
        state=state,
        rng=load_file(directory / RNG_FILE),
    )


def save_training_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    rng_by_rank: list[dict[str, Any] | None],
    best_model: dict[str, torch.Tensor] | None = None,
) -> None:
    """Gathers the trainable and optimiser state and writes them on rank 0 (under FSDP every rank calls)."""
    model_state = trainable_state(model)
    optimizer_tensors = optimizer_state(model, optimizer)
    if is_main_process():
        save_checkpoint(directory, model_state, optimizer_tensors, state, rng_by_rank, best_model)


def restore_training_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> Checkpoint | None:
    """Loads model, optimiser, scheduler and this rank's RNG states; returns the checkpoint, or None."""
    loaded = load_checkpoint(directory)
    if loaded is None:
        return None
    if loaded.state["world_size"] != world_size():
        raise ValueError(
            f"Checkpoint {loaded.directory} was written by {loaded.state['world_size']} process(es) but this "
            f"run has {world_size()}; resume with the same number of processes."
        )
    load_trainable_state(model, loaded.model, str(loaded.directory))
    load_optimizer_state(model, optimizer, loaded.optimizer)
    scheduler.load_state_dict(loaded.state["scheduler"])
    rng = rng_for_rank(loaded, rank())
    if rng is not None:
        restore_rng(rng, device)
    return loaded


def rng_for_rank(checkpoint: Checkpoint, rank: int) -> dict[str, Any] | None:
    """Returns the RNG states saved for `rank`, or None when the checkpoint has none for it."""
    saved = checkpoint.state.get("rng", {}).get(str(rank))
    if saved is None or f"rank{rank}.torch" not in checkpoint.rng:
        return None
    state = dict(saved) | {"torch": checkpoint.rng[f"rank{rank}.torch"]}
    if f"rank{rank}.cuda" in checkpoint.rng:
        state["cuda"] = checkpoint.rng[f"rank{rank}.cuda"]
    return state


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # Clones break storage sharing (tied weights), which safetensors refuses.
    save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}, str(path))
    _fsync(path)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=1))
    _fsync(path)


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
    # rename() cannot replace a non-empty directory, so the old one steps aside first; load_checkpoint
    # falls back to the `.old` copy if a crash lands between the two renames.
    backup = directory.parent / f".{directory.name}.old"
    shutil.rmtree(backup, ignore_errors=True)
    if directory.exists():
        os.replace(directory, backup)
    os.replace(tmp, directory)
    shutil.rmtree(backup, ignore_errors=True)


class RunLog:
    """metrics.jsonl rows (appended to progress.history), optional TensorBoard and the tqdm bar."""

    def __init__(self, run_dir: Path | None, state: Any, tensorboard: bool, show: bool, total: int):
        self.state = state
        main = is_main_process()
        self.path = run_dir / "metrics.jsonl" if run_dir is not None and main else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # The checkpoint's history is the truth: rows logged after it (before a crash) are dropped.
            self.path.write_text("".join(json.dumps(row) + "\n" for row in state.history))
        self.writer = None
        if tensorboard and main and run_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    "tensorboard: true needs the tensorboard package; pip install tensorboard "
                    "or set tensorboard: false."
                ) from error
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.bar = tqdm(
            total=total,
            initial=state.step,
            disable=not (show and main),
            unit="step",
            desc="train",
            dynamic_ncols=True,
        )

    def step(self, loss: float, lr: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}", refresh=False)

    def row(self, row: dict[str, Any]) -> None:
        self.state.history.append(row)
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key not in {"step", "epoch"}:
                    self.writer.add_scalar(
                        key if key.startswith("val_") else f"train_{key}", value, row["step"]
                    )

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
