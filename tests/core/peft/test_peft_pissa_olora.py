"""PiSSA and OLoRA LoRA initialisations with HF peft as the oracle: factors, residuals, conversion to LoRA."""

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
    perturb_peft,
    refused,
    weighted_loss,
)
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.core.peft import (
    LoRA,
    adapter_specs,
    add_adapter,
    convert_adapter,
    load_adapter,
    merge,
    save_adapter,
    spec_from_dict,
    unmerge,
    wrappers,
)
from pipelines.core.recipe import StageSection

peft = import_hf_peft()
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
    "ignore:PiSSA changes the base weights of the model:UserWarning",
    "ignore:OLoRA changes the base weights of the model:UserWarning",
)

TARGETS = LLAMA_TARGETS
INITS = ["pissa", "pissa_niter_2", "olora"]


def both(tiny_llama, init: str, use_rslora: bool = False, seed: int = 5):
    """Ours and HF peft's on copies of the model, from the same seed (pissa_niter draws a random basis)."""
    spec = LoRA(r=4, alpha=8, init=init, use_rslora=use_rslora, targets=TARGETS)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, use_rslora=use_rslora,
                             target_modules=TARGETS)  # fmt: skip
    return ours_and_peft(tiny_llama, spec, config, seed)


@pytest.mark.parametrize("init", INITS)
def test_same_factors_and_residual_base_as_hf_peft_and_the_model_starts_as_its_base(
    tiny_llama, input_ids, init
):
    ours, theirs = both(tiny_llama, init)
    for wrapper, their in peft_layers(ours, theirs):
        adapter = wrapper.adapters["default"]
        assert torch.equal(adapter.lora_A.weight, their.lora_A["default"].weight)
        assert torch.equal(adapter.lora_B.weight, their.lora_B["default"].weight)
        assert torch.equal(wrapper.base_layer.weight, their.base_layer.weight)  # W - s B0 A0, bit for bit
        assert not torch.equal(adapter.lora_B.weight, torch.zeros_like(adapter.lora_B.weight))
    torch.testing.assert_close(logits(ours, input_ids), logits(tiny_llama, input_ids), atol=2e-6, rtol=1e-5)


def test_frozen_residual_layer_takes_the_fused_path_and_gradients_reach_only_a_and_b(
    tiny_llama, input_ids, fused_calls
):
    ours = add_adapter(copy.deepcopy(tiny_llama), LoRA(r=4, alpha=8, init="pissa", targets=TARGETS))
    ours.train()
    weighted_loss(ours(input_ids=input_ids).logits).backward()
    assert len(fused_calls) == 6  # every adapted projection
    with_grad = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert with_grad and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in with_grad)
    assert not any(b.requires_grad for n, b in ours.named_buffers() if "initial_lora" in n)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_merge_equals_unmerged_output_and_unmerge_restores_the_residual_bit_for_bit(
    tiny_llama, input_ids, init
):
    ours = add_adapter(copy.deepcopy(tiny_llama), LoRA(r=4, alpha=8, init=init, targets=TARGETS))
    perturb_adapters(ours, scale=0.05)
    expected = logits(ours, input_ids)
    residuals = {path: w.base_layer.weight.clone() for path, w in wrappers(ours)}
    merge(ours)
    torch.testing.assert_close(logits(ours, input_ids), expected, atol=1e-5, rtol=1e-5)
    unmerge(ours)
    assert all(torch.equal(w.base_layer.weight, residuals[path]) for path, w in wrappers(ours))
    assert torch.equal(logits(ours, input_ids), expected)


@pytest.mark.parametrize(("init", "use_rslora"), [("pissa", False), ("olora", False), ("pissa", True)])
def test_peft_file_is_the_plain_lora_peft_converts_to_and_loads_on_the_original_base(
    tiny_llama, input_ids, tmp_path, init, use_rslora
):
    ours, theirs = both(tiny_llama, init, use_rslora)
    theirs.save_pretrained(tmp_path / "initial")  # peft's conversion needs the adapter as initialised
    perturb_adapters(ours, scale=0.05)  # as if trained
    copy_adapter_to_peft(ours, theirs)
    expected = logits(ours, input_ids)
    saved = save_adapter(ours, tmp_path / "ours", format="peft")
    theirs.save_pretrained(
        tmp_path / "theirs", path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    mine, reference = (load_file(d / "adapter_model.safetensors") for d in (saved, tmp_path / "theirs"))
    assert mine.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(mine[key], value), key
    config, their_config = (
        json.loads((d / "adapter_config.json").read_text()) for d in (saved, tmp_path / "theirs")
    )
    assert (
        (config["r"], config["init_lora_weights"])
        == (8, True)
        == (their_config["r"], their_config["init_lora_weights"])
    )
    assert config["lora_alpha"] == pytest.approx(their_config["lora_alpha"])
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), str(saved)).eval()  # the original base
    torch.testing.assert_close(logits(loaded, input_ids), expected, atol=2e-6, rtol=1e-5)
    plain = copy.deepcopy(tiny_llama)
    assert load_adapter(plain, saved) == "default"  # and here, as a plain rank-8 LoRA on the original base
    spec = adapter_specs(plain)["default"]
    assert (spec.r, spec.alpha, spec.init, spec.use_rslora) == (
        8,
        config["lora_alpha"],
        "default",
        use_rslora,
    )
    torch.testing.assert_close(logits(plain, input_ids), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa_niter_2", "olora"])
def test_native_file_rebuilds_the_same_residual_on_the_original_base(tiny_llama, input_ids, tmp_path, init):
    ours = add_adapter(copy.deepcopy(tiny_llama), LoRA(r=4, alpha=8, init=init, targets=TARGETS))
    perturb_adapters(ours, scale=0.05)
    expected = logits(ours, input_ids)
    native = save_adapter(ours, tmp_path / "native")
    assert {
        "model.layers.0.self_attn.q_proj.initial_lora_A",
        "model.layers.0.self_attn.q_proj.initial_lora_B",
    } <= set(load_file(native / "adapter_model.safetensors"))
    torch.manual_seed(99)  # another random basis would be drawn, but the file's factors are used
    fresh = copy.deepcopy(tiny_llama)
    load_adapter(fresh, native)
    for (_, a), (_, b) in zip(wrappers(ours), wrappers(fresh), strict=True):
        assert torch.equal(a.base_layer.weight, b.base_layer.weight)
    assert torch.equal(logits(fresh, input_ids), expected)
    converted = convert_adapter(native, tmp_path / "converted", "peft")  # without the model
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), str(converted)).eval()
    torch.testing.assert_close(logits(loaded, input_ids), expected, atol=2e-6, rtol=1e-5)


def test_peft_pissa_file_without_conversion_loads_by_decomposing_the_base_as_peft_does(
    tiny_llama, input_ids, tmp_path
):
    _, theirs = both(tiny_llama, "pissa")
    perturb_peft(theirs, scale=0.05)
    theirs.save_pretrained(tmp_path / "theirs")
    assert (
        json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    )
    ours = copy.deepcopy(tiny_llama)
    load_adapter(ours, tmp_path / "theirs")
    torch.testing.assert_close(
        logits(ours, input_ids), logits(theirs.eval(), input_ids), atol=1e-6, rtol=1e-5
    )
    with refused(f"{tmp_path / 'theirs'} is an HF peft pissa adapter of a decomposed base, which only its "
                 "base model can rebuild; load_adapter(model, ...) and save_adapter(model, ...) "
                 "instead."):  # fmt: skip
        convert_adapter(tmp_path / "theirs", tmp_path / "native", "native")


def test_errors_name_the_module_and_the_fix(tiny_llama, tmp_path):
    with refused("The lora init must be 'default', 'gaussian', 'pissa', 'pissa_niter_K' (K a positive "
                 "integer) or 'olora', not 'pisa'."):  # fmt: skip
        LoRA(init="pisa")
    with refused("The lora init 'olora' cannot be combined with use_dora; drop one of them."):
        LoRA(init="olora", use_dora=True)
    with refused("LoRA init 'pissa' is supported on Linear layers only, not on model.embed_tokens "
                 "(Embedding); use init 'default' there."):  # fmt: skip
        add_adapter(copy.deepcopy(tiny_llama), LoRA(init="pissa", targets=["embed_tokens"]))
    model = add_adapter(copy.deepcopy(tiny_llama), LoRA(r=2, targets=["q_proj"]), name="first")
    merge(model)
    with refused("LoRA init 'pissa' decomposes 'model.layers.0.self_attn.q_proj', which has a merged "
                 "adapter; unmerge first."):  # fmt: skip
        add_adapter(model, LoRA(init="pissa", targets=["q_proj"]), name="second")
    dora = add_adapter(copy.deepcopy(tiny_llama), LoRA(r=2, use_dora=True, targets=["q_proj"]), name="first")
    with refused("LoRA init 'olora' would change the base weight under the DoRA adapter on "
                 "'model.layers.0.self_attn.q_proj', whose scale depends on it; add it to a model without "
                 "DoRA there."):  # fmt: skip
        add_adapter(dora, LoRA(init="olora", targets=["q_proj"]), name="second")
    assert spec_from_dict({"method": "lora", "init": "pissa_niter_4"}).init == "pissa_niter_4"
    stage = {"name": "task", "objective": "classification", "adapter": {"method": "lora", "init": "olora"}}
    assert StageSection.model_validate(stage).adapter == LoRA(init="olora")  # a recipe's adapter section


def test_a_refused_file_leaves_the_base_as_it_was(tiny_llama, tmp_path):
    ours = add_adapter(copy.deepcopy(tiny_llama), LoRA(r=4, alpha=8, init="pissa", targets=TARGETS))
    native = save_adapter(ours, tmp_path / "native")
    tensors = load_file(native / "adapter_model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.lora_B.weight"]
    save_file(tensors, native / "adapter_model.safetensors")
    fresh = copy.deepcopy(tiny_llama)
    with pytest.raises(ValueError, match="lacks 'model.layers.1.mlp.down_proj.lora_B.weight'"):
        load_adapter(fresh, native)
    for name, parameter in tiny_llama.named_parameters():
        assert torch.equal(parameter, dict(fresh.named_parameters())[name]), name
    assert not any(isinstance(m, nn.ModuleDict) for m in fresh.modules())
