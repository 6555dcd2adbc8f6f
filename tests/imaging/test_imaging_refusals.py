"""``peft-pipelines validate`` refuses an imaging option its configuration would not read, and only those."""

from __future__ import annotations

import pytest
import yaml

from pipelines.core.recipe import validate_recipe_file

TIMM_CNN, MONAI_CNN, HF = "timm:resnet18", "monai:DenseNet121", "hf:facebook/dinov2-small"
KWARGS = "backbone.options.model_kwargs"
SECOND_STAGE = {"name": "more", "objective": "classification", "adapter": {"method": "ssf", "targets": []},
                "train": {"max_steps": 2}}  # fmt: skip


def _recipe(backbone: str) -> dict:
    return {
        "name": "refusals", "pipeline": "imaging/classification",
        "backbone": {"name": backbone, "options": {"pretrained": False}},
        "data": {"dataset": "pneumoniamnist", "task": "binary",
                 "options": {"transforms": {"image_size": 32}}},
        "stages": [{"name": "task", "objective": "classification",
                    "adapter": {"method": "lora", "r": 4, "targets": []}, "train": {"max_steps": 2}}],
        "compare": ["linear_probe", "full_finetune"],
    }  # fmt: skip


def _set(recipe: dict, path: str, value) -> None:
    *parents, key = path.split(".")
    node = recipe
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):  # a new stage goes at the end
        node[int(key) : int(key) + 1] = [value]
    else:
        node[key] = value


def _errors(tmp_path, backbone: str, changes: dict) -> list:
    recipe = _recipe(backbone)
    for path, value in changes.items():
        _set(recipe, path, value)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return validate_recipe_file(tmp_path / "recipe.yaml")


# (backbone, the recipe's changes, the one error path validate must give)
REFUSED = [
    ("dinov2_small", {"backbone.options.weights": "w.safetensors"}, "backbone.options.weights"),
    (HF, {"backbone.options.weights": "w.safetensors"}, "backbone.options.weights"),
    ("dinov2_small", {"backbone.options.img_size": 224}, "backbone.options.img_size"),
    (HF, {"backbone.options.img_size": 224}, "backbone.options.img_size"),
    (MONAI_CNN, {"backbone.options.img_size": 64}, "backbone.options.img_size"),
    ("dinov2_small", {"backbone.options.in_channels": 1}, "backbone.options.in_channels"),
    (HF, {"backbone.options.spatial_dims": 3}, "backbone.options.spatial_dims"),
    (TIMM_CNN, {"backbone.options.spatial_dims": 3}, "backbone.options.spatial_dims"),
    (TIMM_CNN, {"backbone.options.pooling": "mean"}, "backbone.options.pooling"),
    (MONAI_CNN, {"backbone.options.pooling": "cls"}, "backbone.options.pooling"),
    ("dinov2_small", {KWARGS: {"num_hidden_layers": 2}}, KWARGS),
    (TIMM_CNN, {KWARGS: {"num_classes": 5}}, KWARGS + ".num_classes"),
    (TIMM_CNN, {KWARGS: {"in_chans": 1}}, KWARGS + ".in_chans"),
    ("timm:vit_tiny_patch16_224", {"backbone.options.img_size": 32, KWARGS: {"img_size": 64}},
     KWARGS + ".img_size"),
    ("monai:resnet18", {KWARGS: {"spatial_dims": 3}},
     KWARGS + ".spatial_dims"),
    (MONAI_CNN, {KWARGS: {"out_channels": 4}}, KWARGS + ".out_channels"),
    (MONAI_CNN, {"backbone.options.pretrained": True}, "backbone.options.pretrained"),
    (TIMM_CNN, {"backbone.options.weights": "w.pth"}, "backbone.options.pretrained"),
    ("dinov2_small", {"data.options.transforms": {"augment": False, "rotate_degrees": 10}},
     "data.options.transforms.rotate_degrees"),
    ("dinov2_small", {"data.options.transforms": {"augment": False, "flip_prob": 0.5}},
     "data.options.transforms.flip_prob"),
    ("dinov2_small", {"data.options.transforms": {"intensity": "minmax", "intensity_range": [0, 1]}},
     "data.options.transforms.intensity_range"),
    ("dinov2_small", {"compare": ["linear_probe"], "stages.0.options": {"full_finetune_lr_scale": 0.1}},
     "stages.0.options.full_finetune_lr_scale"),
    ("dinov2_small", {"compare": ["full_finetune"], "stages.0.options": {"linear_probe_lr_scale": 2.0}},
     "stages.0.options.linear_probe_lr_scale"),
    ("dinov2_small", {"stages.0.adapter": None, "stages.0.options": {"linear_probe_lr_scale": 2.0}},
     "stages.0.options.linear_probe_lr_scale"),  # the primary model is the linear probe: trained once
    ("dinov2_small", {"compare": [], "stages.0.options": {"checkpoint_baselines": True}},
     "stages.0.options.checkpoint_baselines"),
    ("dinov2_small", {"stages.0.options": {"full_finetune_lr_scale": 0.1}, "stages.1": SECOND_STAGE},
     "stages.0.options.full_finetune_lr_scale"),
    ("dinov2_small", {"stages.1": dict(SECOND_STAGE, options={"head_dropout": 0.2})},
     "stages.1.options.head_dropout"),
    ("dinov2_small", {"stages.0.options": {"update_batchnorm_stats": True}},
     "stages.0.options.update_batchnorm_stats"),
    (MONAI_CNN, {"compare": ["linear_probe", "ssf"], "stages.0.options": {"update_batchnorm_stats": True}},
     "stages.0.options.update_batchnorm_stats"),
    ("dinov2_small", {"stages.0.train": {"early_stopping_metric": "auroc", "early_stopping_patience": 2}},
     "stages.0.train.early_stopping_metric"),
]  # fmt: skip

ACCEPTED = [
    (HF, {"backbone.options.pooling": "mean", "backbone.options.model_kwargs": {"num_hidden_layers": 2}}),
    ("dinov2_small", {"backbone.options.in_channels": 3, "backbone.options.spatial_dims": 2}),
    ("monai:ViT", {"backbone.options.img_size": 32, "backbone.options.model_kwargs": {"patch_size": 8}}),
    (MONAI_CNN, {"backbone.options.weights": "w.pth", "backbone.options.pretrained": True,
                 "backbone.options.spatial_dims": 3}),
    (TIMM_CNN, {"backbone.options.in_channels": 1, "backbone.options.weights": "w.pth",
                "backbone.options.pretrained": True}),
    ("dinov2_small", {"data.options.transforms": {"augment": True, "rotate_degrees": 5, "flip_prob": 0.5,
                                                  "intensity": "range", "intensity_range": [0, 1]}}),
    ("dinov2_small", {"stages.0.options": {"full_finetune_lr_scale": 0.1, "linear_probe_lr_scale": 2.0,
                                           "checkpoint_baselines": True, "head_dropout": 0.1}}),
    (MONAI_CNN, {"stages.0.options": {"update_batchnorm_stats": True}}),  # full_finetune tunes them
    (MONAI_CNN, {"compare": [], "stages.0.adapter": {"method": "norm"},
                 "stages.0.options": {"update_batchnorm_stats": True}}),
    ("dinov2_small", {"stages.1": dict(SECOND_STAGE, options={"full_finetune_lr_scale": 0.1})}),
    ("dinov2_small", {"stages.0.train": {"early_stopping_metric": "loss", "early_stopping_patience": 2}}),
]  # fmt: skip


@pytest.mark.parametrize(("backbone", "changes", "path"), REFUSED, ids=[case[2] for case in REFUSED])
def test_validate_refuses_an_option_this_configuration_does_not_read(tmp_path, backbone, changes, path):
    """Each of these options is read by some configuration only; here it would be accepted and ignored."""
    errors = _errors(tmp_path, backbone, changes)
    assert [error.path for error in errors] == [path], errors
    reason, _, action = errors[0].message.rpartition(": ")  # one line: why, then what to do
    assert reason and action and "\n" not in errors[0].message


@pytest.mark.parametrize(("backbone", "changes"), ACCEPTED)
def test_validate_accepts_the_same_options_where_they_are_read(tmp_path, backbone, changes):
    assert _errors(tmp_path, backbone, changes) == []
