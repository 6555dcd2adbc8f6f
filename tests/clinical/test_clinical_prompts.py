"""Prefix tuning and P-tuning in the clinical model: HF peft's loss through the exported adapter, the note's
positions pooled whatever the padding, and a recipe with a prefix task stage and a P-tuning spec."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml

from pipelines.clinical.backbones import load_backbone
from pipelines.clinical.stages import build_model, lm_adapter, lm_copy, save_exports
from pipelines.core.peft import PrefixTuning, PTuning, add_adapter, disable_adapters
from pipelines.core.runner import run_recipe

SPECS = {"prefix": PrefixTuning(num_tokens=3), "ptuning": PTuning(num_tokens=3, encoder_hidden_size=8)}
IDS = torch.tensor([[5, 60, 70, 80, 90, 100, 7, 200], [9, 61, 72, 83, 94, 0, 0, 0]])
MASK = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])  # right padding, as PadCollate pads


def _model(method: str, pooling: str = "mean"):
    backbone = load_backbone("tiny-random-llama")
    model = build_model(backbone, "binary", 2, pooling)
    add_adapter(model, lm_adapter(model, SPECS[method], "task"), name="task")
    return backbone, model.eval()


@pytest.mark.parametrize("method", sorted(SPECS))
def test_the_lm_loss_is_hf_peft_loss_with_the_exported_adapter(method, tmp_path):
    peft = pytest.importorskip("peft")
    backbone, model = _model(method)
    sizes = save_exports(
        model, lm_copy(backbone.model), tmp_path, {"task": "binary", "class_names": ["a", "b"]}
    )
    assert "task/peft" in sizes
    oracle_lm = load_backbone("tiny-random-llama").model  # same seed: the same base weights
    oracle = peft.PeftModel.from_pretrained(oracle_lm, str(tmp_path / "task" / "peft")).eval()
    labels = IDS.masked_fill(MASK == 0, -100)
    labels[
        :, 0
    ] = -100  # HF peft's P-tuning also scores token 0 from the prompt; ours, as the base model, not
    with torch.no_grad():
        ours = model.lm_loss(IDS, MASK)
        expected = oracle(input_ids=IDS, attention_mask=MASK, labels=labels).loss
        with disable_adapters(model):
            base = model.lm_loss(IDS, MASK)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert abs(float(base - ours)) > 1e-3  # the prompt matters, so the hook ran


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("method", sorted(SPECS))
def test_a_padded_note_scores_as_the_note_alone(method, pooling):
    _, model = _model(method, pooling)
    with torch.no_grad():
        batch = model(IDS, MASK)
        alone = model(IDS[1:, :5], MASK[1:, :5])
        plain = model.features(IDS, MASK)
        with disable_adapters(model):
            bare = model.features(IDS, MASK)
    torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=0)
    assert plain.shape == bare.shape == (2, 32) and not torch.allclose(plain, bare, atol=1e-3)


def test_a_recipe_with_a_prefix_task_stage_and_a_ptuning_spec(tmp_path, synthetic_notes):
    ids, texts, labels = synthetic_notes(n=40)
    notes = tmp_path / "notes.csv"
    pd.DataFrame({"note_id": ids, "text": texts, "label": labels}).to_csv(notes, index=False)
    lora = {"method": "lora", "r": 2, "alpha": 4, "targets": ["re:.*layers\\.1\\.self_attn\\.(q|v)_proj"]}
    recipe = {
        "name": "tiny_prefix", "pipeline": "clinical/two_stage",
        "backbone": {"name": "tiny-random-llama", "options": {"cached_layers": 0}},
        "data": {"dataset": str(notes), "task": "binary",
                 "options": {"id_column": "note_id", "split": {"train": 0.6, "val": 0.1, "test": 0.3}}},
        "stages": [
            {"name": "domain", "objective": "causal_lm", "adapter": lora,
             "train": {"epochs": 1, "batch_size": 2, "lr": 1e-2},
             "options": {"max_length": 32, "max_blocks": 4}},
            {"name": "task", "objective": "classification", "adapter": {"method": "prefix", "num_tokens": 4},
             "trainable": ["domain", "task"], "train": {"epochs": 2, "batch_size": 8, "lr": 1e-2},
             "options": {"max_length": 24}},
        ],
        "evaluation": {"metrics": ["auroc"], "bootstrap": 10},
        "compare": [{"method": "ptuning", "num_tokens": 4}], "output_dir": str(tmp_path / "runs"),
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = run_recipe(path)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["extra"]["models"]["two_stage"]["reload_identical"] is True
    head = 33  # binary head
    domain = 2 * (32 + 32) + 2 * (32 + 16)  # r=2 on q (32 -> 32) and v (32 -> 16) of layer 1
    prefix = 4 * 2 * 2 * 16  # 4 tokens x 2 layers x (key, value) x 2 kv heads x 8
    assert report["parameters"]["two_stage"]["trainable"] == head + domain + prefix
    ptuning = 4 * 32 + 3 * (32 * 32 + 32)  # the prompt embedding and the 3-layer MLP encoder
    assert report["parameters"]["ptuning_num_tokens4"]["trainable"] == head + ptuning
    ptuning_stage = report["extra"]["models"]["ptuning_num_tokens4"]["stages"][0]
    assert ptuning_stage["adapted_modules"] == ["lm.model.embed_tokens"]
    config = json.loads((run_dir / "adapters" / "task" / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 4
