"""HF peft as the oracle: our LoRA, DoRA and rsLoRA files load in HF peft and theirs in ours, same logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft_testing import copy_adapter_to_peft, import_hf_peft, logits, perturb_adapters, perturb_peft, refused
from torch import nn

from pipelines.core.peft import (
    SSF,
    LoRA,
    adapter_names,
    add_adapter,
    convert_adapter,
    load_adapter,
    merge,
    save_adapter,
)

peft = import_hf_peft()
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


OURS = {
    "lora": LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]),
    "dora": LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"], use_dora=True),
    "rslora": LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"], use_rslora=True),
}


@pytest.mark.parametrize("kind", list(OURS))
def test_our_peft_format_loads_in_hf_peft(tiny_llama, input_ids, tmp_path, kind):
    model = add_adapter(copy.deepcopy(tiny_llama), OURS[kind], name="task")
    perturb_adapters(model, scale=0.3)
    save_adapter(model, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == [
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    ]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path).eval()
    expected = logits(model, input_ids)
    assert not torch.allclose(expected, logits(tiny_llama, input_ids), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(logits(theirs, input_ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["lora", "dora", "rslora"])
def test_hf_peft_files_load_in_ours(tiny_llama, input_ids, tmp_path, kind):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
        use_dora=kind == "dora", use_rslora=kind == "rslora",
    )  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(tiny_llama), config).eval()
    perturb_peft(theirs)
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    model = copy.deepcopy(tiny_llama)
    assert load_adapter(model, tmp_path) == "default"
    assert adapter_names(model) == ["default"]
    expected = logits(theirs, input_ids)
    assert not torch.allclose(expected, logits(tiny_llama, input_ids), atol=1e-3)
    torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-5, rtol=0)
    # Merged, both are still the same function.
    merge(model)
    merged = theirs.merge_and_unload()
    torch.testing.assert_close(logits(model, input_ids), logits(merged, input_ids), atol=1e-5, rtol=0)


def test_same_weights_same_forward_as_hf_peft(tiny_llama, input_ids):
    """Our forward against HF peft's on the very same A, B (copied in memory, not through files)."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(tiny_llama), config).eval()
    model = add_adapter(
        copy.deepcopy(tiny_llama), LoRA(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    )
    perturb_adapters(model, scale=0.3)
    assert len(copy_adapter_to_peft(model, theirs)) == 2 * 2 * 3
    model.train()  # the fused training path and the eval path both match
    torch.testing.assert_close(logits(model, input_ids), logits(theirs, input_ids), atol=1e-5, rtol=0)
    model.eval()
    torch.testing.assert_close(logits(model, input_ids), logits(theirs, input_ids), atol=1e-5, rtol=0)


def test_embedding_lora_both_ways(tiny_llama, input_ids, tmp_path):
    model = add_adapter(copy.deepcopy(tiny_llama), LoRA(r=2, alpha=4, targets=["embed_tokens", "q_proj"]))
    perturb_adapters(model, scale=0.3)
    save_adapter(model, tmp_path / "ours", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, input_ids), logits(model, input_ids), atol=1e-5, rtol=0)

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "v_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(tiny_llama), config).eval()
    perturb_peft(theirs)
    theirs.save_pretrained(tmp_path / "theirs", save_embedding_layers=False)
    model = copy.deepcopy(tiny_llama)
    load_adapter(model, tmp_path / "theirs")
    torch.testing.assert_close(logits(model, input_ids), logits(theirs, input_ids), atol=1e-5, rtol=0)


class Convolutions(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1, stride=2)
        self.c3 = nn.Conv3d(2, 3, 3, padding=1)

    def forward(self, x1, x2, x3):
        return torch.cat([self.c1(x1).flatten(), self.c2(x2).flatten(), self.c3(x3).flatten()])


def test_convolution_lora_both_ways(tmp_path):
    base = Convolutions()
    x = (torch.randn(2, 3, 7), torch.randn(2, 4, 6, 6), torch.randn(1, 2, 4, 4, 4))
    model = add_adapter(copy.deepcopy(base), LoRA(r=2, alpha=4, targets=["c1", "c2", "c3"]))
    perturb_adapters(model, scale=0.3)
    save_adapter(model, tmp_path / "ours", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(theirs(*x), model(*x), atol=1e-5, rtol=0)

    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c1", "c3"])
    )
    perturb_peft(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(model(*x), theirs(*x), atol=1e-5, rtol=0)


def test_convert_adapter_between_formats_without_the_model(tiny_llama, input_ids, tmp_path):
    model = add_adapter(copy.deepcopy(tiny_llama), OURS["rslora"], name="task")
    perturb_adapters(model, scale=0.3)
    save_adapter(model, tmp_path / "native")
    convert_adapter(tmp_path / "native", tmp_path / "peft", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(theirs, input_ids), logits(model, input_ids), atol=1e-5, rtol=0)
    convert_adapter(tmp_path / "peft", tmp_path / "back", format="native")
    back = copy.deepcopy(tiny_llama)
    assert load_adapter(back, tmp_path / "back") == "default"
    assert torch.equal(logits(back, input_ids), logits(model, input_ids))


def test_convert_adapter_refusals(tmp_path):
    block = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    ssf = add_adapter(copy.deepcopy(block), SSF(targets=["0"]), name="task")
    save_adapter(ssf, tmp_path / "ssf")
    with refused(
        f"{tmp_path / 'ssf'} cannot be converted to the HF peft format: Adapter 'task' is ssf; the HF peft "
        "format is written for LoRA, LoHa, LoKr, VeRA, AdaLoRA, P-tuning and prefix tuning only."
    ):
        convert_adapter(tmp_path / "ssf", tmp_path / "out", format="peft")
    lora = add_adapter(copy.deepcopy(block), LoRA(r=2, targets=["0"]), name="task")
    save_adapter(lora, tmp_path / "head", extra=["1"])
    with refused(
        f"{tmp_path / 'head'} cannot be converted to the HF peft format: it holds head modules, which HF "
        "peft files do not carry."
    ):
        convert_adapter(tmp_path / "head", tmp_path / "out", format="peft")
    with refused("Unknown adapter format 'onnx'; use 'native' or 'peft'."):
        convert_adapter(tmp_path / "head", tmp_path / "out", format="onnx")
    assert not (tmp_path / "out").exists()
