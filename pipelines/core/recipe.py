"""The recipe schema (pydantic, ``extra="forbid"`` everywhere), loading, overrides and validation.

A recipe is plain YAML data (``yaml.safe_load`` rules: no tags that build Python objects, no dotted
import paths). Domain knobs live in the ``options`` dicts of ``backbone``, ``data`` and each stage; the
pipeline validates them with the options model it registered::

    class ImagingOptions(BaseModel, extra="forbid"):      # every field optional or defaulted
        backbone: BackboneOptions = BackboneOptions()     # validates recipe.backbone.options
        data: DataOptions = DataOptions()                 # validates recipe.data.options
        stages: list[StageOptions] = []                   # validates [s.options for s in recipe.stages]

    register_pipeline("imaging/classification", ImagingPipeline, options=ImagingOptions)

A pipeline reads the validated model with :func:`pipeline_options` in its ``from_recipe``. An options
model without a ``data`` field (say) means the pipeline takes no data options; a recipe giving some is
an error. A pipeline class may also declare ``OBJECTIVES``, ``BASELINES`` and ``DATASETS`` (tuples of
names) to have ``stages[i].objective``, ``compare`` and ``data.dataset`` checked at validation time,
``SPEC_BASELINES = True`` when it trains ``compare`` entries given as adapter specs, and a
``check_recipe(recipe)`` class method returning ``(yaml path, reason)`` pairs for the fields it cannot
honour (say, ``data.shots_per_class`` on a regression task): every field is honoured or refused here,
never silently ignored.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Union

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from pipelines.core.peft import ADAPTER_METHODS
from pipelines.core.recipe_yaml import (
    RecipeError,
    RecipeValidationError,
    apply_overrides,
    line_of,
    parse_yaml,
    suggest,
    translate_errors,
    yaml_error,
)
from pipelines.core.training import TrainConfig

__all__ = [
    "AdapterSpec",
    "BackboneSection",
    "DataSection",
    "EvaluationSection",
    "Recipe",
    "RecipeError",
    "RecipeValidationError",
    "StageSection",
    "apply_overrides",
    "check_pipeline",
    "find_recipe",
    "list_recipes",
    "load_recipe",
    "pipeline_options",
    "recipe_to_yaml",
    "recipes_dir",
    "save_recipe",
    "validate_recipe_file",
]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_SPECS = tuple(ADAPTER_METHODS.values())
AdapterSpec = Annotated[Union[_SPECS], Field(discriminator="method")] if len(_SPECS) > 1 else _SPECS[0]  # noqa: UP007


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackboneSection(_Section):
    """Which pretrained network the pipeline starts from."""

    name: str = Field(
        description="A named offline default of the pipeline (e.g. dinov2_small), a hub id or a path."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Pipeline-defined backbone knobs, checked by its options model."
    )


class DataSection(_Section):
    """Which dataset, task and subset the pipeline trains and evaluates on."""

    dataset: str = Field(description="A registered dataset (`peft-pipelines list datasets`) or a path.")
    task: str | None = Field(
        None, description="Evaluation task: binary, multiclass, multilabel or regression (null: the default)."
    )
    fraction: float = Field(1.0, gt=0, le=1, description="Fraction of the training split used (seeded).")
    shots_per_class: int | None = Field(
        None, ge=1, description="Few-shot: training examples kept per class (null: all)."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Pipeline-defined data knobs, checked by its options model."
    )


class StageSection(_Section):
    """One training stage: adds an adapter (or none) and trains the named adapters."""

    name: str = Field(pattern=_NAME, description="Stage name; also the name of the adapter it adds.")
    objective: str = Field(description="Pipeline-defined objective, e.g. classification or causal_lm.")
    adapter: AdapterSpec | None = Field(
        None,
        description="Adapter spec chosen by `method` (lora, bottleneck, ...); null trains the head only.",
    )
    trainable: list[str] | None = Field(
        None,
        description="Adapters trained here (this or earlier stages); default [name], or [] with no adapter.",
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop settings.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Pipeline-defined stage knobs, checked by its options model."
    )

    @model_validator(mode="after")
    def _default_trainable(self) -> StageSection:
        if self.trainable is None:
            self.trainable = [self.name] if self.adapter is not None else []
        return self


class EvaluationSection(_Section):
    """How the test split is scored."""

    metrics: list[str] = Field(default_factory=list, description="Metric names (empty: the task's defaults).")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for the 95% intervals (0: none).")
    headline: str | None = Field(None, description="The metric reported first (default: the first metric).")


class Recipe(_Section):
    """A complete, validated run description."""

    name: str = Field(pattern=_NAME, description="Run name; runs go to <output_dir>/<name>/<timestamp>/.")
    pipeline: str = Field(description="Registered pipeline, e.g. imaging/classification.")
    description: str = Field("", description="One line saying what the recipe does.")
    seed: int = Field(0, ge=0, description="Seed for Python, NumPy and torch.")
    seeds: list[int] | None = Field(
        None,
        description="Repeat the whole experiment once per seed (each replaces `seed`); the report gives each "
        "model's mean over seeds with a pooled interval and the seeds on which the primary model won.",
    )
    backbone: BackboneSection = Field(description="The pretrained network.")
    data: DataSection = Field(description="The dataset and task.")
    stages: list[StageSection] = Field(min_length=1, description="Training stages, run in order.")
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection, description="Scoring.")
    compare: list[str | AdapterSpec] = Field(
        default_factory=list,
        description="Baselines on the same data, seed and budget: a pipeline-defined name, or an adapter "
        "spec trained exactly as written with the last stage's objective and training settings.",
    )
    output_dir: str = Field("runs", description="Folder that receives the run directories.")

    _source: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        problems = []  # "path: message" lines, split back into separate errors by translate_errors
        if self.seeds is not None:
            if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
                problems.append("seeds: give at least two different non-negative seeds, e.g. [0, 1, 2]")
            if self.seed != 0:
                problems.append("seed: with seeds, each repeat sets the seed; remove seed or put it in seeds")
        seen: dict[str, int] = {}
        for index, stage in enumerate(self.stages):
            if stage.name in seen:
                problems.append(
                    f"stages.{index}.name: '{stage.name}' is already the name of stage {seen[stage.name]}"
                )
            seen.setdefault(stage.name, index)
            adapters = {s.name for s in self.stages[: index + 1] if s.adapter is not None}
            for position, trained in enumerate(stage.trainable or []):
                if trained not in adapters:
                    known = ", ".join(sorted(adapters)) or "none"
                    problems.append(
                        f"stages.{index}.trainable.{position}: '{trained}' is not an adapter added by this "
                        f"or an earlier stage (adapters so far: {known})"
                    )
        evaluation = self.evaluation
        if evaluation.headline and evaluation.metrics and evaluation.headline not in evaluation.metrics:
            problems.append(f"evaluation.headline: '{evaluation.headline}' is not one of evaluation.metrics")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def source(self) -> Path | None:
        """The file this recipe was loaded from, if any."""
        return self._source


def recipes_dir() -> Path:
    """Return the shipped recipes folder, ``pipelines/recipes`` (package data; ``recipes`` links to it in a
    checkout)."""
    return Path(__file__).resolve().parents[1] / "recipes"


def list_recipes(pattern: str = "*") -> list[str]:
    """Return shipped recipe names such as ``imaging/pneumoniamnist_dinov2s_lora`` matching a pattern."""
    root = recipes_dir()
    names = (p.relative_to(root).with_suffix("").as_posix() for p in root.glob("*/*.yaml"))
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def find_recipe(name_or_path: str | Path) -> Path:
    """Return the path of a recipe file, or of a shipped recipe given by name (``domain/name``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = recipes_dir() / f"{str(name_or_path).removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    close = suggest(str(name_or_path).removesuffix(".yaml"), list_recipes())
    hint = f"did you mean '{close}'? " if close else ""
    raise FileNotFoundError(
        f"recipe '{name_or_path}' is neither a file nor a shipped recipe; {hint}"
        "see `peft-pipelines list recipes`"
    )


def pipeline_options(recipe: Recipe) -> BaseModel | None:
    """Return the recipe's options validated by its pipeline's options model (None if it has none)."""
    from pipelines.core.registry import get_pipeline_entry

    model = get_pipeline_entry(recipe.pipeline).options
    if model is None:
        return None
    return model.model_validate(_options_payload(model, recipe)[0])


def _options_payload(model: type | None, recipe: Recipe) -> tuple[dict, list[tuple[list[str], str]]]:
    sections = {
        "backbone": recipe.backbone.options,
        "data": recipe.data.options,
        "stages": [stage.options for stage in recipe.stages],
    }
    fields = model.model_fields if model is not None else {}
    payload, refused = {}, []
    for key, value in sections.items():
        if key in fields:
            payload[key] = value
        elif key == "stages":
            refused += [(["stages", str(i), "options"], "stage") for i, v in enumerate(value) if v]
        elif value:
            refused.append(([key, "options"], key))
    return payload, refused


def _options_path(parts: list[str]) -> list[str]:
    """Map a path inside the options payload to the recipe's YAML path."""
    cut = 2 if parts[:1] == ["stages"] else 1
    return [*parts[:cut], "options", *parts[cut:]]


def check_pipeline(
    recipe: Recipe, node: yaml.Node | None = None, file: str | None = None
) -> list[RecipeError]:
    """Check what only the pipeline knows: its name, options, objectives, baselines and dataset."""
    from pipelines.core.data import list_datasets
    from pipelines.core.registry import get_pipeline_entry

    def error(parts: list[str], message: str, candidates: Sequence[str] = (), word: str = "") -> RecipeError:
        return RecipeError(".".join(parts), message, suggest(word, candidates) if word else None,
                           line_of(node, parts), file)  # fmt: skip

    name_errors = _pipeline_name_errors(recipe.pipeline, node, file or "")
    if name_errors:
        return name_errors
    entry = get_pipeline_entry(recipe.pipeline)
    errors = []
    payload, refused = _options_payload(entry.options, recipe)
    for parts, section in refused:
        errors.append(error(parts, f"pipeline {entry.name} takes no {section} options"))
    if entry.options is not None:
        try:
            entry.options.model_validate(payload)
        except pydantic.ValidationError as problem:
            for item in translate_errors(problem, entry.options, payload, None, file):
                parts = _options_path(item.path.split("."))
                errors.append(
                    RecipeError(".".join(parts), item.message, item.suggestion, line_of(node, parts), file)
                )
    objectives = getattr(entry.cls, "OBJECTIVES", None)
    for index, stage in enumerate(recipe.stages):
        if objectives is not None and stage.objective not in objectives:
            message = (
                f"pipeline {entry.name} has no objective '{stage.objective}' (has: {', '.join(objectives)})"
            )
            errors.append(error(["stages", str(index), "objective"], message, objectives, stage.objective))
    baselines = getattr(entry.cls, "BASELINES", None)
    for index, baseline in enumerate(recipe.compare):
        if not isinstance(baseline, str):
            if not getattr(entry.cls, "SPEC_BASELINES", False):
                message = f"pipeline {entry.name} takes baseline names only: {', '.join(baselines or ())}"
                errors.append(error(["compare", str(index)], message))
            continue
        if baselines is not None and baseline not in baselines:
            message = (
                f"pipeline {entry.name} has no baseline '{baseline}' (has: {', '.join(baselines) or 'none'})"
            )
            errors.append(error(["compare", str(index)], message, baselines, baseline))
    errors += _metric_errors(recipe, error)
    check = getattr(entry.cls, "check_recipe", None)
    if check is not None and not errors:  # the pipeline's own checks may assume valid options
        errors += [error(path.split("."), reason) for path, reason in check(recipe)]
    dataset = recipe.data.dataset
    known = getattr(entry.cls, "DATASETS", None) or list_datasets()
    if "/" not in dataset and "." not in dataset and dataset not in known:
        message = (
            f"unknown dataset '{dataset}' for pipeline {entry.name} (known: {', '.join(known) or 'none'})"
        )
        errors.append(error(["data", "dataset"], message, known, dataset))
    return errors


def _pipeline_name_errors(name: str, node: yaml.Node | None, file: str) -> list[RecipeError]:
    from pipelines.core.registry import RegistryError, get_pipeline_entry

    try:
        get_pipeline_entry(name)
    except RegistryError as problem:
        return [RecipeError("pipeline", str(problem), None, line_of(node, ["pipeline"]), file)]
    return []


def _metric_errors(recipe: Recipe, error: Any) -> list[RecipeError]:
    """Check the task and metric names against the evaluation registry (domains add theirs on import)."""
    from pipelines.core.evaluation import get_metric, list_metrics
    from pipelines.core.evaluation.registry import known_tasks

    errors = []
    task, tasks = recipe.data.task, known_tasks()
    if task is not None and task not in tasks:
        errors.append(
            error(["data", "task"], f"unknown task '{task}' (tasks: {', '.join(tasks)})", tasks, task)
        )
    names = list_metrics()
    evaluation = recipe.evaluation
    checked = [(["evaluation", "metrics", str(i)], m) for i, m in enumerate(evaluation.metrics)]
    if evaluation.headline and not evaluation.metrics:
        checked.append((["evaluation", "headline"], evaluation.headline))
    for parts, metric in checked:
        if metric not in names:
            errors.append(
                error(parts, f"unknown metric '{metric}' (see pipelines.core.evaluation)", names, metric)
            )
        elif task in tasks and task is not None and task not in get_metric(metric).tasks:
            errors.append(error(parts, f"metric '{metric}' does not apply to task '{task}'"))
    return errors


def _load(
    path: str | Path, overrides: Sequence[str], pipeline_checks: bool
) -> tuple[Recipe | None, list[RecipeError]]:
    file = find_recipe(path)
    shown = str(file)
    try:
        data, node = parse_yaml(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as problem:
        return None, [yaml_error(problem, shown)]
    if not isinstance(data, dict):
        return None, [
            RecipeError("", "a recipe must be a YAML mapping of keys to values", file=shown, line=1)
        ]
    try:
        data = apply_overrides(data, overrides, Recipe)
    except RecipeValidationError as problem:
        return None, [
            RecipeError(e.path, f"override: {e.message}", e.suggestion, file=shown) for e in problem.errors
        ]
    try:
        recipe = Recipe.model_validate(data)
    except pydantic.ValidationError as problem:
        errors = translate_errors(problem, Recipe, data, node, shown)
        if pipeline_checks and isinstance(data.get("pipeline"), str):
            errors += _pipeline_name_errors(data["pipeline"], node, shown)
        return None, errors
    recipe._source = file
    return recipe, check_pipeline(recipe, node, shown) if pipeline_checks else []


def load_recipe(path: str | Path, overrides: Sequence[str] = (), check: bool = True) -> Recipe:
    """Load, override and validate a recipe file (or a shipped recipe name).

    Args:
        path: A YAML file or a shipped name such as ``imaging/pneumoniamnist_dinov2s_lora``.
        overrides: ``dotted.key=value`` items applied before validation.
        check: Also run the pipeline-level checks (:func:`check_pipeline`).

    Raises:
        RecipeValidationError: Every problem at once, each with its YAML path.
    """
    file = find_recipe(path)
    recipe, errors = _load(file, overrides, check)
    if errors or recipe is None:
        raise RecipeValidationError(sorted(errors, key=lambda error: error.line or 0), str(file))
    return recipe


def validate_recipe_file(path: str | Path, overrides: Sequence[str] = ()) -> list[RecipeError]:
    """Return every problem of a recipe file (empty when valid), each with its YAML path and line."""
    try:
        return sorted(_load(path, overrides, True)[1], key=lambda error: error.line or 0)
    except FileNotFoundError as problem:
        return [RecipeError("", str(problem), file=str(path))]


def recipe_to_yaml(recipe: Recipe) -> str:
    """Return the recipe as YAML that loads back to an equal Recipe."""
    data = recipe.model_dump(mode="json")
    for stage in data["stages"]:
        if stage["adapter"] is not None:  # the method first, as a person writes it
            stage["adapter"] = {"method": stage["adapter"]["method"], **stage["adapter"]}
    data["compare"] = [e if isinstance(e, str) else {"method": e["method"], **e} for e in data["compare"]]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write the resolved recipe to ``path`` and return it."""
    path = Path(path)
    path.write_text(recipe_to_yaml(recipe), encoding="utf-8")
    return path
