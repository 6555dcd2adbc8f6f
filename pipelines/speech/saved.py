"""What a saved speech adapter needs beside its tensors: the base speaker it speaks as, and (for a
transformers model) the pitch and energy statistics its inputs were standardised with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.core.files import write_text_atomic

__all__ = ["FACTS_FILE", "write_speech_facts", "read_speech_facts"]

FACTS_FILE = "speech_adapter.json"


def write_speech_facts(directory: str | Path, facts: dict[str, Any]) -> Path:
    """Write ``facts`` (JSON values) beside the adapter files in ``directory``."""
    return write_text_atomic(Path(directory) / FACTS_FILE, json.dumps(facts, indent=2) + "\n")


def read_speech_facts(directory: str | Path) -> dict[str, Any]:
    """The facts :func:`write_speech_facts` wrote; one-line errors for a folder without or with a damaged
    file."""
    path = Path(directory) / FACTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {directory} was not saved by a speech pipeline's save_adapter or run; "
            "save it again with pipe.save_adapter(folder)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is damaged ({error}); save the adapter again") from None
