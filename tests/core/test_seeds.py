"""`seeds: [...]` repeats the whole experiment; the summary against scikit-learn and a loop in the test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipelines.core import registry
from pipelines.core.evaluation import RunResult, evaluate
from pipelines.core.runner import run_recipe

RECIPE = """\
name: toy_seeds
pipeline: toy/seeds
backbone: {name: tiny}
data: {dataset: toy, task: binary}
stages:
  - {name: task, objective: classification, adapter: {method: lora, r: 2, targets: [fc]}}
evaluation: {metrics: [auroc], bootstrap: 200}
compare: [linear_probe]
seeds: [0, 1, 2]
"""
LABELS = np.array([0, 1] * 30)


def _scores(seed: int, strength: float) -> np.ndarray:
    return 1 / (1 + np.exp(-(strength * (LABELS - 0.5) + np.random.default_rng(seed).normal(size=60))))


class SeededPipeline:
    """The adapter separates the classes better than the probe; both depend on the recipe's seed."""

    DATASETS = ("toy",)

    def __init__(self, recipe):
        self.recipe = recipe

    @classmethod
    def from_recipe(cls, recipe):
        return cls(recipe)

    def run(self, run_dir, resume=False):
        seed = self.recipe.seed
        predictions = {
            "lora": (LABELS, _scores(seed, 2.0)),
            "linear_probe": (LABELS, _scores(seed + 10, 1.0)),
        }
        results = {
            k: evaluate("binary", *v, ["auroc"], bootstrap=200, seed=seed) for k, v in predictions.items()
        }
        recipe = self.recipe
        return RunResult(recipe.name, recipe.pipeline, "binary", "auroc", "lora", results, predictions)


@pytest.fixture(autouse=True)
def seeded_pipeline(monkeypatch):
    monkeypatch.setattr(registry, "_PIPELINES", {})
    monkeypatch.setattr(registry, "_DOMAINS", {})
    registry.register_pipeline("toy/seeds", SeededPipeline)


def test_seeds_repeat_the_run_and_summarise_each_model(tmp_path):
    (tmp_path / "toy_seeds.yaml").write_text(RECIPE)
    run_dir = run_recipe(tmp_path / "toy_seeds.yaml", output_dir=tmp_path / "runs")
    per_seed = {s: json.loads((run_dir / f"seed-{s}" / "report.json").read_text()) for s in (0, 1, 2)}
    assert {s: r["headline"]["value"] for s, r in per_seed.items()} == pytest.approx(
        {s: roc_auc_score(LABELS, _scores(s, 2.0)) for s in (0, 1, 2)}
    )
    report = json.loads((run_dir / "report.json").read_text())
    lora = [roc_auc_score(LABELS, _scores(s, 2.0)) for s in (0, 1, 2)]
    probe = [roc_auc_score(LABELS, _scores(s + 10, 1.0)) for s in (0, 1, 2)]
    assert report["results"]["lora"]["auroc"]["value"] == pytest.approx(np.mean(lora))
    summary = report["extra"]["seeds"]
    assert summary["per_model"]["lora"]["auroc"]["sd"] == pytest.approx(np.std(lora, ddof=1))
    # pooled interval: the same resamples (numpy Generator(seed 0)) for every seed, seed-mean per resample
    indices = np.random.default_rng(0).integers(0, 60, size=(200, 60))
    pooled = [np.mean([roc_auc_score(LABELS[i], _scores(s, 2.0)[i]) for s in (0, 1, 2)]) for i in indices]
    expected = np.percentile(pooled, [2.5, 97.5])
    assert [report["results"]["lora"]["auroc"][k] for k in ("low", "high")] == pytest.approx(expected)
    wins = summary["wins"]["linear_probe"]
    assert wins["won"] == sum(a > b for a, b in zip(lora, probe, strict=True)) and wins["of"] == 3
    assert wins["difference"] == pytest.approx(np.mean(lora) - np.mean(probe))
    assert wins["low"] < wins["difference"] < wins["high"]
    assert "was ahead on" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize(
    ("line", "message"),
    [("seeds: [0]", "at least two different"), ("seeds: [1, 1]", "at least two different")],
)
def test_bad_seed_lists_are_refused(tmp_path, line, message):
    from pipelines.core.recipe import validate_recipe_file

    (tmp_path / "toy_seeds.yaml").write_text(RECIPE.replace("seeds: [0, 1, 2]", line))
    errors = validate_recipe_file(tmp_path / "toy_seeds.yaml")
    assert [e.path for e in errors] == ["seeds"] and message in errors[0].message


def test_seed_beside_seeds_is_refused(tmp_path):
    from pipelines.core.recipe import validate_recipe_file

    (tmp_path / "toy_seeds.yaml").write_text(RECIPE + "seed: 4\n")
    errors = validate_recipe_file(tmp_path / "toy_seeds.yaml")
    assert [e.path for e in errors] == ["seed"] and "each repeat sets the seed" in errors[0].message


def test_a_pooled_difference_without_kept_predictions_says_so_instead_of_nan():
    from pipelines.core.experiment.seeds import _notes

    wins = {
        "ssf@1%": {"metric": "auroc", "won": 3, "of": 3, "difference": 0.0794, "low": math.nan,
                   "high": math.nan, "p_value": math.nan},
        "ssf@100%": {"metric": "auroc", "won": 3, "of": 3, "difference": 0.0158, "low": 0.0105,
                     "high": 0.0210, "p_value": 0.000999},
    }  # fmt: skip
    notes = _notes([0, 1, 2], "lora@100%", wins)[1:]
    assert notes == [
        "lora@100% minus ssf@1%: auroc +0.079 seed-mean; no pooled interval: the seeds' test predictions of "
        "both are not kept; lora@100% was ahead on 3 of 3 seeds.",
        "lora@100% minus ssf@100%: auroc +0.016 [+0.011, +0.021] (seed-mean, pooled paired bootstrap, "
        "p < 0.001); lora@100% was ahead on 3 of 3 seeds.",
    ]


def test_a_sweeps_pairs_at_its_smaller_fractions_are_kept_for_every_seed(tmp_path, monkeypatch):
    """Each seed's `extra.comparisons_by_fraction` moves under `extra.seeds`, keyed by seed (the first
    seed's alone, at the top level, would read as the repeated run's)."""
    run = SeededPipeline.run

    def with_pairs(self, run_dir, resume=False):
        result = run(self, run_dir, resume)
        result.info = {
            "extra": {"comparisons_by_fraction": {"10%": {"model": "lora", "seed": self.recipe.seed}}}
        }
        return result

    monkeypatch.setattr(SeededPipeline, "run", with_pairs)
    (tmp_path / "toy_seeds.yaml").write_text(RECIPE)
    run_dir = run_recipe(str(tmp_path / "toy_seeds.yaml"), output_dir=tmp_path / "runs")
    extra = json.loads((run_dir / "report.json").read_text())["extra"]
    assert "comparisons_by_fraction" not in extra
    assert extra["seeds"]["comparisons_by_fraction"] == {
        str(seed): {"10%": {"model": "lora", "seed": seed}} for seed in (0, 1, 2)
    }
