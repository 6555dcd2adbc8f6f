"""`export --format peft` asks the run's pipeline to write its head as peft's modules_to_save."""

from __future__ import annotations

import json

import numpy as np

from pipelines import cli
from pipelines.core.recipe import Recipe
from pipelines.core.runner import run_recipe


def test_a_protein_run_exports_its_adapter_and_head_for_hf_peft(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["sequence,target,set"]
    for i in range(40):
        sequence = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=12))
        rows.append(f"{sequence},{sequence.count('W')},{'test' if i >= 32 else 'train'}")
    (tmp_path / "toy.csv").write_text("\n".join(rows) + "\n")
    recipe = Recipe.model_validate({
        "name": "export", "pipeline": "protein/sequence", "backbone": {"name": "esm2_tiny_random"},
        "data": {"dataset": str(tmp_path / "toy.csv"), "task": "regression"},
        "stages": [{"name": "task", "objective": "regression",
                    "adapter": {"method": "lora", "r": 2, "targets": ["q"]}, "train": {"max_steps": 2}}],
        "evaluation": {"bootstrap": 0}, "output_dir": str(tmp_path / "runs"),
    })  # fmt: skip
    run_dir = run_recipe(recipe)
    assert cli.main(["export", str(run_dir), "--format", "peft", "--out", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "task" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["head.linear"]
