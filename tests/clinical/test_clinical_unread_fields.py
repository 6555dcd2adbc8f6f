"""Every recipe field the clinical pipeline would accept and not read for the recipe's configuration is
refused at validate time, by its path; the same fields where they are read validate. A second causal-LM
stage's max_blocks is honoured (it used to share the first one's blocks of the same length)."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import yaml

from pipelines.clinical.experiment import ClinicalExperiment
from pipelines.clinical.pipeline import ClinicalTwoStagePipeline
from pipelines.core.recipe import load_recipe, recipes_dir, validate_recipe_file

TOP = "re:.*layers\\.1\\.self_attn\\.(q|v)_proj"
LORA = {"method": "lora", "r": 2, "alpha": 4, "targets": [TOP]}
DEMO = recipes_dir() / "clinical" / "mtsamples_cardio_two_stage.yaml"
MIMIC = recipes_dir() / "clinical" / "llama_mimic_two_stage.yaml"
SPECIALTIES = recipes_dir() / "clinical" / "mtsamples_specialties_two_stage.yaml"


def _lm(name: str, **options) -> dict:
    train = {"epochs": 1, "batch_size": 2, "lr": 1e-2}
    return {"name": name, "objective": "causal_lm", "adapter": LORA, "trainable": [name], "train": train,
            "options": {"max_length": 16, **options}}  # fmt: skip


def _head(name: str, **options) -> dict:
    train = {"epochs": 1, "batch_size": 8, "lr": 1e-2}
    return {"name": name, "objective": "classification", "adapter": LORA, "trainable": [name], "train": train,
            "options": {"max_length": 24, **options}}  # fmt: skip


def _notes_recipe(tmp_path, synthetic_notes) -> dict:
    """A notes file, the tiny random backbone, a causal-LM stage and a classification stage."""
    ids, texts, labels = synthetic_notes(n=40)
    notes = tmp_path / "notes.csv"
    pd.DataFrame({"note_id": ids, "text": texts, "label": labels}).to_csv(notes, index=False)
    return {
        "name": "tiny_unread", "pipeline": "clinical/two_stage", "backbone": {"name": "tiny-random-llama"},
        "data": {"dataset": str(notes), "task": "binary", "options": {"id_column": "note_id"}},
        "stages": [_lm("domain", max_blocks=4, eval_blocks=2), _head("task")],
        "evaluation": {"metrics": ["auroc"], "bootstrap": 10}, "output_dir": str(tmp_path / "runs"),
    }  # fmt: skip


def _set(recipe: dict, dotted: str, value) -> dict:
    recipe = copy.deepcopy(recipe)
    *parents, last = dotted.split(".")
    node = recipe
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[last] = value
    return recipe


def _paths(tmp_path, recipe: dict) -> list[str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return [error.path for error in validate_recipe_file(path)]


NO_VAL = {"train": 0.7, "test": 0.3}
NOTES_CASES = [  # (changes of the notes-file recipe, the one refused path); "stages": a function of them
    ({"backbone.options.revision": "main"}, "backbone.options.revision"),
    ({"backbone.options.dtype": "bfloat16"}, "backbone.options.dtype"),
    ({"backbone.options.tiny": {"depth": 3}}, "backbone.options.tiny.depth"),
    (
        {"backbone.name": "/nonexistent/model", "backbone.options.revision": "main"},
        "backbone.options.revision",
    ),
    ({"data.options.task_name": "top_specialties"}, "data.options.task_name"),
    ({"data.options.num_classes": 3}, "data.options.num_classes"),
    ({"data.options.split": {"train": 0.6, "dev": 0.1, "test": 0.3}}, "data.options.split.dev"),
    ({"data.options.max_val": 4}, "data.options.max_val"),
    ({"data.options.max_val": 4, "data.options.split": NO_VAL}, "data.options.max_val"),
    ({"stages.1.train.eval_every": 2, "data.options.split": NO_VAL}, "stages.1.train.eval_every"),
    ({"stages.1.options.max_blocks": 8}, "stages.1.options.max_blocks"),
    ({"stages.1.options.eval_blocks": 8}, "stages.1.options.eval_blocks"),
    ({"stages.0.options.pooling": "mean"}, "stages.0.options.pooling"),
    ({"stages.0.options.class_weights": True}, "stages.0.options.class_weights"),
    ({"stages.0.train.eval_every": 2}, "stages.0.train.eval_every"),
    ({"stages.0.train.early_stopping_patience": 2}, "stages.0.train.early_stopping_patience"),
    (
        {"stages.1.train.early_stopping_patience": 2, "stages.1.train.early_stopping_metric": "auroc"},
        "stages.1.train.early_stopping_metric",
    ),
    ({"stages.1.train.early_stopping_metric": "auroc"}, "stages.1.train.early_stopping_metric"),
    ({"stages": lambda s: [s[0], _lm("more", eval_blocks=9), s[1]]}, "stages.1.options.eval_blocks"),
    ({"stages": lambda s: [*s, _head("again", pooling="mean")]}, "stages.2.options.pooling"),
    (
        {"stages": lambda s: [*s, {**_head("again"), "options": {"max_length": 12}}]},
        "stages.2.options.max_length",
    ),
    ({"stages": lambda s: s[:1]}, "stages"),
]


def _changed(recipe: dict, changes: dict) -> dict:
    for field, value in changes.items():
        recipe = (
            {**recipe, "stages": value(recipe["stages"])} if field == "stages" else _set(recipe, field, value)
        )
    return recipe


@pytest.mark.parametrize(("changes", "path"), NOTES_CASES, ids=[path for _, path in NOTES_CASES])
def test_a_field_the_notes_recipe_does_not_read_is_refused_by_path(tmp_path, synthetic_notes, changes, path):
    base = _notes_recipe(tmp_path, synthetic_notes)
    assert _paths(tmp_path, base) == []
    assert _paths(tmp_path, _changed(base, changes)) == [path]


DEMO_CASES = {  # change of the shipped MTSamples demo (smollm2-135m, a GGUF file) -> the one refused path
    "revision on the GGUF backbone": ("backbone.options.revision", "main"),
    "bfloat16 on the GGUF backbone": ("backbone.options.dtype", "bfloat16"),
    "tiny sizes on the GGUF backbone": ("backbone.options.tiny", {"layers": 2}),
    "text_column with MTSamples": ("data.options.text_column", "note"),
    "label_columns with MTSamples": ("data.options.label_columns", ["a", "b"]),
    "id_column with MTSamples": ("data.options.id_column", "note_id"),
    "num_classes with the binary MTSamples task": ("data.options.num_classes", 3),
}


@pytest.mark.parametrize("case", sorted(DEMO_CASES))
def test_a_field_the_mtsamples_demo_does_not_read_is_refused_by_path(tmp_path, case):
    field, value = DEMO_CASES[case]
    demo = yaml.safe_load(DEMO.read_text())
    assert _paths(tmp_path, _set(demo, field, value)) == [field]


@pytest.mark.parametrize(
    ("recipe", "changes"),
    [
        (MIMIC, {"backbone.options.revision": "main", "backbone.options.dtype": "bfloat16"}),  # a hub id
        (SPECIALTIES, {"backbone.options.dtype": "float32", "data.options.num_classes": 4}),
        (DEMO, {"data.options.max_val": 8, "stages.1.train.eval_every": 4,
                "stages.1.train.early_stopping_patience": 2, "stages.1.train.early_stopping_mode": "min"}),
    ],
)  # fmt: skip
def test_the_same_fields_validate_where_they_are_read(tmp_path, recipe, changes):
    assert _paths(tmp_path, _changed(yaml.safe_load(recipe.read_text()), changes)) == []


def test_a_second_causal_lm_stage_trains_on_its_own_max_blocks(tmp_path, synthetic_notes):
    recipe = _notes_recipe(tmp_path, synthetic_notes)
    recipe["stages"] = [_lm("first", max_blocks=2, eval_blocks=3), _lm("second", max_blocks=5), _head("task")]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    pipe = ClinicalTwoStagePipeline.from_recipe(load_recipe(path))
    hooks = ClinicalExperiment(pipe)
    hooks.load_data(tmp_path / "run")
    model = hooks.new_model()
    blocks = [len(hooks.plan_stage(model, stage, i).dataset) for i, stage in enumerate(pipe.stages[:2])]
    assert blocks == [2, 5] and len(hooks.held_out) == 3
