"""VeRA with HF peft as the oracle: the same projections from the same key, same forward, files both ways."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft_testing import (
    LLAMA_TARGETS,
    assert_same_base_weights,
    copy_adapter_to_peft,
    import_hf_peft,
    logits,
    ours_and_peft,
    perturb_adapters,
    perturb_peft,
    refused,
    weighted_loss,
)
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.core.peft import (
    LoRA,
    VeRA,
    add_adapter,
    convert_adapter,
    count_parameters,
    load_adapter,
    merge,
    save_adapter,
    unmerge,
)

peft = import_hf_peft()
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
    "ignore:Specified to not load vera_A and vera_B:UserWarning",
    "ignore:Specified to not save vera_A and vera_B:UserWarning",
)

TARGETS = LLAMA_TARGETS


def projections(model: nn.Module, name: str = "default") -> list[nn.Module]:
    return [m.adapters[name].projections for m in model.modules() if name in getattr(m, "adapters", {})]


def test_same_projections_forward_gradients_and_merge_as_hf_peft(tiny_llama, input_ids):
    spec = VeRA(r=4, projection_prng_key=11, d_initial=0.2, targets=TARGETS)
    config = peft.VeraConfig(r=4, projection_prng_key=11, d_initial=0.2, target_modules=TARGETS)
    ours, theirs = ours_and_peft(tiny_llama, spec, config)
    theirs.eval()
    shared = projections(ours)
    assert len(shared) == 6 and all(p is shared[0] for p in shared)  # one pair for every layer
    assert torch.equal(shared[0].vera_A, theirs.base_model.vera_A["default"])  # (4, 64): the widest input
    assert torch.equal(shared[0].vera_B, theirs.base_model.vera_B["default"])  # (32, 4): the widest output
    assert shared[0].vera_A.shape == (4, 64) and shared[0].vera_B.shape == (32, 4)
    torch.testing.assert_close(logits(ours, input_ids), logits(tiny_llama, input_ids), atol=0, rtol=0)
    perturb_adapters(ours, scale=0.3)
    tensors = copy_adapter_to_peft(ours, theirs)
    assert all(key.endswith(("vera_lambda_b", "vera_lambda_d")) for key, _, _ in tensors)
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=1e-5, rtol=0)
    ours.train()
    weighted_loss(ours(input_ids=input_ids).logits).backward()
    weighted_loss(theirs(input_ids=input_ids).logits).backward()
    for key, mine, their in tensors:
        torch.testing.assert_close(mine.grad, their.grad, atol=1e-4, rtol=1e-4, msg=key)
    ours.eval()
    merge(ours)
    assert_same_base_weights(ours, theirs.merge_and_unload(), atol=1e-6)


def test_only_d_and_b_train_and_the_projections_are_frozen_buffers(tiny_llama, input_ids):
    model = add_adapter(copy.deepcopy(tiny_llama), VeRA(r=4, targets=TARGETS))
    model.train()
    weighted_loss(model(input_ids=input_ids).logits).backward()
    trained = sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.grad is not None})
    assert trained == ["vera_lambda_b", "vera_lambda_d"]
    assert all(p.requires_grad == (".adapters." in n) for n, p in model.named_parameters())
    buffers = dict(model.named_buffers())
    assert sum(n.endswith(("vera_A", "vera_B")) for n in buffers) == 2  # shared: listed once
    assert not any("vera_A" in k or "vera_B" in k for k in model.state_dict())  # never in a checkpoint
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert torch.equal(adapter.vera_lambda_b, torch.zeros(32))
    assert torch.equal(adapter.vera_lambda_d, torch.full((4,), 0.1))


def test_parameter_count_against_the_formula_and_against_lora(tiny_llama):
    for r in (4, 8, 16):
        vera = count_parameters(add_adapter(copy.deepcopy(tiny_llama), VeRA(r=r, targets=TARGETS)))
        lora = count_parameters(add_adapter(copy.deepcopy(tiny_llama), LoRA(r=r, targets=TARGETS)))
        # each layer trains b (its output width) and d (r): 2 layers x ((32 + r) + (16 + r) + (32 + r))
        assert vera.trainable == 2 * (80 + 3 * r)
        assert lora.trainable == 2 * r * ((32 + 32) + (32 + 16) + (64 + 32))
        assert vera.total - vera.trainable == lora.total - lora.trainable  # projections are not parameters
        assert vera.trainable * 9 < lora.trainable  # 9.0x fewer at r=4, 16x at 8, 26x at 16


@pytest.mark.parametrize("save_projection", [True, False])
def test_our_peft_files_load_in_hf_peft(tiny_llama, input_ids, tmp_path, save_projection):
    model = add_adapter(
        copy.deepcopy(tiny_llama), VeRA(r=4, save_projection=save_projection, targets=TARGETS)
    )
    perturb_adapters(model, scale=0.3)
    save_adapter(model, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] is save_projection
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) is save_projection
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path).eval()
    expected = logits(model, input_ids)
    assert not torch.allclose(expected, logits(tiny_llama, input_ids), atol=1e-3)
    torch.testing.assert_close(logits(theirs, input_ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("save_projection", [True, False])
def test_hf_peft_files_load_in_ours(tiny_llama, input_ids, tmp_path, save_projection):
    config = peft.VeraConfig(
        r=8, projection_prng_key=3, save_projection=save_projection, target_modules=TARGETS
    )
    theirs = peft.get_peft_model(copy.deepcopy(tiny_llama), config).eval()
    perturb_peft(theirs)
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(tiny_llama)
    assert load_adapter(model, tmp_path) == "default"
    expected = logits(theirs, input_ids)
    assert not torch.allclose(expected, logits(tiny_llama, input_ids), atol=1e-3)
    torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-5, rtol=0)


def test_projections_saved_by_hf_peft_are_used_as_saved(tiny_llama, input_ids, tmp_path):
    """A file's projections win over the key's draw (peft may write them wider than the layers need)."""
    theirs = peft.get_peft_model(
        copy.deepcopy(tiny_llama), peft.VeraConfig(r=4, target_modules=TARGETS)
    ).eval()
    perturb_peft(theirs)
    theirs.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.vera_A"] = torch.randn(4, 70)  # wider than any layer, other values than the key's
    tensors["base_model.vera_B"] = torch.randn(40, 4)
    save_file(tensors, weights)
    other = copy.deepcopy(tiny_llama)
    load_adapter(other, tmp_path)
    with torch.no_grad():
        theirs.base_model.vera_A["default"].data = tensors["base_model.vera_A"]
        theirs.base_model.vera_B["default"].data = tensors["base_model.vera_B"]
    torch.testing.assert_close(logits(other, input_ids), logits(theirs, input_ids), atol=1e-5, rtol=0)
    tensors["base_model.vera_A"] = torch.randn(4, 60)  # narrower than the widest input, 64
    save_file(tensors, weights)
    with refused(f"{weights}: tensor 'vera_A' has shape (4, 60), the model needs (4, >=64)."):
        load_adapter(copy.deepcopy(tiny_llama), tmp_path)
    save_file({k: v for k, v in tensors.items() if "vera_B" not in k}, weights)
    with refused(
        f"{weights} lacks the VeRA projections vera_A and vera_B that its config says it saved "
        "(save_projection); re-save the adapter."
    ):
        load_adapter(copy.deepcopy(tiny_llama), tmp_path)


@pytest.mark.parametrize("save_projection", [True, False])
def test_native_round_trip_and_conversion(tiny_llama, input_ids, tmp_path, save_projection):
    model = add_adapter(
        copy.deepcopy(tiny_llama), VeRA(r=4, save_projection=save_projection, targets=TARGETS)
    )
    perturb_adapters(model, scale=0.3)
    if save_projection:  # then loading must use the saved copy, not a redraw from the key
        with torch.no_grad():
            projections(model)[0].vera_A.add_(torch.randn(4, 64) * 0.1)
    save_adapter(model, tmp_path / "native", name="default")
    keys = set(load_file(tmp_path / "native" / "adapter_model.safetensors"))
    assert ({"vera_A", "vera_B"} <= keys) is save_projection
    fresh = copy.deepcopy(tiny_llama)
    load_adapter(fresh, tmp_path / "native")
    assert torch.equal(logits(fresh, input_ids), logits(model, input_ids))
    convert_adapter(tmp_path / "native", tmp_path / "peft", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(theirs, input_ids), logits(model, input_ids), atol=1e-5, rtol=0)
    convert_adapter(tmp_path / "peft", tmp_path / "back", format="native")
    back = copy.deepcopy(tiny_llama)
    load_adapter(back, tmp_path / "back")
    assert torch.equal(logits(back, input_ids), logits(model, input_ids))


def test_merge_unmerge_round_trip_and_stacking(tiny_llama, input_ids):
    model = add_adapter(copy.deepcopy(tiny_llama), VeRA(r=4, targets=TARGETS), name="a")
    add_adapter(model, VeRA(r=2, projection_prng_key=1, targets=["q_proj"]), name="b")
    perturb_adapters(model, scale=0.3)
    assert projections(model, "a")[0] is not projections(model, "b")[0]  # each adapter draws its own
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = logits(model, input_ids)
    merge(model)
    torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-5, rtol=0)
    unmerge(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0, msg=key)


def test_unsupported_layers_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 3), nn.Embedding(5, 4))
    with refused("VeRA cannot adapt '1' (Conv2d); it supports Linear layers only."):
        add_adapter(model, VeRA(r=2, targets=["0", "1"]))
    with refused("VeRA cannot adapt '2' (Embedding); it supports Linear layers only."):
        add_adapter(model, VeRA(r=2, targets=["2"]))
    assert type(model[0]) is nn.Linear and all(p.requires_grad for p in model.parameters())
    with refused("The vera rank r must be a positive integer, not -1; set r: 8, say."):
        VeRA(r=-1)


def test_hf_peft_configs_we_cannot_honour(tiny_llama, tmp_path):
    theirs = peft.get_peft_model(copy.deepcopy(tiny_llama), peft.VeraConfig(r=2, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "bias": "all"}))
    with refused(f"{path}: VeRA with fan_in_fan_out or a trained bias is not supported."):
        load_adapter(copy.deepcopy(tiny_llama), tmp_path)
