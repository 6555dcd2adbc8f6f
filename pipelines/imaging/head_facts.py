"""What a saved imaging model needs beside its tensors, in ``imaging_head.json`` next to the adapter files.

The operating point: a binary model's threshold (a score at or above it is called positive), how it was
chosen (Youden's J) and on which split, so a reloaded model gives the accuracy, sensitivity and
specificity the trained one gave. Also the task and, for a folder dataset, the class names (label ``i``
is ``classes[i]``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.core.files import atomic_write

__all__ = ["FACTS", "operating_point", "head_facts", "write_head_facts", "read_head_facts"]

FACTS = "imaging_head.json"


def operating_point(threshold: float | None, split: str, examples: int) -> dict[str, Any] | None:
    """A threshold chosen by Youden's J on ``examples`` images of ``split``; None when none was chosen."""
    if threshold is None:
        return None
    return {"threshold": float(threshold), "chosen_by": "youden_j", "split": split, "examples": examples}


def head_facts(task: str, point: dict[str, Any] | None, classes: list[str] | None) -> dict[str, Any]:
    """The facts written beside a saved model (see the module docstring)."""
    return {"task": task, "operating_point": point, "classes": classes}


def write_head_facts(folder: Path, facts: dict[str, Any]) -> Path:
    """Write ``facts`` to ``folder/imaging_head.json``; returns its path."""
    path = Path(folder) / FACTS
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(facts, indent=2), encoding="utf-8"))
    return path


def read_head_facts(folder: Path) -> dict[str, Any] | None:
    """The facts saved in ``folder`` (None when the folder has no ``imaging_head.json``)."""
    path = Path(folder) / FACTS
    if not path.is_file():
        return None
    try:
        facts = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({type(error).__name__}); save the adapter again or delete the file"
        ) from error
    if not isinstance(facts, dict) or "operating_point" not in facts:
        raise ValueError(f"{path} has no 'operating_point'; save the adapter again or delete the file")
    return facts
