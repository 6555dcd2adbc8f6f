"""Protein adapter folders: the head's facts beside the adapter, finding what a run saved, HF peft export.

Every folder that holds a task head also gets ``protein_head.json``: the task, level, classes, pooling,
the adapters it was trained on top of (a masked-LM stage's) and the backbone it was trained on, so
:meth:`load` restores the model exactly, or refuses another backbone by name.

HF peft export: LoRA tensors are renamed by the core's ``convert_adapter``; the head becomes peft's
``modules_to_save``. peft (0.21, ``utils/save_and_load.py``) saves a ``modules_to_save`` module's tensors
without the ``modules_to_save.<adapter>.`` part, as ``base_model.model.<module path>.<tensor>``, and
matches ``modules_to_save`` names as suffixes of module paths, so the entry is ``head.linear``: a bare
``head`` would also wrap ESM's ``lm_head`` and ``contact_head``. The head's regression target scale (two
buffers peft cannot carry) is folded into that linear layer, so the peft model's output is the prediction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.core.files import atomic_write
from pipelines.core.peft import export_peft_with_head

__all__ = [
    "HEAD", "FACTS", "head_facts", "write_head_facts", "read_head_facts", "saved_outputs", "adapter_folders",
    "check_backbone", "export_peft", "export_run",
]  # fmt: skip

HEAD = "head"
FACTS = "protein_head.json"
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."
PEFT_HEAD = f"{HEAD}.linear"  # peft's modules_to_save entry (see the module docstring)


def backbone_fingerprint(provenance: dict | None) -> str | None:
    """What identifies a backbone's weights (random architecture and seed, sha256, hub revision), or None."""
    weights = (provenance or {}).get("weights")
    if weights == "random initialisation":
        arch = json.dumps(provenance.get("architecture"), sort_keys=True)  # type: ignore[union-attr]
        return f"random ESM-2 {arch} seed {provenance.get('init_seed')}"  # type: ignore[union-attr]
    if isinstance(weights, dict):
        if "sha256" in weights:
            return f"sha256 {weights['sha256']}"
        if "files" in weights:
            return "sha256 " + ",".join(f["sha256"] for f in weights["files"])
        if "hub_id" in weights:
            return f"{weights['hub_id']}@{weights.get('revision')}"
    return None


def head_facts(model: Any, task: str, level: str, stages: list[str], provenance: dict | None) -> dict:
    """The facts of a trained head that its tensors do not say (see the module docstring)."""
    return {
        "task": task, "level": level, "num_classes": model.num_classes, "pooling": model.pooling,
        "stages": stages, "backbone": (provenance or {}).get("name"),
        "backbone_weights": backbone_fingerprint(provenance),
    }  # fmt: skip


def write_head_facts(directory: str | Path, facts: dict) -> Path:
    """Write ``protein_head.json`` into an adapter folder."""
    path = Path(directory) / FACTS
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(facts, indent=2) + "\n"))


def read_head_facts(directory: Path) -> dict | None:
    """The folder's ``protein_head.json``, or None (a folder saved before it existed)."""
    path = directory / FACTS
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def saved_outputs(directory: Path) -> int:
    """Outputs of the head saved with an adapter (1 for regression, the classes otherwise)."""
    from safetensors import safe_open

    path = directory / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the folder that save_adapter() or a run wrote")
    with safe_open(str(path), "pt") as handle:
        if f"{HEAD}.linear.weight" not in handle.keys():
            raise ValueError(
                f"{path} holds no task head ({HEAD}.linear.weight): a masked_lm stage's adapter? Load the "
                "run folder or its task stage's adapter folder"
            )
        return handle.get_slice(f"{HEAD}.linear.weight").get_shape()[0]


def _run_folders(run_dir: Path) -> list[Path]:
    adapters = run_dir / "adapters"
    if not adapters.is_dir():
        seeds = sorted(run_dir.glob("seed-*"))
        if seeds:
            raise FileNotFoundError(
                f"{run_dir} repeated its recipe over seeds; load one seed's run folder, e.g. {seeds[0]}"
            )
        raise FileNotFoundError(
            f"{run_dir} is neither a run folder (no adapters/) nor an adapter folder (no {CONFIG}); a run "
            "whose last stage has adapter: null saves no head to load"
        )
    heads = [folder for folder in sorted(adapters.iterdir()) if (folder / FACTS).is_file()]
    if len(heads) == 1:
        return adapter_folders(heads[0])
    folders = [folder for folder in sorted(adapters.iterdir()) if (folder / CONFIG).is_file()]
    recipe = run_dir / "recipe.yaml"
    if recipe.is_file():  # a run saved before protein_head.json: the recipe's stage order
        import yaml

        names = [stage["name"] for stage in yaml.safe_load(recipe.read_text(encoding="utf-8"))["stages"]]
        folders = [adapters / name for name in names if (adapters / name / CONFIG).is_file()]
    if not folders:
        raise FileNotFoundError(f"{adapters} holds no adapter folder (with {CONFIG})")
    return folders


def adapter_folders(path: str | Path) -> list[Path]:
    """The adapter folders to load, in training order, for a run folder or one adapter folder.

    A task adapter trained on top of a masked-LM stage's adapter brings that one along (its sibling
    folder, as a run saves them); the last folder holds the head.
    """
    path = Path(path)
    if not (path / CONFIG).is_file():
        return _run_folders(path)
    stages = (read_head_facts(path) or {}).get("stages") or [path.name]
    folders = [path.parent / name for name in stages[:-1]] + [path]
    missing = [folder for folder in folders if not (folder / CONFIG).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} was trained on top of the adapter in {missing[0]}, which is missing; copy that folder "
            "beside it (as the run saved them)"
        )
    return folders


def check_backbone(facts: dict | None, provenance: dict | None, folder: Path) -> None:
    """Refuse a backbone other than the one the head was trained on, when both can be told apart."""
    saved = (facts or {}).get("backbone_weights")
    current = backbone_fingerprint(provenance)
    if saved and current and saved != current:
        raise ValueError(
            f"{folder} was trained on backbone '{facts.get('backbone')}' ({saved}), but this pipeline's is "
            f"'{(provenance or {}).get('name')}' ({current}); create the pipeline with the backbone it was "
            "trained on"
        )


def export_peft(source: str | Path, target: str | Path) -> Path:
    """Write a protein adapter folder in HF peft's layout, its head as ``modules_to_save``.

    ``peft.PeftModel.from_pretrained(ProteinModel(backbone, task, num_classes, pooling), target)`` then
    restores adapter and head (see the module docstring); ``protein_head.json`` is copied along.
    """

    def fold(head: dict) -> tuple[list[str], dict]:  # the target scale folded into one Linear
        std, mean = head[f"{HEAD}.target_std"].float(), head[f"{HEAD}.target_mean"].float()
        weight, bias = head[f"{HEAD}.linear.weight"] * std, head[f"{HEAD}.linear.bias"] * std + mean
        return [PEFT_HEAD], {f"{PEFT_HEAD}.weight": weight, f"{PEFT_HEAD}.bias": bias}

    source, target = Path(source), Path(target)
    kind = f"a protein folder carries '{HEAD}'"
    export_peft_with_head(source, target, lambda extra: extra in ([], [HEAD]), fold, kind)
    facts = read_head_facts(source)
    if json.loads((target / CONFIG).read_text(encoding="utf-8")).get("modules_to_save"):
        facts = {**(facts or {}), "peft_head": {"modules_to_save": [PEFT_HEAD], "target_scale_folded": True}}
    if facts:
        write_head_facts(target, facts)
    return target


def export_run(run_dir: str | Path, out: str | Path) -> list[Path]:
    """Export every adapter a run saved (``out/<stage>/``) in HF peft's layout; returns the folders.

    A masked-LM stage's adapter and the task adapter trained on top of it become two peft adapters; a
    peft model reproduces the run only with both loaded and active.
    """
    return [export_peft(folder, Path(out) / folder.name) for folder in adapter_folders(run_dir)]
