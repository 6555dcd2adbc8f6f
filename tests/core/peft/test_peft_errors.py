"""Every refusal of the PEFT module, with its exact message: one sentence naming the thing and the fix."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from peft_testing import Block, make_tiny_llama, perturb_adapters, refused
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.core.peft import (
    IA3,
    SSF,
    BitFit,
    Bottleneck,
    LoRA,
    NormTuning,
    adapter_names,
    add_adapter,
    disable_adapters,
    load_adapter,
    merge,
    remove_adapter,
    save_adapter,
    set_trainable,
    spec_from_dict,
    unmerge,
)
from pipelines.core.peft.layers import AdaptedLayer


def stacked() -> nn.Module:
    model = add_adapter(Block(), LoRA(r=2, targets=["q_proj"]), name="domain")
    return add_adapter(model, LoRA(r=2, targets=["q_proj"]), name="task")


def test_target_matching_nothing_lists_the_closest_names():
    model = make_tiny_llama()
    with refused(
        "The lora adapter 'default' targets ['q_prj'] match no module of LlamaForCausalLM; closest module "
        "names: k_proj, o_proj, q_proj, up_proj, v_proj."
    ):
        add_adapter(model, LoRA(targets=["q_prj"]))
    assert adapter_names(model) == [] and not any(isinstance(m, AdaptedLayer) for m in model.modules())
    with refused("The bottleneck adapter 'default' targets ['re:.*foo'] match no module of Block."):
        add_adapter(Block(), Bottleneck(targets=["re:.*foo"]))
    with refused(
        "set_trainable extra targets ['haed'] match no module of Block; closest module names: head."
    ):
        set_trainable(add_adapter(Block(), LoRA(targets=["q_proj"])), ["default"], extra=["haed"])


def test_unsupported_layers_are_named():
    with refused(
        "LoRA cannot adapt 'norm' (LayerNorm); it supports Linear, Embedding, Conv1d, Conv2d, Conv3d and "
        "ConvTranspose1d layers."
    ):
        add_adapter(Block(), LoRA(targets=["norm"]))
    with refused("DoRA is supported on Linear layers only, not on 0 (Conv2d)."):
        add_adapter(nn.Sequential(nn.Conv2d(2, 2, 1)), LoRA(targets=["0"], use_dora=True))
    with refused("LoRA on 0: grouped ConvTranspose1d (groups=2) is not supported."):
        add_adapter(nn.Sequential(nn.ConvTranspose1d(4, 4, 3, groups=2)), LoRA(targets=["0"]))
    with refused("NormTuning target 'q_proj' is a Linear, not a norm layer."):
        add_adapter(Block(), NormTuning(targets=["q_proj"]))
    with refused("NormTuning target 'norm' has no affine parameters or statistics to tune."):
        add_adapter(Block(affine=False), NormTuning(targets=["norm"]))
    # With no targets, norms with nothing to tune are skipped rather than refused.
    mixed = nn.Sequential(nn.LayerNorm(4), nn.LayerNorm(4, elementwise_affine=False))
    add_adapter(mixed, NormTuning())
    assert [n for n, _ in mixed.named_modules() if n.endswith("adapters.default")] == ["0.adapters.default"]
    with refused("BitFit target 'q_proj' (Linear) has no bias; choose layers with one."):
        add_adapter(Block(bias=False), BitFit(targets=["q_proj"]))
    holder = nn.Module()
    holder.block = Block()
    with refused(
        "Cannot tell the output channels of module 'block' (Block); target a Linear, Embedding, convolution "
        "or norm layer instead."
    ):
        add_adapter(holder, Bottleneck(targets=["block"]))
    with refused("The lora adapter 'default' needs targets (module names, re:..., type:...)."):
        add_adapter(Block(), LoRA())


def test_adapter_names():
    model = add_adapter(Block(), LoRA(targets=["q_proj"]), name="task")
    with refused("The model already has an adapter named 'task'; choose another name."):
        add_adapter(model, SSF(targets=["head"]), name="task")
    for bad in ["1task", "a.b", "", "task adapter"]:
        with refused(
            f"Adapter name {bad!r} must be letters, digits, '_' or '-', starting with a letter or '_'."
        ):
            add_adapter(model, SSF(targets=["head"]), name=bad)
    with refused("The model has no adapter named 'tsak'; it has ['task']."):
        set_trainable(model, ["tsak"])
    for call in (lambda: merge(model, ["tsak"]), lambda: unmerge(model, ["tsak"])):
        with refused("The model has no adapter named 'tsak'; it has ['task']."):
            call()
    with refused("The model has no adapter named 'tsak'; it has ['task']."):
        remove_adapter(model, "tsak")
    assert adapter_names(model) == ["task"]


def test_norm_tuning_and_dora_must_come_first_on_a_layer():
    """Added after another adapter they would not compose in order, and merging would change outputs."""
    model = add_adapter(Block(), SSF(targets=["norm"]), name="ssf")
    with refused(
        "The norm adapter 'norms' recomputes 'norm' from its base weights, so it must be the first adapter "
        "there, but 'norm' already has 'ssf'."
    ):
        add_adapter(model, NormTuning(), name="norms")
    with refused(
        "The norm adapter 'again' recomputes 'norm' from its base weights, so it must be the first adapter "
        "there, but 'norm' already has 'first'."
    ):
        add_adapter(add_adapter(Block(), NormTuning(), name="first"), NormTuning(), name="again")
    model = add_adapter(Block(), LoRA(r=2, targets=["q_proj"]), name="lora")
    with refused(
        "The DoRA adapter 'dora' recomputes 'q_proj' from its base weights, so it must be the first adapter "
        "there, but 'q_proj' already has 'lora'."
    ):
        add_adapter(model, LoRA(r=2, use_dora=True, targets=["q_proj"]), name="dora")
    assert adapter_names(model) == ["lora"] and list(model.q_proj.adapters) == ["lora"]


def test_merge_refusals():
    model = add_adapter(Block(), Bottleneck(hidden=2, targets=["q_proj"]), name="task")
    with refused(
        "Adapter 'task' on 'q_proj' (transform) cannot be merged: "
        "BottleneckAdapter is not a linear change of the layer's weights."
    ):
        merge(model)
    model = stacked()
    with refused("Cannot merge 'task' on 'q_proj' before 'domain'; merge them together."):
        merge(model, ["task"])
    assert not any(a.merged for a in model.q_proj.adapters.values())
    merge(model)
    with refused("Cannot unmerge 'domain' on 'q_proj' before 'task'; unmerge them together."):
        unmerge(model, ["domain"])
    with refused("Adapter 'domain' is merged into the weights; unmerge(model) before disabling."):
        with disable_adapters(model):
            pass
    with refused("Adapter 'task' is merged on 'q_proj'; unmerge it before removing it."):
        remove_adapter(model, "task")
    with refused("Adapter 'task' is merged on 'q_proj'; unmerge(model) before saving it."):
        save_adapter(model, "unused", name="task")
    model = add_adapter(Block(affine=False), SSF(targets=["norm"]))
    with refused("Cannot merge into 'norm': the layer has no weight (no affine parameters)."):
        merge(model)
    model = add_adapter(Block(bias=False), SSF(targets=["q_proj"]))
    with refused("Cannot merge a shift into 'q_proj': the layer has no bias."):
        merge(model)
    assert not model.q_proj.adapters["default"].merged


def test_spec_from_dict_refusals():
    with refused(
        "Adapter method 'lora' has no option 'rank'; options: ['alpha', 'dropout', 'init', 'r', 'targets', "
        "'use_dora', 'use_rslora']."
    ):
        spec_from_dict({"method": "lora", "rank": 8})
    with refused(
        "Unknown adapter method 'lorax'; choose one of ['adalora', 'bitfit', 'bottleneck', 'ia3', 'loha', "
        "'lokr', 'lora', 'norm', 'prefix', 'prompt', 'ptuning', 'sct', 'ssf', 'vera']."
    ):
        spec_from_dict({"method": "lorax"})
    with refused(
        "Unknown adapter method None; choose one of ['adalora', 'bitfit', 'bottleneck', 'ia3', 'loha', "
        "'lokr', 'lora', 'norm', 'prefix', 'prompt', 'ptuning', 'sct', 'ssf', 'vera']."
    ):
        spec_from_dict({"r": 8})
    assert spec_from_dict({"method": "ia3", "targets": ("q",)}) == IA3(targets=["q"])


def test_save_refusals(tmp_path):
    model = add_adapter(Block(), SSF(targets=["q_proj"]), name="task")
    with refused(
        "Adapter 'task' is ssf; the HF peft format is written for LoRA, LoHa, LoKr, VeRA, AdaLoRA, "
        "P-tuning and prefix tuning only."
    ):
        save_adapter(model, tmp_path, format="peft")
    with refused("Unknown adapter format 'onnx'; use 'native' or 'peft'."):
        save_adapter(model, tmp_path, format="onnx")
    with refused("format='peft' saves adapter weights only; save heads in the native format."):
        save_adapter(model, tmp_path, format="peft", extra=["head"])
    with refused("The model has adapters ['domain', 'task']; name the one to save."):
        save_adapter(stacked(), tmp_path)
    with refused("The model has no adapter named 'other'; it has ['task']."):
        save_adapter(model, tmp_path, name="other")
    grouped = add_adapter(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), LoRA(r=2, targets=["0"]))
    with refused("HF peft computes LoRA on '0' (Conv2d) differently; export it in the native format."):
        save_adapter(grouped, tmp_path, format="peft")
    transposed = add_adapter(nn.Sequential(nn.ConvTranspose1d(4, 4, 3)), LoRA(r=2, targets=["0"]))
    with refused(
        "HF peft computes LoRA on '0' (ConvTranspose1d) differently; export it in the native format."
    ):
        save_adapter(transposed, tmp_path, format="peft")
    dilated = add_adapter(nn.Sequential(nn.Conv1d(4, 4, 3, dilation=2)), LoRA(r=2, targets=["0"]))
    with refused("HF peft computes LoRA on '0' (Conv1d) differently; export it in the native format."):
        save_adapter(dilated, tmp_path, format="peft")
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.fixture
def saved(tmp_path):
    """(directory of a saved LoRA on q_proj, the pristine base it came from)."""
    base = Block()
    model = add_adapter(copy.deepcopy(base), LoRA(r=2, targets=["q_proj"]), name="task")
    perturb_adapters(model)
    return save_adapter(model, tmp_path / "task"), base


def test_pickles_are_refused(tmp_path):
    torch.save({"q_proj.lora_A.weight": torch.zeros(2, 8)}, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text("{}")
    with refused(
        f"{tmp_path / 'adapter_model.bin'} is a pickle file, which is never loaded; re-save the adapter as "
        "safetensors (HF peft: save_pretrained(..., safe_serialization=True))."
    ):
        load_adapter(Block(), tmp_path)


def test_missing_files(tmp_path, saved):
    directory, base = saved
    with refused(f"Adapter directory {tmp_path / 'nowhere'} does not exist.", FileNotFoundError):
        load_adapter(base, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with refused(
        f"{tmp_path / 'empty'} has no adapter_model.safetensors; it is not an adapter directory.",
        FileNotFoundError,
    ):
        load_adapter(base, tmp_path / "empty")
    (directory / "adapter_config.json").unlink()
    with refused(f"{directory} has adapter_model.safetensors but no adapter_config.json.", FileNotFoundError):
        load_adapter(base, directory)


def assert_untouched(model: nn.Module) -> None:
    """A refused file leaves no adapter behind and the base as trainable as it was."""
    assert adapter_names(model) == []
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_shape_mismatch_names_the_tensor_and_both_shapes(saved):
    directory, _ = saved
    other = Block()
    other.q_proj = nn.Linear(8, 4)
    with refused(
        f"{directory / 'adapter_model.safetensors'}: tensor 'q_proj.lora_B.weight' has shape (8, 2), the "
        "model expects (4, 2)."
    ):
        load_adapter(other, directory)
    assert_untouched(other)


def test_missing_and_unexpected_keys(saved):
    directory, base = saved
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if "lora_B" not in k}, weights)
    with refused(f"{weights} lacks 'q_proj.lora_B.weight'; was it saved from this model?"):
        load_adapter(base, directory)
    assert_untouched(base)
    save_file({**tensors, "q_proj.lora_C.weight": torch.zeros(1)}, weights)
    with refused(
        f"{weights} has 'q_proj.lora_C.weight', which the model does not; was it saved from this model?"
    ):
        load_adapter(base, directory)
    assert_untouched(base)


def test_hf_peft_configs_we_cannot_honour(saved):
    directory, base = saved
    config_path = directory / "adapter_config.json"
    config = {"peft_type": "IA3", "r": 2, "lora_alpha": 4}
    config_path.write_text(json.dumps(config))
    with refused(
        f"{config_path}: peft_type 'IA3' is not supported; only LORA, LOHA, LOKR, VERA, ADALORA, P_TUNING "
        "and PREFIX_TUNING."
    ):
        load_adapter(base, directory)
    config_path.write_text(json.dumps({**config, "peft_type": "LORA", "rank_pattern": {"q_proj": 4}}))
    with refused(f"{config_path}: per-module rank_pattern is not supported."):
        load_adapter(base, directory)
    config_path.write_text(json.dumps({**config, "peft_type": "LORA"}))
    save_file({"base_model.model.head.weight": torch.zeros(3, 8)}, directory / "adapter_model.safetensors")
    with refused(
        f"{directory / 'adapter_model.safetensors'} holds no LoRA tensors (lora_A, lora_B, "
        "lora_embedding_A/B)."
    ):
        load_adapter(base, directory)
    assert_untouched(base)


def test_a_target_that_matches_nothing_beside_others_is_warned_about():
    from pipelines.core.peft import IA3, merge

    with pytest.warns(
        UserWarning, match="target 'q_prj' matches no module \\(the others do\\); is it misspelt"
    ):
        add_adapter(Block(), LoRA(targets=["q_prj", "head"]))
    model = add_adapter(Block(), IA3(targets=["q_proj"]))
    with torch.no_grad():
        model.q_proj.adapters["default"].ia3_l.zero_()
    with refused("Cannot merge into 'q_proj': a zero scale could not be unmerged."):
        merge(model)


def test_a_pickle_file_given_as_the_adapter_is_named_as_one(tmp_path):
    torch.save({"q_proj.lora_A.weight": torch.zeros(2, 8)}, tmp_path / "x.pt")
    with refused(
        f"{tmp_path / 'x.pt'} is a pickle file, which is never loaded; re-save the adapter as safetensors "
        "(HF peft: save_pretrained(..., safe_serialization=True))."
    ):
        load_adapter(Block(), tmp_path / "x.pt")


@pytest.mark.parametrize("damage", ["truncated", "pickle renamed"])
def test_a_damaged_weights_file_is_named(tmp_path, saved, damage):
    directory, base = saved
    weights = directory / "adapter_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:40])
    else:
        torch.save({"q_proj.lora_A.weight": torch.zeros(2, 8)}, weights)
    with pytest.raises(ValueError, match=f"^{re.escape(str(weights))} is damaged or not a safetensors file"):
        load_adapter(base, directory)
    assert not any(hasattr(m, "adapters") for m in base.modules())  # nothing was added
