"""The metrics log of a training run: `run_dir/metrics.jsonl`, optional TensorBoard and the progress bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pipelines.core.distributed import is_main_process
from pipelines.core.files import write_text_atomic


class RunLog:
    """metrics.jsonl rows (appended to progress.history), optional TensorBoard and the tqdm bar."""

    def __init__(self, run_dir: Path | None, state: Any, tensorboard: bool, show: bool, total: int):
        self.state = state
        main = is_main_process()
        self.path = run_dir / "metrics.jsonl" if run_dir is not None and main else None
        if self.path is not None:
            # The checkpoint's history is the truth: rows logged after it (before a crash) are dropped.
            write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in state.history))
        self.writer = None
        if tensorboard and main and run_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    "tensorboard: true needs the tensorboard package; pip install tensorboard "
                    "or set tensorboard: false."
                ) from error
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.bar = tqdm(
            total=total,
            initial=state.step,
            disable=not (show and main),
            unit="step",
            desc="train",
            dynamic_ncols=True,
        )

    def step(self, loss: float, lr: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}", refresh=False)

    def row(self, row: dict[str, Any]) -> None:
        self.state.history.append(row)
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key not in {"step", "epoch"}:
                    self.writer.add_scalar(
                        key if key.startswith("val_") else f"train_{key}", value, row["step"]
                    )

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
