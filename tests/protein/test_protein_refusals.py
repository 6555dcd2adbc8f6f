"""Validation refuses each recipe field the protein pipelines would accept and not read in that
configuration (and accepts the same field where it is read); the masked-LM FASTA keeps the residue limit."""

from __future__ import annotations

import copy

import pytest
import yaml

from pipelines.core.recipe import validate_recipe_file
from pipelines.protein.data import ProteinRecord
from pipelines.protein.datasets import DataOptions
from pipelines.protein.model import ProteinModel
from pipelines.protein.options import StageOptions
from pipelines.protein.stages import masked_lm_stage

LORA = {"method": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]}
BASES = {
    "sequence": {
        "name": "toy", "pipeline": "protein/sequence", "backbone": {"name": "esm2_tiny_random"},
        "data": {"dataset": "flip_gb1", "task": "regression"},
        "stages": [{"name": "task", "objective": "regression", "adapter": LORA}],
    },
    "residue": {
        "name": "toy", "pipeline": "protein/residue", "backbone": {"name": "esm2_tiny_random"},
        "data": {"dataset": "flip_secondary_structure", "task": "multiclass"},
        "stages": [{"name": "task", "objective": "classification", "adapter": LORA}],
    },
    "evotune": {
        "name": "toy", "pipeline": "protein/sequence", "backbone": {"name": "esm2_tiny_random"},
        "data": {"dataset": "flip_gb1", "task": "regression"},
        "stages": [{"name": "evotune", "objective": "masked_lm", "adapter": LORA},
                   {"name": "task", "objective": "regression", "adapter": LORA}],
    },
}  # fmt: skip
RESIDUE_FASTA = {"data.dataset": "mine/labels.fasta", "data.options.sequences_path": "mine/seqs.fasta",
                 "data.options.label_classes": "HEC"}  # fmt: skip


def _recipe(base: str, settings: dict) -> dict:
    """``BASES[base]`` with each dotted path of ``settings`` set (a list index is a number)."""
    recipe = copy.deepcopy(BASES[base])
    for dotted, value in settings.items():
        *parents, last = dotted.split(".")
        node = recipe
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return recipe


def _errors(tmp_path, base: str, settings: dict) -> list[str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(base, settings)))
    return [error.path for error in validate_recipe_file(path)]


REFUSED = [
    (
        "sequence",
        {"backbone.name": "esm2_t6_8M_UR50D", "backbone.options": {"seed": 1}},
        "backbone.options.seed",
    ),
    (
        "sequence",
        {"backbone.name": "weights/esm2.pt", "backbone.options": {"num_layers": 2}},
        "backbone.options.num_layers",
    ),
    (
        "sequence",
        {"backbone.name": "facebook/esm2_t6_8M_UR50D", "backbone.options": {"checkpoint_dir": "w"}},
        "backbone.options.checkpoint_dir",
    ),
    ("sequence", {"backbone.options": {"checkpoint_dir": "w"}}, "backbone.options.checkpoint_dir"),
    (
        "sequence",
        {"backbone.options": {"max_residues": 64}, "data.options": {"max_residues": 32}},
        "backbone.options.max_residues",
    ),
    ("sequence", {"data.options": {"ligand": "metal"}}, "data.options.ligand"),
    ("residue", {"data.options": {"ligand": "metal"}}, "data.options.ligand"),
    ("sequence", {"data.options": {"sequence_column": "seq"}}, "data.options.sequence_column"),
    ("sequence", {"data.options": {"target_column": "fitness"}}, "data.options.target_column"),
    ("sequence", {"data.options": {"split_column": None}}, "data.options.split_column"),
    ("sequence", {"data.options": {"valid_fraction": 0.2}}, "data.options.valid_fraction"),
    ("residue", {"data.options": {"test_fraction": 0.2}}, "data.options.test_fraction"),
    (
        "residue",
        {"data.dataset": "flip_bind", "data.task": "binary", "data.options": {"sequences_path": "s.fa"}},
        "data.options.sequences_path",
    ),
    ("residue", {"data.options": {"label_classes": "HEC"}}, "data.options.label_classes"),
    (
        "sequence",
        {"data.dataset": "mine/toy.csv", "data.options": {"split": "sampled"}},
        "data.options.split",
    ),
    ("sequence", {"data.options": {"path": "mine/toy.csv", "ligand": "any"}}, "data.options.ligand"),
    (
        "sequence",
        {"data.dataset": "mine/toy.fasta", "data.options": {"target_column": "y"}},
        "data.options.target_column",
    ),
    (
        "sequence",
        {"data.dataset": "mine/toy.csv", "data.options": {"sequences_path": "s.fa"}},
        "data.options.sequences_path",
    ),
    (
        "sequence",
        {"data.dataset": "mine/toy.csv", "data.options": {"label_classes": "AB"}},
        "data.options.label_classes",
    ),
    ("residue", {**RESIDUE_FASTA, "data.options.sequence_column": "seq"}, "data.options.sequence_column"),
    ("sequence", {"stages.0.options": {"mask_probability": 0.2}}, "stages.0.options.mask_probability"),
    ("sequence", {"stages.0.options": {"sequences_path": "family.fasta"}}, "stages.0.options.sequences_path"),
    ("evotune", {"stages.1.options": {"mask_probability": 0.15}}, "stages.1.options.mask_probability"),
    ("residue", {"stages.0.options": {"pooling": "bos"}}, "stages.0.options.pooling"),
    ("residue", {"stages.0.options": {"pooling": "mean"}}, "stages.0.options.pooling"),
    ("evotune", {"stages.0.options": {"pooling": "bos"}}, "stages.0.options.pooling"),
    (
        "sequence",
        {"stages.0.adapter": None, "stages.0.options": {"last_n_layers": 1}},
        "stages.0.options.last_n_layers",
    ),
    ("evotune", {"stages.0.adapter": None, "stages.1.trainable": ["task"]}, "stages.0.adapter"),
    ("residue", {"data.task": "regression", "stages.0.objective": "regression"}, "data.task"),
    ("residue", {"data.options": {"split": "one_vs_many"}}, "data.options.split"),
    ("sequence", {"data.options": {"split": "three_vs_many"}}, "data.options.split"),
    ("residue", {"data.dataset": "mine/labels.csv"}, "data.dataset"),
    ("residue", {"data.options": {"path": "mine/labels.tsv"}}, "data.options.path"),
    ("sequence", {"data.task": "multilabel", "stages.0.objective": "classification"}, "data.task"),
]


@pytest.mark.parametrize(("base", "settings", "path"), REFUSED, ids=[f"{b}-{p}" for b, _, p in REFUSED])
def test_validate_refuses_a_field_this_configuration_does_not_read(tmp_path, base, settings, path):
    assert _errors(tmp_path, base, settings) == [path]


READ = [
    ("sequence", {"backbone.options": {"seed": 3, "num_layers": 1, "max_residues": 64}}),
    (
        "sequence",
        {"backbone.name": "esm2_random", "backbone.options": {"embed_dim": 16, "attention_heads": 2}},
    ),
    ("sequence", {"backbone.name": "esm2_t6_8M_UR50D", "backbone.options": {"checkpoint_dir": "w"}}),
    ("sequence", {"backbone.options": {"max_residues": 64}, "data.options": {"max_residues": None}}),
    ("residue", {"data.dataset": "flip_bind", "data.task": "binary", "data.options": {"ligand": "metal"}}),
    ("sequence", {"data.options": {"split": "sampled", "sequences_path": None, "label_classes": None}}),
    (
        "sequence",
        {
            "data.dataset": "mine/toy.csv",
            "data.options": {
                "sequence_column": "seq",
                "target_column": "y",
                "split_column": None,
                "valid_fraction": 0.2,
                "test_fraction": 0.2,
            },
        },
    ),
    ("sequence", {"data.dataset": "mine/toy.fasta", "data.options": {"valid_fraction": 0.2}}),
    ("residue", {**RESIDUE_FASTA, "data.options.test_fraction": 0.3}),
    (
        "evotune",
        {
            "stages.0.options": {
                "mask_probability": 0.2,
                "sequences_path": "family.fasta",
                "last_n_layers": 1,
            },
            "stages.1.options": {"pooling": "bos", "last_n_layers": 2},
        },
    ),
    ("sequence", {"stages.0.adapter": None, "stages.0.options": {"last_n_layers": 1}, "compare": [LORA]}),
]


@pytest.mark.parametrize(("base", "settings"), READ, ids=[str(i) for i in range(len(READ))])
def test_validate_accepts_the_fields_where_they_are_read(tmp_path, base, settings):
    assert _errors(tmp_path, base, settings) == []


def test_masked_lm_fasta_is_held_to_the_residue_limit(tmp_path, tiny_backbone):
    (tmp_path / "family.fasta").write_text(">a\nMKTAYIAKQR\n>b\nMKV\n")
    model = ProteinModel(tiny_backbone, "regression", 2)
    splits = {"train": [], "valid": [ProteinRecord("v", "MKTW", target=1.0)]}
    stage = StageOptions(sequences_path=str(tmp_path / "family.fasta"))
    spec = object()  # any adapter: the plan only carries it
    plan, facts = masked_lm_stage(model, "evo", spec, stage, splits, DataOptions(long_sequences="crop"), 5)
    assert [r.sequence for r in plan.dataset.records] == ["MKTAY", "MKV"]
    assert facts["sequences_issues"]["cropped"] == 1
    plan, facts = masked_lm_stage(model, "evo", spec, stage, splits, DataOptions(long_sequences="skip"), 5)
    assert [r.sequence for r in plan.dataset.records] == ["MKV"]
    with pytest.raises(Exception, match="more than the limit of 5"):
        masked_lm_stage(model, "evo", spec, stage, splits, DataOptions(), 5)
