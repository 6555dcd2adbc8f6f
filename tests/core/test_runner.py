"""Runner: run directory contents, seeding, resume, rank-0 writing and the demo index."""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml

from pipelines.core import recipe as recipe_module
from pipelines.core import registry, runner
from pipelines.core.evaluation import MetricResult, RunResult
from pipelines.core.recipe import load_recipe
from pipelines.core.runner import RunError, run_demo, run_recipe, write_demo_index

RECIPE = """\
name: toy_run
pipeline: toy/run
backbone: {name: tiny}
data: {dataset: toy, task: binary}
stages:
  - {name: task, objective: classification, adapter: {method: lora, r: 2, targets: [fc]}}
evaluation: {metrics: [auroc], bootstrap: 0}
compare: [linear_probe]
"""


class FakePipeline:
    """Returns a fixed result and records how it was called; writes a checkpoint as the loop would."""

    DATASETS = ("toy",)
    calls: list = []
    fail_before_checkpoint = False  # a failed attempt: the run folder exists, no checkpoint in it

    def __init__(self, recipe):
        self.recipe = recipe

    @classmethod
    def from_recipe(cls, recipe):
        return cls(recipe)

    def run(self, run_dir, resume=False):
        FakePipeline.calls.append({"run_dir": run_dir, "resume": resume, "draw": random.random()})
        if FakePipeline.fail_before_checkpoint:
            raise ValueError("the data folder is missing")
        if run_dir.exists():  # rank 0 only, as the training loop
            checkpoint = run_dir / "stages" / "task" / "checkpoints" / "last"
            checkpoint.mkdir(parents=True, exist_ok=True)
            (checkpoint / "trainer_state.json").write_text(json.dumps({"progress": {"step": 3}}))
        return RunResult(
            name=self.recipe.name,
            pipeline=self.recipe.pipeline,
            task="binary",
            headline_metric="auroc",
            primary_model="lora",
            results={
                "lora": {"auroc": MetricResult(0.9, 0.85, 0.95)},
                "linear_probe": {"auroc": MetricResult(0.8, 0.7, 0.88)},
            },
            parameters={"lora": {"trainable": 10, "total": 1000, "fraction": 0.01}},
            info={"cost": {"wall_time_s": 42.0}},
        )


@pytest.fixture(autouse=True)
def fake_pipeline(monkeypatch):
    monkeypatch.setattr(registry, "_PIPELINES", {})
    monkeypatch.setattr(registry, "_IMPORT_ERRORS", {})
    monkeypatch.setattr(registry, "_DOMAINS", {})
    registry.register_pipeline("toy/run", FakePipeline)
    FakePipeline.calls = []
    FakePipeline.fail_before_checkpoint = False


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "toy_run.yaml"
    path.write_text(RECIPE)
    return path


def test_run_dir_holds_resolved_recipe_and_report(recipe_file, tmp_path):
    run_dir = run_recipe(recipe_file, ["seed=3"], output_dir=tmp_path / "runs")
    assert run_dir.parent == tmp_path / "runs" / "toy_run"
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    expected = load_recipe(recipe_file, ["seed=3", f"output_dir={tmp_path / 'runs'}"]).model_dump(mode="json")
    assert saved == expected
    report = json.loads((run_dir / "report.json").read_text())
    assert report["headline"] == {
        "metric": "auroc", "model": "lora", "value": 0.9, "low": 0.85, "high": 0.95, "greater_is_better": True
    }  # fmt: skip
    assert (run_dir / "report.md").is_file()
    assert FakePipeline.calls[0]["run_dir"] == run_dir and FakePipeline.calls[0]["resume"] is False


def test_runs_are_seeded_and_get_their_own_directories(recipe_file, tmp_path):
    first = run_recipe(recipe_file, output_dir=tmp_path)
    second = run_recipe(recipe_file, output_dir=tmp_path)
    assert first != second
    assert FakePipeline.calls[0]["draw"] == FakePipeline.calls[1]["draw"]


def test_resume_reuses_the_newest_run(recipe_file, tmp_path):
    run_dir = run_recipe(recipe_file, output_dir=tmp_path)
    assert run_recipe(recipe_file, ["stages.0.train.epochs=2"], resume=True, output_dir=tmp_path) == run_dir
    assert FakePipeline.calls[-1]["resume"] is True
    assert yaml.safe_load((run_dir / "recipe.previous.yaml").read_text())["stages"][0]["train"]["epochs"] == 1
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["stages"][0]["train"]["epochs"] == 2


def test_resume_takes_the_newest_run_with_a_checkpoint_and_says_which(recipe_file, tmp_path, caplog):
    root = tmp_path / "toy_run"
    with pytest.raises(RunError) as error:
        run_recipe(recipe_file, resume=True, output_dir=tmp_path)
    assert str(error.value) == f"no run of toy_run in {root} has a checkpoint to resume; run without --resume"
    good = run_recipe(recipe_file, output_dir=tmp_path)
    FakePipeline.fail_before_checkpoint = True
    for _ in range(2):  # two failed attempts after it, each with a newer run folder and no checkpoint
        with pytest.raises(ValueError, match="the data folder is missing"):
            run_recipe(recipe_file, output_dir=tmp_path)
    failed = sorted(p for p in root.iterdir() if p != good)
    assert len(failed) == 2 and all(p.name > good.name for p in failed)
    FakePipeline.fail_before_checkpoint = False
    with caplog.at_level(logging.INFO, logger="pipelines.core.run_folder"):
        assert run_recipe(recipe_file, resume=True, output_dir=tmp_path) == good
    assert FakePipeline.calls[-1] == {"run_dir": good, "resume": True, "draw": FakePipeline.calls[-1]["draw"]}
    checkpoint = good / "stages" / "task" / "checkpoints" / "last"
    assert (
        f"resuming {good} from its checkpoint {checkpoint} (step 3); passed over 2 newer run(s) without one"
        in [record.getMessage() for record in caplog.records]
    )
    for folder in failed:
        shutil.rmtree(folder / "stages", ignore_errors=True)
    shutil.rmtree(good / "stages")
    with pytest.raises(RunError, match="no run of toy_run in .* has a checkpoint to resume"):
        run_recipe(recipe_file, resume=True, output_dir=tmp_path)


def files_of(folder):
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["run.json", "run before run.json"])
def test_resume_with_another_recipe_of_the_same_name_is_refused_and_changes_nothing(tmp_path, legacy):
    first = tmp_path / "first.yaml"
    first.write_text(RECIPE)
    run_dir = run_recipe(first, output_dir=tmp_path / "runs")
    saved = json.loads((run_dir / "run.json").read_text())
    assert saved["name"] == "toy_run" and len(saved["recipe_sha256"]) == 64
    if legacy:
        (run_dir / "run.json").unlink()
    other = tmp_path / "other.yaml"
    other.write_text(RECIPE.replace("r: 2", "r: 4").replace("bootstrap: 0", "bootstrap: 10"))
    before = files_of(run_dir)
    with pytest.raises(RunError) as error:
        run_recipe(other, resume=True, output_dir=tmp_path / "runs")
    assert str(error.value) == (
        f"{other} is not the recipe {run_dir} was started with (it differs in stages.0.adapter.r, "
        "evaluation.bootstrap); resume it with that recipe (only output_dir, description and each stage's "
        "epochs, max_steps, checkpoint_every, eval_every, log_every, num_workers, tensorboard may change) "
        "or run without --resume"
    )
    assert files_of(run_dir) == before
    assert len(FakePipeline.calls) == 1
    # the fields a resume may change do not count, and a copy of the same recipe under another file does
    allowed = ["stages.0.train.max_steps=9", "stages.0.train.checkpoint_every=3", "description=longer"]
    twin = tmp_path / "twin.yaml"
    twin.write_text(RECIPE)
    assert run_recipe(twin, allowed, resume=True, output_dir=tmp_path / "runs") == run_dir
    assert json.loads((run_dir / "run.json").read_text())["recipe_sha256"] == saved["recipe_sha256"]
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["stages"][0]["train"]["max_steps"] == 9


def test_recipe_hash_leaves_out_only_the_resumable_fields():
    from pipelines.core.run_folder import RESUMABLE_FIELDS, recipe_hash

    base = load_recipe_data()
    train = ["max_steps=7", "epochs=3", "eval_every=2", "log_every=1", "num_workers=2", "tensorboard=true",
             "checkpoint_every=5"]  # fmt: skip
    same = load_recipe_data(["output_dir=else", "description=x", *(f"stages.0.train.{t}" for t in train)])
    assert recipe_hash(same) == recipe_hash(base)
    assert len(RESUMABLE_FIELDS) == 9
    for change in ["seed=1", "stages.0.train.lr=0.5", "stages.0.train.batch_size=2", "data.fraction=0.5",
                   "stages.0.train.precision=fp32", "compare=[]", "stages.0.adapter.alpha=4"]:  # fmt: skip
        assert recipe_hash(load_recipe_data([change])) != recipe_hash(base), change


def load_recipe_data(overrides=()):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "toy_run.yaml"
        path.write_text(RECIPE)
        return load_recipe(path, list(overrides)).model_dump(mode="json")


def test_under_torchrun_every_rank_gets_rank_0s_refusal(recipe_file, tmp_path, monkeypatch):
    from pipelines.core import distributed

    monkeypatch.setattr(distributed, "setup_distributed", lambda: None)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    monkeypatch.setattr(distributed, "broadcast_from_main", lambda obj: ("error", "no run of toy_run ..."))
    with pytest.raises(RunError, match=r"^no run of toy_run \.\.\.$"):
        run_recipe(recipe_file, resume=True, output_dir=tmp_path)


def test_only_the_main_process_writes(recipe_file, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_is_main_process", lambda: False)
    run_dir = run_recipe(recipe_file, output_dir=tmp_path)
    assert FakePipeline.calls[0]["run_dir"] == run_dir
    assert not run_dir.exists()


def _report(folder, name, pipeline, metric, values, fraction, seconds):
    folder.mkdir(parents=True)
    report = {
        "name": name,
        "pipeline": pipeline,
        "headline": {"metric": metric, "model": "lora", "value": values["lora"], "low": 0.1, "high": 0.2},
        "results": {model: {metric: {"value": v, "low": None, "high": None}} for model, v in values.items()},
        "parameters": {"lora": {"trainable": 1, "total": 100, "fraction": fraction}},
        "cost": {"wall_time_s": seconds},
    }
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_demo_index_rows(tmp_path):
    protein = _report(
        tmp_path / "runs" / "gb1" / "t1",
        "gb1",
        "protein/regression",
        "mse",
        {"lora": 0.5, "linear_probe": 0.4, "full_finetune": 0.7},
        0.0123,
        300.0,
    )
    imaging = _report(
        tmp_path / "runs" / "pm" / "t2",
        "pm",
        "imaging/classification",
        "auroc",
        {"lora": 0.93, "linear_probe": 0.9},
        0.05,
        42.0,
    )
    index = write_demo_index([protein, imaging], tmp_path / "runs" / "demo" / "index.md", {"speech": "boom"})
    assert index.read_text().splitlines() == [
        "# peft-pipelines demo",
        "",
        "| domain | recipe | headline (95% CI) | against the best baseline | trainable | wall time "
        "| report |",
        "|---|---|---|---|---|---|---|",
        "| imaging | pm | auroc 0.930 [0.100, 0.200] (lora) | beat linear_probe (0.900) | 5% | 42 s "
        "| [report.md](../pm/t2/report.md) |",
        "| protein | gb1 | mse 0.500 [0.100, 0.200] (lora) | lost to linear_probe (0.400) | 1.23% | 5.0 min "
        "| [report.md](../gb1/t1/report.md) |",
        "",
        "Not run or failed:",
        "",
        "- speech: boom",
    ]


def test_run_demo_runs_present_recipes_and_reports_missing_ones(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    (recipes / "toy").mkdir(parents=True)
    (recipes / "toy" / "toy_run.yaml").write_text(textwrap.dedent(RECIPE))
    monkeypatch.setattr(recipe_module, "recipes_dir", lambda: recipes)
    monkeypatch.setattr(registry, "demo_recipes", lambda: {"toy": "toy/toy_run", "other": "other/absent"})
    index, failures = run_demo(output_dir=tmp_path / "runs")
    assert index == tmp_path / "runs" / "demo" / "index.md"
    assert list(failures) == ["other"] and "is not in this checkout" in failures["other"]
    assert (
        "| toy | toy_run | auroc 0.900 [0.850, 0.950] (lora) | beat linear_probe (0.800) |"
        in index.read_text()
    )
    with pytest.raises(ValueError, match="no demo for domain 'nope'; choose from toy, other"):
        run_demo(["nope"], output_dir=tmp_path)


def test_ctrl_c_in_a_demo_stops_the_demo_instead_of_moving_to_the_next_domain(tmp_path, monkeypatch):
    from pipelines.core.training import TrainingInterrupted

    recipes = tmp_path / "recipes"
    (recipes / "toy").mkdir(parents=True)
    (recipes / "toy" / "toy_run.yaml").write_text(RECIPE)
    monkeypatch.setattr(recipe_module, "recipes_dir", lambda: recipes)
    monkeypatch.setattr(registry, "demo_recipes", lambda: {"toy": "toy/toy_run", "again": "toy/toy_run"})

    def interrupted(self, run_dir, resume=False):
        FakePipeline.calls.append(run_dir)
        raise TrainingInterrupted("Training interrupted after step 1/4", 1, run_dir / "checkpoints", 4)

    monkeypatch.setattr(FakePipeline, "run", interrupted)
    with pytest.raises(TrainingInterrupted):
        run_demo(output_dir=tmp_path / "runs")
    assert len(FakePipeline.calls) == 1


def test_demo_index_compares_against_the_recipe_baselines_only():
    from pipelines.core.runner import _comparison

    row = lambda v: {"mcd": {"value": v, "low": None, "high": None}}  # noqa: E731
    report = {
        "headline": {"metric": "mcd", "model": "speaker", "value": 27.7, "greater_is_better": False},
        "results": {"speaker": row(27.7), "lora": row(28.1), "reference": row(10.4)},
    }
    assert _comparison(report, ["lora"]) == "beat lora (28.100)"
    assert _comparison(report) == "lost to reference (10.400)"  # no compare list: every other row
    sweep = {
        "headline": {"metric": "mcd", "model": "speaker@100%", "value": 27.7, "greater_is_better": False},
        "results": {"speaker@10%": row(27.0), "lora@10%": row(26.0), "speaker@100%": row(27.7),
                    "lora@100%": row(28.1)},
    }  # fmt: skip
    assert _comparison(sweep, ["lora"]) == "beat lora@100% (28.100)"  # the same fraction's baseline


def test_demo_index_gives_the_paired_difference_against_the_best_baseline(tmp_path):
    import numpy as np

    from pipelines.core.evaluation import evaluate, write_report

    labels = np.array([0, 1] * 40)
    noise = np.random.default_rng(0).normal(size=(3, 80))
    scores = {
        "lora": labels + noise[0],
        "linear_probe": labels + 2 * noise[1],
        "bitfit": labels + 3 * noise[2],
    }
    predictions = {k: (labels, 1 / (1 + np.exp(-v))) for k, v in scores.items()}
    results = {k: evaluate("binary", *v, ["auroc"], bootstrap=200) for k, v in predictions.items()}
    run = tmp_path / "runs" / "pm" / "t1"
    write_report(
        run, RunResult("pm", "imaging/classification", "binary", "auroc", "lora", results, predictions)
    )
    row = write_demo_index([run], tmp_path / "index.md").read_text().splitlines()[-1]
    paired = json.loads((run / "report.json").read_text())["comparisons"]["results"]["linear_probe"]["auroc"]
    expected = f"minus linear_probe {paired['difference']:+.3f} [{paired['low']:+.3f}, {paired['high']:+.3f}]"
    assert f"| {expected}, p = {paired['p_holm']:.3g} (Holm) |" in row
