"""Tests for the training loop: tiny models on the CPU, each a fraction of a second."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from pipelines.core.checkpoint import trainable_names
from pipelines.core.training import (
    NonFiniteLossError,
    TrainConfig,
    TrainingInterrupted,
    build_optimizer,
    lr_factor,
    train,
)

torch.set_num_threads(1)
WEIGHTS = torch.tensor([1.0, -2.0, 0.5, 3.0])


def regression_data(n: int = 32) -> TensorDataset:
    generator = torch.Generator().manual_seed(123)
    x = torch.randn(n, 4, generator=generator)
    return TensorDataset(x, x @ WEIGHTS + 0.5)


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x).squeeze(-1), y)


def noisy_mse(model: nn.Module, batch) -> torch.Tensor:
    """Uses all three RNGs so that reproducibility covers torch, numpy and python random."""
    x, y = batch
    jitter = 1.0 + 0.01 * float(np.random.rand()) + 0.01 * random.random()
    return nn.functional.mse_loss(model(x).squeeze(-1), y) * jitter


def linear(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(4, 1)


def mlp(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 1))


def losses(result) -> list[float]:
    return [row["loss"] for row in result.history if "loss" in row]


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_loss_falls_on_a_learnable_problem():
    model = linear()
    config = TrainConfig(epochs=15, batch_size=8, lr=0.1, optimizer="sgd", momentum=0.5, clip_grad_norm=None)
    result = train(model, regression_data(), mse, config, val_data=regression_data(), progress=False)
    assert result.steps == 60 and result.epochs == 15.0
    assert losses(result)[-1] < 0.01 * losses(result)[0]
    assert result.best_metric < 0.01 and result.best_step == 60
    torch.testing.assert_close(model.weight.detach().squeeze(), WEIGHTS, atol=0.05, rtol=0)
    assert result.samples_per_second > 0 and result.peak_memory_bytes > 0 and result.precision == "fp32"


def test_two_runs_with_the_same_seed_are_identical():
    runs = []
    for _ in range(2):
        model = mlp()
        config = TrainConfig(epochs=2, batch_size=4, grad_accum=2, log_every=1, warmup_ratio=0.25)
        result = train(model, regression_data(), noisy_mse, config, seed=7, progress=False)
        runs.append((losses(result), params(model)))
    assert len(runs[0][0]) == 8
    assert runs[0][0] == runs[1][0]
    for name, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][name])
    model = mlp()
    other = train(model, regression_data(), noisy_mse, config, seed=8, progress=False)
    assert losses(other) != runs[0][0]


def test_accumulation_gives_the_same_first_update():
    updated = []
    for batch_size, accum in [(8, 1), (4, 2)]:
        model = linear()
        config = TrainConfig(max_steps=1, batch_size=batch_size, grad_accum=accum, clip_grad_norm=None)
        train(model, regression_data(), mse, config, progress=False)
        updated.append(params(model))
    for name in updated[0]:
        torch.testing.assert_close(updated[0][name], updated[1][name], atol=1e-6, rtol=0)
    assert not torch.equal(updated[0]["weight"], linear().weight)


def test_clipping_limits_the_update_and_logs_the_raw_norm():
    data = regression_data()
    model = linear()
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    x, y = data[torch.randperm(32, generator=torch.Generator().manual_seed(0))[:8]]
    raw_grads = torch.autograd.grad(mse(model, (x, y)), list(model.parameters()))
    raw_norm = torch.cat([g.flatten() for g in raw_grads]).norm().item()
    config = TrainConfig(max_steps=1, optimizer="sgd", momentum=0.0, lr=1.0, clip_grad_norm=0.5, log_every=1)
    result = train(model, data, mse, config, progress=False)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert raw_norm > 0.5
    assert result.history[0]["grad_norm"] == pytest.approx(raw_norm, rel=1e-6)
    assert (after - before).norm().item() == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        ("cosine", 0, 0.5),
        ("cosine", 1, 1.0),
        ("cosine", 2, 1.0),
        ("cosine", 6, 0.5),
        ("cosine", 8, 0.5 * (1 + math.cos(math.pi * 0.75))),
        ("linear", 6, 0.5),
        ("linear", 9, 0.125),
        ("constant", 9, 1.0),
    ],
)
def test_schedule_factor(schedule, step, expected):
    assert lr_factor(step, total_steps=10, warmup_steps=2, schedule=schedule) == pytest.approx(expected)


def test_logged_learning_rates_follow_the_schedule():
    config = TrainConfig(max_steps=10, batch_size=4, lr=0.2, schedule="linear", warmup_ratio=0.2, log_every=1)
    result = train(linear(), regression_data(), mse, config, progress=False)
    expected = [0.2 * lr_factor(step, 10, 2, "linear") for step in range(10)]
    assert [row["lr"] for row in result.history] == pytest.approx(expected)


def test_early_stopping_restores_the_best_state():
    scores = iter([3.0, 2.0, 2.5, 2.4, 1.0])
    snapshots = {}

    def evaluate(model):
        snapshots[len(snapshots) + 1] = params(model)
        return {"rmse": next(scores), "other": 0.0}

    model = linear()
    config = TrainConfig(
        max_steps=20, batch_size=4, eval_every=1, early_stopping_patience=2, early_stopping_metric="rmse"
    )
    result = train(model, regression_data(), mse, config, evaluate_fn=evaluate, progress=False)
    assert result.stopped_early and result.restored_best
    assert result.steps == 4 and result.best_step == 2 and result.best_metric == 2.0
    assert [row["val_rmse"] for row in result.history if "val_rmse" in row] == [3.0, 2.0, 2.5, 2.4]
    for name, value in params(model).items():
        assert torch.equal(value, snapshots[2][name])
    assert any("restored the best trainable state (rmse 2 at step 2)" in note for note in result.notes)


def test_validation_loss_is_the_sample_weighted_mean():
    data = regression_data(10)
    model = linear()
    config = TrainConfig(max_steps=1, batch_size=4, lr=1e-9, optimizer="sgd", momentum=0.0)
    result = train(model, data, mse, config, val_data=data, progress=False)
    with torch.no_grad():
        expected = mse(model, data[:]).item()
    assert result.history[-1]["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_unknown_early_stopping_metric_is_named():
    config = TrainConfig(max_steps=2, early_stopping_patience=1, early_stopping_metric="auroc")
    with pytest.raises(ValueError, match=r"early_stopping_metric 'auroc' is not among .*\['loss'\]"):
        train(linear(), regression_data(), mse, config, val_data=regression_data(), progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = []

    def exploding(model, batch):
        calls.append(1)
        loss = mse(model, batch)
        return loss * float("nan") if len(calls) == 5 else loss

    model = linear()
    config = TrainConfig(max_steps=8, batch_size=4, checkpoint_every=2, log_every=1)
    with pytest.raises(NonFiniteLossError) as error:
        train(model, regression_data(), exploding, config, run_dir=tmp_path, progress=False)
    message = str(error.value)
    assert "the loss at step 5 is nan" in message
    assert f"the last good checkpoint is at {tmp_path / 'checkpoints' / 'last'} (step 4)" in message
    assert "Lower the learning rate" in message and error.value.step == 5
    state = json.loads((tmp_path / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["progress"]["step"] == 4
    saved = load_file(tmp_path / "checkpoints" / "last" / "model.safetensors")
    for name, value in params(model).items():  # the bad step was never applied
        assert torch.equal(saved[name], value)


def run_six_steps(run_dir, loss_fn=noisy_mse, resume=False, **overrides):
    config = TrainConfig(
        max_steps=6, batch_size=4, grad_accum=2, lr=0.05, warmup_ratio=0.2, log_every=1, **overrides
    )
    model = mlp()
    result = train(
        model, regression_data(24), loss_fn, config, run_dir=run_dir, resume=resume, progress=False
    )
    return result, model


def stop_at_call(call: int, exception: type[BaseException]):
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        if len(calls) == call:
            raise exception("stop")
        return noisy_mse(model, batch)

    return loss_fn


def assert_same_run(first, second):
    (result_a, model_a), (result_b, model_b) = first, second
    assert len(losses(result_a)) == 6
    for a, b in zip(losses(result_a), losses(result_b), strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    assert [row["lr"] for row in result_a.history] == pytest.approx([row["lr"] for row in result_b.history])
    for name, value in params(model_a).items():
        torch.testing.assert_close(value, params(model_b)[name], atol=1e-6, rtol=0)


def test_resume_mid_epoch_reproduces_an_uninterrupted_run(tmp_path):
    # 24 samples / batch 4 = 6 micro-batches = 3 steps per epoch; the crash comes in step 3 (epoch 0).
    reference = run_six_steps(tmp_path / "a", checkpoint_every=2)
    with pytest.raises(RuntimeError, match="stop"):
        run_six_steps(tmp_path / "b", loss_fn=stop_at_call(6, RuntimeError), checkpoint_every=2)
    state = json.loads((tmp_path / "b" / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert (state["progress"]["step"], state["progress"]["epoch"], state["progress"]["batch_in_epoch"]) == (
        2,
        0,
        4,
    )
    resumed = run_six_steps(tmp_path / "b", resume=True, checkpoint_every=2)
    assert_same_run(reference, resumed)
    metrics = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert metrics == resumed[0].history


def test_ctrl_c_writes_a_checkpoint_and_resume_continues(tmp_path):
    reference = run_six_steps(tmp_path / "a")
    with pytest.raises(TrainingInterrupted) as error:
        run_six_steps(tmp_path / "b", loss_fn=stop_at_call(10, KeyboardInterrupt))  # in step 5, epoch 1
    message = str(error.value)
    assert "interrupted after step 4/6" in message and str(tmp_path / "b" / "checkpoints" / "last") in message
    assert "peft-pipelines run RECIPE --resume" in message and "train(..., resume=True)" in message
    resumed = run_six_steps(tmp_path / "b", resume=True)
    assert_same_run(reference, resumed)


def test_resuming_a_finished_run_trains_nothing(tmp_path):
    first, model = run_six_steps(tmp_path)
    again, model_again = run_six_steps(tmp_path, loss_fn=stop_at_call(1, AssertionError), resume=True)
    assert again.steps == 6 and again.history == first.history
    for name, value in params(model).items():
        assert torch.equal(value, params(model_again)[name])


def test_checkpoint_files_hold_no_pickle(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1), nn.BatchNorm1d(1))
    model[0].requires_grad_(False)
    model[3].requires_grad_(False)
    config = TrainConfig(max_steps=2, batch_size=4, early_stopping_patience=3)
    train(model, regression_data(), mse, config, val_data=regression_data(), run_dir=tmp_path, progress=False)
    directory = tmp_path / "checkpoints" / "last"
    files = sorted(path.name for path in directory.iterdir())
    assert files == [
        "best_model.safetensors",
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng.safetensors",
        "trainer_state.json",
    ]
    for path in directory.iterdir():
        assert not path.read_bytes().startswith(b"\x80"), path  # the pickle protocol marker
    saved = load_file(directory / "model.safetensors")
    # BatchNorm 1 owns trainable parameters, so its statistics travel; the frozen BatchNorm 3's do not.
    assert sorted(saved) == sorted(trainable_names(model))
    assert sorted(saved) == [
        "1.bias", "1.num_batches_tracked", "1.running_mean", "1.running_var", "1.weight", "2.bias", "2.weight"
    ]  # fmt: skip
    optimizer = load_file(directory / "optimizer.safetensors")
    assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= set(optimizer)
    names = json.loads((directory / "optimizer.json").read_text())["param_names"]
    assert names == ["2.weight", "1.weight", "1.bias", "2.bias"]  # decay group first, then no-decay
    assert set(load_file(directory / "rng.safetensors")) == {"rank0.torch"}


def test_pickle_checkpoint_is_refused(tmp_path):
    run_six_steps(tmp_path)
    torch.save({"x": 1}, tmp_path / "checkpoints" / "last" / "extra.pt")
    with pytest.raises(ValueError, match=r"contains pickle files \['extra.pt'\]"):
        run_six_steps(tmp_path, resume=True)


def test_argument_errors_name_the_fix(tmp_path):
    frozen = linear().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters; add an adapter or call set_trainable"):
        build_optimizer(frozen, TrainConfig())
    with pytest.raises(ValueError, match="early_stopping_patience needs val_data or evaluate_fn"):
        train(linear(), regression_data(), mse, TrainConfig(early_stopping_patience=2), progress=False)
    with pytest.raises(ValueError, match="eval_every needs val_data or evaluate_fn"):  # not skipped silently
        train(linear(), regression_data(), mse, TrainConfig(eval_every=2), progress=False)
    with pytest.raises(ValueError, match="need a run_dir"):
        train(linear(), regression_data(), mse, TrainConfig(), resume=True, progress=False)
    with pytest.raises(TypeError, match="loss_fn must return a scalar tensor, got Tensor \\(8,\\)"):
        train(linear(), regression_data(), lambda m, b: m(b[0]).squeeze(-1), TrainConfig(), progress=False)
    with pytest.raises(ValueError, match="extra_forbidden|Extra inputs"):
        TrainConfig(learning_rate=1e-3)
    with pytest.raises(ValueError, match="momentum is SGD's; optimizer adamw does not read it: remove it"):
        TrainConfig(momentum=0.5)
    assert TrainConfig(**TrainConfig().model_dump()) == TrainConfig()  # a resolved recipe's defaults pass


def test_every_config_field_is_documented():
    for name, info in TrainConfig.model_fields.items():
        assert info.description, name


def test_metrics_jsonl_rows_and_resume_without_checkpoint(tmp_path):
    config = TrainConfig(max_steps=4, batch_size=8, log_every=2)
    result = train(linear(), regression_data(), mse, config, val_data=regression_data(), run_dir=tmp_path,
                   resume=True, progress=False)  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == result.history
    assert [sorted(row) for row in rows] == [
        ["epoch", "grad_norm", "loss", "lr", "step"],
        ["epoch", "grad_norm", "loss", "lr", "step"],
        ["epoch", "step", "val_loss"],
    ]
    assert [(row["step"], row["epoch"]) for row in rows] == [(2, 0.5), (4, 1.0), (4, 1.0)]


def test_bf16_autocast_on_cpu_when_asked():
    seen = []

    def loss_fn(model, batch):
        seen.append(model(batch[0]).dtype)
        return mse(model, batch)

    result = train(
        linear(), regression_data(), loss_fn, TrainConfig(max_steps=1, precision="bf16"), progress=False
    )
    assert seen == [torch.bfloat16] and result.precision == "bf16"
    train(linear(), regression_data(), loss_fn, TrainConfig(max_steps=1), progress=False)
    assert seen[-1] == torch.float32


def test_tensorboard_flag_writes_events_or_names_the_missing_package(tmp_path):
    config = TrainConfig(max_steps=2, batch_size=8, log_every=1, tensorboard=True)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="tensorboard: true needs the tensorboard package"):
            train(linear(), regression_data(), mse, config, run_dir=tmp_path, progress=False)
        return
    train(linear(), regression_data(), mse, config, run_dir=tmp_path, progress=False)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_run_resumes_exactly_after_ctrl_c(tmp_path):
    reference = run_six_steps(tmp_path / "a", device="cuda")
    with pytest.raises(TrainingInterrupted):
        run_six_steps(tmp_path / "b", loss_fn=stop_at_call(10, KeyboardInterrupt), device="cuda")
    rng = load_file(tmp_path / "b" / "checkpoints" / "last" / "rng.safetensors")
    assert set(rng) == {"rank0.torch", "rank0.cuda"}
    resumed = run_six_steps(tmp_path / "b", resume=True, device="cuda")
    assert_same_run(reference, resumed)
    assert reference[0].precision == "bf16" and reference[0].peak_memory_bytes > 0
