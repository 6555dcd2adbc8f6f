"""The training loop's callback hooks: when each runs, what it sees, and extra loss terms."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pipelines.core.training import TrainCallback, TrainConfig, train

torch.set_num_threads(1)


def regression_data(n: int = 16) -> TensorDataset:
    generator = torch.Generator().manual_seed(123)
    x = torch.randn(n, 4, generator=generator)
    return TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]))


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x).squeeze(-1), y)


def linear() -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(4, 1)


class Recorder(TrainCallback):
    """Records every call, with the weight's gradient and value at the time."""

    def __init__(self):
        self.calls = []

    def on_train_begin(self, model, total_steps):
        self.calls.append(("begin", total_steps))

    def extra_loss(self, model):
        self.calls.append(("extra", None))
        return None

    def on_after_backward(self, model, step):
        self.calls.append(("backward", step, model.weight.grad.clone(), model.weight.detach().clone()))

    def on_step_end(self, model, step):
        self.calls.append(("end", step, model.weight.grad.clone(), model.weight.detach().clone()))


def test_hooks_run_in_order_with_steps_from_zero_and_see_the_gradients_of_the_step():
    recorder = Recorder()
    config = TrainConfig(max_steps=3, batch_size=4, grad_accum=2, lr=0.1, optimizer="sgd", momentum=0.0,
                         clip_grad_norm=None, schedule="constant")  # fmt: skip
    model = linear()
    train(model, regression_data(), mse, config, callbacks=[recorder], progress=False)
    kinds = [call[:2] for call in recorder.calls]
    step = [("extra", None), ("extra", None)]  # one per micro-batch
    assert kinds == [("begin", 3), *step, ("backward", 0), ("end", 0), *step, ("backward", 1), ("end", 1),
                     *step, ("backward", 2), ("end", 2)]  # fmt: skip
    for before, after in zip(recorder.calls[3::4], recorder.calls[4::4], strict=True):
        assert torch.equal(before[2], after[2])  # the gradients are not zeroed before on_step_end
        torch.testing.assert_close(after[3], before[3] - 0.1 * before[2])  # on_step_end comes after the step


def test_no_callbacks_and_callbacks_that_do_nothing_train_the_same():
    config = TrainConfig(max_steps=4, batch_size=4, log_every=1)
    runs = []
    for callbacks in ((), [TrainCallback(), object()]):  # an object without hooks is ignored too
        model = linear()
        result = train(model, regression_data(), mse, config, callbacks=callbacks, progress=False)
        runs.append(([row["loss"] for row in result.history], model.weight.detach().clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


class Penalty:
    """An L2 penalty on the weight; only extra_loss, and no TrainCallback base (neither is needed)."""

    def __init__(self, weight: float):
        self.weight = weight

    def extra_loss(self, model):
        return self.weight * model.weight.pow(2).sum()


def test_extra_loss_is_added_to_every_micro_batch_loss_before_backward():
    config = TrainConfig(max_steps=1, batch_size=4, grad_accum=2, lr=0.1, optimizer="sgd", momentum=0.0,
                         clip_grad_norm=None, log_every=1)  # fmt: skip
    model = linear()
    start = model.weight.detach().clone()
    result = train(model, regression_data(), mse, config, callbacks=[Penalty(0.5)], progress=False)
    plain = linear()
    train(plain, regression_data(), mse, config, progress=False)
    # the penalty's gradient, 0.5 * 2 * w (the same in both micro-batches), moves the weight by lr times it
    torch.testing.assert_close(model.weight.detach(), plain.weight.detach() - 0.1 * start, atol=1e-6, rtol=0)
    penalised = result.history[0]["loss"]
    unpenalised = train(linear(), regression_data(), mse, config, progress=False).history[0]["loss"]
    assert penalised == pytest.approx(unpenalised + 0.5 * start.pow(2).sum().item(), rel=1e-6)
