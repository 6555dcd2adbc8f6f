"""The experiment a recipe describes, written once for every pipeline.

``run_experiment(hooks, recipe, run_dir, resume)``: load the data through the domain's hooks, draw the
low-data training subset (``data.fraction``, ``data.shots_per_class``), train the recipe's stages on one
model (add the stage's adapter, ``set_trainable``, ``core.training.train``), save its adapters and check
that they reload to identical outputs, train each ``compare`` entry on the same data, seed and step
budget (saving its adapters too), score every model on the test split with ``evaluate``, and return the
RunResult the runner writes as the report: the headline, parameters (trainable = what any stage
trained; total = every parameter of the final model, adapters included), cost (with each phase's wall
and CPU seconds), what each stage of each model trained (``extra.models``) and the notes on the low-data
draw and compare specs.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.core.evaluation import RunResult, evaluate
from pipelines.core.experiment.accounting import Laps, adapter_entry, cost, headline_metric, parameter_count
from pipelines.core.experiment.hooks import ExperimentData, ExperimentHooks, Outcome, StagePlan, Trained
from pipelines.core.peft import (
    add_adapter,
    as_spec,
    load_adapter,
    save_adapter,
    set_trainable,
    spec_to_dict,
    wrappers,
)
from pipelines.core.sampling import low_data_indices
from pipelines.core.training import train

__all__ = ["run_experiment", "compare_label", "compare_stages", "recipe_notes", "train_candidate"]


def run_experiment(hooks: ExperimentHooks, recipe: Any, run_dir: Path, resume: bool = False) -> RunResult:
    """Run ``recipe`` with the domain's ``hooks``; returns the report's content (see the module docstring)."""
    started, laps = time.perf_counter(), Laps()
    run_dir = Path(run_dir)
    data = hooks.load_data(run_dir)
    laps.lap("load_data")
    keep = low_data_indices(
        data.train_size, data.train_labels, recipe.data.fraction, recipe.data.shots_per_class, recipe.seed
    )
    hooks.keep_training(keep)
    data.info["low_data"] = {"fraction": recipe.data.fraction, "shots_per_class": recipe.data.shots_per_class,
                             "train_full": data.train_size, "train_used": len(keep)}  # fmt: skip
    laps.lap("keep_training")
    primary = getattr(hooks, "primary_label", primary_label)(recipe)
    models = {primary: train_candidate(hooks, recipe.stages, primary, run_dir, resume, recipe.seed, True)}
    laps.lap(primary, model=True)
    for entry in recipe.compare:
        label = compare_label(entry)
        if label == primary:
            continue
        plan = compare_stages(recipe, entry) if not isinstance(entry, str) else hooks.baseline(entry)
        first = len(recipe.stages) - 1 if not isinstance(entry, str) else 0  # a spec copies the last stage
        models[label] = _outcome(label, plan) if isinstance(plan, Outcome) else train_candidate(
            hooks, plan, label, run_dir / "baselines", resume, recipe.seed, True, first, check=False
        )  # fmt: skip
        laps.lap(label, model=True)
    metrics = list(recipe.evaluation.metrics or data.metrics) or None
    results = {
        label: evaluate(data.task, *m.predictions, metrics, recipe.evaluation.bootstrap, recipe.seed,
                        **m.details.get("evaluate", {}))
        for label, m in models.items()
    }  # fmt: skip
    laps.lap("evaluate")
    described = hooks.describe(models)
    laps.lap("describe")
    results.update(described.pop("results", {}))
    described["adapter"] = adapter_entry(recipe, models[primary].adapters) | described.get("adapter", {})
    described["notes"] = described.get("notes", []) + recipe_notes(recipe, primary, data)
    return RunResult(
        name=recipe.name, pipeline=recipe.pipeline, task=data.task,
        headline_metric=headline_metric(recipe, results[primary]), primary_model=primary,
        results=results, predictions={label: m.predictions for label, m in models.items()},
        parameters={label: m.parameters for label, m in models.items()},
        histories={label: _history(m.results) for label, m in models.items()},
        info=_info(data.info, described, models, primary, (started, laps)),
    )  # fmt: skip


def primary_label(recipe: Any) -> str:
    """The primary model's label: its stages' adapter methods, each once, joined by '+', or 'head_only'."""
    methods = [stage.adapter.method for stage in recipe.stages if stage.adapter is not None]
    return "+".join(dict.fromkeys(methods)) or "head_only"


def compare_label(entry: Any) -> str:
    """A compare entry's label: the baseline's name, or ``<method>_<field><value>...`` for a spec, which is
    also its adapter's name, so a value keeps only letters, digits, '_' and '-' (alpha 32.0 -> alpha32,
    dropout 0.1 -> dropout0p1)."""
    if isinstance(entry, str):
        return entry
    spec = spec_to_dict(as_spec(entry))
    defaults = spec_to_dict(type(as_spec(entry))())
    changed = [f"{key}{_label_value(value)}" for key, value in spec.items()
               if key not in ("method", "targets") and value != defaults.get(key)]  # fmt: skip
    return "_".join([spec["method"], *changed])


def _label_value(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text.replace(".", "p")).strip("_")


def recipe_notes(recipe: Any, primary: str, data: ExperimentData) -> list[str]:
    """What the engine did that a reader needs to know: the low-data draw and how compare entries trained."""
    notes, low, last = [], data.info["low_data"], recipe.stages[-1]
    if low["train_used"] != low["train_full"] or low["shots_per_class"] is not None:
        asked = f"data.fraction={low['fraction']:g}"
        if low["shots_per_class"] is not None:
            asked += f", data.shots_per_class={low['shots_per_class']}"
        how = "per class" if data.train_labels is not None else "at random"
        notes.append(f"Low-data run: {low['train_used']} of {low['train_full']} training examples drawn "
                     f"{how} ({asked}, seed {recipe.seed}); every model trains on these or on the domain's "
                     "cap of them.")  # fmt: skip
    for entry in recipe.compare:
        label = compare_label(entry)
        if label == primary:
            notes.append(f"Compare entry '{label}' is the primary model; trained once.")
        elif not isinstance(entry, str):
            notes.append(
                f"Compare entry '{label}' is a copy of the last stage ('{last.name}', {last.objective}: its "
                "data, training settings and steps) with only this adapter (and the head, where the model "
                "has one), trained on a new model without the earlier stages' adapters."
            )
    return notes


def compare_stages(recipe: Any, entry: Any) -> list[Any]:
    """A compare entry written as an adapter spec: the last stage's objective and budget, this adapter."""
    last = recipe.stages[-1]
    label = compare_label(entry)
    return [last.model_copy(update={"name": label, "adapter": as_spec(entry), "trainable": [label]})]


def train_candidate(
    hooks: ExperimentHooks, stages: list[Any], label: str, root: Path, resume: bool, seed: int, save: bool,
    first: int = 0, check: bool = True,
) -> Trained:  # fmt: skip
    """Train ``stages`` in order on a new model; when ``save``, save its adapters (``root/adapters/<stage>``,
    a baseline's with ``check=False`` under ``root/adapters/<label>/``) and, when ``check``, reload them.

    ``plan_stage`` gets each stage's index in the recipe: ``first`` is the first one's (a compare spec is a
    copy of the last recipe stage, so its options are that stage's).

    The optional hook ``evaluate_options(model)`` returns this model's keyword arguments of ``evaluate``
    (a binary threshold chosen on validation: ``{"threshold": t}``).
    """
    model = hooks.new_model()
    trained_names: set[str] = set()
    results, plans, stage_facts = [], [], []
    for index, stage in enumerate(stages):
        plan = hooks.plan_stage(model, stage, first + index)
        plans.append(plan)
        _prepare(model, stage, plan)
        trained_names |= {name for name, p in model.named_parameters() if p.requires_grad}
        folder = root / "train" / label / stage.name if plan.checkpoint else None
        config = plan.train or stage.train
        if folder is None:  # a model the domain trains without checkpoints (a cheap baseline)
            config = config.model_copy(update={"checkpoint_every": None})
        result = plan.trained if plan.trained is not None else train(
            model, plan.dataset, plan.loss_fn, config, val_data=plan.val_data,
            evaluate_fn=plan.evaluate_fn, run_dir=folder, resume=resume and folder is not None,
            collate_fn=plan.collate_fn, seed=seed, progress=False,
        )  # fmt: skip
        results.append(result)
        stage_facts.append(_stage_facts(model, stage, plan, config, result))
        if hasattr(hooks, "after_stage"):
            hooks.after_stage(model, stage, result)
    candidate = Trained(label, model, hooks.predict(model), parameter_count(model, trained_names), results)
    candidate.details["stages"] = stage_facts
    if hasattr(hooks, "evaluate_options"):
        candidate.details["evaluate"] = hooks.evaluate_options(model)
    if save:
        _save(hooks, candidate, stages, plans, root / "adapters" / ("" if check else label))
    if save and check:
        _check_reload(hooks, candidate)
    return candidate


def _stage_facts(model: nn.Module, stage: Any, plan: StagePlan, config: Any, result: Any) -> dict[str, Any]:
    """What one stage trained as the engine ran it: its adapter as written and the modules it went on,
    what trained, the learning rate, whether it wrote checkpoints, its steps and time."""
    facts = {"name": stage.name, "objective": stage.objective,
             "adapter": spec_to_dict(stage.adapter) if stage.adapter is not None else None}  # fmt: skip
    if plan.adapter is not None:
        facts["adapted_modules"] = [path for path, layer in wrappers(model) if stage.name in layer.adapters]
    trainable = "all" if plan.full else list(stage.trainable or []) + list(plan.extra_trainable)
    facts |= {"trainable": trainable, "lr": config.lr, "checkpoints": plan.checkpoint,
              "steps": result.steps, "wall_time_s": round(result.wall_time_s, 2)}  # fmt: skip
    if result.best_step is not None:  # the best evaluation, by the stage's early_stopping_metric and mode
        facts["best"] = {"metric": result.metric_name, "value": result.best_metric, "step": result.best_step}
    return facts | ({"notes": list(result.notes)} if result.notes else {})


def _prepare(model: nn.Module, stage: Any, plan: StagePlan) -> None:
    if plan.full:
        model.requires_grad_(True)
        return
    if plan.adapter is not None:
        add_adapter(model, plan.adapter, name=stage.name)
    set_trainable(model, list(stage.trainable or []), extra=plan.extra_trainable)


def _adapter_module(hooks: ExperimentHooks, model: nn.Module) -> nn.Module:
    """The module whose adapters a file holds: ``hooks.adapter_module(model)`` (a wrapper's inner model,
    whose own module names lab code saves) or the model."""
    return hooks.adapter_module(model) if hasattr(hooks, "adapter_module") else model


def _save(hooks: ExperimentHooks, candidate: Trained, stages, plans, root: Path) -> None:
    """Save each stage's adapter, with what trained beside it (a head), to ``root/<stage>``."""
    module = _adapter_module(hooks, candidate.model)
    for stage, plan in zip(stages, plans, strict=True):
        if plan.adapter is not None:
            save_adapter(module, root / stage.name, name=stage.name, extra=plan.extra_trainable)
            candidate.adapters[stage.name] = root / stage.name


def _check_reload(hooks: ExperimentHooks, candidate: Trained) -> None:
    """Load the saved adapters into a fresh model and compare ``hooks.probe`` outputs (no probe: no check)."""
    probe = getattr(hooks, "probe", None)
    if not candidate.adapters or probe is None:
        return
    fresh = hooks.new_model()
    for folder in candidate.adapters.values():
        load_adapter(_adapter_module(hooks, fresh), folder)
    _match_placement(fresh, candidate.model)
    candidate.model.eval(), fresh.eval()
    with torch.no_grad():
        same = torch.equal(probe(candidate.model), probe(fresh))
    candidate.details["reload_identical"] = bool(same)


def _match_placement(fresh: nn.Module, trained: nn.Module) -> None:
    """Give the reloaded model the trained one's device and per-parameter dtypes (the precision policy
    casts frozen weights to bf16 on a GPU), so the reload check compares like with like."""
    placed = dict(trained.named_parameters())
    device = next(iter(placed.values())).device if placed else None
    if device is not None:
        fresh.to(device)  # buffers too (BatchNorm statistics)
    with torch.no_grad():
        for name, parameter in fresh.named_parameters():
            twin = placed.get(name)
            if twin is not None and (parameter.dtype != twin.dtype or parameter.device != twin.device):
                parameter.data = parameter.data.to(device=twin.device, dtype=twin.dtype)


def _history(results: list[Any]) -> list[dict]:
    """The stages' training rows on one step axis: a later stage's steps continue the earlier ones'."""
    rows, offset = [], 0
    for result in results:
        rows += [
            {**row, "step": row["step"] + offset} if "step" in row else dict(row) for row in result.history
        ]
        offset += result.steps
    return rows


def _outcome(label: str, outcome: Outcome) -> Trained:
    total = max(outcome.total, 1)
    parameters = {
        "trainable": outcome.trainable,
        "total": outcome.total,
        "fraction": outcome.trainable / total,
    }
    return Trained(label, None, outcome.predictions, parameters, details=dict(outcome.details))


def _model_facts(model: Trained) -> dict[str, Any]:
    """Steps, the precision policy of each stage, and what the engine noted (reload check, details)."""
    facts = {"steps": sum(r.steps for r in model.results)}
    policies = [getattr(r, "precision_policy", None) for r in model.results]
    if any(policies):
        facts["precision"] = policies
    if model.adapters:
        facts["adapters"] = {stage: str(folder) for stage, folder in model.adapters.items()}
    return facts | {key: value for key, value in model.details.items() if key != "evaluate"}


def _info(dataset: dict, described: dict, models: dict[str, Trained], primary: str, clock: tuple) -> dict:
    main = models[primary]
    notes = list(described.pop("notes", []))
    notes += [f"Training of '{primary}', stage '{stage['name']}': {note.rstrip('.')}."
              for stage in main.details.get("stages", []) for note in stage.get("notes", [])]  # fmt: skip
    if "reload_identical" in main.details:
        verdict = "identical" if main.details["reload_identical"] else "DIFFERENT"
        notes.append(f"The saved adapters ({', '.join(main.adapters)}) reloaded into a fresh model give "
                     f"{verdict} outputs on test examples.")  # fmt: skip
    extra = described.pop("extra", {})
    extra["models"] = {label: _model_facts(m) for label, m in models.items()}
    return {
        "dataset": {**dataset, **described.pop("dataset", {})},
        "cost": {**cost(models, primary, *clock), **described.pop("cost", {})},
        "notes": notes,
        "extra": extra,
        **described,
    }
