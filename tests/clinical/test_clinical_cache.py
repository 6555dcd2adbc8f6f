"""The cached-layer check: nothing below the cached layers may be adapted or trained, embeddings included."""

from __future__ import annotations

import pytest
import torch

from pipelines.clinical.backbones import load_backbone
from pipelines.clinical.data import Notes
from pipelines.clinical.experiment import ClinicalExperiment
from pipelines.clinical.stages import StageError, build_model, check_cached_layers
from pipelines.clinical.tokens import LMBlocks
from pipelines.core.peft import LoRA, adapter_names, add_adapter
from pipelines.core.registry import create_pipeline

BLOCKS = torch.randint(3, 259, (4, 8), generator=torch.Generator().manual_seed(0))


def _model(cached: int = 1):
    """A fresh tiny random Llama (2 layers) per test: adapters go into the backbone in place."""
    return build_model(load_backbone("tiny-random-llama"), "binary", 2, "last", cached_layers=cached)


def test_a_lora_on_the_embeddings_makes_the_cache_stale_and_is_refused_before_it_is_added(synthetic_notes):
    ids, texts, labels = synthetic_notes(n=8)
    pipe = create_pipeline(
        "clinical/two_stage", backbone="tiny-random-llama", backbone_options={"cached_layers": 1},
        domain_adapter={"method": "lora", "r": 2, "alpha": 4, "targets": ["embed_tokens"]},
        task_adapter=None, block_length=8, progress=False,
    )  # fmt: skip
    hooks = ClinicalExperiment.for_notes(pipe, Notes(ids, texts, labels, "binary", ["no", "yes"]))
    model = hooks.new_model()
    with pytest.raises(StageError, match=r"adapter on 'model\.embed_tokens' sits before the decoder layers"):
        hooks.plan_stage(model, pipe.stages[0], 0)
    assert adapter_names(model) == []  # refused before the model changed
    prefix = LMBlocks.prefix_of(model, BLOCKS)
    add_adapter(model.lm, LoRA(r=2, alpha=4, targets=["embed_tokens"]), "domain")
    with torch.no_grad():  # why: once the adapter is non-zero the cached states no longer match
        for name, parameter in model.lm.named_parameters():
            if ".adapters.domain." in name:
                parameter.normal_()
        assert not torch.allclose(model.token_nll(BLOCKS, prefix), model.token_nll(BLOCKS))


@pytest.mark.parametrize(
    ("parameter", "where"),
    [
        ("model.embed_tokens.weight", "sits before the decoder layers"),
        ("model.layers.0.input_layernorm.weight", "sits in layer 0"),
    ],
)
def test_a_trainable_parameter_below_the_cached_layers_is_refused(parameter, where):
    model = _model()
    model.lm.get_parameter(parameter).requires_grad_(True)
    with pytest.raises(StageError, match=rf"trainable parameter '{parameter}' {where}, below"):
        check_cached_layers(model)


def test_a_trainable_lm_head_tied_to_the_embeddings_is_refused():
    model = _model()
    model.lm.lm_head.weight = model.lm.model.embed_tokens.weight  # as in SmolLM2 (tie_word_embeddings)
    model.lm.lm_head.weight.requires_grad_(True)
    with pytest.raises(StageError, match=r"'model\.embed_tokens\.weight' sits before the decoder layers"):
        check_cached_layers(model)


def test_adapters_and_trainables_above_the_cached_layers_pass():
    model = _model()
    add_adapter(model.lm, LoRA(r=2, targets=["re:model\\.layers\\.1\\.self_attn\\.q_proj", "lm_head"]), "top")
    model.decoder.norm.weight.requires_grad_(True)
    model.decoder.layers[1].post_attention_layernorm.weight.requires_grad_(True)
    check_cached_layers(model)
    model.cached_layers = 0
    model.lm.model.embed_tokens.weight.requires_grad_(True)
    check_cached_layers(model)  # no cache, nothing to go stale
