"""Every registered pipeline honours the generic recipe fields or refuses them at validate time, by path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipelines.core.evaluation.report import REPORT_SCHEMA
from pipelines.core.experiment import compare_label
from pipelines.core.recipe import Recipe, load_recipe, validate_recipe_file
from pipelines.core.registry import demo_recipes
from pipelines.core.runner import run_recipe

# domain -> the generic low-data fields its demo recipe refuses (with the reason's first words)
REFUSED = {
    "imaging": {},
    "clinical": {},
    "protein": {"data.shots_per_class": "a regression task has no classes"},  # GB1 fitness is regression
    "speech": {"data.shots_per_class": "speech/speaker_adaptation has no classes"},  # fraction: of clips
}


@pytest.mark.parametrize("domain", sorted(REFUSED))
@pytest.mark.parametrize(("field", "value"), [("data.fraction", "0.5"), ("data.shots_per_class", "2")])
def test_low_data_fields_are_honoured_or_refused_at_validate(domain, field, value):
    errors = validate_recipe_file(demo_recipes()[domain], [f"{field}={value}"])
    if field in REFUSED[domain]:
        assert [error.path for error in errors] == [field]
        assert REFUSED[domain][field] in errors[0].message
    else:
        assert errors == []


def test_every_domain_is_in_the_conformance_table():
    assert sorted(demo_recipes()) == sorted(REFUSED)


# ----- the run-level contract, on each ported pipeline's tiny configuration ----------------------------


def _protein_recipe(tmp_path) -> dict:
    """A tiny random ESM-2 on 60 toy sequences whose target counts W: 48 train, 12 test."""
    rng = np.random.default_rng(0)
    rows = ["sequence,target,set"]
    for i in range(60):
        body = list(rng.choice(list("ACDEFGHILMNPQRSTVY"), size=16))
        for _ in range(int(rng.integers(0, 4))):
            body[int(rng.integers(16))] = "W"
        rows.append(f"{''.join(body)},{''.join(body).count('W')},{'test' if i >= 48 else 'train'}")
    (tmp_path / "toy.csv").write_text("\n".join(rows) + "\n")
    lora = {"method": "lora", "r": 2, "alpha": 4, "targets": ["q", "v"]}
    return {
        "name": "conformance", "pipeline": "protein/sequence", "backbone": {"name": "esm2_tiny_random"},
        "data": {"dataset": str(tmp_path / "toy.csv"), "task": "regression"},
        "stages": [{"name": "task", "objective": "regression", "adapter": lora,
                    "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-2}}],
        "evaluation": {"bootstrap": 20},
        "compare": ["one_hot", {"method": "lora", "r": 4, "targets": ["q"]}],
        "output_dir": str(tmp_path / "runs"),
    }  # fmt: skip


def _imaging_recipe(tmp_path) -> dict:
    """A 2-block 32-wide timm ViT on 16x16 grey images whose class brightens a centre square."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 48), ("val", 16), ("test", 20)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 120, (n, 16, 16)).astype(np.uint8)
        images[labels == 1, 4:12, 4:12] += 120
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    np.savez(tmp_path / "tiny.npz", **arrays)
    vit = {"pretrained": False, "img_size": 32, "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}}
    return {
        "name": "conformance", "pipeline": "imaging/classification",
        "backbone": {"name": "timm:vit_tiny_patch16_224", "options": vit},
        "data": {"dataset": str(tmp_path / "tiny.npz"), "task": "binary",
                 "options": {"transforms": {"image_size": 32}, "eval_batch_size": 8}},
        "stages": [{"name": "task", "objective": "classification",
                    "adapter": {"method": "lora", "r": 2, "alpha": 4, "targets": []},
                    "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-2}}],
        "evaluation": {"bootstrap": 20},
        "compare": ["linear_probe", {"method": "lora", "r": 4, "targets": []}],
        "output_dir": str(tmp_path / "runs"),
    }  # fmt: skip


def _clinical_recipe(tmp_path) -> dict:
    """A tiny random LLaMA (byte tokenizer) classifying 40 fake notes whose words depend on the label."""
    rng = np.random.default_rng(0)
    words = {
        1: "chest pain dyspnea stent lung wheeze".split(),
        0: "knee fracture cataract polyp rash".split(),
    }
    rows = ["note_id,text,label"] + [
        f"n{i},{' '.join(rng.choice(words[i % 2], size=8))},{i % 2}" for i in range(40)
    ]
    (tmp_path / "notes.csv").write_text("\n".join(rows) + "\n")
    lora = {"method": "lora", "r": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]}
    return {
        "name": "conformance", "pipeline": "clinical/two_stage",
        "backbone": {"name": "tiny-random-llama"},
        "data": {"dataset": str(tmp_path / "notes.csv"), "task": "binary",
                 "options": {"id_column": "note_id", "split": {"train": 0.6, "val": 0.1, "test": 0.3}}},
        "stages": [{"name": "task", "objective": "classification", "adapter": lora,
                    "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2}, "options": {"max_length": 16}}],
        "evaluation": {"metrics": ["auroc"], "bootstrap": 20},
        "compare": ["head_only", {"method": "lora", "r": 4, "targets": ["q_proj"]}],
        "output_dir": str(tmp_path / "runs"),
    }  # fmt: skip


def _speech_recipe(tmp_path) -> dict:
    """A tiny random FastSpeech2Conformer adapted to FSDD's held-out speaker from 20 clips (2 per digit)."""
    if not (Path(os.environ.get("PEFT_PIPELINES_DATA", "")) / "fsdd" / "recordings").is_dir():
        pytest.skip("FSDD is not in the data mirror (PEFT_PIPELINES_DATA)")
    overrides = [
        "backbone.name=test_tiny_fastspeech2_conformer", "stages.0.train.max_steps=3",
        "stages.0.adapter.hidden=4", "data.options.adaptation_clips=20", "data.options.samples=0",
        "data.options.eval_clips_per_digit=1", "evaluation.metrics=[mcd]", "evaluation.bootstrap=20",
        "compare=[lora, base, {method: lora, r: 2}]",
    ]  # fmt: skip
    recipe = load_recipe("speech/fastspeech2_conformer_speaker_adapter", overrides).model_dump(mode="json")
    return recipe | {"output_dir": str(tmp_path / "runs")}


TINY = {
    "protein": _protein_recipe, "imaging": _imaging_recipe, "clinical": _clinical_recipe,
    "speech": _speech_recipe,
}  # fmt: skip


def _run(recipe: dict) -> dict:
    run_dir = run_recipe(Recipe.model_validate(recipe))
    return json.loads((run_dir / "report.json").read_text())


@pytest.mark.parametrize("domain", sorted(TINY))
def test_a_run_honours_the_recipe_contract(domain, tmp_path):
    """fraction halves the recorded training set, trained baselines take the primary's steps, a spec in
    compare trains as written, the report follows the schema, trainable fraction is trainable / total."""
    import jsonschema

    recipe = TINY[domain](tmp_path)
    recipe["data"]["fraction"] = 0.5
    report = _run(recipe)
    jsonschema.validate(report, json.loads(REPORT_SCHEMA.read_text()))
    low_data = report["dataset"]["low_data"]
    assert low_data["fraction"] == 0.5 and low_data["train_used"] == round(0.5 * low_data["train_full"])
    steps = {label: entry["steps"] for label, entry in report["extra"]["models"].items() if entry["steps"]}
    primary = report["headline"]["model"]
    assert len(steps) >= 2 and set(steps.values()) == {steps[primary]}
    if isinstance(recipe["compare"][-1], dict):
        spec_label = compare_label(recipe["compare"][-1])
        assert spec_label in report["results"] and spec_label in steps
        (stage,) = report["extra"]["models"][spec_label]["stages"]  # as the engine ran it
        assert stage["adapter"]["r"] == recipe["compare"][-1]["r"] and stage["adapted_modules"]
        (folder,) = report["extra"]["models"][spec_label]["adapters"].values()  # saved like the primary's
        assert (Path(folder) / "adapter_model.safetensors").is_file()
        copies = [
            note for note in report["notes"] if note.startswith(f"Compare entry '{spec_label}' is a copy")
        ]
        assert len(copies) == 1
    assert sum(note.startswith("Low-data run: ") for note in report["notes"]) == 1
    assert report["extra"]["models"][primary]["reload_identical"] is True
    assert {"load_data", "keep_training", "evaluate", "describe"} <= set(report["cost"]["phases"])
    assert set(report["cost"]["phases"]["models"]) == set(report["results"]) & set(report["extra"]["models"])
    for label, count in report["parameters"].items():
        assert count["fraction"] == pytest.approx(count["trainable"] / count["total"]), label


def _losses(run_dir: Path) -> dict[str, list]:
    """Every trained model's (step, loss) rows, by its metrics.jsonl path in the run folder."""
    rows = {}
    for file in sorted(run_dir.rglob("metrics.jsonl")):
        logged = [json.loads(line) for line in file.read_text().splitlines()]
        rows[str(file.relative_to(run_dir))] = [(r["step"], r["loss"]) for r in logged if "loss" in r]
    return rows


@pytest.mark.parametrize("domain", sorted(TINY))
def test_an_interrupted_run_resumes_to_the_losses_of_an_uninterrupted_one(domain, tmp_path):
    """Every model of a run stopped after 2 of 4 steps and resumed logs the losses of a 4-step run."""
    recipe = TINY[domain](tmp_path)
    steady = {"schedule": "constant", "warmup_ratio": 0.0, "log_every": 1, "checkpoint_every": 2}
    for stage in recipe["stages"]:
        stage["train"] |= steady | {"max_steps": 4}
    whole = run_recipe(Recipe.model_validate(recipe | {"output_dir": str(tmp_path / "whole")}))
    part = json.loads(json.dumps(recipe)) | {"output_dir": str(tmp_path / "part")}
    for stage in part["stages"]:
        stage["train"]["max_steps"] = 2
    stopped = run_recipe(Recipe.model_validate(part))
    resumed = run_recipe(Recipe.model_validate(recipe | {"output_dir": str(tmp_path / "part")}), resume=True)
    expected = _losses(whole)
    assert resumed == stopped and expected and all(len(rows) == 4 for rows in expected.values())
    assert _losses(resumed) == expected
