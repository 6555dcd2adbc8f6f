"""The protein pipelines end to end on a tiny random ESM-2: lab code, recipes with two stages, the mirror."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.core.recipe import Recipe, check_pipeline, find_recipe, list_recipes, load_recipe
from pipelines.core.registry import create_pipeline
from pipelines.core.runner import run_recipe
from pipelines.protein.backbones import load_backbone


def _toy_regression(n=48, seed=0):
    """Sequences whose target counts W and K: a signal a tiny model can learn."""
    rng = np.random.default_rng(seed)
    letters = list("ACDEFGHILMNPQRSTVY")
    sequences, targets = [], []
    for _ in range(n):
        body = list(rng.choice(letters, size=int(rng.integers(10, 24))))
        for _ in range(int(rng.integers(0, 4))):
            body[int(rng.integers(len(body)))] = "W"
        sequences.append("".join(body))
        targets.append(float(sequences[-1].count("W")))
    return sequences, targets


def test_lab_code_fits_evaluates_and_reloads_identically(tmp_path):
    backbone = load_backbone("esm2_tiny_random")[0]
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    sequences, targets = _toy_regression()
    pipe = create_pipeline(
        "protein/sequence", backbone=backbone, task="regression",
        adapter={"method": "lora", "r": 2, "alpha": 4, "targets": ["q", "v"]},
        train={"epochs": 8, "batch_size": 8, "lr": 1e-2, "log_every": 1}, bootstrap=50,
    )  # fmt: skip
    result = pipe.fit((sequences[:40], targets[:40]), val=(sequences[40:], targets[40:]))
    losses = [row["loss"] for row in result.history if "loss" in row]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    report = pipe.evaluate((sequences[40:], targets[40:]))
    assert report["spearman"].low <= report["spearman"].value <= report["spearman"].high
    for key, value in backbone.state_dict().items():
        if key in frozen:  # base weights (adapted layers keep theirs under base_layer)
            assert torch.equal(value, frozen[key]), key
    expected = pipe.predict((sequences, targets))[1]
    pipe.save_adapter(tmp_path / "adapter")
    fresh = create_pipeline(
        "protein/sequence", backbone=load_backbone("esm2_tiny_random")[0], task="regression"
    )
    fresh.load_adapter(tmp_path / "adapter")
    np.testing.assert_array_equal(fresh.predict((sequences, targets))[1], expected)


def _recipe(tmp_path, data, stages, pipeline="protein/sequence", task="regression", compare=("one_hot",)):
    data = dict(data)  # data["path"] becomes data.dataset, the way a user names their own file
    return Recipe.model_validate({
        "name": "toy", "pipeline": pipeline, "seed": 0,
        "backbone": {"name": "esm2_tiny_random"},
        "data": {"dataset": data.pop("path"), "task": task, "options": data},
        "stages": stages, "evaluation": {"bootstrap": 20}, "compare": list(compare),
        "output_dir": str(tmp_path / "runs"),
    })  # fmt: skip


def test_recipe_with_masked_lm_stage_then_task_stage(tmp_path):
    sequences, targets = _toy_regression(60)
    rows = ["sequence,target,set"] + [
        f"{s},{t},{'test' if i >= 45 else 'train'}"
        for i, (s, t) in enumerate(zip(sequences, targets, strict=True))
    ]
    (tmp_path / "toy.csv").write_text("\n".join(rows) + "\n")
    lora = {"method": "lora", "r": 2, "alpha": 4}
    stages = [
        {"name": "evotune", "objective": "masked_lm", "adapter": {**lora, "targets": ["k", "v"]},
         "train": {"epochs": 2, "batch_size": 8, "lr": 5e-3}},
        {"name": "task", "objective": "regression", "adapter": {**lora, "targets": ["q"]},
         "train": {"epochs": 3, "batch_size": 8, "lr": 1e-2},
         "options": {"last_n_layers": 1, "pooling": "bos"}},
    ]  # fmt: skip
    spec = {"method": "lora", "r": 2, "targets": ["k"]}  # a copy of the last stage: its last_n_layers
    recipe = _recipe(
        tmp_path, {"path": str(tmp_path / "toy.csv")}, stages, compare=["one_hot", "linear_probe", spec]
    )
    assert check_pipeline(recipe) == []
    run_dir = run_recipe(recipe)
    report = json.loads((run_dir / "report.json").read_text())
    assert (
        set(report["results"]) == {"one_hot", "linear_probe", "lora", "lora_r2"}
        and report["headline"]["model"] == "lora"
    )
    (copied,) = report["extra"]["models"]["lora_r2"]["stages"]
    assert copied["adapted_modules"] == ["backbone.model.layers.1.self_attn.k_proj"]
    assert report["backbone"]["weights"] == "random initialisation"
    assert any("NOT pretrained" in note for note in report["notes"])
    assert report["dataset"]["sizes"] == {"train": 41, "valid": 4, "test": 15}  # 10% of 45 held out
    stage = report["extra"]["masked_lm"]["evotune"]
    assert stage["valid_perplexity_before"] > 1 and stage["valid_perplexity_after"] > 1
    assert stage["sequences"] == 41 and stage["mask_probability"] == 0.15
    evotune, task = report["extra"]["models"]["lora"]["stages"]  # the engine's record of each stage
    # each stage's best evaluation (masked-LM loss on the valid split; the task's validation loss)
    assert evotune["best"]["metric"] == task["best"]["metric"] == "loss"
    assert 1 <= evotune["best"]["step"] <= evotune["steps"] and 1 <= task["best"]["step"] <= task["steps"]
    assert (evotune["objective"], evotune["trainable"], task["trainable"]) == (
        "masked_lm",
        ["evotune"],
        ["task", "head"],
    )
    assert (run_dir / "adapters" / "evotune" / "adapter_model.safetensors").is_file()
    config = json.loads((run_dir / "adapters" / "task" / "adapter_config.json").read_text())
    assert config["modules"] == ["backbone.model.layers.1.self_attn.q_proj"] and config["extra_modules"] == [
        "head"
    ]
    # trainable in any stage: evotune's LoRA r=2 on k and v of both layers (4 x 128), the task's on q of
    # layer 1 (A 2x32 + B 32x2) and the head (32 + 1)
    assert report["parameters"]["lora"]["trainable"] == 4 * 128 + 128 + 33


def test_recipe_rejects_a_task_stage_before_the_last(tmp_path):
    (tmp_path / "toy.csv").write_text("sequence,target,set\nMKT,1,train\nMKV,2,train\nMKW,3,test\n")
    stage = {"name": "task", "objective": "regression", "adapter": None, "train": {"epochs": 1}}
    recipe = _recipe(tmp_path, {"path": str(tmp_path / "toy.csv")}, [stage, {**stage, "name": "again"}])
    with pytest.raises(
        ValueError, match="stage 'task' comes before the task stage, so its objective must be"
    ):
        run_recipe(recipe)


def test_residue_recipe_reports_q3_with_protein_level_interval(tmp_path):
    rng = np.random.default_rng(1)
    sequences = ["".join(rng.choice(list("ADEKLRGP"), size=int(rng.integers(12, 30)))) for _ in range(30)]
    labels = ["".join("H" if c in "AELK" else "C" if c in "GP" else "E" for c in s) for s in sequences]
    (tmp_path / "seqs.fasta").write_text("".join(f">p{i}\n{s}\n" for i, s in enumerate(sequences)))
    (tmp_path / "labels.fasta").write_text(
        "".join(
            f">p{i} SET={'test' if i >= 22 else 'train'} VALIDATION=False\n{y}\n"
            for i, y in enumerate(labels)
        )
    )
    data = {
        "path": str(tmp_path / "labels.fasta"),
        "sequences_path": str(tmp_path / "seqs.fasta"),
        "label_classes": "HEC",
    }
    lora = {"method": "lora", "r": 2, "targets": ["all"]}
    stages = [{"name": "task", "objective": "classification", "adapter": lora,
               "train": {"epochs": 4, "batch_size": 4, "lr": 1e-2}}]  # fmt: skip
    recipe = _recipe(tmp_path, data, stages, "protein/residue", "multiclass")
    recipe = recipe.model_copy(
        update={"evaluation": recipe.evaluation.model_copy(update={"metrics": ["q3", "auroc"]})}
    )
    report = json.loads((run_recipe(recipe) / "report.json").read_text())
    assert report["headline"]["metric"] == "q3"
    scored = sum(len(s) for s in sequences[22:])
    assert report["extra"]["evaluation"]["lora"]["n_examples"] == scored
    interval = report["extra"]["protein_level_interval"]["lora"]
    assert interval["low"] <= report["headline"]["value"] <= interval["high"]


def test_shipped_protein_recipes_validate(flip_mirror):
    names = list_recipes("protein/*")
    assert "protein/gb1_lora" in names and "protein/ss3_lora" in names
    for name in names:
        assert check_pipeline(load_recipe(find_recipe(name), check=False)) == [], name


def test_gb1_demo_quick_variant_on_the_mirror(flip_mirror, tmp_path):
    overrides = [
        "backbone.name=esm2_tiny_random", "data.options.max_train=64", "data.options.max_valid=16",
        "data.options.max_test=64", "stages.0.train.epochs=1", "evaluation.bootstrap=20",
    ]  # fmt: skip
    run_dir = run_recipe("protein/gb1_lora", overrides, output_dir=tmp_path)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["dataset"]["sizes"] == {"train": 64, "valid": 16, "test": 64}
    assert report["dataset"]["sha256"] == {
        "flip/gb1/three_vs_rest.csv": "b8aa60cc061013a5c2e6f4070593c82976b1d9e5c9058a66ad57c6e9c3cec023"
    }
    assert report["dataset"]["issues"]["cropped"] == 64 + 16 + 64
    assert set(report["results"]) == {"one_hot", "linear_probe", "lora"}


ATTENTION_AND_FEED_FORWARD = [f"self_attn.{p}_proj" for p in ("q", "k", "v", "out")] + ["fc1", "fc2"]
SLEDZIESKI = [f"{i}.self_attn.{p}_proj" for i in range(25, 33) for p in "kv"]


@pytest.mark.parametrize(
    "name,layers,expected",
    [
        ("protein/gb1_esm2_650m_sledzieski", 33, SLEDZIESKI),
        (
            "protein/gb1_esm2_3b_schmirler",
            36,
            [f"{i}.{m}" for i in range(36) for m in ATTENTION_AND_FEED_FORWARD],
        ),
    ],
)
def test_published_recipes_adapt_the_published_layers(name, layers, expected):
    import re

    from pipelines.core.recipe import pipeline_options
    from pipelines.protein.backbones import expand_targets, random_esm2

    recipe = load_recipe(find_recipe(name), check=False)
    stage, options = recipe.stages[0], pipeline_options(recipe).stages[0]
    backbone, _ = random_esm2(num_layers=layers, embed_dim=8, attention_heads=2)  # the layer layout only
    patterns = [t[3:] for t in expand_targets(backbone, stage.adapter.targets, options.last_n_layers)]
    names = [n for n, _ in backbone.named_modules() if any(re.fullmatch(p, n) for p in patterns)]
    assert sorted(names) == sorted(f"model.layers.{e}" for e in expected)


def test_multiclass_adapter_reload_reads_the_number_of_classes_from_the_file(tmp_path):
    sequences, counts = _toy_regression(24)
    labels = [min(int(c), 2) for c in counts]
    pipe = create_pipeline("protein/sequence", backbone="esm2_tiny_random", task="multiclass",
                           train={"epochs": 1, "batch_size": 8}, bootstrap=0)  # fmt: skip
    pipe.fit((sequences, labels))
    assert pipe.model.head.linear.out_features == 3
    expected = pipe.predict((sequences, labels))[1]
    pipe.save_adapter(tmp_path / "a")
    fresh = create_pipeline("protein/sequence", backbone="esm2_tiny_random", task="multiclass")
    fresh.load_adapter(tmp_path / "a")
    np.testing.assert_array_equal(fresh.predict((sequences, labels))[1], expected)
    with pytest.raises(FileNotFoundError, match="pass the folder that save_adapter"):
        fresh.load_adapter(tmp_path / "missing")


def test_lab_code_applies_the_residue_limit():
    from pipelines.protein.data import ProteinDataError

    refuse = create_pipeline(
        "protein/sequence", backbone="esm2_tiny_random", backbone_options={"max_residues": 5}
    )
    with pytest.raises(
        ProteinDataError, match="record 'sequence 1' has 6 residues, more than the limit of 5"
    ):
        refuse.records((["MKT", "MKTAYI"], [1.0, 2.0]))
    crop = create_pipeline("protein/sequence", backbone="esm2_tiny_random", data_options={"max_residues": 4,
                           "long_sequences": "crop"})  # fmt: skip
    assert [r.sequence for r in crop.records((["MKT", "MKTAYI"], [1.0, 2.0]))] == ["MKT", "MKTA"]
