"""The clip sweep of a speaker-adaptation report, and what both speech hooks classes keep of their models.

``data.options.sweep_clips``: the stage's adapter alone is retrained from each number of adaptation clips
and scored on the same test clips (``extra.sweep_adaptation_clips``); the other models are not retrained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipelines.core.experiment import Trained, train_candidate
from pipelines.speech.scoring import Synthesis, evaluate_scores, unscored_summary

__all__ = ["clip_sweep", "model_syntheses"]


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


def model_syntheses(hooks: Any, models: dict[str, Trained]) -> dict[str, Synthesis]:
    """Each model's test synthesis: a trained one's from ``hooks.syntheses``, an untrained baseline's from
    ``hooks.untrained``."""
    return {
        label: hooks.untrained[label] if m.model is None else hooks.syntheses[id(m.model)]
        for label, m in models.items()
    }
