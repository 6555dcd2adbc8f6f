"""Compare entries written as adapter specs: trained as the last stage with that adapter alone, refused
early when the model cannot hold them; prefix tuning and P-tuning refused over cached layers."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from pipelines.clinical.pipeline import ClinicalTwoStagePipeline
from pipelines.clinical.stages import StageError
from pipelines.core.experiment import compare_label
from pipelines.core.recipe import load_recipe, validate_recipe_file
from pipelines.core.runner import run_recipe

TOP = "re:.*layers\\.1\\.self_attn\\.(q|v)_proj"
SPEC = {"method": "lora", "r": 3, "alpha": 6.0, "targets": ["re:.*layers\\.1\\.mlp\\.down_proj"]}


def _recipe(tmp_path, synthetic_notes, compare: list, cached: int = 1, last: str = "classification") -> dict:
    ids, texts, labels = synthetic_notes(n=40)
    notes = tmp_path / "notes.csv"
    pd.DataFrame({"note_id": ids, "text": texts, "label": labels}).to_csv(notes, index=False)
    lora = {"method": "lora", "r": 2, "alpha": 4, "targets": [TOP]}
    stages = [
        {"name": "domain", "objective": "causal_lm", "adapter": lora, "trainable": ["domain"],
         "train": {"epochs": 1, "batch_size": 2, "lr": 1e-2, "log_every": 1},
         "options": {"max_length": 32, "max_blocks": 4, "eval_blocks": 2}},
        {"name": "task", "objective": "classification", "adapter": lora, "trainable": ["domain", "task"],
         "train": {"epochs": 2, "batch_size": 8, "lr": 1e-2, "log_every": 1}, "options": {"max_length": 24}},
    ]  # fmt: skip
    if last != "classification":  # the task stage first, then a causal-LM stage
        stages = [{**stages[1], "trainable": ["task"]}, stages[0]]
    return {
        "name": "tiny_compare", "pipeline": "clinical/two_stage",
        "backbone": {"name": "tiny-random-llama", "options": {"cached_layers": cached}},
        "data": {"dataset": str(notes), "task": "binary",
                 "options": {"id_column": "note_id", "split": {"train": 0.6, "val": 0.1, "test": 0.3}}},
        "stages": stages, "evaluation": {"metrics": ["auroc"], "bootstrap": 10}, "compare": compare,
        "output_dir": str(tmp_path / "runs"),
    }  # fmt: skip


def _write(tmp_path, recipe: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_spec_baseline_trains_the_last_stage_with_the_adapter_as_written(tmp_path, synthetic_notes):
    path = _write(tmp_path, _recipe(tmp_path, synthetic_notes, ["head_only", SPEC]))
    run_dir = run_recipe(path)
    report = json.loads((run_dir / "report.json").read_text())
    label = compare_label(load_recipe(path).compare[1])
    assert label == "lora_r3_alpha6"

    def last_step(folder) -> int:  # the training loop's own log of a stage
        return json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])["step"]

    final_steps, domain_steps = (
        last_step(run_dir / "train/two_stage/task"),
        last_step(run_dir / "train/two_stage/domain"),
    )
    assert (final_steps, domain_steps) == (6, 2)  # 2 epochs of 3 batches of 8; 4 blocks in batches of 2
    models = report["extra"]["models"]
    assert models[label]["steps"] == final_steps == last_step(run_dir / "baselines/train" / label / label)
    assert models["two_stage"]["steps"] == final_steps + domain_steps
    (facts,) = models[label]["stages"]  # the engine's record of the stage as it ran
    assert {k: facts["adapter"][k] for k in SPEC} == SPEC and facts["adapter"]["dropout"] == 0.0
    assert facts["adapted_modules"] == ["lm.model.layers.1.mlp.down_proj"]
    assert (facts["name"], facts["objective"], facts["steps"]) == (label, "classification", final_steps)
    assert facts["trainable"] == [label, "classifier"] and facts["lr"] == 1e-2
    # the head (32 + 1) and r = 3 on down_proj (64 -> 32): nothing of the domain stage
    assert report["parameters"][label]["trainable"] == 33 + 3 * (64 + 32)
    (note,) = [n for n in report["notes"] if n.startswith("Compare entry")]  # the engine's, once
    assert note.startswith(f"Compare entry '{label}' is a copy of the last stage ('task', classification")


def test_a_spec_below_the_cached_layers_stops_before_anything_trains(tmp_path, synthetic_notes):
    spec = {"method": "lora", "r": 2, "targets": ["q_proj"]}  # layer 0 too, under cached_layers: 1
    recipe = load_recipe(_write(tmp_path, _recipe(tmp_path, synthetic_notes, [spec])))
    pipe = ClinicalTwoStagePipeline.from_recipe(recipe)
    with pytest.raises(
        StageError, match=r"^compare\.0: adapter on 'model\.layers\.0\.self_attn\.q_proj' sits"
    ):
        pipe.run(tmp_path / "run")
    assert not (tmp_path / "run" / "train").exists()


def test_validate_refuses_prompt_methods_over_cached_layers_and_specs_after_a_causal_lm_stage(
    tmp_path, synthetic_notes
):
    prefix = {"method": "prefix", "num_tokens": 4}
    recipe = _recipe(tmp_path, synthetic_notes, [{"method": "ptuning", "num_tokens": 4}])
    recipe["stages"][1]["adapter"] = prefix
    errors = {e.path: e.message for e in validate_recipe_file(_write(tmp_path, recipe))}
    assert sorted(errors) == ["compare.0.method", "stages.1.adapter.method"]
    assert errors["stages.1.adapter.method"].startswith("prefix changes what every decoder layer reads")
    assert errors["compare.0.method"].endswith("set backbone.options.cached_layers: 0 (it is 1)")
    recipe["backbone"]["options"]["cached_layers"] = 0
    assert validate_recipe_file(_write(tmp_path, recipe)) == []
    reversed_stages = _recipe(tmp_path, synthetic_notes, ["head_only", SPEC], last="causal_lm")
    errors = validate_recipe_file(_write(tmp_path, reversed_stages))
    assert [e.path for e in errors] == ["compare.1"] and "stage 'domain' is causal_lm" in errors[0].message
