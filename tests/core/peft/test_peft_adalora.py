"""AdaLoRA with HF peft as the oracle: the same init, forward, pruned ranks step by step, files both ways."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft_testing import (
    LLAMA_TARGETS,
    copy_adapter_to_peft,
    import_hf_peft,
    logits,
    ours_and_peft,
    peft_layers,
    perturb_adapters,
    refused,
    weighted_loss,
)
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from pipelines.core.peft import (
    AdaLoRA,
    AdaLoRASchedule,
    add_adapter,
    convert_adapter,
    load_adapter,
    merge,
    save_adapter,
    set_trainable,
    spec_from_dict,
    training_callbacks,
    unmerge,
    wrappers,
)
from pipelines.core.recipe import StageSection
from pipelines.core.training import TrainCallback, TrainConfig, train

peft = import_hf_peft()
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
    "ignore:.*LoRA tensor\\(s\\) have invalid shape",
    "ignore:The following rank_pattern keys did not match:RuntimeWarning",
)

TARGETS = LLAMA_TARGETS
SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3, "beta1": 0.8, "beta2": 0.7}
PEFT_SCHEDULE = {**SCHEDULE, "deltaT": 2, "lora_alpha": 8, "orth_reg_weight": 0.3}
OURS = AdaLoRA(**SCHEDULE, delta_t=2, alpha=8, orth_reg_weight=0.3, targets=TARGETS)
STEPS = 12


def both(tiny_llama, total_step: int = STEPS, seed: int = 4):
    """Ours and HF peft's AdaLoRA on copies of the model, drawn from the same seed."""
    config = peft.AdaLoraConfig(
        **PEFT_SCHEDULE, total_step=total_step, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    return ours_and_peft(tiny_llama, OURS, config, seed)


def pairs(ours, theirs):
    """(our layer's adapter, peft's layer) by module path."""
    return [(wrapper.adapters["default"], their) for wrapper, their in peft_layers(ours, theirs)]


def test_same_init_forward_and_merge_as_hf_peft(tiny_llama, input_ids):
    ours, theirs = both(tiny_llama)
    for mine, their in pairs(ours, theirs):
        for factor in ("lora_A", "lora_E", "lora_B"):
            assert torch.equal(getattr(mine, factor), getattr(their, factor)["default"])
    theirs.eval()
    torch.testing.assert_close(logits(ours, input_ids), logits(tiny_llama, input_ids), atol=0, rtol=0)
    perturb_adapters(ours, scale=0.3)
    copy_adapter_to_peft(ours, theirs)
    expected = logits(theirs, input_ids)
    torch.testing.assert_close(logits(ours, input_ids), expected, atol=1e-6, rtol=1e-5)
    merge(ours)
    torch.testing.assert_close(logits(ours, input_ids), expected, atol=1e-5, rtol=1e-5)
    unmerge(ours)
    torch.testing.assert_close(logits(ours, input_ids), expected, atol=1e-6, rtol=1e-5)


def test_gradients_reach_only_the_triplets(tiny_llama, input_ids):
    ours = add_adapter(copy.deepcopy(tiny_llama), OURS)
    perturb_adapters(ours)
    weighted_loss(ours(input_ids=input_ids).logits).backward()
    with_grad = {n.rsplit(".", 1)[-1] for n, p in ours.named_parameters() if p.grad is not None}
    assert with_grad == {"lora_A", "lora_E", "lora_B"}
    assert all(p.grad.abs().sum() > 0 for n, p in ours.named_parameters() if p.grad is not None)


class _Record(TrainCallback):
    """Our masks after each step's allocation (adapter callbacks run before the ones passed)."""

    def __init__(self):
        self.masks = []

    def on_step_end(self, model, step):
        self.masks.append({p: w.adapters["default"].rank_mask.tolist() for p, w in wrappers(model)})


def _peft_loop(theirs, batches, steps: int) -> list[dict[str, list[bool]]]:
    """HF peft's documented AdaLoRA loop: backward, step, update_and_allocate(step from 0), zero_grad."""
    params = [p for p in theirs.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.05, weight_decay=0.0)
    theirs.train()
    kept = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        theirs(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        theirs.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        pattern = theirs.peft_config["default"].rank_pattern or {}
        paths = [
            p.removeprefix("base_model.model.")
            for p, _ in theirs.named_modules()
            if p.endswith(tuple(TARGETS))
        ]
        kept.append({path: pattern.get(f"{path}.lora_E.default") for path in paths})
    return kept


def test_same_ranks_pruned_at_the_same_steps_as_hf_peft_rank_allocator(tiny_llama):
    ours, theirs = both(tiny_llama)
    generator = torch.Generator().manual_seed(8)
    batches = [{"input_ids": torch.randint(0, 64, (3, 9), generator=generator)} for _ in range(4)]
    record = _Record()
    config = TrainConfig(max_steps=STEPS, lr=0.05, schedule="constant", clip_grad_norm=None, precision="fp32")
    loader = DataLoader([{"input_ids": b["input_ids"][i]} for b in batches for i in range(3)], batch_size=3)
    train(ours, loader, lambda m, b: m(input_ids=b["input_ids"], labels=b["input_ids"]).loss, config,
          callbacks=[record], progress=False)  # fmt: skip
    reference = _peft_loop(theirs, batches, STEPS)
    pruned_steps = []
    for step, (mine, their) in enumerate(zip(record.masks, reference, strict=True)):
        for path, mask in mine.items():
            if their[path] is not None:  # peft's pattern as of its last allocation
                assert mask == their[path], (step, path)
        if any(not all(mask) for mask in mine.values()):
            pruned_steps.append(step)
    # tinit=2: nothing before step 3; then every delta_t=2 steps; T - tfinal = 9 fixes the final ranks
    assert pruned_steps[0] == 4 and sum(sum(m) for m in record.masks[-1].values()) == 2 * 6
    for mine, their in pairs(ours, theirs):
        torch.testing.assert_close(mine.lora_E, their.lora_E["default"], atol=1e-5, rtol=1e-4)
        assert torch.equal(mine.lora_E == 0, their.lora_E["default"] == 0)
        assert torch.equal(~mine.rank_mask, (their.lora_E["default"] == 0).view(-1))


def test_orthogonal_penalty_is_added_to_the_loss_as_hf_peft(tiny_llama, input_ids):
    ours, theirs = both(tiny_llama)
    perturb_adapters(ours, scale=0.3)
    copy_adapter_to_peft(ours, theirs)
    (schedule,) = training_callbacks(ours)
    task = ours(input_ids=input_ids, labels=input_ids).loss
    expected = theirs(input_ids=input_ids, labels=input_ids).loss
    torch.testing.assert_close(task + schedule.extra_loss(ours), expected, atol=1e-6, rtol=1e-6)


def test_schedule_takes_total_steps_from_the_run_and_refuses_an_empty_budget(tiny_llama):
    ours = add_adapter(copy.deepcopy(tiny_llama), OURS)
    (schedule,) = training_callbacks(ours)
    schedule.on_train_begin(ours, 20)
    assert schedule.total_step == 20 and schedule.initial_budget == 24 and schedule.target_budget == 12
    # peft's cubic budget: int((24 - 12) * (1 - (t - 2) / 15) ** 3 + 12)
    assert [schedule.budget(t) for t in (2, 3, 10, 17, 18)] == [(24, False), (21, False), (13, True),
                                                                (12, False), (12, True)]  # fmt: skip
    with refused("The adalora tinit (2) and tfinal (3) leave no rank-budgeting steps in 5 training steps; "
                 "lower them or train longer."):  # fmt: skip
        schedule.on_train_begin(ours, 5)
    set_trainable(ours, [])
    assert training_callbacks(ours) == []  # a frozen AdaLoRA adapter keeps its ranks


def _trained(tiny_llama, steps: int = STEPS):
    ours, _ = both(tiny_llama)
    generator = torch.Generator().manual_seed(8)
    data = [{"input_ids": torch.randint(0, 64, (9,), generator=generator)} for _ in range(12)]
    config = TrainConfig(max_steps=steps, batch_size=3, lr=0.05, schedule="constant", precision="fp32")
    train(
        ours,
        data,
        lambda m, b: m(input_ids=b["input_ids"], labels=b["input_ids"]).loss,
        config,
        progress=False,
    )
    return ours


def test_files_round_trip_natively_and_load_in_hf_peft_with_its_rank_pattern(tiny_llama, input_ids, tmp_path):
    ours = _trained(tiny_llama)
    ours.eval()
    expected = logits(ours, input_ids)
    kept = {p: w.adapters["default"].rank_mask.tolist() for p, w in wrappers(ours)}
    assert sum(sum(k) for k in kept.values()) == 12 and any(not all(k) for k in kept.values())
    native = save_adapter(ours, tmp_path / "native")
    tensors = load_file(native / "adapter_model.safetensors")
    assert not any("importance" in k or "uncertainty" in k for k in tensors)  # training statistics stay out
    fresh = copy.deepcopy(tiny_llama)
    load_adapter(fresh, native)
    assert torch.equal(logits(fresh, input_ids), expected)
    peft_dir = save_adapter(ours, tmp_path / "peft", format="peft")
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == STEPS and config["deltaT"] == 2
    assert config["rank_pattern"] == {f"{path}.lora_E": mask for path, mask in kept.items()}
    saved = load_file(peft_dir / "adapter_model.safetensors")
    for path, mask in kept.items():
        assert saved[f"base_model.model.{path}.lora_A"].shape == (sum(mask), 64 if "down" in path else 32)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), str(peft_dir)).eval()
    torch.testing.assert_close(logits(theirs, input_ids), expected, atol=1e-6, rtol=1e-5)
    # peft's own file of the same model, loaded here; and back to peft through convert_adapter
    theirs.save_pretrained(tmp_path / "theirs")
    again = copy.deepcopy(tiny_llama)
    load_adapter(again, tmp_path / "theirs")
    torch.testing.assert_close(logits(again, input_ids), expected, atol=1e-6, rtol=1e-5)
    resaved = save_adapter(again, tmp_path / "resaved", format="peft")
    assert json.loads((resaved / "adapter_config.json").read_text())["rank_pattern"] == config["rank_pattern"]
    converted = convert_adapter(native, tmp_path / "converted", "peft")
    assert load_file(converted / "adapter_model.safetensors").keys() == saved.keys()
    back = convert_adapter(peft_dir, tmp_path / "back", "native")  # the kept ranks, all of them kept
    assert json.loads((back / "adapter_config.json").read_text())["total_step"] == STEPS
    reloaded = copy.deepcopy(tiny_llama)
    load_adapter(reloaded, back)
    torch.testing.assert_close(logits(reloaded, input_ids), expected, atol=1e-6, rtol=1e-5)


def test_schedule_resumes_exactly_from_a_checkpoint(tiny_llama, tmp_path):
    generator = torch.Generator().manual_seed(8)
    data = [{"input_ids": torch.randint(0, 64, (9,), generator=generator)} for _ in range(12)]
    calls = []

    def loss(model, batch, crash_at=None):
        calls.append(1)
        if len(calls) == crash_at:
            raise RuntimeError("stop")
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    config = TrainConfig(max_steps=STEPS, batch_size=3, lr=0.05, schedule="constant", precision="fp32",
                         checkpoint_every=3)  # fmt: skip
    runs = []
    for crash_at, resume in ((None, False), (8, False), (None, True)):  # the crash comes in step 7 (from 0)
        torch.manual_seed(4)
        model = add_adapter(copy.deepcopy(tiny_llama), OURS)
        calls.clear()
        try:
            train(model, data, lambda m, b, c=crash_at: loss(m, b, c), config, run_dir=tmp_path / str(resume),
                  resume=resume, progress=False)  # fmt: skip
        except RuntimeError:
            (tmp_path / "True").mkdir()
            (tmp_path / "False" / "checkpoints").rename(tmp_path / "True" / "checkpoints")
        runs.append(model)
    whole, _, resumed = runs
    for (_, a), (_, b) in zip(wrappers(whole), wrappers(resumed), strict=True):
        assert torch.equal(a.adapters["default"].rank_mask, b.adapters["default"].rank_mask)
        torch.testing.assert_close(
            a.adapters["default"].lora_E, b.adapters["default"].lora_E, atol=1e-6, rtol=0
        )


def test_recipe_spec_and_errors(tiny_llama, tmp_path):
    spec = spec_from_dict({"method": "adalora", "init_r": 6, "target_r": 3, "targets": ["q_proj"]})
    assert spec == AdaLoRA(init_r=6, target_r=3, targets=["q_proj"])
    stage = {"name": "task", "objective": "classification", "adapter": {"method": "adalora", "tinit": 3}}
    assert StageSection.model_validate(stage).adapter == AdaLoRA(tinit=3)  # a recipe's adapter section
    with refused("The adalora init_r must be positive and target_r in [0, init_r=4], not 5."):
        AdaLoRA(init_r=4, target_r=5)
    with refused("The adalora tinit (5) and tfinal (5) leave no rank-budgeting steps in 10 training steps; "
                 "lower them or train longer."):  # fmt: skip
        AdaLoRA(tinit=5, tfinal=5, total_step=10)
    with refused("AdaLoRA cannot adapt 'model.embed_tokens' (Embedding); it supports Linear and ungrouped "
                 "Conv2d layers, as HF peft."):  # fmt: skip
        add_adapter(copy.deepcopy(tiny_llama), AdaLoRA(targets=["embed_tokens"]))
    untrained = add_adapter(copy.deepcopy(tiny_llama), AdaLoRA(targets=["q_proj"]))
    with refused("AdaLoRA adapter 'default' has no total_step for HF peft's AdaLoRA config, which needs one; "
                 "set total_step in the adapter spec or train the adapter first."):  # fmt: skip
        save_adapter(untrained, tmp_path / "x", format="peft")
    with refused("Adapter 'x' is lora, not adalora; it has no rank schedule."):
        from pipelines.core.peft import LoRA

        AdaLoRASchedule(add_adapter(copy.deepcopy(tiny_llama), LoRA(targets=["q_proj"]), name="x"), "x")


def test_conv2d_forward_and_merge_as_hf_peft():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 6, 6)
    spec = AdaLoRA(init_r=3, target_r=2, total_step=10, targets=["0", "2"])
    config = peft.AdaLoraConfig(init_r=3, target_r=2, total_step=10, target_modules=["0", "2"])
    ours, theirs = ours_and_peft(model, spec, config, seed=2)
    perturb_adapters(ours, scale=0.3)
    assert {key for key, _, _ in copy_adapter_to_peft(ours, theirs)} == {
        f"{layer}.{factor}" for layer in ("0", "2") for factor in ("lora_A", "lora_E", "lora_B")
    }
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, atol=1e-6, rtol=1e-5)
        merge(ours)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
