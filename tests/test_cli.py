"""The peft-pipelines command, called in-process through main([...])."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import pipelines
from pipelines import cli
from pipelines.core import recipe as recipe_module
from pipelines.core import registry, runner

RECIPE = """\
name: toy_cli
pipeline: toy/cli
description: A toy recipe for the CLI tests.
backbone: {name: tiny}
data: {dataset: toy, task: binary}
stages:
  - {name: task, objective: classification, adapter: {method: lora, r: 2, targets: [fc]}}
"""


class ToyPipeline:
    """Does nothing, quickly."""

    DATASETS = ("toy",)


@pytest.fixture(autouse=True)
def toy_world(tmp_path, monkeypatch):
    """A registry with one toy pipeline and a recipes folder with one toy recipe."""
    monkeypatch.setattr(registry, "_PIPELINES", {})
    monkeypatch.setattr(registry, "_IMPORT_ERRORS", {})
    monkeypatch.setattr(registry, "_DOMAINS", {})
    registry.register_pipeline("toy/cli", ToyPipeline)
    recipes = tmp_path / "recipes"
    (recipes / "toy").mkdir(parents=True)
    (recipes / "toy" / "toy_cli.yaml").write_text(RECIPE)
    monkeypatch.setattr(recipe_module, "recipes_dir", lambda: recipes)
    monkeypatch.chdir(tmp_path)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"peft-pipelines {pipelines.__version__}\n"


@pytest.mark.parametrize("command", ["run", "validate", "list", "evaluate", "export", "cp", "demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: peft-pipelines {command}")


def test_validate_prints_every_error_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.replace("{name: tiny}", "{name: tiny, optoins: {}}").replace("r: 2", "rank: 2"))
    assert cli.main(["validate", "toy/toy_cli", str(bad)]) == 2
    assert capsys.readouterr().out.splitlines() == [
        "toy/toy_cli: ok",
        f"{bad}: 2 errors",
        f"  {bad}:4: backbone.optoins: unknown key 'optoins' (did you mean 'options'?)",
        f"  {bad}:7: stages.0.adapter.rank: unknown key 'rank' (valid keys: r, alpha, dropout, targets, "
        "use_dora, use_rslora, init, method)",
    ]
    assert cli.main(["validate", "toy/toy_cli"]) == 0


def test_validate_with_overrides(capsys):
    assert cli.main(["validate", "toy/toy_cli", "--set", "data.fraction=2"]) == 2
    assert "data.fraction: Input should be less than or equal to 1" in capsys.readouterr().out


def test_list_shows_pipelines_and_recipes(capsys):
    assert cli.main(["list", "pipelines"]) == 0
    assert capsys.readouterr().out.split() == ["toy/cli", "Does", "nothing,", "quickly."]
    assert cli.main(["list", "recipes", "toy/*"]) == 0
    assert capsys.readouterr().out.split() == [
        "toy/toy_cli",
        "A",
        "toy",
        "recipe",
        "for",
        "the",
        "CLI",
        "tests.",
    ]
    assert cli.main(["list", "imaging/*"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pipelines:\n  (none)\nrecipes:\n  (none)\ndatasets:\n")


def test_cp_copies_a_shipped_recipe_and_refuses_to_overwrite(tmp_path, capsys):
    assert cli.main(["cp", "toy/toy_cli"]) == 0
    assert (tmp_path / "toy_cli.yaml").read_text() == RECIPE
    capsys.readouterr()
    assert cli.main(["cp", "toy/toy_cli"]) == 1
    assert capsys.readouterr().err == (
        f"peft-pipelines: error: {tmp_path / 'toy_cli.yaml'} exists; pass --force to overwrite it "
        "or choose another destination\n"
    )
    assert cli.main(["cp", "toy/toy_cli", "--force"]) == 0


COMMENTED = """\
# A shipped recipe with comments, which a copy keeps.
name: toy_cli   # the run folder's name
pipeline: toy/cli
description: "name: is not this line"
backbone: {name: tiny}
data: {dataset: toy, task: binary}
stages:
  - {name: task, objective: classification, adapter: {method: lora, r: 2, targets: [fc]}}
output_dir: results
"""


def test_cp_names_the_copy_after_its_file_and_keeps_the_rest(tmp_path, capsys):
    (tmp_path / "recipes" / "toy" / "toy_cli.yaml").write_text(COMMENTED)
    assert cli.main(["cp", "toy/toy_cli", "edits/my-lr.sweep.yaml"]) == 0
    copy = tmp_path / "edits" / "my-lr.sweep.yaml"
    assert copy.read_text() == COMMENTED.replace("name: toy_cli   #", "name: my-lr.sweep   #")
    assert capsys.readouterr().out == (
        f"copied {tmp_path / 'recipes' / 'toy' / 'toy_cli.yaml'} to {Path('edits/my-lr.sweep.yaml')} with "
        "name: my-lr.sweep (was toy_cli), so its runs go to results/my-lr.sweep/; edit it, then "
        "`peft-pipelines run edits/my-lr.sweep.yaml`\n"
    )
    assert recipe_module.load_recipe(copy).name == "my-lr.sweep"
    assert cli.main(["cp", "toy/toy_cli", "my copy.yaml"]) == 1
    assert capsys.readouterr().err == (
        "peft-pipelines: error: my copy.yaml: the copy's name comes from its file name, and 'my copy' is not "
        "a recipe name (letters, digits, _ . -, starting with a letter or digit); choose another file name\n"
    )
    assert not (tmp_path / "my copy.yaml").exists()


@pytest.mark.parametrize(
    ("argv", "options"),
    [
        (["run", "--resume", "toy/toy_cli", "seed=1", "data.fraction=0.5"], (True, None)),
        (["run", "toy/toy_cli", "--output-dir", "d", "seed=1", "data.fraction=0.5"], (False, "d")),
        (["run", "toy/toy_cli", "seed=1", "--resume", "data.fraction=0.5", "--output-dir=d"], (True, "d")),
        (["run", "toy/toy_cli", "seed=1", "--debug", "data.fraction=0.5"], (False, None)),
    ],
)
def test_run_takes_its_options_anywhere(monkeypatch, argv, options):
    seen = []
    monkeypatch.setattr(runner, "run_recipe", lambda *args, **kwargs: seen.append((args, kwargs)) or "d")
    monkeypatch.setattr(runner, "summary_line", str)
    assert cli.main(argv) == 0
    recipe, overrides = seen[0][0]
    assert (recipe, overrides) == ("toy/toy_cli", ["seed=1", "data.fraction=0.5"])
    assert seen[0][1] == {"resume": options[0], "output_dir": options[1]}


def test_run_still_refuses_unknown_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "toy/toy_cli", "seed=1", "--bogus", "other.yaml"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith("error: unrecognized arguments: --bogus other.yaml\n")


def test_errors_are_one_line_unless_debug(capsys):
    assert cli.main(["run", "toy/toy_cl"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "peft-pipelines: error: recipe 'toy/toy_cl' is neither a file nor a shipped recipe; "
        "did you mean 'toy/toy_cli'? see `peft-pipelines list recipes`\n"
    )
    with pytest.raises(FileNotFoundError):
        cli.main(["run", "toy/toy_cl", "--debug"])


def test_invalid_recipe_in_run_exits_2_with_every_error(tmp_path, capsys):
    assert cli.main(["run", "toy/toy_cli", "seed=-1", "data.fraction=0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"peft-pipelines: error: recipe {tmp_path / 'recipes' / 'toy' / 'toy_cli.yaml'} is invalid:",
        "  seed: Input should be greater than or equal to 0",
        "  line 5: data.fraction: Input should be greater than 0",
    ]


def test_interrupt_exits_130_with_the_resume_command(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_recipe", interrupted)
    assert cli.main(["run", "toy/toy_cli"]) == 130
    assert capsys.readouterr().err == (
        "peft-pipelines: interrupted; continue from the last checkpoint with "
        "`peft-pipelines run toy/toy_cli --resume`\n"
    )
    assert cli.main(["run", "toy/toy_cli", "seed=3", "--output-dir", "elsewhere"]) == 130
    assert capsys.readouterr().err.endswith(
        "`peft-pipelines run toy/toy_cli seed=3 --resume --output-dir elsewhere`\n"
    )


def test_an_interrupt_before_any_checkpoint_says_to_start_again(monkeypatch, capsys):
    from pipelines.core.training import TrainingInterrupted

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted("Training interrupted after step 0/5; ...", 0, None, 5)

    monkeypatch.setattr(runner, "run_recipe", interrupted)
    assert cli.main(["run", "toy/toy_cli", "description=a b"]) == 130
    assert capsys.readouterr().err == (
        "peft-pipelines: interrupted after step 0/5; no checkpoint was written, so start again with "
        "`peft-pipelines run toy/toy_cli 'description=a b'`\n"
    )


def test_evaluate_a_predictions_csv(tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, 60)
    y_score = np.clip(y_true * 0.3 + rng.random(60) * 0.7, 0, 1)
    table = tmp_path / "predictions.csv"
    table.write_text("y_true,y_score\n" + "".join(f"{t},{s}\n" for t, s in zip(y_true, y_score, strict=True)))
    out = tmp_path / "report.json"
    argv = [
        "evaluate",
        str(table),
        "--task",
        "binary",
        "--metrics",
        "auroc",
        "--bootstrap",
        "50",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = roc_auc_score(y_true, y_score)
    assert lines[1].split()[:2] == ["auroc", f"{expected:.4f}"]
    saved = json.loads(out.read_text())
    assert saved["results"]["auroc"]["value"] == pytest.approx(expected, abs=1e-12)
    assert saved["results"]["auroc"]["low"] <= expected <= saved["results"]["auroc"]["high"]
    assert (saved["task"], saved["n"], saved["bootstrap"]) == ("binary", 60, 50)


def test_evaluate_reads_npz_and_names_missing_arrays(tmp_path, capsys):
    path = tmp_path / "predictions.npz"
    np.savez(path, y_true=np.array([0.0, 1.0, 2.0, 3.0]), y_score=np.array([0.1, 0.9, 2.2, 2.8]))
    assert (
        cli.main(["evaluate", str(path), "--task", "regression", "--metrics", "spearman", "--bootstrap", "0"])
        == 0
    )
    assert capsys.readouterr().out.splitlines()[1].split() == ["spearman", "1.0000"]
    np.savez(path, labels=np.array([0, 1]))
    assert cli.main(["evaluate", str(path), "--task", "binary"]) == 1
    assert "has no array 'y_score'; save y_true and y_score" in capsys.readouterr().err


def _native_adapter(folder):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"format": "peft-pipelines", "name": folder.name}))
    (folder / "adapter_model.safetensors").write_bytes(b"tensors")


def test_export_copies_adapters_in_their_saved_format(tmp_path, capsys):
    _native_adapter(tmp_path / "run" / "adapters" / "task")
    _native_adapter(tmp_path / "run" / "adapters" / "domain")
    assert cli.main(["export", "run", "--out", "exported", "--adapter", "task"]) == 0
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["task"]
    assert (tmp_path / "exported" / "task" / "adapter_model.safetensors").read_bytes() == b"tensors"
    assert cli.main(["export", "run", "--out", "exported", "--adapter", "task"]) == 1
    assert "exists; choose another --out or pass --force" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "run" / "adapters")
    assert cli.main(["export", "run", "--out", "x"]) == 1
    assert capsys.readouterr().err == "peft-pipelines: error: no adapters in run/adapters\n"


def test_export_converts_real_adapters_and_skips_head_folders(tmp_path, capsys):
    from torch import nn

    from pipelines.core.peft import LoRA, add_adapter, save_adapter

    model = add_adapter(nn.Sequential(nn.Linear(4, 4)), LoRA(r=2, targets=["0"]), name="task")
    save_adapter(model, tmp_path / "run" / "adapters" / "task")
    (tmp_path / "run" / "adapters" / "classifier").mkdir()
    assert cli.main(["export", "run", "--format", "peft", "--out", "exported"]) == 0
    out = capsys.readouterr().out
    assert "classifier: skipped, not an adapter (no adapter_config.json)" in out
    config = (tmp_path / "exported" / "task" / "adapter_config.json").read_text()
    assert '"peft_type": "LORA"' in config


class _BadImages:
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise ValueError(f"images/{index}.png is not an image file; replace or remove it")


def test_an_error_in_a_dataloader_worker_is_the_workers_own_line():
    from torch.utils.data import DataLoader

    with pytest.raises(ValueError) as caught:
        next(iter(DataLoader(_BadImages(), num_workers=1)))
    assert str(caught.value).startswith("Caught ValueError in DataLoader worker process 0.")
    assert cli._one_line(caught.value) == "images/0.png is not an image file; replace or remove it"
