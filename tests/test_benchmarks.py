"""benchmarks/pipeline_step.py: the CPU configuration's smallest case, every row, one timed step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pipeline_step  # noqa: E402
from pipeline_cases import DOMAINS, build_case  # noqa: E402


def test_cpu_speech_case_times_every_row_with_the_same_adapters_on_both_lora_sides():
    rows = pipeline_step.measure("cpu", "speech", list(pipeline_step.ROWS), torch.device("cpu"), 1, 1)
    by_row = {row["row"]: row for row in rows}
    assert list(by_row) == ["floor", "full", "hf_peft", "ours", "pipeline"]
    assert all(row["step_ms"] > 0 and row["steps_timed"] == 1 and row["peak_gib"] is None for row in rows)
    model = build_case("cpu", "speech", 2).new_model()
    assert by_row["floor"]["trainable_parameters"] == 0
    assert by_row["full"]["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    lora = by_row["pipeline"]["trainable_parameters"]
    # r=4 on every proj (hidden 64 in and out): A (4 x 64) and B (64 x 4) on 5 layers
    assert lora == 5 * 2 * 4 * 64 == by_row["hf_peft"]["trainable_parameters"]
    assert lora == by_row["ours"]["trainable_parameters"]
    for row in ("ours", "pipeline"):  # every adapted proj takes the fused path, in every step
        assert by_row[row]["lora_forwards_per_step"] == {"fused": 5, "plain": 0}
    assert by_row["hf_peft"]["lora_forwards_per_step"] == {"fused": 0, "plain": 0}
    assert by_row["pipeline"]["precision"] == {
        "compute_dtype": "float32", "frozen_dtype": "float32", "cast_parameters": 0,
    }  # fmt: skip
    table = pipeline_step.table(rows).splitlines()
    assert table[2].startswith("| speech | frozen floor |") and "| 1.00 |" in table[2]
    assert len(table) == 7 and all(line.endswith("frames/s |") for line in table[2:])


def test_hf_peft_targets_are_the_modules_the_pipeline_adapts():
    case = build_case("cpu", "clinical", 2)
    model = case.new_model()
    names = {name: pipeline_step.target_names(model, list(spec.targets)) for name, spec in case.adapters}
    assert (
        names["domain"]
        == names["task"]
        == [f"lm.model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    )
    ours = pipeline_step.prepare(case, "ours")
    theirs = pipeline_step.prepare(case, "hf_peft")
    count = {m: sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, theirs)}
    assert count[ours] == count[theirs] > 0  # both adapters and the head train on both sides


@pytest.mark.parametrize("precision", ["auto", "bf16"])
@pytest.mark.parametrize("domain", DOMAINS)
def test_every_pipeline_step_takes_the_fused_lora_path_under_its_precision_policy(domain, precision):
    """Each domain's own training step (the clinical task stage over its domain adapter, LoRA dropout
    included) computes every LoRA adapter in the fused Function, none on the plain path: in float32, and
    under the policy CUDA's ``auto`` gives (``bf16`` on the CPU: frozen weights cast, bf16 autocast)."""
    (row,) = pipeline_step.measure("cpu", domain, ["pipeline"], torch.device("cpu"), 1, 1, precision)
    counts, policy = row["lora_forwards_per_step"], row["precision"]
    assert counts["plain"] == 0 and counts["fused"] > 0, counts
    expected = "bfloat16" if precision == "bf16" else "float32"
    assert policy["compute_dtype"] == policy["frozen_dtype"] == expected
    assert (policy["cast_parameters"] > 0) == (precision == "bf16")


def test_our_clinical_task_step_keeps_less_for_backward_than_hf_peft():
    """Two stacked LoRAs, the task one with dropout: HF peft keeps each dropout's float output, the fused
    Function a boolean mask (the counts are bytes, the same on every machine)."""
    rows = pipeline_step.measure("cpu", "clinical", ["floor", "hf_peft", "ours"], torch.device("cpu"), 1, 1)
    saved = {row["row"]: row["saved_bytes"] for row in rows}
    assert saved["floor"] < saved["ours"] < saved["hf_peft"]
