"""Tests for the distributed helpers, and 2-process gloo training against a single-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pipelines.core import distributed as D
from pipelines.core.training import TrainConfig, train

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]

# Shared by the worker script and the single-process reference, so both build identical runs.
COMMON = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.layers = nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 1)])

        def forward(self, x):
            return self.layers[1](torch.tanh(self.layers[0](x)))

        def loss(self, x, y):  # a method, not forward: loss_fn must reach it under DDP too
            return nn.functional.mse_loss(self(x).squeeze(-1), y)

    def dataset():
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(123))
        return TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]))

    def mse(model, batch):
        x, y = batch
        return model.loss(x, y)

    def config(batch_size, strategy):
        return TrainConfig(max_steps=3, batch_size=batch_size, lr=0.05, log_every=1, strategy=strategy,
                           schedule="constant", eval_every=2)
    """
)

WORKER = (
    textwrap.dedent(
        """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from pipelines.core import distributed as D
    from pipelines.core.training import TrainConfig, train
    """
    )
    + COMMON
    + textwrap.dedent(
        """
    out = {}
    for strategy in ["ddp", "fsdp"]:
        model = Blocks()
        model.layers[0].bias.requires_grad_(False)  # a frozen parameter must not upset either wrapper
        result = train(model, dataset(), mse, config(4, strategy), val_data=dataset(),
                       run_dir=f"{sys.argv[1]}/{strategy}", progress=False)
        from pipelines.core.checkpoint import trainable_state
        state = trainable_state(model)
        out[strategy] = {"losses": [row.get("loss", row.get("val_loss")) for row in result.history],
                         "params": {k: v.tolist() for k, v in state.items()}}
    out["rank"], out["world_size"], out["main"] = D.rank(), D.world_size(), D.is_main_process()
    with open(f"{sys.argv[1]}/rank{D.rank()}.json", "w") as handle:
        json.dump(out, handle)
    D.cleanup_distributed()
    """
    )
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    namespace = {"TrainConfig": TrainConfig}
    exec(COMMON, namespace)  # noqa: S102 - the same source the workers run
    model = namespace["Blocks"]()
    model.layers[0].bias.requires_grad_(False)
    data = namespace["dataset"]()
    result = train(
        model, data, namespace["mse"], namespace["config"](8, "auto"), val_data=data, progress=False
    )
    assert ["val_loss" in row for row in result.history] == [False, False, True, False, True]
    losses = [row.get("loss", row.get("val_loss")) for row in result.history]
    return losses, {name: value.detach() for name, value in model.named_parameters()}


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    processes = []
    for rank in range(2):
        env = os.environ | {
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }  # fmt: skip
        processes.append(
            subprocess.Popen(
                [sys.executable, str(script), str(tmp_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        )
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [(r["rank"], r["world_size"], r["main"]) for r in ranks] == [(0, 2, True), (1, 2, False)]

    reference_losses, reference_params = single_process_reference()
    for strategy in ["ddp", "fsdp"]:
        for rank in ranks:  # every rank reports the loss averaged over ranks
            assert rank[strategy]["losses"] == pytest.approx(reference_losses, abs=1e-5), strategy
        params = ranks[0][strategy]["params"]
        assert sorted(params) == ["layers.0.weight", "layers.1.bias", "layers.1.weight"]
        for name, value in params.items():
            torch.testing.assert_close(torch.tensor(value), reference_params[name], atol=1e-5, rtol=0)
        # only rank 0 writes, and the checkpoint records the world size
        rows = [json.loads(line) for line in (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()]
        assert [row.get("loss", row.get("val_loss")) for row in rows] == pytest.approx(
            reference_losses, abs=1e-5
        )
        state = json.loads((tmp_path / strategy / "checkpoints" / "last" / "trainer_state.json").read_text())
        assert state["world_size"] == 2 and state["progress"]["step"] == 3
        assert sorted(state["rng"]) == ["0", "1"]


def test_single_process_helpers_report_a_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not D.is_distributed() and D.world_size() == 1 and D.rank() == 0 and D.is_main_process()
    assert D.setup_distributed() is False
    model = nn.Linear(2, 1)
    assert D.wrap_model(model, "ddp", torch.device("cpu")) is model
    assert D.unwrap_model(model) is model
    assert D.broadcast_from_main({"a": 1.0}) == {"a": 1.0} and D.gather_to_all(3) == [3]


def test_setup_distributed_names_a_missing_variable(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(
        RuntimeError, match="environment variable MASTER_ADDR is missing; launch with `torchrun"
    ):
        D.setup_distributed()


def test_resumable_sampler_skips_the_consumed_prefix_of_the_same_permutation():
    data = list(range(10))
    full = list(D.ResumableSampler(data, seed=3, epoch=1))
    assert sorted(full) == data and full != data
    assert list(D.ResumableSampler(data, seed=3, epoch=1, skip=4)) == full[4:]
    assert len(D.ResumableSampler(data, seed=3, epoch=1, skip=4)) == 6
    assert list(D.ResumableSampler(data, seed=3, epoch=2)) != full


def test_epoch_batches_of_a_dataset_and_of_a_dataloader_skip_alike():
    data = TensorDataset(torch.arange(12.0))
    batches = [b[0].tolist() for b in D.epoch_batches(data, batch_size=4, seed=0, epoch=0, skip=1)]
    full = [b[0].tolist() for b in D.epoch_batches(data, batch_size=4, seed=0, epoch=0, skip=0)]
    assert batches == full[1:] and len(full) == 3
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    assert [b[0].tolist() for b in D.epoch_batches(loader, 4, 0, 0, skip=2)] == [[8.0, 9.0, 10.0, 11.0]]
    assert D.batches_per_epoch(data, 5) == 3 and D.batches_per_epoch(loader, 99) == 3


def test_move_to_device_and_batch_size_walk_nested_batches():
    batch = {"x": [torch.zeros(3, 2), (torch.ones(3),)], "name": "a"}
    moved = D.move_to_device(batch, torch.device("cpu"))
    assert moved["name"] == "a" and torch.equal(moved["x"][1][0], torch.ones(3))
    assert D.batch_size_of(batch) == 3 and D.batch_size_of({"n": 1}) == 1
    assert D.peak_memory_bytes(torch.device("cpu")) > 0
