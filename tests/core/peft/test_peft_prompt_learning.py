"""P-tuning and prefix tuning, HF peft the oracle: same weights same outputs, files both ways, refusals."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from peft_testing import import_hf_peft, make_tiny_llama, refused
from torch import nn

from pipelines.core.peft import (
    PrefixTuning,
    PTuning,
    adapter_specs,
    add_adapter,
    convert_adapter,
    disable_adapters,
    load_adapter,
    merge,
    remove_adapter,
    save_adapter,
    wrappers,
)

peft = import_hf_peft()
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BertModel(config).eval()


def tiny_esm() -> nn.Module:
    config = transformers.EsmConfig(
        vocab_size=33, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        pad_token_id=1, mask_token_id=32, position_embedding_type="rotary", token_dropout=True,
        max_position_embeddings=64,
    )  # fmt: skip
    return transformers.EsmModel(config).eval()


MODELS = {
    "llama": (make_tiny_llama, "CAUSAL_LM"),
    "llama_model": (lambda: make_tiny_llama().model, "FEATURE_EXTRACTION"),
    "bert": (tiny_bert, "FEATURE_EXTRACTION"), "esm": (tiny_esm, "FEATURE_EXTRACTION"),
}  # fmt: skip
VARIANTS = {
    "ptuning-mlp": (PTuning(num_tokens=3, encoder_hidden_size=8),
                    dict(peft_type="P_TUNING", num_virtual_tokens=3, encoder_hidden_size=8)),
    "ptuning-lstm": (PTuning(num_tokens=3, encoder="lstm", encoder_hidden_size=8, encoder_num_layers=1),
                     dict(peft_type="P_TUNING", num_virtual_tokens=3, encoder_hidden_size=8,
                          encoder_reparameterization_type="LSTM", encoder_num_layers=1)),
    "prefix": (PrefixTuning(num_tokens=3), dict(peft_type="PREFIX_TUNING", num_virtual_tokens=3)),
    "prefix-projection": (PrefixTuning(num_tokens=3, prefix_projection=True, encoder_hidden_size=8),
                          dict(peft_type="PREFIX_TUNING", num_virtual_tokens=3, prefix_projection=True,
                               encoder_hidden_size=8)),
}  # fmt: skip
CASES = [(m, v) for m in MODELS for v in VARIANTS if not (m == "esm" and v.startswith("prefix"))]
IDS = [f"{m}-{v}" for m, v in CASES]


def inputs(model_name: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # padding, so the extended mask matters
    return {"input_ids": torch.randint(2, 30, (2, 6), generator=generator), "attention_mask": mask}


def output(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def run(model, model_name: str, **extra) -> torch.Tensor:
    with torch.no_grad():
        return output(model(**inputs(model_name), **extra))


def peft_config(model_name: str, variant: str):
    settings = dict(VARIANTS[variant][1])
    settings["task_type"] = MODELS[model_name][1]
    return peft.get_peft_config(settings)


def the_adapter(model: nn.Module, name: str = "default") -> nn.Module:
    return next(w.adapters[name] for _, w in wrappers(model) if name in w.adapters)


def hf_encoder_state(peft_model) -> dict[str, torch.Tensor]:
    state = peft_model.prompt_encoder["default"].state_dict()
    return {key.replace("transform.", "projection."): value for key, value in state.items()}


@pytest.fixture(scope="module")
def bases():
    torch.manual_seed(0)
    return {name: make() for name, (make, _) in MODELS.items()}


@pytest.mark.parametrize(("model_name", "variant"), CASES, ids=IDS)
def test_same_weights_same_outputs_as_hf_peft(bases, model_name, variant):
    base = bases[model_name]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(model_name, variant)).eval()
    ours = add_adapter(copy.deepcopy(base), VARIANTS[variant][0])
    the_adapter(ours).load_state_dict(hf_encoder_state(theirs))
    expected = run(theirs, model_name)
    assert output_shape_matches(expected, run(base, model_name), variant)
    torch.testing.assert_close(run(ours, model_name), expected, atol=1e-6, rtol=0)
    if model_name == "llama":  # labels get -100 for the prompt (P-tuning), the loss is peft's
        labels = inputs(model_name)["input_ids"]
        loss = ours(**inputs(model_name), labels=labels).loss
        torch.testing.assert_close(loss, theirs(**inputs(model_name), labels=labels).loss, atol=1e-6, rtol=0)


def output_shape_matches(adapted: torch.Tensor, base: torch.Tensor, variant: str) -> bool:
    extra = 3 if variant.startswith("ptuning") else 0  # P-tuning's outputs start with the prompt's positions
    changed = not torch.allclose(adapted[:, extra:], base, atol=1e-4)
    return adapted.shape[1] == base.shape[1] + extra and changed


@pytest.mark.parametrize(("model_name", "variant"), CASES, ids=IDS)
def test_our_peft_format_loads_in_hf_peft(bases, model_name, variant, tmp_path):
    base = bases[model_name]
    ours = add_adapter(copy.deepcopy(base), VARIANTS[variant][0], name="task")
    save_adapter(ours, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == VARIANTS[variant][1]["peft_type"]
    assert config["task_type"] == MODELS[model_name][1]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(run(theirs, model_name), run(ours, model_name), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("model_name", "variant"), CASES, ids=IDS)
def test_hf_peft_files_load_in_ours(bases, model_name, variant, tmp_path):
    base = bases[model_name]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(model_name, variant)).eval()
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    assert load_adapter(ours, tmp_path, name="task") == "task"
    spec = dataclasses.replace(adapter_specs(ours)["task"], targets=[])
    assert spec == (PTuning(num_tokens=3, encoder="none", targets=[]) if variant.startswith("ptuning")
                    else PrefixTuning(num_tokens=3, prefix_projection=False, targets=[]))  # fmt: skip
    torch.testing.assert_close(run(ours, model_name), run(theirs, model_name), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("model_name", "variant"), CASES, ids=IDS)
def test_disabled_is_the_base_and_the_base_gets_no_gradient(bases, model_name, variant):
    base = bases[model_name]
    model = add_adapter(copy.deepcopy(base), VARIANTS[variant][0]).train()
    output(model(**inputs(model_name))).float().pow(2).mean().backward()
    adapter = {id(p) for p in the_adapter(model).parameters()}
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == (id(parameter) in adapter), name
        assert parameter.requires_grad == (id(parameter) in adapter), name
    model.eval()
    with disable_adapters(model):
        assert torch.equal(run(model, model_name), run(base, model_name))


@pytest.mark.parametrize(("model_name", "variant"), CASES, ids=IDS)
def test_native_save_load_reproduces_outputs(bases, model_name, variant, tmp_path):
    base = bases[model_name]
    model = add_adapter(copy.deepcopy(base), VARIANTS[variant][0], name="task")
    save_adapter(model, tmp_path)
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, tmp_path) == "task"
    assert torch.equal(run(fresh, model_name), run(model, model_name))
    ids = inputs(model_name)["input_ids"]
    with torch.no_grad():  # positional inputs are rewritten as well
        assert torch.equal(output(fresh(ids)), output(model(input_ids=ids)))


@pytest.mark.parametrize("variant", ["ptuning-mlp", "prefix"])
def test_a_model_inside_a_wrapper_and_remove_and_deepcopy(bases, variant):
    class Classifier(nn.Module):  # a domain wrapper around the language model, as clinical's
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, **batch):
            return self.lm(**batch)

    base = bases["llama"]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config("llama", variant)).eval()
    model = add_adapter(Classifier(copy.deepcopy(base)), VARIANTS[variant][0])
    the_adapter(model).load_state_dict(hf_encoder_state(theirs))
    torch.testing.assert_close(run(model, "llama"), run(theirs, "llama"), atol=1e-6, rtol=0)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        the_adapter(twin).embedding.weight.add_(1.0)  # the copy has its own adapter and hook
    assert not torch.allclose(run(twin, "llama"), run(model, "llama"))
    torch.testing.assert_close(run(model, "llama"), run(theirs, "llama"), atol=1e-6, rtol=0)
    remove_adapter(model, "default")
    assert torch.equal(run(model, "llama"), run(base, "llama"))
    assert not model.lm._forward_pre_hooks  # the removed adapter's hook took itself off


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_with_the_cache_matches_hf_peft_forward(bases, variant):
    # The oracle is HF peft's forward on the whole sequence at each step: its own generate (0.21.2 under
    # transformers 5.x) departs from it, and with prefix tuning gives the base model's tokens.
    base = bases["llama"]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config("llama", variant)).eval()
    ours = add_adapter(copy.deepcopy(base), VARIANTS[variant][0])
    the_adapter(ours).load_state_dict(hf_encoder_state(theirs))
    batch = inputs("llama")
    tokens, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        generated = ours.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
        for _ in range(4):
            following = theirs(input_ids=tokens, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
            tokens, mask = torch.cat([tokens, following], 1), torch.cat([mask, torch.ones_like(following)], 1)
    assert torch.equal(generated[:, -tokens.shape[1] :], tokens)


def test_refusals(bases, tmp_path):
    with refused(
        "Prefix tuning cannot adapt 'embeddings.word_embeddings': it belongs to EsmModel; it supports "
        "LlamaForCausalLM, LlamaModel, BertModel only."
    ):
        add_adapter(copy.deepcopy(bases["esm"]), PrefixTuning(num_tokens=2))
    plain = nn.Sequential()
    plain.add_module("embed_tokens", nn.Embedding(5, 4))
    with refused(
        "P-tuning cannot adapt 'embed_tokens': it belongs to Sequential; it supports LlamaForCausalLM, "
        "LlamaModel, BertModel, EsmModel only."
    ):
        add_adapter(plain, PTuning(num_tokens=2))
    with refused(
        "P-tuning targets a model's token embedding; 'model.layers.0.self_attn.q_proj' is a Linear, not an "
        "Embedding."
    ):
        add_adapter(copy.deepcopy(bases["llama"]), PTuning(targets=["model.layers.0.self_attn.q_proj"]))
    model = add_adapter(copy.deepcopy(bases["llama"]), PTuning(num_tokens=2), name="first")
    with refused(
        "LlamaForCausalLM already has the prompt adapter 'first' (P-tuning or prefix tuning); one at a time, "
        "as in HF peft: remove_adapter it first."
    ):
        add_adapter(model, PrefixTuning(num_tokens=2), name="second")
    assert list(adapter_specs(model)) == ["first"]
    with pytest.raises(ValueError, match="cannot be merged"):
        merge(model)
    save_adapter(model, tmp_path / "native")
    with pytest.raises(ValueError, match="load_adapter\\(model, ...\\) and save_adapter"):
        convert_adapter(tmp_path / "native", tmp_path / "converted", format="peft")
    save_adapter(model, tmp_path / "peft", format="peft")
    with pytest.raises(ValueError, match="load_adapter\\(model, ...\\) and save_adapter"):
        convert_adapter(tmp_path / "peft", tmp_path / "converted", format="native")
    with pytest.raises(ValueError, match=r"weight' has shape \(2, 32\), the model expects \(2, 16\)"):
        load_adapter(copy.deepcopy(bases["bert"]), tmp_path / "peft")
    with refused("The ptuning num_tokens must be a positive integer, not 0; set 20, say."):
        PTuning(num_tokens=0)


def test_prefix_refuses_gradient_checkpointing_in_training(bases):
    model = add_adapter(copy.deepcopy(bases["llama"]), PrefixTuning(num_tokens=2))
    model.gradient_checkpointing_enable()
    with refused(
        "Prefix tuning cannot train LlamaForCausalLM with gradient checkpointing (recomputed layers would "
        "add the prefix twice), as in HF peft; turn it off."
    ):
        model.train()(**inputs("llama"))


def test_a_foreign_cache_is_refused(bases):
    model = add_adapter(copy.deepcopy(bases["llama"]), PrefixTuning(num_tokens=2))
    with torch.no_grad():
        cache = bases["llama"](input_ids=torch.tensor([[3, 4]]), use_cache=True).past_key_values
        with pytest.raises(ValueError, match="holds tokens but not this adapter's prefix"):
            model(input_ids=torch.tensor([[5]]), past_key_values=cache)
