"""The recipe fields ``clinical/two_stage`` would accept and not read for the recipe's configuration,
refused at validate time (see ``ClinicalTwoStagePipeline.check_recipe``): each is a ``(yaml path,
reason)`` pair for a field the recipe sets, with a one-line reason ending in what to do.

What each field depends on: ``revision`` is read for hub ids only, ``dtype`` by hub ids and folders (GGUF
files are dequantised to float32, the random test model is float32), ``tiny`` by tiny-random-llama only;
MTSamples reads ``task_name`` and ``num_classes`` (the latter for its multiclass and multilabel tasks), a
notes file the column options; the split's train, val and test parts are read, validation only by a
classification stage that sets ``eval_every`` or ``early_stopping_patience`` (and then only its loss);
causal-LM stages read ``max_blocks`` and (the first one) ``eval_blocks``, classification stages
``pooling`` and ``class_weights``, and every classification stage classifies the first one's tokens with
its pooling.
"""

from __future__ import annotations

import inspect
from typing import Any

from pipelines.clinical.backbones import backbone_source, tiny_llama
from pipelines.clinical.data import MTSAMPLES
from pipelines.clinical.options import DataOptions, StageOptions

__all__ = ["unread_fields"]

TINY_SIZES = tuple(inspect.signature(tiny_llama).parameters)
COLUMNS = ("text_column", "label_columns", "id_column")
SPLITS = ("train", "val", "test")
LM_ONLY = ("max_blocks", "eval_blocks")
HEAD_ONLY = ("pooling", "class_weights")
VALIDATION = ("eval_every", "early_stopping_patience")
_WHERE = {"random": "the random test backbone", "gguf": "the GGUF backbone", "local": "the model folder"}


def unread_fields(recipe: Any) -> list[tuple[str, str]]:
    """Every field the recipe sets that this configuration would not read (or could not run)."""
    return _backbone_fields(recipe) + _data_fields(recipe) + _stage_fields(recipe)


def _given(options: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in (options or {}).items() if value is not None}


def _validates(stage: Any) -> bool:
    return bool(stage.train.early_stopping_patience or stage.train.eval_every)


def _backbone_fields(recipe: Any) -> list[tuple[str, str]]:
    name, given = recipe.backbone.name, _given(recipe.backbone.options)
    source = backbone_source(name)
    where = f"{_WHERE.get(source, 'the hub id')} {name}"
    problems = []
    if "revision" in given and source != "hub":
        reason = f"only hub ids read a revision; {where} does not: remove it"
        problems.append(("backbone.options.revision", reason))
    if given.get("dtype", "float32") != "float32" and source in ("random", "gguf"):
        reason = (
            f"{where} is always loaded in float32 (only hub ids and model folders read dtype): remove it "
            "or give a transformers folder or hub id"
        )
        problems.append(("backbone.options.dtype", reason))
    tiny = given.get("tiny") or {}
    if tiny and source != "random":
        problems.append(
            ("backbone.options.tiny", f"only tiny-random-llama reads its sizes; {where} does not: remove it")
        )
    elif tiny:
        sizes = ", ".join(TINY_SIZES)
        for key in tiny:
            if key not in TINY_SIZES:
                reason = (
                    f"tiny-random-llama has no size '{key}' (it takes {sizes}): remove it or use one of those"
                )
                problems.append((f"backbone.options.tiny.{key}", reason))
    return problems


def _data_fields(recipe: Any) -> list[tuple[str, str]]:
    dataset, given = recipe.data.dataset, _given(recipe.data.options)
    problems = []
    if dataset == MTSAMPLES.name:
        for key in COLUMNS:
            if key in given:
                reason = f"MTSamples has its own columns; only a notes file reads {key}: remove it"
                problems.append((f"data.options.{key}", reason))
        task_name = given.get("task_name", DataOptions.model_fields["task_name"].default)
        if "num_classes" in given and task_name == "cardiopulmonary_vs_rest":
            reason = (
                "the MTSamples task cardiopulmonary_vs_rest is binary; only top_specialties and "
                "specialties_multilabel read num_classes: remove it"
            )
            problems.append(("data.options.num_classes", reason))
    else:
        for key in ("task_name", "num_classes"):
            if key in given:
                reason = (
                    f"only MTSamples reads {key}; the notes file {dataset} takes its classes from "
                    "label_columns: remove it"
                )
                problems.append((f"data.options.{key}", reason))
    split = given.get("split", DataOptions.model_fields["split"].default_factory())
    for key in split:
        if key not in SPLITS:
            reason = (
                f"only the train, val and test parts are read, so the notes of '{key}' would go unused: "
                "rename it to one of those or remove it"
            )
            problems.append((f"data.options.split.{key}", reason))
    validating = [s for s in recipe.stages if s.objective == "classification" and _validates(s)]
    if "max_val" in given and not split.get("val"):
        reason = (
            "data.options.split has no val part, so there are no validation notes to cap: remove it or "
            "give split a val fraction"
        )
        problems.append(("data.options.max_val", reason))
    elif "max_val" in given and not validating:
        reason = (
            "no classification stage reads the validation notes (none sets train.eval_every or "
            "train.early_stopping_patience): remove it or set one of those"
        )
        problems.append(("data.options.max_val", reason))
    if not split.get("val"):
        reason = (
            "data.options.split has no val part, so there are no validation notes to evaluate: give split "
            "a val fraction or remove it"
        )
        for index, stage in enumerate(recipe.stages):
            if stage.objective == "classification":
                keys = [key for key in VALIDATION if getattr(stage.train, key) is not None]
                problems += [(f"stages.{index}.train.{key}", reason) for key in keys]
    return problems


def _stage_fields(recipe: Any) -> list[tuple[str, str]]:
    stages = recipe.stages
    lm = [i for i, s in enumerate(stages) if s.objective == "causal_lm"]
    heads = [i for i, s in enumerate(stages) if s.objective == "classification"]
    problems = []
    if not heads:
        problems.append(
            ("stages", "the clinical pipeline needs a classification stage (it trains the head): add one")
        )
    for index, stage in enumerate(stages):
        given, at, name = _given(stage.options), f"stages.{index}", stage.name
        if stage.objective == "classification":
            for key in LM_ONLY:
                if key in given:
                    reason = f"causal_lm stages read {key}; classification stage '{name}' does not: remove it"
                    problems.append((f"{at}.options.{key}", reason))
        else:
            for key in HEAD_ONLY:
                if key in given:
                    reason = f"classification stages read {key}; causal_lm stage '{name}' does not: remove it"
                    problems.append((f"{at}.options.{key}", reason))
            for key in VALIDATION:
                if getattr(stage.train, key) is not None:
                    reason = (
                        f"causal_lm stage '{name}' has no validation data (validation notes are classified, "
                        "not packed into blocks): remove it"
                    )
                    problems.append((f"{at}.train.{key}", reason))
            if index != lm[0] and "eval_blocks" in given:
                reason = (
                    "the held-out perplexity after every causal_lm stage uses the first one's blocks (stage "
                    f"'{stages[lm[0]].name}'): set eval_blocks there and remove it here"
                )
                problems.append((f"{at}.options.eval_blocks", reason))
        problems += _watching_fields(stage, at)
    if heads:
        problems += _head_consistency(recipe, heads)
    return problems


def _watching_fields(stage: Any, at: str) -> list[tuple[str, str]]:
    """An early-stopping metric the validation lacks: with patience it would fail, without it the best
    evaluation would silently not be tracked."""
    metric = stage.train.early_stopping_metric
    if stage.objective == "classification" and metric != "loss":
        reason = (
            f"the clinical validation computes only the loss, not '{metric}': set it to loss or remove it"
        )
        return [(f"{at}.train.early_stopping_metric", reason)]
    return []


def _head_consistency(recipe: Any, heads: list[int]) -> list[tuple[str, str]]:
    """Every classification stage classifies the first one's tokens (max_length) with its pooling."""
    first = recipe.stages[heads[0]]
    first_options = StageOptions.model_validate(dict(first.options or {}))
    problems = []
    for index in heads[1:]:
        stage = recipe.stages[index]
        options = StageOptions.model_validate(dict(stage.options or {}))
        for key in ("max_length", "pooling"):
            mine, theirs = getattr(options, key), getattr(first_options, key)
            if mine == theirs:
                continue
            at = index if key in _given(stage.options) else heads[0]
            reason = (
                f"classification stage '{stage.name}' has {key} {mine} and the first one ('{first.name}') "
                f"{theirs}; every classification stage uses the first one's: give them the same {key}"
            )
            problems.append((f"stages.{at}.options.{key}", reason))
    return problems
