"""`peft-pipelines run` on a tiny pipeline that really trains: Ctrl-C, NaN, a full disk, damaged and
missing checkpoints each end in one line and the documented exit code, never a traceback."""

from __future__ import annotations

import errno
import json
import shlex
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pipelines import cli
from pipelines.core import checkpoint_files, registry
from pipelines.core import recipe as recipe_module
from pipelines.core.evaluation import MetricResult, RunResult
from pipelines.core.training import train

RECIPE = """\
name: toy_train
pipeline: toy/train
backbone: {name: tiny}
data: {dataset: toy, task: regression}
stages:
  - name: task
    objective: regression
    adapter: {method: lora, r: 2, targets: [fc]}
    train: {max_steps: 6, batch_size: 4, lr: 0.05, checkpoint_every: 2, log_every: 1}
evaluation: {metrics: [mse], bootstrap: 0}
"""


class TrainingPipeline:
    """Trains a 4 -> 1 linear model for the recipe's first stage; `hook(call)` can disturb each loss."""

    DATASETS = ("toy",)
    hook = None

    def __init__(self, recipe):
        self.recipe = recipe

    @classmethod
    def from_recipe(cls, recipe):
        return cls(recipe)

    def run(self, run_dir, resume=False):
        torch.manual_seed(self.recipe.seed)
        model = nn.Linear(4, 1)
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
        data = TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]))
        calls = []

        def loss_fn(model, batch):
            calls.append(1)
            factor = TrainingPipeline.hook(len(calls)) if TrainingPipeline.hook else None
            loss = nn.functional.mse_loss(model(batch[0]).squeeze(-1), batch[1])
            return loss * factor if factor is not None else loss

        result = train(model, data, loss_fn, self.recipe.stages[0].train, run_dir=run_dir / "stages" / "task",
                       resume=resume, seed=self.recipe.seed, progress=False)  # fmt: skip
        return RunResult(
            name=self.recipe.name, pipeline=self.recipe.pipeline, task="regression", headline_metric="mse",
            primary_model="task", results={"task": {"mse": MetricResult(result.history[-1]["loss"], 0, 1)}},
            histories={"task": result.history},
        )  # fmt: skip


@pytest.fixture(autouse=True)
def training_world(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_PIPELINES", {})
    monkeypatch.setattr(registry, "_IMPORT_ERRORS", {})
    monkeypatch.setattr(registry, "_DOMAINS", {})
    registry.register_pipeline("toy/train", TrainingPipeline)
    recipes = tmp_path / "recipes"
    (recipes / "toy").mkdir(parents=True)
    (recipes / "toy" / "toy_train.yaml").write_text(RECIPE)
    monkeypatch.setattr(recipe_module, "recipes_dir", lambda: recipes)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(TrainingPipeline, "hook", None)


def only_run(root):
    (run_dir,) = [p for p in (root / "toy_train").iterdir()]
    return run_dir


def last_step(run_dir) -> int:
    rows = (run_dir / "stages" / "task" / "metrics.jsonl").read_text().splitlines()
    return json.loads(rows[-1])["step"]


def test_ctrl_c_names_the_checkpoint_and_the_resume_command_and_exits_130(tmp_path, capsys):
    def ctrl_c(call):
        if call == 5:  # in step 5: steps 1-4 are done
            # A real SIGINT; raise_signal runs its handler before returning, so the KeyboardInterrupt comes
            # from here and not from wherever the interpreter next checks (inside a __del__ it is ignored).
            signal.raise_signal(signal.SIGINT)

    TrainingPipeline.hook = ctrl_c
    assert cli.main(["run", "toy/toy_train", "--output-dir", "out dir", "stages.0.train.lr=0.05"]) == 130
    run_dir = only_run(tmp_path / "out dir")
    checkpoint = run_dir.relative_to(tmp_path) / "stages" / "task" / "checkpoints" / "last"
    command = "peft-pipelines run toy/toy_train stages.0.train.lr=0.05 --resume --output-dir 'out dir'"
    assert capsys.readouterr().err == (
        f"peft-pipelines: interrupted after step 4/6; checkpoint: {checkpoint}; continue with `{command}`\n"
    )
    assert (
        json.loads((run_dir / "stages/task/checkpoints/last/trainer_state.json").read_text())["progress"][
            "step"
        ]
        == 4
    )
    TrainingPipeline.hook = None
    assert cli.main(shlex.split(command)[1:]) == 0  # the printed command works as printed
    assert capsys.readouterr().err == ""
    assert only_run(tmp_path / "out dir") == run_dir and last_step(run_dir) == 6


def test_a_nan_loss_is_one_line_and_exit_1(capsys):
    TrainingPipeline.hook = lambda call: float("nan") if call == 3 else None
    assert cli.main(["run", "toy/toy_train"]) == 1
    err = capsys.readouterr().err
    checkpoint = only_run(cli.Path("runs")) / "stages" / "task" / "checkpoints" / "last"
    assert err.startswith(
        "peft-pipelines: error: Training stopped: the loss at step 3 is nan; the last good checkpoint is at "
        f"{checkpoint} (step 2). Lower the learning rate"
    )
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_full_disk_is_one_line_and_leaves_no_temporary_folder(monkeypatch, capsys):
    def full(tensors, path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(checkpoint_files, "save_file", full)
    assert cli.main(["run", "toy/toy_train"]) == 1
    checkpoints = only_run(cli.Path("runs")) / "stages" / "task" / "checkpoints"
    assert capsys.readouterr().err == (
        f"peft-pipelines: error: disk full while writing the checkpoint to {checkpoints / 'last'}: "
        "free space and resume\n"
    )
    assert list(checkpoints.iterdir()) == []


def test_resume_without_any_checkpoint_refuses_in_one_line(capsys):
    def broken(call):
        raise ValueError("the toy data is unreadable")

    TrainingPipeline.hook = broken
    assert cli.main(["run", "toy/toy_train"]) == 1  # a failed attempt: a run folder, no checkpoint
    TrainingPipeline.hook = None
    capsys.readouterr()
    assert cli.main(["run", "toy/toy_train", "--resume"]) == 1
    assert capsys.readouterr().err == (
        "peft-pipelines: error: no run of toy_train in runs/toy_train has a checkpoint to resume; "
        "run without --resume\n"
    )


def test_resume_with_every_checkpoint_damaged_names_the_file_in_one_line(capsys):
    assert cli.main(["run", "toy/toy_train"]) == 0
    checkpoints = only_run(cli.Path("runs")) / "stages" / "task" / "checkpoints"
    for name in ("last", "previous"):
        (checkpoints / name / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    capsys.readouterr()
    assert cli.main(["run", "toy/toy_train", "--resume"]) == 1
    err = capsys.readouterr().err
    damaged = checkpoints / "last" / "model.safetensors"
    assert err.startswith(f"peft-pipelines: error: checkpoint file {damaged} (truncated or corrupt: ")
    assert err.endswith("are damaged; run without --resume to start fresh\n") and err.count("\n") == 1
