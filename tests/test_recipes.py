"""Every shipped recipe under recipes/ loads, validates (pipeline checks included) and round-trips."""

from __future__ import annotations

import pytest
import yaml

from pipelines.core.recipe import Recipe, find_recipe, list_recipes, load_recipe, recipe_to_yaml, recipes_dir
from pipelines.core.registry import demo_recipes, domain_modules, import_domains


def _skip_if_domain_dependency_missing(name: str) -> None:
    """A domain whose third-party library is absent cannot be checked here; say which library."""
    prefix = name.split("/", 1)[0]
    error = import_domains().get(prefix)
    missing = getattr(error, "name", "") or ""
    if error is not None and not missing.startswith("pipelines"):
        pytest.skip(f"{domain_modules()[prefix][0]} needs {missing or error}, which is not installed")


def test_recipes_are_in_domain_folders():
    stray = list(recipes_dir().glob("*.yaml")) if recipes_dir().is_dir() else []
    assert stray == [], "recipes live in recipes/<domain>/"
    assert {name.split("/")[0] for name in list_recipes()} <= set(domain_modules())


@pytest.mark.parametrize("name", list_recipes())
def test_shipped_recipe_is_valid(name):
    _skip_if_domain_dependency_missing(name)
    recipe = load_recipe(name)
    assert recipe.name == name.split("/")[1], "a recipe's name equals its file name (runs/<name>/)"
    assert recipe.pipeline.split("/")[0] == name.split("/")[0], "a recipe uses its own domain's pipeline"
    assert recipe.description, "a shipped recipe says what it does"
    again = Recipe.model_validate(yaml.safe_load(recipe_to_yaml(recipe)))
    assert again.model_dump() == recipe.model_dump()


def test_every_domain_declares_a_shipped_demo_recipe():
    demos = demo_recipes()
    assert sorted(demos) == sorted(domain_modules())
    for domain, name in demos.items():
        assert name.startswith(f"{domain}/") and not name.endswith(".yaml")
        assert find_recipe(name) == recipes_dir() / f"{name}.yaml"
