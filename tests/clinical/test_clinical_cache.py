"""The layer cache: nothing below the cached layers may be adapted or trained, embeddings included; and it
computes states only for the notes and blocks the stages read."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml

from pipelines.clinical.backbones import load_backbone
from pipelines.clinical.data import Notes
from pipelines.clinical.experiment import ClinicalExperiment
from pipelines.clinical.model import ClinicalModel
from pipelines.clinical.stages import StageError, build_model, check_cached_layers
from pipelines.clinical.tokens import LMBlocks
from pipelines.core.peft import LoRA, adapter_names, add_adapter
from pipelines.core.registry import create_pipeline
from pipelines.core.runner import run_recipe

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


@pytest.fixture
def prefix_rows(monkeypatch):
    """Rows (notes or blocks) of every ``prefix_states`` call, i.e. everything the layer cache computes."""
    rows: list[int] = []
    original = ClinicalModel.prefix_states

    def counting(self, input_ids, attention_mask=None):
        rows.append(int(input_ids.shape[0]))
        return original(self, input_ids, attention_mask)

    monkeypatch.setattr(ClinicalModel, "prefix_states", counting)
    return rows


def test_the_recipe_caches_only_the_drawn_capped_notes_and_the_blocks_stage_one_reads(
    tmp_path, synthetic_notes, prefix_rows
):
    ids, texts, labels = synthetic_notes(n=60)
    notes_file = tmp_path / "notes.csv"
    pd.DataFrame({"note_id": ids, "text": texts, "label": labels}).to_csv(notes_file, index=False)
    top = {"method": "lora", "r": 2, "targets": ["re:.*layers\\.1\\.self_attn\\.q_proj"]}
    recipe = {
        "name": "tiny_lazy", "pipeline": "clinical/two_stage", "seed": 0,
        "backbone": {"name": "tiny-random-llama", "options": {"cached_layers": 1}},
        "data": {"dataset": str(notes_file), "task": "binary", "fraction": 0.5,
                 "options": {"id_column": "note_id", "max_test": 8,
                             "split": {"train": 0.5, "val": 0.2, "test": 0.3}}},
        "stages": [
            {"name": "domain", "objective": "causal_lm", "adapter": top, "trainable": ["domain"],
             "train": {"epochs": 1, "batch_size": 2}, "options": {"max_length": 16, "max_blocks": 3,
                                                                  "eval_blocks": 2}},
            {"name": "task", "objective": "classification", "trainable": ["domain"],
             "train": {"epochs": 1, "batch_size": 4}, "options": {"max_length": 24}},
        ],
        "evaluation": {"bootstrap": 10},
        "output_dir": str(tmp_path / "runs"),
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    report = json.loads((run_recipe(path) / "report.json").read_text())
    assert report["dataset"]["low_data"]["train_full"] == 30 and report["dataset"]["splits"] == {
        "train": 16,
        "test": 8,
    }
    # 3 training blocks + 2 held-out blocks, then the 16 drawn training notes and the 8 capped test notes;
    # nothing for the 12 validation notes (no stage validates) nor the 14 notes the draw left out.
    assert sum(prefix_rows) == 3 + 2 + 16 + 8
    phases = report["cost"]["phases"]  # the engine's: the cache is made in load_data and keep_training
    assert set(phases) == {"load_data", "keep_training", "models", "evaluate", "describe"}
    assert set(phases["models"]) == {"two_stage"}


def test_lab_fit_caches_no_validation_notes_when_no_stage_validates(synthetic_notes, prefix_rows):
    ids, texts, labels = synthetic_notes(n=20)
    notes = Notes(ids, texts, labels, "binary", ["0", "1"])
    pipe = create_pipeline(
        "clinical/two_stage", backbone="tiny-random-llama", domain_adapter=None,
        task_adapter={"method": "lora", "r": 2, "targets": ["re:.*layers\\.1\\.self_attn\\.q_proj"]},
        max_length=16, backbone_options={"cached_layers": 1}, progress=False,
    )  # fmt: skip
    hooks = ClinicalExperiment.for_notes(pipe, notes.subset(range(12)), notes.subset(range(12, 20)))
    assert "val" not in hooks.sets and sum(prefix_rows) == 12
    pipe.stages[-1].train.eval_every = 1
    hooks = ClinicalExperiment.for_notes(pipe, notes.subset(range(12)), notes.subset(range(12, 20)))
    assert len(hooks.sets["val"]) == 8 and sum(prefix_rows) == 12 + 12 + 8
