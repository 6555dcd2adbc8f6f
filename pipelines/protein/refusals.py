"""The recipe fields a protein recipe sets that its configuration would not read, refused at validate time.

Each pipeline reads an option only in some configurations: ``seed`` and the sizes only for a random
backbone, ``checkpoint_dir`` only for a fair-esm name, the CSV columns only for the user's own CSV, the
per-residue FASTA fields only for the user's own per-residue files, ``ligand`` only for FLIP bind,
``pooling`` only on the last stage of a per-sequence task, the masked-LM options only on a masked_lm stage.
:func:`unread_fields` names each field the recipe sets where it would be accepted and ignored, and two
that loading would refuse only at run time: a FLIP split the dataset has not, a CSV as per-residue data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipelines.protein.backbones import FAIR_ESM_MODELS, RANDOM_PRESETS
from pipelines.protein.datasets import DataOptions
from pipelines.protein.datasets import own_file as datasets_own_file
from pipelines.protein.flip import BIND_SPLITS, GB1_SPLITS
from pipelines.protein.options import BackboneOptions, StageOptions

__all__ = ["own_file", "unread_fields"]

RANDOM_ONLY = ("seed", "num_layers", "embed_dim", "attention_heads")
CSV_COLUMNS = ("sequence_column", "target_column", "split_column")
RESIDUE_FILES = ("sequences_path", "label_classes")
FLIP_SPLITS = {"flip_gb1": GB1_SPLITS, "flip_bind": BIND_SPLITS, "flip_secondary_structure": ("sampled",)}


def _given(options: dict[str, Any], model: type[BaseModel]) -> set[str]:
    """The options the recipe sets (an explicit null where the default is null sets nothing)."""
    fields = model.model_fields
    return {key for key, value in options.items()
            if key in fields and not (value is None and fields[key].default is None)}  # fmt: skip


def own_file(recipe: Any) -> str | None:
    """The recipe's own data file as :func:`pipelines.protein.datasets.load_splits` reads it (None: FLIP)."""
    return datasets_own_file(recipe.data.dataset, recipe.data.options.get("path"))


def _backbone(recipe: Any) -> list[tuple[str, str]]:
    name, given = recipe.backbone.name, _given(recipe.backbone.options, BackboneOptions)
    random = ["esm2_random", *RANDOM_PRESETS]
    refused = [(key, f"only a random backbone ({', '.join(random)}) reads it; '{name}' loads its weights: "
                "remove it") for key in RANDOM_ONLY if key in given and name not in random]  # fmt: skip
    if "checkpoint_dir" in given and name not in FAIR_ESM_MODELS:
        refused.append(("checkpoint_dir", f"only a fair-esm name (e.g. esm2_t33_650M_UR50D) is looked up in "
                        f"it, not '{name}': remove it or give the backbone a fair-esm name"))  # fmt: skip
    if "max_residues" in given and "max_residues" in _given(recipe.data.options, DataOptions):
        refused.append(("max_residues", "data.options.max_residues sets the residue limit and wins over it: "
                        "remove one of the two"))  # fmt: skip
    return [(f"backbone.options.{key}", reason) for key, reason in refused]


def _data(recipe: Any, level: str) -> list[tuple[str, str]]:
    given, own, dataset = _given(recipe.data.options, DataOptions), own_file(recipe), recipe.data.dataset
    csv = own is not None and Path(own).suffix.lower() in (".csv", ".tsv")
    unread: dict[str, str] = {}
    if own is None:
        flip = f"the FLIP dataset {dataset}"
        if dataset != "flip_bind":
            unread["ligand"] = "only flip_bind reads it (which ligand class counts as binding): remove it"
        for key in (*CSV_COLUMNS, *RESIDUE_FILES):
            unread[key] = (
                f"it describes your own file (data.options.path); {flip} is read as published: remove it"
            )
        for key in ("valid_fraction", "test_fraction"):
            unread[key] = f"{flip} has published valid and test splits, so nothing is held out: remove it"
    else:
        unread["split"] = ("it names a FLIP split; your own file's splits come from its split column or SET= "
                           "fields (none: test_fraction and valid_fraction): remove it")  # fmt: skip
        unread["ligand"] = "only the FLIP dataset flip_bind reads it: remove it"
        if not csv or level == "residue":
            for key in CSV_COLUMNS:
                unread[key] = f"only a per-sequence CSV's columns are named; {own} is not one: remove it"
        if level == "sequence":
            for key in RESIDUE_FILES:
                unread[key] = ("only per-residue FASTA labels (protein/residue) read it; a per-sequence file "
                               "holds its sequences and targets itself: remove it")  # fmt: skip
    refused = [(f"data.options.{key}", reason) for key, reason in unread.items() if key in given]
    split, known = recipe.data.options.get("split"), FLIP_SPLITS.get(dataset)
    if own is None and known is not None and "split" in given and split not in known:
        refused.append(("data.options.split", f"{dataset} has no split '{split}': choose {', '.join(known)}"))
    if csv and level == "residue":
        where = "data.options.path" if recipe.data.options.get("path") else "data.dataset"
        refused.append((where, f"{own} is a CSV, but per-residue labels come as FASTA: give the label FASTA "
                        "here and the sequence FASTA in data.options.sequences_path"))  # fmt: skip
    return refused


def _stages(recipe: Any, level: str) -> list[tuple[str, str]]:
    last, refused = len(recipe.stages) - 1, []
    specs = any(not isinstance(entry, str) for entry in recipe.compare)  # they copy the last stage's options
    for index, stage in enumerate(recipe.stages):
        given, where = _given(stage.options, StageOptions), f"stages.{index}.options"
        if stage.objective != "masked_lm":
            refused += [(f"{where}.{key}", f"only a masked_lm stage reads it, not the {stage.objective} "
                         f"stage '{stage.name}': remove it or move it to a masked_lm stage")
                        for key in ("mask_probability", "sequences_path") if key in given]  # fmt: skip
        if "pooling" in given and level == "residue":
            refused.append((f"{where}.pooling", "a per-residue head scores every residue and pools nothing: "
                            "remove it"))  # fmt: skip
        elif "pooling" in given and index != last:
            refused.append((f"{where}.pooling", f"the head pools as the last stage's options say, not stage "
                            f"'{stage.name}''s: move it to stages.{last}.options"))  # fmt: skip
        if "last_n_layers" in given and stage.adapter is None and not (index == last and specs):
            refused.append((f"{where}.last_n_layers", f"stage '{stage.name}' adds no adapter to place on the "
                            "last layers: give it an adapter or remove it"))  # fmt: skip
    return refused


def unread_fields(recipe: Any, level: str) -> list[tuple[str, str]]:
    """``(yaml path, reason)`` of each option ``recipe`` sets that a ``level`` (``sequence`` or ``residue``)
    pipeline would accept and not read in this configuration."""
    return _backbone(recipe) + _data(recipe, level) + _stages(recipe, level)
