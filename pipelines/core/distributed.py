"""Where training runs: process group setup, devices, model wrapping, data sharding and collectives.

`train` calls these itself, so the same code runs in one process or under
`torchrun --nproc_per_node N -m pipelines run RECIPE`. Outside torchrun every helper is a no-op that
reports a world of one process.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


def is_distributed() -> bool:
    """Returns True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Returns the number of training processes (1 outside a distributed run)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Returns this process's global rank (0 outside a distributed run)."""
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    """Returns this process's rank on its machine, from torchrun's LOCAL_RANK (0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Returns True on rank 0, the process that writes metrics and checkpoints and shows progress."""
    return rank() == 0


def launched_distributed() -> bool:
    """Returns True when the environment (torchrun's WORLD_SIZE) asks for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup_distributed(backend: str | None = None) -> bool:
    """Initialises the process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    Uses nccl when CUDA is available (and binds this process to cuda:LOCAL_RANK), gloo otherwise.
    Does nothing when the group already exists or the environment names a single process. The group
    is destroyed at interpreter exit, or earlier by `cleanup_distributed`.

    Returns:
        True when this call initialised the process group.
    """
    if is_distributed() or not launched_distributed():
        return False
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(
                f"WORLD_SIZE is set but environment variable {key} is missing; "
                "launch with `torchrun --nproc_per_node N -m pipelines run RECIPE`."
            )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    atexit.register(cleanup_distributed)
    return True


def cleanup_distributed() -> None:
    """Destroys the process group if one exists (safe to call more than once), after a barrier: a rank
    that tears gloo down while another is still in its last collective can abort the process ("terminate
    called without an active exception", exit -6) at the end of a run that succeeded."""
    if is_distributed():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def default_device(model: nn.Module) -> torch.device:
    """Returns the device to train on: cuda:LOCAL_RANK in a CUDA distributed run, else the model's."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def wrap_model(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """Wraps `model` for data-parallel training; returns it unchanged in a single process.

    "auto" and "ddp" use DistributedDataParallel (find_unused_parameters=False; frozen parameters are
    fine). "fsdp" shards with FSDP2 (`fully_shard`): every child of an `nn.ModuleList` (the usual
    transformer-block container) becomes its own shard unit, then the root.
    """
    if world_size() == 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    if any(True for _ in block.parameters()):
                        fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Returns the user's module inside a DistributedDataParallel wrapper (FSDP2 modules are in place)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """Returns True when the model's parameters are FSDP2 shards (gathering them needs every rank)."""
    if "torch.distributed.fsdp" not in sys.modules:  # nothing can be sharded; skip a slow import
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Context that skips the gradient all-reduce on accumulation micro-batches (sync=False)."""
    if sync or world_size() == 1:
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if is_sharded(model):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


class ResumableSampler(Sampler[int]):
    """This process's share of one epoch's seeded permutation, minus the first `skip` indices.

    The permutation is DistributedSampler's (seed + epoch), so every world size sees the same global
    order: with one process the first batch is permutation[:B]; with two, rank r takes
    permutation[r::2] and the first global batch is the same set of samples. `skip` drops indices this
    process already consumed before a checkpoint, so a resumed epoch continues where it stopped.
    """

    def __init__(self, dataset: Sized, seed: int, epoch: int, shuffle: bool = True, skip: int = 0):
        self.inner = DistributedSampler(
            dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed, drop_last=False
        )
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.inner)[self.skip :])

    def __len__(self) -> int:
        return max(len(self.inner) - self.skip, 0)


def batches_per_epoch(data: Dataset | DataLoader, batch_size: int) -> int | None:
    """Returns this process's batches per epoch (None for a DataLoader without a length)."""
    if isinstance(data, DataLoader):
        try:
            return len(data)
        except TypeError:
            return None
    return math.ceil(math.ceil(len(data) / world_size()) / batch_size)


def epoch_batches(
    data: Dataset | DataLoader,
    batch_size: int,
    seed: int,
    epoch: int,
    skip: int,
    collate_fn: Callable | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[Any]:
    """Yields this process's batches of epoch `epoch`, after the first `skip` (consumed before a resume).

    A Dataset gets a fresh DataLoader over `ResumableSampler` (skipping costs nothing); a DataLoader is
    iterated as given (its sampler's set_epoch is called) and skipped batches are loaded and dropped.
    """
    if isinstance(data, DataLoader):
        if hasattr(data.sampler, "set_epoch"):
            data.sampler.set_epoch(epoch)
        iterator = iter(data)
        for _ in range(skip):
            next(iterator, None)
        yield from iterator
        return
    sampler = ResumableSampler(data, seed=seed, epoch=epoch, skip=skip * batch_size)
    # The generator seeds worker processes, keeping the global torch RNG untouched by data loading.
    generator = torch.Generator().manual_seed(seed + epoch)
    yield from DataLoader(
        data,
        batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=generator,
        pin_memory=pin_memory,
    )


def shard_indices(length: int) -> list[int]:
    """Returns this process's indices of an evaluation set (strided, no padding, no duplicates)."""
    return list(range(rank(), length, world_size()))


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Returns the element-wise sum of `values` over all processes (itself in a single process)."""
    if world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_from_main(obj: Any) -> Any:
    """Returns rank 0's `obj` on every process (so every rank takes the same decision)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_all(obj: Any) -> list[Any]:
    """Returns the list of every process's `obj`, indexed by rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Waits for every process (no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Returns `batch` with every tensor (in dicts, lists, tuples, namedtuples) moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device) for value in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    """Returns the leading dimension of the first tensor in `batch` (1 when there is none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values = (
        batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else []
    )
    for value in values:
        if isinstance(value, (torch.Tensor, Mapping, list, tuple)):
            return batch_size_of(value)
    return 1


def peak_memory_bytes(device: torch.device) -> int:
    """Returns peak CUDA memory allocated on `device`, else this process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # Windows has no resource module.
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
