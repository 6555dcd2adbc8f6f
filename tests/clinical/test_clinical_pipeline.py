"""The clinical pipeline end to end on a tiny random Llama: training, stacking, saving, HF peft export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipelines.clinical.backbones import load_backbone
from pipelines.clinical.experiment import ClinicalExperiment
from pipelines.clinical.pipeline import ClinicalTwoStagePipeline
from pipelines.clinical.stages import StageError, classification_data, load_adapters, score
from pipelines.core.experiment import train_candidate
from pipelines.core.peft import adapter_names
from pipelines.core.registry import create_pipeline

TOP = ["re:.*layers\\.1\\.self_attn\\.(q|v)_proj"]
DOMAIN = {"method": "lora", "r": 4, "alpha": 8, "targets": TOP}
TASK = {"method": "lora", "r": 4, "alpha": 4, "dropout": 0.1, "targets": TOP}


@pytest.fixture
def frame(synthetic_notes):
    ids, texts, labels = synthetic_notes(n=40)
    return pd.DataFrame({"note_id": ids, "text": texts, "label": labels})


def _pipeline(train_domain: bool, cached: int = 1) -> ClinicalTwoStagePipeline:
    return create_pipeline(
        "clinical/two_stage",
        backbone="tiny-random-llama",
        domain_adapter=DOMAIN,
        task_adapter=TASK,
        train_domain_in_task_stage=train_domain,
        domain_train={"epochs": 3, "batch_size": 4, "lr": 2e-2, "log_every": 1},
        task_train={"epochs": 4, "batch_size": 8, "lr": 2e-2, "log_every": 1},
        block_length=32,
        max_length=48,
        id_column="note_id",
        backbone_options={"cached_layers": cached},
        bootstrap=50,
        progress=False,
    )


def _domain_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.lm.named_parameters() if ".domain." in n}


def test_stage_two_with_a_frozen_domain_adapter_leaves_it_bit_identical(frame):
    pipe = _pipeline(train_domain=False)
    hooks = ClinicalExperiment.for_notes(pipe, pipe._notes(frame))
    after_domain = []
    hooks.after_stage = lambda model, stage, result: after_domain.append(_domain_tensors(model))
    trained = train_candidate(hooks, pipe.stages, "fit", Path("unused"), False, pipe.seed, False)
    first, second = trained.results
    losses = [row["loss"] for row in first.history if "loss" in row]
    assert losses[-1] < losses[0]  # the causal-LM objective learns the notes
    before = after_domain[0]
    assert before and any(".lora_B." in n and p.abs().sum() > 0 for n, p in before.items())
    losses = [row["loss"] for row in second.history if "loss" in row]
    assert losses[-1] < losses[0]
    after = _domain_tensors(trained.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert adapter_names(trained.model) == ["domain", "task"]
    assert trained.parameters["trainable"] == sum(  # the head and both adapters, each trained once
        p.numel()
        for n, p in trained.model.named_parameters()
        if ".adapters." in n or n.startswith("classifier.")
    )
    task_b = next(p for n, p in trained.model.lm.named_parameters() if ".task." in n and "lora_B" in n)
    assert task_b.abs().sum() > 0


def test_trainable_domain_changes_in_stage_two_and_adapters_reload_exactly(frame, tmp_path):
    pipe = _pipeline(train_domain=True)
    pipe.fit(frame.iloc[:30])
    assert pipe.stages[1].trainable == ["domain", "task"]
    trained = {
        n.split(".adapters.")[1].split(".")[0] for n, p in pipe.model.lm.named_parameters() if p.requires_grad
    }
    assert trained == {"domain", "task"}  # both adapters trained in stage 2 (variant d)
    y_true, y_score = pipe.predict(frame.iloc[30:])
    sizes = pipe.save(tmp_path / "adapters")
    assert set(sizes) == {"domain", "domain/peft", "task", "task/peft", "classifier"}
    fresh = pipe.new_model(2)  # same backbone, no adapters, a new head
    load_adapters(fresh, tmp_path / "adapters", ["domain", "task"])
    data = classification_data(fresh, pipe.backbone.tokenizer, pipe._notes(frame.iloc[30:]), 48)
    again = score(fresh, data, "binary", 0)
    assert np.array_equal(again[1], y_score) and np.array_equal(again[0], y_true)
    report = pipe.evaluate(frame.iloc[30:])
    assert 0.0 <= report["auroc"].value <= 1.0


def test_peft_export_loads_in_hf_peft_with_identical_logits(frame, tmp_path):
    peft = pytest.importorskip("peft")
    pipe = _pipeline(train_domain=True, cached=0)
    pipe.fit(frame.iloc[:20])
    pipe.save(tmp_path)
    ids = torch.tensor([[5, 60, 70, 80, 90, 100, 7]])
    pipe.model.eval()
    with torch.no_grad():
        ours = pipe.model.lm(input_ids=ids).logits
    oracle_lm = load_backbone("tiny-random-llama").model  # same seed: the same base weights
    oracle = peft.PeftModel.from_pretrained(
        oracle_lm, str(tmp_path / "domain" / "peft"), adapter_name="domain"
    )
    with torch.no_grad():
        domain_only = oracle(input_ids=ids).logits
    oracle.load_adapter(str(tmp_path / "task" / "peft"), adapter_name="task")
    oracle.base_model.set_adapter(["domain", "task"])
    oracle.eval()
    with torch.no_grad():
        stacked = oracle(input_ids=ids).logits
    torch.testing.assert_close(stacked, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(domain_only, ours, atol=1e-4)  # the task adapter matters


def test_cached_layers_refuse_adapters_below_them(frame):
    pipe = create_pipeline(
        "clinical/two_stage",
        backbone="tiny-random-llama",
        domain_adapter=None,
        task_adapter={"method": "lora", "r": 2, "targets": ["q_proj"]},
        backbone_options={"cached_layers": 1},
        progress=False,
    )
    with pytest.raises(StageError, match=r"'model\.layers\.0\.self_attn\.q_proj' sits in layer 0, below"):
        pipe.fit(frame)


def test_quick_recipe_runs_end_to_end_with_baselines_and_private_outputs(frame, tmp_path):
    from pipelines.core.recipe import load_recipe
    from pipelines.core.runner import run_recipe

    notes_file = tmp_path / "notes.csv"
    frame.assign(text=frame["text"] + " PRIVATE").to_csv(notes_file, index=False)
    recipe = {
        "name": "tiny_two_stage",
        "pipeline": "clinical/two_stage",
        "backbone": {"name": "tiny-random-llama", "options": {"cached_layers": 1}},
        "data": {
            "dataset": str(notes_file),
            "task": "binary",
            "options": {"id_column": "note_id", "split": {"train": 0.5, "val": 0.1, "test": 0.4}},
        },
        "stages": [
            {"name": "domain", "objective": "causal_lm", "adapter": DOMAIN,
             "train": {"epochs": 1, "batch_size": 4, "lr": 1e-2},
             "options": {"max_length": 32, "eval_blocks": 4}},
            {"name": "task", "objective": "classification", "adapter": TASK, "trainable": ["domain", "task"],
             "train": {"epochs": 2, "batch_size": 8, "lr": 1e-2}, "options": {"max_length": 48}},
        ],
        "evaluation": {"metrics": ["auroc", "accuracy"], "bootstrap": 50, "headline": "auroc"},
        "compare": ["head_only", "single_stage_lora"],
        "output_dir": str(tmp_path / "runs"),
    }  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = run_recipe(path)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["headline"]["model"] == "two_stage" and report["headline"]["metric"] == "auroc"
    assert set(report["results"]) == {
        "two_stage",
        "head_only",
        "single_stage_lora",
        "base_lm",
        "after_domain",
    }
    assert (
        report["results"]["after_domain"]["perplexity"]["value"]
        < report["results"]["base_lm"]["perplexity"]["value"]
    )
    assert report["parameters"]["head_only"]["trainable"] == 33  # hidden 32 + bias, binary head
    assert (
        report["parameters"]["two_stage"]["trainable"]
        > report["parameters"]["single_stage_lora"]["trainable"]
    )
    assert report["dataset"]["splits"] == {"train": 20, "test": 16}
    splits = json.loads((run_dir / "splits.json").read_text())
    assert len(splits["ids"]["train"]) == 20 and not set(splits["ids"]["train"]) & set(splits["ids"]["test"])
    for file in run_dir.rglob("*"):
        if file.is_file() and file.suffix in (".json", ".jsonl", ".md", ".yaml", ".safetensors"):
            assert b"PRIVATE" not in file.read_bytes(), file
    assert (run_dir / "adapters" / "domain" / "peft" / "adapter_config.json").is_file()
    assert report["extra"]["models"]["two_stage"]["reload_identical"] is True
    # lab code after a recipe run: load() gives the run's primary model back
    pipe = ClinicalTwoStagePipeline.from_recipe(load_recipe(run_dir / "recipe.yaml"))
    pipe.load(run_dir / "adapters")
    notes = pd.read_csv(notes_file)
    test = notes[notes["note_id"].isin(splits["ids"]["test"])]
    assert pipe.evaluate(test)["auroc"].value == report["results"]["two_stage"]["auroc"]["value"]


def test_mtsamples_recipe_path_on_a_tiny_backbone(mirror, tmp_path):
    from pipelines.core.recipe import load_recipe

    recipe = load_recipe(
        "clinical/mtsamples_cardio_two_stage",
        overrides=[
            "backbone.name=tiny-random-llama",
            "stages.0.adapter.targets=[q_proj]",
            "stages.1.adapter.targets=[q_proj]",
            "stages.0.options.max_blocks=4",
            "stages.0.options.eval_blocks=4",
            "stages.0.options.max_length=32",
            "stages.1.options.max_length=32",
            "stages.1.train.epochs=1",
            "data.options.max_train=16",
            "data.options.max_test=24",
            "evaluation.bootstrap=20",
            "backbone.options.cached_layers=0",
        ],
    )
    pipe = ClinicalTwoStagePipeline.from_recipe(recipe)
    pipe.progress = False
    result = pipe.run(tmp_path)
    assert result.info["dataset"]["full_splits"] == {"train": 1650, "val": 236, "test": 471}
    assert result.info["dataset"]["splits"] == {"train": 16, "test": 24}
    assert result.info["dataset"]["classes"]["test"]["Cardiovascular / Pulmonary"] == 4
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert splits["source"]["sha256"].startswith("54a8e65b") and len(splits["ids"]["val"]) == 236
    assert set(result.results) == {"two_stage", "head_only", "single_stage_lora", "base_lm", "after_domain"}
    assert "perplexity_change" in result.info["extra"]


@pytest.mark.slow
def test_smollm2_loads_from_the_pypi_gguf_and_knows_english():
    from pipelines.clinical.backbones import BackboneError
    from pipelines.clinical.model import ClinicalModel

    try:
        backbone = load_backbone("smollm2-135m")
    except BackboneError as error:
        pytest.skip(str(error))
    assert backbone.info["architecture"] == "LlamaForCausalLM" and backbone.info["layers"] == 30
    assert backbone.info["parameters"] == 134_515_008 and len(backbone.info["weights"]["sha256"]) == 64
    ids = torch.tensor(
        [backbone.tokenizer("The patient was admitted with chest pain and shortness of breath.")["input_ids"]]
    )
    model = ClinicalModel(backbone.model, outputs=1)
    with torch.no_grad():
        fluent = model.lm_loss(ids).item()
        shuffled = model.lm_loss(
            ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
        ).item()
    assert fluent < 4.0 and shuffled > fluent + 1.0


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_multiclass_and_multilabel_heads_train_and_score(frame, task):
    columns = "label"
    if task == "multiclass":
        frame = frame.assign(label=[("a", "b", "c")[i % 3] for i in range(len(frame))])
    else:
        frame = frame.assign(
            l1=[i % 2 for i in range(len(frame))], l2=[int(i % 3 == 0) for i in range(len(frame))]
        )
        columns = ["l1", "l2"]
    pipe = create_pipeline(
        "clinical/two_stage",
        backbone="tiny-random-llama",
        task=task,
        domain_adapter=None,
        task_adapter=TASK,
        task_train={"epochs": 1, "batch_size": 8},
        max_length=24,
        pooling="last",
        class_weights=True,
        label_columns=columns,
        bootstrap=20,
        progress=False,
    )
    pipe.fit(frame.iloc[:30])
    y_true, y_score = pipe.predict(frame.iloc[30:])
    assert y_score.shape == (10, 3 if task == "multiclass" else 2)
    if task == "multiclass":
        np.testing.assert_allclose(y_score.sum(axis=1), 1.0, rtol=1e-6)
    report = pipe.evaluate(frame.iloc[30:])
    assert 0.0 <= report["auroc"].value <= 1.0
