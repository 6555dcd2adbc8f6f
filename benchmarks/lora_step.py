"""One LoRA training step against full fine-tuning, the frozen floor and HF peft: time and peak memory.

GPU (default when CUDA is present): LLaMA-1.1B shape (hidden 2048, 22 layers, 32 heads, 4 KV heads,
intermediate 5632, vocab 32000), bf16 weights, batch 8 x 1024 tokens, LoRA r=16 on all 7 projections.
Each configuration gets a fresh model; the median of `--steps` timed steps (CUDA events) after warm-up.
CPU: a small LLaMA shape in float32, HF peft and this package's LoRA built from the same weights, their
steps interleaved so that both see the same machine load.

    python benchmarks/lora_step.py [--device cpu|cuda] [--steps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, batch=8, tokens=1024),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=2000, batch=4, tokens=128),
}  # fmt: skip


def build_model(shape: dict, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = {k: v for k, v in shape.items() if k not in ("batch", "tokens")}
    config = LlamaConfig(**sizes, max_position_embeddings=shape["tokens"], attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def prepare(name: str, model):
    """Makes configuration `name` of a fresh model; returns (model, parameters to optimise, is floor)."""
    if name == "full":
        return model, list(model.parameters()), False
    model.requires_grad_(False)
    if name == "floor":
        return model, [], True
    if name.startswith("hf_peft"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS, lora_dropout=0.0)
        model = get_peft_model(model, config, autocast_adapter_dtype=name == "hf_peft")
    else:
        from pipelines.core.peft import LoRA, add_adapter

        add_adapter(model, LoRA(r=16, alpha=32, targets=PROJECTIONS), name="bench")
    return model, [p for p in model.parameters() if p.requires_grad], False


def make_step(model, parameters, floor: bool, ids: torch.Tensor):
    optimizer = torch.optim.AdamW(parameters, lr=1e-5) if parameters else None

    def step():
        if floor:
            embeds = model.model.embed_tokens(ids).detach().requires_grad_()
            loss = model(inputs_embeds=embeds, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def time_gpu(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def run_gpu(names: list[str], steps: int, compile: bool = False) -> list[dict]:
    shape = SHAPES["llama-1.1b"]
    rows = []
    for name in names:
        gc.collect()
        torch.cuda.empty_cache()
        model, parameters, floor = prepare(name, build_model(shape, torch.bfloat16, "cuda"))
        if compile:
            model.forward = torch.compile(model.forward)
        ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["tokens"]), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        times = time_gpu(make_step(model, parameters, floor, ids), warmup=3, steps=steps)
        peak = torch.cuda.max_memory_allocated() / 2**30
        rows.append(
            {
                "config": name + ("+compile" if compile else ""),
                "step_ms": statistics.median(times),
                "peak_gib": peak,
            }
        )
        print(f"{name:16s} {rows[-1]['step_ms']:8.1f} ms {peak:7.2f} GiB", flush=True)
        del model, parameters
    return rows


def run_gpu_isolated(names: list[str], steps: int, compile: bool, repeat: int = 1) -> list[dict]:
    """Each configuration in `repeat` fresh processes, taken in turns; the median process is reported.

    Processes differ (one configuration's median step varied by up to 20% between processes on an H100),
    so the row gives the median over processes and their range.
    """
    samples: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(repeat):
        for name in names:
            with tempfile.TemporaryDirectory() as folder:
                out = Path(folder) / "row.json"
                command = [sys.executable, __file__, "--device", "cuda", "--configs", name]
                command += ["--steps", str(steps), "--json", str(out), "--in-process"]
                command += ["--compile"] if compile else []
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                row = json.loads(out.read_text())["rows"][0]
            samples[name].append(row)
            print(f"{row['config']:22s} {row['step_ms']:8.1f} ms {row['peak_gib']:7.2f} GiB", flush=True)
    rows = []
    for runs in samples.values():
        times = [run["step_ms"] for run in runs]
        summary = {"step_ms": statistics.median(times), "step_ms_range": [min(times), max(times)]}
        summary |= {"processes": len(runs), "peak_gib": max(run["peak_gib"] for run in runs)}
        rows.append({**runs[0], **summary})
    return rows


def run_cpu(steps: int) -> list[dict]:
    shape = SHAPES["small"]
    base = build_model(shape, torch.float32, "cpu").state_dict()
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["tokens"]))
    configs = {}
    for name in ("hf_peft", "ours"):
        model = build_model(shape, torch.float32, "cpu")
        model.load_state_dict(base)
        model, parameters, floor = prepare(name, model)
        configs[name] = make_step(model, parameters, floor, ids)
    times = {name: [] for name in configs}
    for index in range(steps + 2):
        for name, step in configs.items():
            start = time.perf_counter()
            step()
            if index >= 2:
                times[name].append((time.perf_counter() - start) * 1000)
    return [{"config": name, "step_ms": statistics.median(t), "peak_gib": None} for name, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--configs", default="full,floor,hf_peft,hf_peft_no_autocast,ours")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model's forward (GPU)")
    parser.add_argument("--repeat", type=int, default=1, help="GPU: processes per configuration")
    parser.add_argument("--in-process", action="store_true", help="GPU: all configurations in this process")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/lora_step.json"))
    args = parser.parse_args()
    if args.device == "cuda":
        names = args.configs.split(",")
        if args.in_process:
            rows = run_gpu(names, args.steps, args.compile)
        else:
            rows = run_gpu_isolated(names, args.steps, args.compile, args.repeat)
        device = torch.cuda.get_device_name()
    else:
        torch.manual_seed(0)
        rows, device = (
            run_cpu(args.steps),
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        )
    floor = next((r for r in rows if r["config"].startswith("floor")), None)
    header = (
        f"{'configuration':22s} {'step (ms)':>10s} {'peak (GiB)':>11s} {'time/floor':>11s} {'mem/floor':>10s}"
    )
    print("\n" + header)
    for row in rows:
        ratio_t = f"{row['step_ms'] / floor['step_ms']:.3f}" if floor else "-"
        ratio_m = f"{row['peak_gib'] / floor['peak_gib']:.3f}" if floor else "-"
        peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "-"
        spread = " ({:.1f}-{:.1f})".format(*row["step_ms_range"]) if "step_ms_range" in row else ""
        print(f"{row['config']:22s} {row['step_ms']:10.1f} {peak:>11s} {ratio_t:>11s} {ratio_m:>10s}{spread}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "torch": torch.__version__, "rows": rows}
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
