"""What a training run checkpoints: trainable tensors, optimiser state and RNG states, and how they
are gathered (FSDP), saved on rank 0 and restored. The file layout is in `checkpoint_files`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.core.checkpoint_files import (  # noqa: F401 - the layout is part of this module's API
    BEST_MODEL_FILE,
    LAST,
    MODEL_FILE,
    OPTIMIZER_JSON_FILE,
    OPTIMIZER_TENSORS_FILE,
    PREVIOUS,
    RNG_FILE,
    STATE_FILE,
    Checkpoint,
    find_checkpoints,
    load_checkpoint,
    previous_dir,
    save_checkpoint,
)
from pipelines.core.distributed import is_main_process, is_sharded, rank, world_size

logger = logging.getLogger(__name__)


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
    if loaded.damaged:
        _set_aside(loaded)
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


def _set_aside(loaded: Checkpoint) -> None:
    """Says that a damaged checkpoint was passed over and moves it to `.<name>.damaged` (rank 0 only).

    Moved, because the next save turns the current `last` into `previous`: a damaged one left in
    place would push out the good checkpoint this run resumed from.
    """
    path, reason = loaded.damaged[0]
    step = loaded.state["progress"].get("step")
    moved = ""
    if is_main_process():
        aside = path.parent.with_name(f".{path.parent.name}.damaged")
        shutil.rmtree(aside, ignore_errors=True)
        with contextlib.suppress(OSError):  # another process may have moved it already
            os.replace(path.parent, aside)
            moved = f" (moved to {aside})"
    logger.warning(
        "checkpoint file %s is damaged (%s)%s; resuming from the previous checkpoint %s (step %s)",
        path, reason, moved, loaded.directory, step,
    )  # fmt: skip


def rng_for_rank(checkpoint: Checkpoint, rank: int) -> dict[str, Any] | None:
    """Returns the RNG states saved for `rank`, or None when the checkpoint has none for it."""
    saved = checkpoint.state.get("rng", {}).get(str(rank))
    if saved is None or f"rank{rank}.torch" not in checkpoint.rng:
        return None
    state = dict(saved) | {"torch": checkpoint.rng[f"rank{rank}.torch"]}
    if f"rank{rank}.cuda" in checkpoint.rng:
        state["cuda"] = checkpoint.rng[f"rank{rank}.cuda"]
    return state
