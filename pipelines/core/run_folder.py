"""Which run folder a run uses: a new ``<output_dir>/<name>/<timestamp>/``, or for ``--resume`` the newest
run of the recipe that has a checkpoint, started with the same recipe (``run.json`` holds its hash).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from pipelines.core.files import write_text_atomic

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
_TIMESTAMP = "%Y%m%d-%H%M%S"
# Fields a resume may change, left out of the recipe's hash: where run folders live and the one-line
# description (neither changes a number), and how long and how often the loop trains, evaluates, logs and
# checkpoints (extending a finished run with more steps is what resume is for; the intervals and worker
# count change no step already taken). Everything that decides what a step computes (data, backbone,
# adapters, optimiser, learning rate, batch size, precision, seed, baselines, scoring) is hashed, so a
# different recipe that shares the name cannot take over the run.
RESUMABLE_FIELDS = (
    "output_dir",
    "description",
    "stages.*.train.epochs",
    "stages.*.train.max_steps",
    "stages.*.train.checkpoint_every",
    "stages.*.train.eval_every",
    "stages.*.train.log_every",
    "stages.*.train.num_workers",
    "stages.*.train.tensorboard",
)


_RESUMABLE_TEXT = "output_dir, description and each stage's " + ", ".join(
    field.rsplit(".", 1)[-1] for field in RESUMABLE_FIELDS if field.startswith("stages.")
)


class RunError(RuntimeError):
    """A run cannot start or resume (e.g. ``--resume`` with no earlier run)."""


def hashed_part(recipe: dict[str, Any]) -> dict[str, Any]:
    """Returns a copy of the resolved recipe (``model_dump(mode="json")``) without `RESUMABLE_FIELDS`."""
    data = json.loads(json.dumps(recipe))
    for field in RESUMABLE_FIELDS:
        _drop(data, field.split("."))
    return data


def _drop(node: Any, parts: list[str]) -> None:
    if not parts:
        return
    children = node if parts[0] == "*" and isinstance(node, list) else None
    if children is not None:
        for child in children:
            _drop(child, parts[1:])
    elif isinstance(node, dict) and parts[0] in node:
        if len(parts) == 1:
            del node[parts[0]]
        else:
            _drop(node[parts[0]], parts[1:])


def recipe_hash(recipe: dict[str, Any]) -> str:
    """Returns the sha256 of the resolved recipe apart from the fields a resume may change."""
    text = json.dumps(hashed_part(recipe), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_run_file(run_dir: Path, recipe: dict[str, Any]) -> Path:
    """Writes ``run_dir/run.json``: the recipe's name and hash, and the fields left out of the hash."""
    payload = {
        "name": recipe["name"],
        "recipe_sha256": recipe_hash(recipe),
        "unhashed": list(RESUMABLE_FIELDS),
    }
    return write_text_atomic(Path(run_dir) / RUN_FILE, json.dumps(payload, indent=1) + "\n")


def new_run_dir(root: Path) -> Path:
    """Returns ``root/<timestamp>`` (with a suffix when two runs start within one second)."""
    stamp = datetime.datetime.now().strftime(_TIMESTAMP)
    run_dir, suffix = root / stamp, 1
    while run_dir.exists():
        run_dir, suffix = root / f"{stamp}-{suffix}", suffix + 1
    return run_dir


def resumable_run_dir(root: Path, recipe: dict[str, Any], source: str) -> Path:
    """Returns the newest run in `root` that has a checkpoint, once its recipe is known to be this one.

    Reads only: nothing in any run folder changes, whatever the outcome.

    Raises:
        RunError: no run there has a checkpoint, or the newest one was started with another recipe.
    """
    from pipelines.core.checkpoint_files import find_checkpoints

    runs = sorted(p for p in root.glob("*") if (p / "recipe.yaml").is_file()) if root.is_dir() else []
    with_checkpoints = [(run, found) for run in reversed(runs) if (found := find_checkpoints(run))]
    if not with_checkpoints:
        raise RunError(
            f"no run of {recipe['name']} in {root} has a checkpoint to resume; run without --resume"
        )
    run_dir, checkpoints = with_checkpoints[0]
    skipped = sorted(runs, reverse=True).index(run_dir)
    _check_same_recipe(run_dir, recipe, source)
    newest = checkpoints[0]
    try:
        step = json.loads((newest / "trainer_state.json").read_text(encoding="utf-8"))["progress"]["step"]
    except (OSError, ValueError, KeyError, TypeError):  # damaged: the training loop says so when it loads
        step = "unknown"
    passed = f"; passed over {skipped} newer run(s) without one" if skipped else ""
    logger.info("resuming %s from its checkpoint %s (step %s)%s", run_dir, newest, step, passed)
    return run_dir


def _check_same_recipe(run_dir: Path, recipe: dict[str, Any], source: str) -> None:
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
    run_file = run_dir / RUN_FILE
    if run_file.is_file():  # the hash it started with, even if someone edited recipe.yaml since
        expected = json.loads(run_file.read_text(encoding="utf-8")).get("recipe_sha256")
    else:  # a run from before run.json existed: its resolved recipe.yaml is the record
        expected = recipe_hash(saved)
    if recipe_hash(recipe) == expected:
        return
    differ = _differences(hashed_part(saved), hashed_part(recipe))
    where = f" (it differs in {', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''})" if differ else ""
    raise RunError(
        f"{source} is not the recipe {run_dir} was started with{where}; resume it with that recipe "
        f"(only {_RESUMABLE_TEXT} may change) or run without --resume"
    )


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Returns the dotted paths where two JSON-like values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [key for key in new if key not in old]
        found = [_differences(old.get(k), new.get(k), f"{path}.{k}" if path else str(k)) for k in keys]
        return [p for paths in found for p in paths]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            p
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for p in _differences(a, b, f"{path}.{i}")
        ]
    return [] if old == new else [path or "(the whole recipe)"]
