"""One training step of each domain's pipeline: the frozen floor, full fine-tuning, HF peft with a plain
PyTorch loop, this package's LoRA in the same plain loop, and the pipeline's own step (its LoRA, run by
the core training loop).

Each domain's model is built by the domain's own code with random weights of the configured shape (see
`pipeline_cases.py`). Every row uses the core precision policy of `precision: auto` (on CUDA: frozen
weights bf16, trainable float32, bf16 autocast; on the CPU: float32). The plain rows time
forward + backward + AdamW on one batch already on the device; the pipeline row times the core loop
between optimiser steps (its DataLoader and collation, gradient clipping at 1.0, logging included).

GPU (`--config gpu`): each (domain, row) in `--repeat` fresh processes taken in turns, each the median
of `--steps` steps after 3 warm-up steps (synchronised); the median process is reported, with the range.
CPU (`--config cpu`): one process, the rows of a domain taken in turns `--repeat` times (a different
row first each time), `--steps` steps each; the median of all timed steps; no peak memory on the CPU.

    python benchmarks/pipeline_step.py --config cpu [--domains imaging,speech] [--json out.json]

A GPU process builds its model on the CPU first (LLaMA-1.1B: tens of seconds), so the whole GPU
configuration (5 domains x 5 rows x 3 processes) takes far longer than its steps; `--in-process --repeat
1` runs every row of the chosen domains in one process, `--domains clinical --rows floor,hf_peft,ours`
a part of it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_cases import DOMAINS, Case, build_case  # noqa: E402

from pipelines.core.distributed import move_to_device  # noqa: E402
from pipelines.core.peft import add_adapter, set_trainable  # noqa: E402
from pipelines.core.peft.inject import logical_modules, matches  # noqa: E402
from pipelines.core.peft.lora import LoRAAdapter  # noqa: E402
from pipelines.core.precision import apply_precision_policy  # noqa: E402
from pipelines.core.training import TrainConfig  # noqa: E402

ROWS = ("floor", "full", "hf_peft", "ours", "pipeline")
WARMUP = {"gpu": 3, "cpu": 1}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def target_names(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Exact names of the Linear modules the targets select (what HF peft is given)."""
    return [
        item.name
        for item in logical_modules(model)
        if isinstance(item.module, torch.nn.Linear)
        and any(matches(t, item.name, item.module) for t in targets)
    ]


def add_hf_peft(case: Case, model: torch.nn.Module) -> None:
    """HF peft LoRA (its defaults: float32 adapters) with the case's adapters, all active and trained."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    root = case.adapter_root(model)
    names = {name: target_names(root, list(spec.targets)) for name, spec in case.adapters}  # before wrapping
    for name, spec in case.adapters:
        config = LoraConfig(
            r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=names[name]
        )
        inject_adapter_in_model(config, root, adapter_name=name)
    for module in root.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter([name for name in names if name in module.lora_A])
    for head in case.heads:
        model.get_submodule(head).requires_grad_(True)


def prepare(case: Case, row: str) -> torch.nn.Module:
    """A fresh model set up as `row` trains it (the floor's input module hands out a leaf with a gradient)."""
    model = case.new_model()
    if row == "full":
        model.requires_grad_(True)
    elif row == "floor":
        model.requires_grad_(False)
        case.input_module(model).register_forward_hook(lambda m, i, out: out.detach().requires_grad_(True))
    elif row == "hf_peft":
        add_hf_peft(case, model)
    elif row == "ours":  # this package's LoRA in the plain loop: the LoRA apart from the core loop
        root = case.adapter_root(model)
        for name, spec in case.adapters:
            add_adapter(root, spec, name=name)
        set_trainable(root, [name for name, _ in case.adapters])
        for head in case.heads:
            model.get_submodule(head).requires_grad_(True)
    return model


@contextlib.contextmanager
def lora_paths() -> Iterator[dict[str, int]]:
    """Counts the forwards of this package's LoRA adapters by path: the fused Function or plain autograd."""
    counts = {"fused": 0, "plain": 0}
    fused, delta = LoRAAdapter.fused_forward, LoRAAdapter.delta

    def counted_fused(self, base, x, stack=()):
        counts["fused"] += 1 + len(stack)  # per adapter: a stack is one Function
        return fused(self, base, x, stack)

    def counted_delta(self, base, x, out):
        counts["plain"] += 1
        return delta(self, base, x, out)

    LoRAAdapter.fused_forward, LoRAAdapter.delta = counted_fused, counted_delta
    try:
        yield counts
    finally:
        LoRAAdapter.fused_forward, LoRAAdapter.delta = fused, delta


def plain_steps(case: Case, row: str, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Times `steps` plain-loop steps of `row` after `warmup`; returns the row's measurements."""
    model = prepare(case, row).to(device).train()
    policy = apply_precision_policy(model, device.type, "auto")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5) if row != "floor" else None
    batch = move_to_device(case.batch, device)
    amp = policy["compute_dtype"] == "bfloat16"
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with lora_paths() as paths:
        for index in range(warmup + steps):
            _sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
                loss = case.loss_fn(model, batch)
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            _sync(device)
            if index >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    sample = _row(case, row, times, device, sum(p.numel() for p in trainable), policy, paths, warmup + steps)
    return sample | {"saved_bytes": saved_bytes(case, model, batch, amp)}


def saved_bytes(case: Case, model: torch.nn.Module, batch: Any, amp: bool) -> int:
    """Bytes autograd keeps for backward in one forward, each storage once, the parameters not counted:
    the activation memory of a step, the same on every machine."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    device = next(model.parameters()).device
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            loss = case.loss_fn(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(kept.values())


def pipeline_steps(
    case: Case, device: torch.device, steps: int, warmup: int, precision: str = "auto"
) -> dict[str, Any]:
    """Times the pipeline's own training entry between optimiser steps (the core loop's step); ``precision``
    is the loop's ``train.precision`` (``bf16`` on the CPU applies the policy ``auto`` gives on CUDA)."""
    stamps: list[float] = []
    trainable: list[int] = []

    def stamp(optimizer, args, kwargs) -> None:
        _sync(device)
        stamps.append(time.perf_counter())
        if not trainable:
            trainable.append(sum(p.numel() for group in optimizer.param_groups for p in group["params"]))

    config = TrainConfig(
        max_steps=warmup + steps,
        batch_size=case.samples,
        lr=1e-5,
        device=str(device),
        log_every=warmup + steps,
        precision=precision,
    )
    handle = register_optimizer_step_post_hook(stamp)
    try:
        with lora_paths() as paths:
            result = case.pipeline(config)
    finally:
        handle.remove()
    times = [(b - a) * 1000 for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:], strict=True)]
    return _row(case, "pipeline", times, device, trainable[0], result.precision_policy, paths, warmup + steps)


def _row(case: Case, row: str, times: list, device, trainable, policy, paths: dict, steps: int) -> dict:
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "domain": case.domain,
        "row": row,
        "shape": case.shape,
        "times_ms": times,
        "peak_gib": peak,
        "samples": case.samples,
        "tokens": case.tokens,
        "unit": case.unit,
        "trainable_parameters": trainable,
        "precision": {k: policy[k] for k in ("compute_dtype", "frozen_dtype", "cast_parameters")},
        "lora_forwards_per_step": {path: count / steps for path, count in paths.items()},
    }


def measure(
    config: str, domain: str, rows: list[str], device: torch.device, steps: int, repeat: int, precision="auto"
) -> list:
    """Every row of one domain in this process, the rows taken in turns `repeat` times (``precision``: the
    pipeline row's, see ``pipeline_steps``)."""
    warmup = WARMUP[config]
    case = build_case(config, domain, warmup + steps)
    measured: dict[str, dict] = {}
    for round_ in range(repeat):
        for row in rows[round_ % len(rows) :] + rows[: round_ % len(rows)]:  # each row first in turn
            torch.manual_seed(0)
            if row == "pipeline":
                sample = pipeline_steps(case, device, steps, warmup, precision)
            else:
                sample = plain_steps(case, row, device, steps, warmup)
            if row in measured:
                measured[row]["times_ms"] += sample["times_ms"]
            else:
                measured[row] = sample
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
    return [summarise([sample]) for sample in measured.values()]


def summarise(samples: list[dict]) -> dict:
    """One row from the samples of its processes: the median process (each its median step)."""
    medians = [statistics.median(s["times_ms"]) for s in samples]
    row = {k: v for k, v in samples[0].items() if k != "times_ms"}
    step = statistics.median(medians)
    peaks = [s["peak_gib"] for s in samples if s["peak_gib"] is not None]
    row |= {
        "step_ms": step,
        "steps_timed": sum(len(s["times_ms"]) for s in samples),
        "processes": len(samples),
        "peak_gib": max(peaks) if peaks else None,
        "samples_per_s": row["samples"] / step * 1000,
    }
    if len(samples) > 1:
        row["step_ms_range"] = [min(medians), max(medians)]
    if row["tokens"]:
        row["tokens_per_s"] = row["samples"] * row["tokens"] / step * 1000
    return row


def measure_isolated(config: str, domains: list[str], rows: list[str], steps: int, repeat: int) -> list:
    """GPU: each (domain, row) in `repeat` fresh processes, taken in turns."""
    samples: dict[tuple[str, str], list[dict]] = {}
    for _ in range(repeat):
        for domain in domains:
            for row in rows:
                with tempfile.TemporaryDirectory() as folder:
                    out = Path(folder) / "row.json"
                    command = [
                        sys.executable,
                        __file__,
                        "--config",
                        config,
                        "--domains",
                        domain,
                        "--rows",
                        row,
                        "--steps",
                        str(steps),
                        "--in-process",
                        "--raw",
                        "--json",
                        str(out),
                    ]
                    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                    sample = json.loads(out.read_text())["rows"][0]
                samples.setdefault((domain, row), []).append(sample)
                print(f"{domain:9s} {row:9s} {statistics.median(sample['times_ms']):9.1f} ms", flush=True)
    return [summarise(runs) for runs in samples.values()]


def table(rows: list[dict]) -> str:
    """A markdown table; ratios against the same domain's frozen floor."""
    lines = [
        "| domain | configuration | step | peak memory | time / floor | saved for backward | throughput |",
        "|---|---|---|---|---|---|---|",
    ]
    floors = {r["domain"]: r for r in rows if r["row"] == "floor"}
    names = {
        "floor": "frozen floor",
        "full": "full fine-tuning (AdamW)",
        "hf_peft": "HF peft LoRA, plain loop",
        "ours": "peft-pipelines LoRA, plain loop",
        "pipeline": "**pipeline's own step** (core loop)",
    }
    for row in rows:
        floor = floors.get(row["domain"])
        ratio = f"{row['step_ms'] / floor['step_ms']:.2f}" if floor else "-"
        peak = f"{row['peak_gib']:.2f} GiB" if row["peak_gib"] is not None else "-"
        spread = " ({:.1f}-{:.1f})".format(*row["step_ms_range"]) if "step_ms_range" in row else ""
        rate = (
            f"{row['tokens_per_s']:,.0f} {row['unit']}/s"
            if "tokens_per_s" in row
            else f"{row['samples_per_s']:,.1f} samples/s"
        )
        step = f"{row['step_ms']:.1f} ms{spread}"
        saved = "-"
        if "saved_bytes" in row:
            saved = f"{row['saved_bytes'] / 2**20:.2f} MiB"
            if floor and floor.get("saved_bytes"):
                saved += f" ({row['saved_bytes'] / floor['saved_bytes']:.2f})"
        lines.append(
            f"| {row['domain']} | {names[row['row']]} | {step} | {peak} | {ratio} | {saved} | {rate} |"
        )
    return "\n".join(lines)


def run(config: str, domains: list[str], rows: list[str], steps: int, repeat: int, in_process: bool) -> dict:
    """Measures and returns the JSON document (device, versions, date, rows)."""
    device = torch.device("cuda" if config == "gpu" else "cpu")
    if config == "gpu" and not in_process:
        measured = measure_isolated(config, domains, rows, steps, repeat)
    else:
        measured = [row for domain in domains for row in measure(config, domain, rows, device, steps, repeat)]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    import peft
    import transformers

    return {
        "config": config,
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "date": datetime.date.today().isoformat(),
        "rows": measured,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", choices=["gpu", "cpu"], default="gpu" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--domains", default=",".join(DOMAINS))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: gpu 10, cpu 3)")
    parser.add_argument(
        "--repeat", type=int, default=None, help="gpu: processes per row (3); cpu: rounds (2)"
    )
    parser.add_argument("--in-process", action="store_true", help="gpu: every row in this process")
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)  # a child process's samples
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    steps = args.steps or (10 if args.config == "gpu" else 3)
    repeat = args.repeat or (3 if args.config == "gpu" else 5)
    domains, rows = args.domains.split(","), args.rows.split(",")
    if args.raw:  # one (domain, row) of measure_isolated: hand back the step times
        device = torch.device("cuda" if args.config == "gpu" else "cpu")
        case = build_case(args.config, domains[0], WARMUP[args.config] + steps)
        sample = (
            pipeline_steps(case, device, steps, WARMUP[args.config])
            if rows[0] == "pipeline"
            else plain_steps(case, rows[0], device, steps, WARMUP[args.config])
        )
        args.json.write_text(json.dumps({"rows": [sample]}))
        return
    result = run(args.config, domains, rows, steps, repeat, args.in_process)
    print(table(result["rows"]))
    out = args.json or Path(f"benchmarks/results/pipeline_step_{args.config}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
