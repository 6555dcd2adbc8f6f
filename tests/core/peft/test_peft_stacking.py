"""Named adapters together: additive LoRAs, order of serial adapters, what trains, unloading, counting."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft_testing import Block, perturb_adapters, relative_error
from torch import nn

from pipelines.core.peft import (
    IA3,
    SSF,
    Bottleneck,
    LoRA,
    NormTuning,
    PromptTuning,
    adapter_names,
    add_adapter,
    count_parameters,
    disable_adapters,
    extend_attention_mask,
    load_adapter,
    merge,
    merge_and_unload,
    remove_adapter,
    save_adapter,
    set_trainable,
    unmerge,
)
from pipelines.core.peft.layers import AdaptedLayer


def lora_delta(layer: AdaptedLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    adapter = layer.adapters[name]
    return x @ adapter.lora_A.weight.t() @ adapter.lora_B.weight.t() * adapter.scaling


def bottleneck(layer: AdaptedLayer, name: str, h: torch.Tensor) -> torch.Tensor:
    adapter = layer.adapters[name]
    return h + adapter.up(F.gelu(adapter.down(h))) * adapter.scale


def test_two_loras_on_one_layer_add_their_deltas():
    base = Block()
    model = copy.deepcopy(base)
    add_adapter(model, LoRA(r=2, targets=["q_proj"]), name="domain")
    add_adapter(model, LoRA(r=3, alpha=6, targets=["q_proj"]), name="task")
    perturb_adapters(model)
    x = torch.randn(4, 8)
    layer = model.q_proj
    expected = base.q_proj(x) + lora_delta(layer, "domain", x) + lora_delta(layer, "task", x)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    out = model(x)
    merge(model, ["domain"])  # a prefix of the stack merges alone
    assert [a.merged for a in layer.adapters.values()] == [True, False]
    assert relative_error(model(x), out) < 1e-5
    merge(model)
    assert relative_error(model(x), out) < 1e-5
    unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, base.q_proj.weight, atol=1e-6, rtol=0)


def test_serial_bottleneck_added_second_sees_the_first_adapters_output():
    x = torch.randn(4, 8)
    first = add_adapter(Block(), LoRA(r=2, targets=["q_proj"]), name="domain")
    add_adapter(first, Bottleneck(hidden=3, targets=["q_proj"]), name="task")
    perturb_adapters(first)
    layer = first.q_proj
    h = layer.base_layer(x) + lora_delta(layer, "domain", x)
    torch.testing.assert_close(layer(x), bottleneck(layer, "task", h), atol=1e-6, rtol=0)

    swapped = copy.deepcopy(first)  # same weights, the other order
    swapped.q_proj.adapters = nn.ModuleDict({k: swapped.q_proj.adapters[k] for k in ["task", "domain"]})
    layer = swapped.q_proj
    expected = bottleneck(layer, "task", layer.base_layer(x)) + lora_delta(layer, "domain", x)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    assert relative_error(swapped(x), first(x)) > 1e-3


def test_set_trainable_freezes_the_other_adapter_bit_for_bit():
    model = add_adapter(Block(), LoRA(r=2, targets=["q_proj"]), name="domain")
    add_adapter(model, SSF(targets=["q_proj", "norm"]), name="task")
    perturb_adapters(model)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".adapters." in n)
    set_trainable(model, ["task"], extra=["head"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        ["head.weight", "head.bias", "norm.adapters.task.ssf_scale", "norm.adapters.task.ssf_shift",
         "q_proj.adapters.task.ssf_scale", "q_proj.adapters.task.ssf_shift"]
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)  # every parameter given
    model(torch.randn(4, 8)).pow(2).sum().backward()
    optimizer.step()
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
    assert changed == trainable
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_stacked_adapters_round_trip_through_files(tmp_path):
    base = Block()
    model = add_adapter(copy.deepcopy(base), LoRA(r=2, targets=["q_proj"]), name="domain")
    add_adapter(model, Bottleneck(hidden=2, targets=["q_proj"]), name="task")
    set_trainable(model, ["task"], extra=["head"])
    perturb_adapters(model)
    with torch.no_grad():
        model.head.weight.mul_(2)
    save_adapter(model, tmp_path / "domain", name="domain")
    save_adapter(model, tmp_path / "task", name="task", extra=["head"])
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, tmp_path / "domain") == "domain"
    assert load_adapter(fresh, tmp_path / "task", name="task") == "task"
    assert adapter_names(fresh) == ["domain", "task"]
    assert torch.equal(fresh.head.weight, model.head.weight)
    x = torch.randn(4, 8)
    assert torch.equal(fresh(x), model(x))


def test_merge_and_unload_leaves_plain_modules():
    base = Block()
    model = add_adapter(copy.deepcopy(base), LoRA(r=2, targets=["q_proj", "head"]), name="domain")
    add_adapter(model, IA3(targets=["q_proj"]), name="task")
    add_adapter(model, NormTuning(), name="norms")
    perturb_adapters(model)
    x = torch.randn(4, 8)
    expected = model(x)
    merge_and_unload(model)
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert [type(m) for m in model.children()] == [nn.Linear, nn.LayerNorm, nn.Linear]
    assert adapter_names(model) == []
    assert relative_error(model(x), expected) < 1e-5
    assert count_parameters(model).total == count_parameters(base).total


def test_remove_adapter_restores_the_plain_layer():
    base = Block()
    model = copy.deepcopy(base)
    original = model.q_proj
    add_adapter(model, LoRA(r=2, targets=["q_proj"]), name="domain")
    add_adapter(model, SSF(targets=["q_proj"]), name="task")
    perturb_adapters(model)
    x = torch.randn(4, 8)
    remove_adapter(model, "domain")
    assert list(model.q_proj.adapters) == ["task"] and adapter_names(model) == ["task"]
    remove_adapter(model, "task")
    assert model.q_proj is original
    assert adapter_names(model) == []
    assert torch.equal(model(x), base(x))


def test_count_parameters_is_exact():
    model = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 2))
    assert count_parameters(model).to_dict() == {"trainable": 80, "total": 80, "fraction": 1.0}
    add_adapter(model, LoRA(r=2, targets=["0"]))
    count = count_parameters(model)  # A: 2 x 10, B: 6 x 2; the base is frozen
    assert (count.trainable, count.total) == (32, 112)
    assert count.fraction == 32 / 112
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    tied[1].weight = tied[0].weight
    assert count_parameters(tied).total == 20  # shared parameters count once


def test_prompt_tuning_on_an_embedding():
    base = nn.Embedding(20, 8)
    model = add_adapter(nn.Sequential(copy.deepcopy(base)), PromptTuning(num_tokens=3, targets=["0"]))
    at_one = add_adapter(
        nn.Sequential(copy.deepcopy(base)), PromptTuning(num_tokens=3, insert_at=1, targets=["0"])
    )
    ids = torch.randint(0, 20, (2, 5))
    out = model(ids)
    prompt = model[0].adapters["default"].prompt
    assert out.shape == (2, 8, 8)
    assert torch.equal(out[:, :3], prompt.expand(2, -1, -1)) and torch.equal(out[:, 3:], base(ids))
    out = at_one(ids)
    assert torch.equal(out[:, 1:4], at_one[0].adapters["default"].prompt.expand(2, -1, -1))
    assert torch.equal(out[:, :1], base(ids)[:, :1]) and torch.equal(out[:, 4:], base(ids)[:, 1:])
    with disable_adapters(model):
        assert torch.equal(model(ids), base(ids))
    out.sum().backward()
    assert [n for n, p in at_one.named_parameters() if p.grad is not None] == ["0.adapters.default.prompt"]
    mask = torch.tensor([[1, 0, 0], [1, 1, 0]])
    assert extend_attention_mask(mask, 2).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert extend_attention_mask(mask, 2, insert_at=1).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert extend_attention_mask(mask[:, 1:], 1, insert_at=1).tolist() == [[0, 1, 0], [1, 1, 0]]


@pytest.mark.parametrize("spec", [NormTuning(targets=["norm"]), LoRA(r=2, use_dora=True, targets=["q_proj"])])
def test_norm_tuning_and_dora_stack_when_first(spec):
    model = add_adapter(Block(), spec, name="first")
    add_adapter(model, SSF(targets=["q_proj", "norm"]), name="second")
    perturb_adapters(model)
    x = torch.randn(4, 8)
    expected = model(x)
    merge(model)
    assert relative_error(model(x), expected) < 1e-5


def test_adapted_layers_expose_their_base_attributes():
    """Code that reads `layer.weight` or `in_features` keeps working after the layer is adapted."""
    model = add_adapter(Block(), LoRA(r=2, targets=["q_proj"]))
    layer = model.q_proj
    assert layer.weight is layer.base_layer.weight and layer.in_features == 8
    assert layer.adapters["default"].lora_A.weight.shape == (2, 8)  # the wrapper's own modules come first
    with pytest.raises(AttributeError, match="^'AdaptedLayer' object has no attribute 'nonexistent'$"):
        _ = layer.nonexistent
