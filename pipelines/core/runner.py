"""Run a recipe end to end (seed, run directory, pipeline, report) and index the demo runs.

A run lives in ``<output_dir>/<recipe name>/<timestamp>/`` and holds the resolved ``recipe.yaml``,
``run.json`` (the recipe's hash, which a resume checks), whatever the pipeline writes (checkpoints,
``metrics.jsonl``, ``adapters/<name>/``) and the report (``report.json``, ``report.md``, plots). Only
the main process (rank 0) writes the run's own files.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipelines.core.checkpoint import seed_everything
from pipelines.core.evaluation import RunResult, write_report
from pipelines.core.evaluation.report_markdown import signed_numbers
from pipelines.core.recipe import (
    Recipe,
    apply_overrides,
    check_pipeline,
    find_recipe,
    load_recipe,
    save_recipe,
)
from pipelines.core.recipe_yaml import RecipeValidationError
from pipelines.core.run_folder import RUN_FILE, RunError, new_run_dir, resumable_run_dir, write_run_file

__all__ = [
    "RunError",
    "run_recipe",
    "run_demo",
    "seed_everything",
    "summary_line",
    "write_demo_index",
]

logger = logging.getLogger(__name__)


def _is_main_process() -> bool:
    try:
        from pipelines.core.distributed import is_main_process
    except ImportError:
        return int(os.environ.get("RANK", "0")) == 0
    return is_main_process()


def _choose_run_dir(root: Path, recipe: Recipe, resume: bool) -> Path:
    if not resume:
        return new_run_dir(root)
    return resumable_run_dir(root, recipe.model_dump(mode="json"), str(recipe.source or recipe.name))


def _shared_run_dir(root: Path, recipe: Recipe, resume: bool) -> Path:
    """Pick the run directory on rank 0 and give every process the same one, or the same error."""
    try:
        from pipelines.core import distributed
    except ImportError:
        return _choose_run_dir(root, recipe, resume)
    distributed.setup_distributed()
    if not distributed.is_distributed():
        return _choose_run_dir(root, recipe, resume)
    chosen: tuple[str, str] | None = None
    if distributed.is_main_process():
        try:
            chosen = ("run_dir", str(_choose_run_dir(root, recipe, resume)))
        except RunError as error:  # raised on every rank, so none waits for rank 0
            chosen = ("error", str(error))
    kind, value = distributed.broadcast_from_main(chosen)
    if kind == "error":
        raise RunError(value)
    return Path(value)


def _resolve(recipe: Recipe | str | Path, overrides: Sequence[str]) -> Recipe:
    if not isinstance(recipe, Recipe):
        return load_recipe(recipe, overrides)
    if overrides:
        source = recipe.source
        recipe = Recipe.model_validate(apply_overrides(recipe.model_dump(mode="json"), overrides, Recipe))
        recipe._source = source
    errors = check_pipeline(recipe)
    if errors:
        raise RecipeValidationError(errors, str(recipe.source or recipe.name))
    return recipe


def run_recipe(
    recipe: Recipe | str | Path,
    overrides: Sequence[str] = (),
    resume: bool = False,
    output_dir: str | Path | None = None,
) -> Path:
    """Run a recipe: validate, seed, make the run directory, run the pipeline, write the report.

    Args:
        recipe: A Recipe, a recipe file or a shipped recipe name (``imaging/pneumoniamnist_dinov2s_lora``).
        overrides: ``dotted.key=value`` items, e.g. ``["stages.0.train.lr=1e-4"]``.
        resume: Continue the newest run of this recipe that has a checkpoint; refused when that run was
            started with another recipe (see ``run_folder.RESUMABLE_FIELDS`` for what may change).
        output_dir: Replaces the recipe's ``output_dir``.

    Returns:
        The run directory.
    """
    recipe = _resolve(recipe, overrides)
    if output_dir is not None:
        recipe = recipe.model_copy(update={"output_dir": str(output_dir)})
    seed_everything(recipe.seed)
    run_dir = _shared_run_dir(Path(recipe.output_dir) / recipe.name, recipe, resume)
    if _is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        previous = run_dir / "recipe.yaml"
        if resume and previous.is_file():
            from pipelines.core.recipe_yaml import parse_yaml

            if parse_yaml(previous.read_text(encoding="utf-8"))[0] != recipe.model_dump(mode="json"):
                previous.replace(run_dir / "recipe.previous.yaml")
                logger.warning(
                    "the recipe changed since the run started; the old one is recipe.previous.yaml"
                )
        save_recipe(recipe, run_dir / "recipe.yaml")
        if not (run_dir / RUN_FILE).is_file():  # a resume keeps the hash the run started with
            write_run_file(run_dir, recipe.model_dump(mode="json"))
    logger.info("run directory: %s", run_dir)
    result = _run_seeds(recipe, run_dir, resume) if recipe.seeds else _run_once(recipe, run_dir, resume)
    if _is_main_process():
        write_report(run_dir, result)
    return run_dir


def _run_once(recipe: Recipe, run_dir: Path, resume: bool) -> RunResult:
    from pipelines.core.registry import get_pipeline_class

    return get_pipeline_class(recipe.pipeline).from_recipe(recipe).run(run_dir, resume=resume)


def _run_seeds(recipe: Recipe, run_dir: Path, resume: bool) -> RunResult:
    """Each seed in its own ``seed-<n>/`` folder with its own report, then the summary over seeds."""
    from pipelines.core.experiment.seeds import aggregate_seeds

    runs = {}
    for seed in recipe.seeds:
        seed_everything(seed)
        folder = run_dir / f"seed-{seed}"
        runs[seed] = _run_once(recipe.model_copy(update={"seed": seed, "seeds": None}), folder, resume)
        if _is_main_process():
            write_report(folder, runs[seed])
    return aggregate_seeds(runs, recipe.evaluation.bootstrap)


def run_demo(
    domains: Sequence[str] | None = None, output_dir: str | Path = "runs"
) -> tuple[Path, dict[str, str]]:
    """Run the demo recipe of each domain that ships one, then write ``<output_dir>/demo/index.md``.

    A failing domain does not stop the others; its error goes into the index.

    Returns:
        The index path and ``{domain: error message}`` for the domains that failed.
    """
    from pipelines.core.recipe import recipes_dir
    from pipelines.core.registry import demo_recipes

    demos = demo_recipes()  # each domain's pipelines name their demo recipe when they register
    chosen = list(demos) if not domains else list(domains)
    unknown = [d for d in chosen if d not in demos]
    if unknown:
        raise ValueError(f"no demo for domain {unknown[0]!r}; choose from {', '.join(demos)}")
    runs: list[Path] = []
    failures: dict[str, str] = {}
    for domain in chosen:
        recipe_file = recipes_dir() / f"{demos[domain]}.yaml"
        if not recipe_file.is_file():
            failures[domain] = f"its demo recipe {recipe_file} is not in this checkout"
            continue
        try:
            runs.append(run_recipe(find_recipe(recipe_file), output_dir=output_dir))
        except Exception as error:  # noqa: BLE001 - one domain's failure is reported, the rest still run
            logger.exception("demo %s failed", domain)
            failures[domain] = f"{type(error).__name__}: {error}".splitlines()[0]
    index = write_demo_index(runs, Path(output_dir) / "demo" / "index.md", failures=failures)
    return index, failures


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"


def _interval(entry: Mapping[str, Any]) -> str:
    text = _number(entry.get("value"))
    if entry.get("low") is not None and entry.get("high") is not None:
        text += f" [{_number(entry['low'])}, {_number(entry['high'])}]"
    return text


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _greater_is_better(metric: str) -> bool:
    """The metric's direction from the evaluation registry (domains register theirs on import)."""
    from pipelines.core.evaluation import get_metric
    from pipelines.core.registry import import_domains

    try:
        return get_metric(metric).greater_is_better
    except ValueError:  # a domain metric whose domain is not imported in this process yet
        import_domains()
        return get_metric(metric).greater_is_better


def summary_line(run_dir: Path) -> str:
    """One line for the end of a run: the headline with its interval and where the report is."""
    report_file = Path(run_dir) / "report.json"
    if not report_file.is_file():
        return f"run directory: {run_dir} (no report.json)"
    report = json.loads(report_file.read_text(encoding="utf-8"))
    headline = report["headline"]
    return (
        f"{report['name']}: {headline['metric']} {_interval(headline)} ({headline['model']}), "
        f"{_comparison(report, _compared(Path(run_dir)))}; report: {Path(run_dir) / 'report.md'}"
    )


def _comparison(report: Mapping[str, Any], baselines: Sequence[str] = ()) -> str:
    """The paired difference against the strongest baseline ('minus full_finetune +0.018 [-0.004, +0.041],
    p = 0.11'), or, without paired comparisons, 'beat linear_probe (0.912)' / 'lost to ...'.

    Baselines are the recipe's `compare` entries when the report has them; other rows of a report
    (a reference such as speech's vocoded recordings) are not competitors.
    """
    from pipelines.core.evaluation.comparisons import best_baseline_comparison

    headline = report["headline"]
    metric, model, value = headline["metric"], headline["model"], headline.get("value")
    at = model[model.index("@") :] if "@" in model else ""  # a sweep's labels: the primary's fraction
    baselines = [f"{name}{at}" for name in baselines]
    paired = best_baseline_comparison(report, baselines) if report.get("comparisons") else None
    if paired is not None and paired.get("difference") is not None:
        difference, low, high = signed_numbers(paired["difference"], paired.get("low"), paired.get("high"))
        return f"minus {paired['baseline']} {difference} [{low}, {high}], p = {_p(paired)}"
    results = report.get("results", {})
    named = [name for name in baselines if name in results]
    others = {
        name: metrics[metric]["value"]
        for name, metrics in results.items()
        if name != model
        and (not named or name in named)
        and metric in metrics
        and metrics[metric].get("value") is not None
    }
    others = {name: v for name, v in others.items() if not (isinstance(v, float) and math.isnan(v))}
    if not others or value is None:
        return "no baseline"
    better = headline.get("greater_is_better")  # written by the report since 2026-12; older ones lack it
    sign = 1.0 if (_greater_is_better(metric) if better is None else better) else -1.0
    best = max(others, key=lambda name: sign * others[name])
    verb = "beat" if sign * value > sign * others[best] else "tied" if value == others[best] else "lost to"
    return f"{verb} {best} ({_number(others[best])})"


def _p(comparison: Mapping[str, Any]) -> str:
    p = comparison.get("p_holm") if comparison.get("p_holm") is not None else comparison.get("p_value")
    text = "n/a" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3g}")
    return text + (" (Holm)" if comparison.get("p_holm") is not None else "")


def _compared(run_dir: Path) -> list[str]:
    """The `compare` list of the run's resolved recipe, or [] when it has none."""
    recipe = run_dir / "recipe.yaml"
    if not recipe.is_file():
        return []
    return list((yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("compare") or [])


def _row(run_dir: Path, index_dir: Path) -> list[str]:
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    headline = report["headline"]
    parameters = report.get("parameters", {}).get(headline["model"], {})
    fraction = parameters.get("fraction")
    link = Path(os.path.relpath(run_dir / "report.md", index_dir)).as_posix()
    return [
        report["pipeline"].split("/")[0],
        report["name"],
        f"{headline['metric']} {_interval(headline)} ({headline['model']})",
        _comparison(report, _compared(run_dir)),
        "n/a" if fraction is None else f"{100 * fraction:.3g}%",
        _duration(report.get("cost", {}).get("wall_time_s")),
        f"[report.md]({link})",
    ]


def write_demo_index(
    runs: Sequence[Path], path: str | Path, failures: Mapping[str, str] | None = None
) -> Path:
    """Write a markdown table with one row per run (domain, headline, baseline, cost, link).

    Args:
        runs: Run directories, each holding a ``report.json``.
        path: The index file, usually ``runs/demo/index.md``; links are relative to it.
        failures: ``{domain: message}`` for demos that did not finish, listed under the table.

    Returns:
        The index path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ["domain", "recipe", "headline (95% CI)", "against the best baseline", "trainable", "wall time"]
    lines = [
        "# peft-pipelines demo",
        "",
        f"| {' | '.join([*header, 'report'])} |",
        f"|{'---|' * (len(header) + 1)}",
    ]
    rows = sorted(_row(Path(run), path.parent.resolve()) for run in runs)
    lines += [f"| {' | '.join(row)} |" for row in rows]
    if failures:
        lines += ["", "Not run or failed:", ""]
        lines += [f"- {domain}: {message}" for domain, message in sorted(failures.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
