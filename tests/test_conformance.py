"""Every registered pipeline honours the generic recipe fields or refuses them at validate time, by path."""

from __future__ import annotations

import pytest

from pipelines.core.recipe import validate_recipe_file
from pipelines.core.registry import demo_recipes

# domain -> the generic low-data fields its demo recipe refuses (with the reason's first words)
REFUSED = {
    "imaging": {},
    "clinical": {},
    "protein": {"data.shots_per_class": "a regression task has no classes"},  # GB1 fitness is regression
    "speech": {
        "data.fraction": "speech/speaker_adaptation does not sample a fraction",
        "data.shots_per_class": "speech/speaker_adaptation has no classes",
    },
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
