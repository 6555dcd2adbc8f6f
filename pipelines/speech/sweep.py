"""The clip sweep of a speaker-adaptation report, and the describe steps both adaptation hooks share.

``data.options.sweep_clips``: the stage's adapter alone is retrained from each number of adaptation clips
and scored on the same test clips (``extra.sweep_adaptation_clips``); the other models are not retrained.
Both hooks classes keep each model's test synthesis (``syntheses``: by ``id(model)``; ``untrained``: by
label) and hand themselves to :func:`summarize_models`, which also writes what lab code reloads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.core.experiment import Outcome, Trained, train_candidate
from pipelines.speech.report import adapter_facts
from pipelines.speech.saved import write_speech_facts
from pipelines.speech.scoring import Synthesis, evaluate_scores, unscored_summary

__all__ = ["Summary", "stage_label", "untrained_baseline", "clip_sweep", "summarize_models"]


def stage_label(recipe: Any) -> str:
    """The stage's name (``speaker``), as speech reports have always named the adapted model."""
    return recipe.stages[-1].name


def untrained_baseline(hooks: Any, name: str, model: Any, synthesis: Synthesis, details=None) -> Outcome:
    """The base model as it is, a baseline nothing trains; its test ``synthesis`` is kept in
    ``hooks.untrained``."""
    hooks.untrained[name] = synthesis
    total = sum(p.numel() for p in model.parameters())
    return Outcome((synthesis.digits, synthesis.scores), 0, total, dict(details or {}))


def clip_sweep(hooks: Any, counts: list, training_for: Callable[[Any], Any], unscored: dict) -> dict:
    """Retrain ``hooks.recipe``'s stages with ``hooks.training = training_for(count)`` for each count;
    returns ``{count: {metric: interval}}`` and adds each run's unscored counts to ``unscored``.

    ``hooks`` is a speech hooks object: its ``predict`` keeps each synthesis in ``hooks.syntheses``.
    """
    recipe, kept, results = hooks.recipe, hooks.training, {}
    bootstrap, seed = recipe.evaluation.bootstrap, recipe.seed
    for count in counts:
        hooks.training = training_for(count)
        label = f"sweep_{count}_clips"
        trained = train_candidate(hooks, recipe.stages, label, hooks.run_dir, hooks.resume, seed, False)
        synthesis = hooks.syntheses.pop(id(trained.model))
        report = evaluate_scores(synthesis, bootstrap, seed, hooks.metrics)
        results[str(count)] = {metric: report[metric].to_dict() for metric in report}
        unscored[label] = unscored_summary(synthesis, hooks.metrics)
    hooks.training = kept
    return results


@dataclass
class Summary:
    """What both adaptation reports state of their models: each one's test synthesis (then the reference
    rows'), the unscored counts, the clip sweep, the primary model, its adapter folder and facts."""

    syntheses: dict[str, Synthesis]
    unscored: dict[str, dict]
    sweep: dict[str, dict]
    primary: Trained
    folder: Path
    adapter: dict[str, Any]


def summarize_models(
    hooks: Any, models: dict[str, Trained], references: dict[str, Synthesis], facts: dict
) -> Summary:
    """The shared describe steps of ``hooks`` (a speech adaptation hooks object): unscored counts of every
    model and reference row, the clip sweep (``hooks.sweep_training``), ``hooks.pipe.model`` set to the
    primary model and ``facts`` written beside its adapter (for ``pipe.load_adapter``)."""
    kept = {label: hooks.untrained[label] if m.model is None else hooks.syntheses[id(m.model)]
            for label, m in models.items()}  # fmt: skip
    syntheses = kept | references
    unscored = {label: unscored_summary(s, hooks.metrics) for label, s in syntheses.items()}
    sweep = clip_sweep(hooks, hooks.data.sweep_clips, hooks.sweep_training, unscored)
    label = stage_label(hooks.recipe)
    primary = models[label]
    hooks.pipe.model = primary.model  # lab code may synthesise with it after run
    folder = primary.adapters[label]
    write_speech_facts(folder, facts)
    return Summary(syntheses, unscored, sweep, primary, folder, adapter_facts(folder, primary))
