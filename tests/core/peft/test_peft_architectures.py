"""Adapters on tiny real backbones: a LLaMA, a timm ViT, a MONAI DenseNet and a fair-esm ESM2."""

from __future__ import annotations

import copy

import pytest
import torch
from peft_testing import is_adapter_name, main_output, make_tiny_llama, perturb_adapters, weighted_loss

from pipelines.core.peft import (
    SSF,
    Bottleneck,
    LoRA,
    NormTuning,
    PromptTuning,
    add_adapter,
    disable_adapters,
    extend_attention_mask,
)
from pipelines.core.peft.layers import AdaptedLayer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def llama():
    pytest.importorskip("transformers")
    return make_tiny_llama(), {"input_ids": torch.randint(0, 64, (2, 6))}


def vit():
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=3
    )
    return model.eval(), {"x": torch.randn(2, 3, 32, 32)}


def densenet():
    monai = pytest.importorskip("monai")
    model = monai.networks.nets.DenseNet(
        spatial_dims=2, in_channels=1, out_channels=2, init_features=8, growth_rate=4, block_config=(2, 2)
    )
    return model.eval(), {"x": torch.randn(2, 1, 16, 16)}


def esm2():
    esm = pytest.importorskip("esm")
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    model = esm.model.esm2.ESM2(num_layers=2, embed_dim=32, attention_heads=4, alphabet=alphabet)
    tokens = torch.randint(4, 24, (2, 8))
    tokens[:, 0], tokens[:, -1] = alphabet.cls_idx, alphabet.eos_idx
    return model.eval(), {"tokens": tokens}


BACKBONES = {"llama": llama, "vit": vit, "densenet": densenet, "esm2": esm2}
SPECS = {
    "llama": {
        "lora": LoRA(r=4, targets=["q_proj", "v_proj", "embed_tokens"]),
        "houlsby": Bottleneck(hidden=4, preset="houlsby"),
        "pfeiffer": Bottleneck(hidden=4, preset="pfeiffer"),
        "ssf": SSF(targets=["q_proj", "down_proj", "input_layernorm"]),
        "norm": NormTuning(),
    },
    "vit": {
        "lora": LoRA(r=4, targets=["qkv", "patch_embed.proj"]),
        "houlsby": Bottleneck(hidden=8, preset="houlsby"),
        "pfeiffer": Bottleneck(hidden=8, preset="pfeiffer"),
        "ssf": SSF(targets=["qkv", "fc1", "type:LayerNorm"]),
        "norm": NormTuning(),
    },
    "densenet": {
        "lora": LoRA(r=2, targets=["type:Conv2d"]),
        "bottleneck": Bottleneck(reduction=4, targets=["re:.*conv2"]),
        "ssf": SSF(targets=["type:Conv2d"]),
        "norm": NormTuning(),
    },
    "esm2": {
        "lora": LoRA(r=4, targets=["q_proj", "v_proj"]),
        "houlsby": Bottleneck(hidden=4, preset="houlsby"),
        "pfeiffer": Bottleneck(hidden=4, placement="parallel", preset="pfeiffer"),
        "ssf": SSF(targets=["q_proj", "fc1", "final_layer_norm"]),
        "norm": NormTuning(),
    },
}
# The modules each preset adapts, to check the presets reach the right layers in each family.
PRESET_MODULES = {
    ("llama", "houlsby"): ["model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"],
    ("llama", "pfeiffer"): ["model.layers.{i}.mlp.down_proj"],
    ("vit", "houlsby"): ["blocks.{i}.attn.proj", "blocks.{i}.mlp.fc2"],
    ("vit", "pfeiffer"): ["blocks.{i}.mlp.fc2"],
    ("esm2", "houlsby"): ["layers.{i}.self_attn.out_proj", "layers.{i}.fc2"],
    ("esm2", "pfeiffer"): ["layers.{i}.fc2"],
}
CASES = [(backbone, method) for backbone, specs in SPECS.items() for method in specs]


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    return {}


def backbone(cache: dict, name: str):
    if name not in cache:
        cache[name] = BACKBONES[name]()
    model, inputs = cache[name]
    return copy.deepcopy(model), inputs


@pytest.mark.parametrize(("name", "method"), CASES, ids=[f"{b}-{m}" for b, m in CASES])
def test_inject_identity_and_one_step_trains_only_adapters(backbones, name, method):
    base, inputs = backbone(backbones, name)
    model = add_adapter(copy.deepcopy(base), SPECS[name][method], name="task")
    adapted = [n for n, m in model.named_modules() if isinstance(m, AdaptedLayer)]
    if (name, method) in PRESET_MODULES:
        expected = [p.format(i=i) for i in (0, 1) for p in PRESET_MODULES[name, method]]
        assert sorted(adapted) == sorted(expected)
    assert adapted
    with torch.no_grad():
        reference = main_output(base(**inputs))
        assert torch.equal(main_output(model(**inputs)), reference)

    parameters = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(is_adapter_name(n) for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    model.train()
    weighted_loss(main_output(model(**inputs))).backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, parameters[n])]
    assert changed and all(is_adapter_name(n) for n in changed)
    if method == "norm":  # BatchNorm statistics go to the adapter, the base layer's stay
        assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers() if not is_adapter_name(n))
    # Train mode updated the statistics of BatchNorm layers without adapters: give them to the base too.
    statistics = {n.replace(".base_layer", ""): b for n, b in model.named_buffers() if not is_adapter_name(n)}
    for n, b in base.named_buffers():
        b.copy_(statistics[n])
    model.eval()
    with torch.no_grad():
        reference = main_output(base(**inputs))
        assert not torch.equal(main_output(model(**inputs)), reference)
        with disable_adapters(model):
            assert torch.equal(main_output(model(**inputs)), reference)


def test_prompt_tuning_on_a_language_model(backbones):
    base, inputs = backbone(backbones, "llama")
    model = add_adapter(copy.deepcopy(base), PromptTuning(num_tokens=3, targets=["embed_tokens"]))
    perturb_adapters(model)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    with torch.no_grad():
        logits = model(**inputs, attention_mask=extend_attention_mask(mask, 3)).logits
        with disable_adapters(model):
            plain = model(**inputs, attention_mask=mask).logits
    assert logits.shape == (2, 9, 64) and plain.shape == (2, 6, 64)
    torch.testing.assert_close(plain, base(**inputs, attention_mask=mask).logits, atol=0, rtol=0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "model.embed_tokens.adapters.default.prompt"
    ]
