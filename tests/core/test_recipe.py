"""Recipe schema: loading, every error at once with its path, suggestions, overrides, safety, round trip."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from pydantic import BaseModel, ConfigDict

from pipelines.core import recipe as recipe_module
from pipelines.core import registry
from pipelines.core.peft import LoRA
from pipelines.core.recipe import (
    Recipe,
    RecipeValidationError,
    apply_overrides,
    find_recipe,
    list_recipes,
    load_recipe,
    pipeline_options,
    recipe_to_yaml,
    validate_recipe_file,
)
from pipelines.core.recipe_yaml import parse_yaml

GOOD = """\
name: toy_recipe
pipeline: toy/classify
description: a toy
seed: 1
backbone: {name: tiny, options: {width: 8}}
data: {dataset: toy, task: binary, fraction: 0.5}
evaluation: {metrics: [auroc, accuracy], bootstrap: 10, headline: auroc}
compare: [linear_probe]
stages:
  - name: task
    objective: classification
    adapter: {method: lora, r: 4, alpha: 8, targets: [query, value]}
    train: {epochs: 1, batch_size: 4, lr: 1e-3}
"""


class BackboneOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = 4


class ToyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backbone: BackboneOptions = BackboneOptions()


class ToyPipeline:
    """A toy pipeline."""

    OBJECTIVES = ("classification",)
    BASELINES = ("linear_probe", "full_finetune")
    DATASETS = ("toy",)


@pytest.fixture(autouse=True)
def toy_pipeline(monkeypatch):
    monkeypatch.setattr(registry, "_PIPELINES", {})
    monkeypatch.setattr(registry, "_IMPORT_ERRORS", {})
    monkeypatch.setattr(registry, "_DOMAINS", {})
    registry.register_pipeline("toy/classify", ToyPipeline, options=ToyOptions)


def write(tmp_path, text: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def summary(errors) -> list[tuple[str, str | None, int | None]]:
    return [(e.path, e.suggestion, e.line) for e in errors]


def test_good_recipe_loads_with_defaults(tmp_path):
    path = write(tmp_path, GOOD)
    recipe = load_recipe(path)
    stage = recipe.stages[0]
    assert stage.adapter == LoRA(r=4, alpha=8.0, targets=["query", "value"])
    assert stage.trainable == ["task"]
    assert stage.train.lr == 1e-3 and isinstance(stage.train.lr, float)  # YAML 1.2 float, not a string
    assert (recipe.data.fraction, recipe.output_dir, recipe.source) == (0.5, "runs", path)
    assert pipeline_options(recipe) == ToyOptions(backbone=BackboneOptions(width=8))
    assert validate_recipe_file(path) == []


def test_every_structural_error_is_reported_at_once(tmp_path):
    path = write(
        tmp_path,
        GOOD.replace("fraction: 0.5", "fractoin: 0.5")
        .replace("r: 4,", "rr: 4,")
        .replace("lr: 1e-3}", "lrr: 1e-3, optimizer: adamww}")
        .replace("bootstrap: 10", "bootstrap: -1")
        + "  - {name: second, objective: classification, adapter: {method: lorra}}\n",
    )
    errors = validate_recipe_file(path)
    assert summary(errors) == [
        ("data.fractoin", "fraction", 6),
        ("evaluation.bootstrap", None, 7),
        ("stages.0.adapter.rr", "r", 12),
        ("stages.0.train.optimizer", "adamw", 13),
        ("stages.0.train.lrr", "lr", 13),
        ("stages.1.adapter.method", "lora", 14),
    ]
    assert str(errors[0]) == f"{path}:6: data.fractoin: unknown key 'fractoin' (did you mean 'fraction'?)"
    assert (
        errors[5].message
        == "unknown method 'lorra' (choose one of: lora, bottleneck, ia3, ssf, bitfit, norm, prompt, "
        "loha, lokr, vera, ptuning, prefix, sct, adalora)"
    )
    with pytest.raises(RecipeValidationError, match=r"is invalid \(6 errors\): line 6: data.fractoin"):
        load_recipe(path)


def test_cross_field_errors_have_paths(tmp_path):
    text = GOOD.replace("headline: auroc", "headline: auprc") + (
        "  - {name: task, objective: classification, trainable: [task, nothing]}\n"
    )
    errors = validate_recipe_file(write(tmp_path, text))
    assert [(e.path, e.message) for e in errors] == [
        ("evaluation.headline", "'auprc' is not one of evaluation.metrics"),
        ("stages.1.name", "'task' is already the name of stage 0"),
        (
            "stages.1.trainable.1",
            "'nothing' is not an adapter added by this or an earlier stage (adapters so far: task)",
        ),
    ]


def test_pipeline_level_checks(tmp_path):
    text = (
        GOOD.replace("width: 8", "widht: 8")
        .replace("fraction: 0.5", "fraction: 0.5, options: {x: 1}")
        .replace("objective: classification", "objective: clasification")
        .replace("[linear_probe]", "[linear_prob]")
        .replace("dataset: toy", "dataset: toyy")
        .replace("[auroc, accuracy]", "[aurco, spearman]")
        .replace("headline: auroc", "headline: aurco")
    )
    errors = validate_recipe_file(write(tmp_path, text))
    assert [(e.path, e.suggestion) for e in errors] == [
        ("backbone.options.widht", "width"),
        ("data.options", None),
        ("data.dataset", "toy"),
        ("evaluation.metrics.0", "auroc"),
        ("evaluation.metrics.1", None),
        ("compare.0", "linear_probe"),
        ("stages.0.objective", "classification"),
    ]
    messages = {e.path: e.message for e in errors}
    assert messages["data.options"] == "pipeline toy/classify takes no data options"
    assert messages["evaluation.metrics.1"] == "metric 'spearman' does not apply to task 'binary'"


def test_unknown_pipeline_is_reported_with_structural_errors(tmp_path):
    text = GOOD.replace("toy/classify", "toy/clasify").replace("seed: 1", "sead: 1")
    errors = validate_recipe_file(write(tmp_path, text))
    assert [(e.path, e.line) for e in errors] == [("pipeline", 2), ("sead", 4)]
    assert errors[0].message == "unknown pipeline 'toy/clasify' (did you mean 'toy/classify'?)"


@pytest.mark.parametrize(
    "text",
    [
        "name: !!python/object/apply:os.system ['echo owned']\n",
        "name: !!python/name:os.system\n",
        "!!python/object:pipelines.core.recipe.Recipe {name: x}\n",
    ],
)
def test_a_recipe_cannot_run_code(tmp_path, text):
    errors = validate_recipe_file(write(tmp_path, text))
    assert len(errors) == 1 and errors[0].line == 1
    assert "tags are not allowed: recipes are plain data" in errors[0].message


def test_repeated_keys_and_non_mappings_are_refused(tmp_path):
    errors = validate_recipe_file(write(tmp_path, GOOD + "seed: 2\n"))
    assert [(e.line, e.message) for e in errors] == [
        (14, "invalid YAML: key 'seed' appears twice in one mapping")
    ]
    errors = validate_recipe_file(write(tmp_path, "- a\n- b\n", "list.yaml"))
    assert errors[0].message == "a recipe must be a YAML mapping of keys to values"


def test_overrides_parse_values_index_lists_and_create_sections():
    data, _ = parse_yaml(GOOD)
    result = apply_overrides(
        data,
        [
            "stages.0.train.lr=1e-4",
            "data.fraction=0.1",
            "stages.0.train.warmup_ratio=0.1",
            "stages.0.adapter.targets=[q_proj, v_proj]",
            "data.options.anything=yes",
            "evaluation.headline=null",
        ],
        Recipe,
    )
    assert result["stages"][0]["train"] == {"epochs": 1, "batch_size": 4, "lr": 1e-4, "warmup_ratio": 0.1}
    assert result["stages"][0]["adapter"]["targets"] == ["q_proj", "v_proj"]
    assert result["data"] == {
        "dataset": "toy",
        "task": "binary",
        "fraction": 0.1,
        "options": {"anything": True},
    }
    assert result["evaluation"]["headline"] is None
    assert data["data"]["fraction"] == 0.5  # the input is not changed


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.0.train.lrr=1", "stages.0.train.lrr: unknown key 'lrr' (did you mean 'lr'?)"),
        ("stages.3.train.lr=1", "stages.3: index 3 is out of range: the list has 1 items"),
        ("stages.first.name=x", "stages.first: 'stages' is a list: use an index"),
        ("dat.fraction=1", "dat: unknown key 'dat' (did you mean 'data'?)"),
        ("seed.value=1", "seed.value: cannot set 'value': 'seed' is a value, not a section"),
        ("seed", "seed: an override must look like KEY=VALUE"),
    ],
)
def test_override_errors_name_the_key(override, message):
    with pytest.raises(RecipeValidationError) as error:
        apply_overrides(parse_yaml(GOOD)[0], [override], Recipe)
    assert str(error.value.errors[0]) == message


def test_overrides_are_applied_before_validation(tmp_path):
    path = write(tmp_path, GOOD)
    assert load_recipe(path, ["stages.0.adapter.r=16"]).stages[0].adapter.r == 16
    errors = validate_recipe_file(path, ["stages.0.adapter.rr=16"])
    assert [(e.path, e.message, e.suggestion) for e in errors] == [
        ("stages.0.adapter.rr", "override: unknown key 'rr'", "r")
    ]


def test_resolved_recipe_round_trips_through_yaml(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    text = recipe_to_yaml(recipe)
    again = Recipe.model_validate(yaml.safe_load(text))
    assert again.model_dump() == recipe.model_dump()
    assert list(yaml.safe_load(text)["stages"][0]["adapter"])[0] == "method"
    assert load_recipe(write(tmp_path, text, "again.yaml")).model_dump() == recipe.model_dump()


def test_shipped_recipes_are_found_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe_module, "recipes_dir", lambda: tmp_path)
    (tmp_path / "toy").mkdir()
    write(tmp_path, GOOD, "toy/toy_recipe.yaml")
    assert list_recipes() == ["toy/toy_recipe"] and list_recipes("imaging/*") == []
    assert find_recipe("toy/toy_recipe") == tmp_path / "toy" / "toy_recipe.yaml"
    assert load_recipe("toy/toy_recipe.yaml").name == "toy_recipe"
    with pytest.raises(FileNotFoundError, match="did you mean 'toy/toy_recipe'\\?"):
        find_recipe("toy/toy_recpe")
