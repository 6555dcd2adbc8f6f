"""The cached-layer check: nothing below the cached layers may be adapted or trained, embeddings included."""

from __future__ import annotations

import pytest
import torch

from pipelines.clinical.backbones import load_backbone
from pipelines.clinical.stages import Stage, StageError, build_model, check_cached_layers, train_stage
from pipelines.clinical.tokens import LMBlocks
from pipelines.core.peft import LoRA, add_adapter

BLOCKS = torch.randint(3, 259, (4, 8), generator=torch.Generator().manual_seed(0))


def _model(cached: int = 1):
    """A fresh tiny random Llama (2 layers) per test: adapters go into the backbone in place."""
    return build_model(load_backbone("tiny-random-llama"), "binary", 2, "last", cached_layers=cached)


def test_a_lora_on_the_embeddings_makes_the_cache_stale_and_is_refused():
    model = _model()
    prefix = LMBlocks.prefix_of(model, BLOCKS)
    stage = Stage("domain", "causal_lm", LoRA(r=2, alpha=4, targets=["embed_tokens"]), ["domain"])
    with pytest.raises(StageError, match=r"adapter on 'model\.embed_tokens' sits before the decoder layers"):
        train_stage(model, stage, LMBlocks(BLOCKS, prefix), "binary", pad_id=0, progress=False)
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
