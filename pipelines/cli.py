"""The ``peft-pipelines`` command: run, validate, list, evaluate, export, cp, demo.

Shipped recipes are package data, ``pipelines/recipes/<domain>/*.yaml`` (``recipes/`` links there in a
checkout); ``run``, ``validate`` and ``cp`` accept a file path or a shipped name such as
``imaging/pneumoniamnist_dinov2s_lora``. Errors print one line on stderr and exit non-zero;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.cli_cp import cmd_cp

PROG = "peft-pipelines"
_KINDS = ("pipelines", "recipes", "datasets")


def _cmd_run(args: argparse.Namespace) -> int:
    from pipelines.core.distributed import is_main_process
    from pipelines.core.runner import run_recipe, summary_line

    run_dir = run_recipe(args.recipe, args.overrides, resume=args.resume, output_dir=args.output_dir)
    if is_main_process():  # under torchrun only rank 0 writes the report, so only it summarises
        print(summary_line(run_dir))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from pipelines.core.recipe import validate_recipe_file

    invalid = 0
    for recipe in args.recipes:
        errors = validate_recipe_file(recipe, args.overrides)
        if errors:
            invalid += 1
            print(f"{recipe}: {len(errors)} error{'s' * (len(errors) != 1)}")
            for error in errors:
                print(f"  {error}")
        else:
            print(f"{recipe}: ok")
    return 2 if invalid else 0


def _recipe_description(path: Path) -> str:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return "(invalid YAML)"
    return str(data.get("description", "")) if isinstance(data, dict) else ""


def _cmd_list(args: argparse.Namespace) -> int:
    kinds, pattern = list(_KINDS), args.pattern or "*"
    if args.what in _KINDS:
        kinds = [args.what]
    elif args.what is not None:  # `list imaging/*` means a pattern over everything
        if args.pattern is not None:
            raise ValueError(f"'{args.what}' is not one of {', '.join(_KINDS)}; use `list KIND PATTERN`")
        pattern = args.what
    for kind in kinds:
        if len(kinds) > 1:
            print(f"{kind}:")
        rows = {"pipelines": _pipeline_rows, "recipes": _recipe_rows, "datasets": _dataset_rows}[kind]
        for line in rows(pattern, args) or ["(none)"]:
            print(f"  {line}" if len(kinds) > 1 else line)
    return 0


def _pipeline_rows(pattern: str, args: argparse.Namespace) -> list[str]:
    from pipelines.core.registry import describe_pipelines, import_domains

    failed = import_domains()
    rows = [f"{entry.name:32s} {entry.description}" for entry in describe_pipelines(pattern)]
    rows += [f"({domain}: unavailable: {error})" for domain, error in sorted(failed.items())]
    return rows


def _recipe_rows(pattern: str, args: argparse.Namespace) -> list[str]:
    from pipelines.core.recipe import list_recipes, recipes_dir

    return [
        f"{name:44s} {_recipe_description(recipes_dir() / f'{name}.yaml')}" for name in list_recipes(pattern)
    ]


def _dataset_rows(pattern: str, args: argparse.Namespace) -> list[str]:
    from pipelines.core.data import data_dir, get_dataset, list_datasets, verify_dataset
    from pipelines.core.registry import import_domains

    import_domains()  # each domain registers its datasets when it is imported
    rows = []
    for name in list_datasets(pattern):
        info = get_dataset(name)
        if args.verify:
            status = "ok" if not verify_dataset(name) else "missing or corrupt"
        else:
            parts = [*info.files, *info.folders]
            status = "present" if all((data_dir() / p).exists() for p in parts) else "missing"
        rows.append(f"{name:28s} {status:18s} {info.license:12s} {info.description}")
    return rows


def _read_predictions(path: Path) -> tuple[Any, Any]:
    import numpy as np

    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            missing = {"y_true", "y_score"} - set(arrays.files)
            if missing:
                raise ValueError(f"{path} has no array {sorted(missing)[0]!r}; save y_true and y_score")
            return arrays["y_true"], arrays["y_score"]
    import pandas

    table = pandas.read_csv(path)

    def columns(prefix: str) -> Any:
        if prefix in table.columns:
            return table[prefix].to_numpy()
        numbered = sorted(
            (c for c in table.columns if c.startswith(f"{prefix}_")), key=lambda c: int(c.split("_")[-1])
        )
        if not numbered:
            raise ValueError(f"{path} has no column {prefix!r} (nor {prefix}_0, {prefix}_1, ...)")
        return table[numbered].to_numpy()

    return columns("y_true"), columns("y_score")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pipelines.core.evaluation import evaluate

    y_true, y_score = _read_predictions(Path(args.predictions))
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    report = evaluate(args.task, y_true, y_score, metrics=metrics, bootstrap=args.bootstrap, seed=args.seed)
    names = metrics or list(report)
    table = {name: report[name] for name in names}
    print(f"{'metric':20s} {'value':>10s}  95% interval")
    for name, result in table.items():
        interval = "" if math.isnan(result.low) else f"[{result.low:.4f}, {result.high:.4f}]"
        print(f"{name:20s} {result.value:10.4f}  {interval}")
    if args.out:
        payload = {
            "predictions": str(args.predictions),
            "task": args.task,
            "n": int(len(y_true)),
            "bootstrap": args.bootstrap,
            "results": {
                n: {k: None if math.isnan(v) else v for k, v in r.to_dict().items()} for n, r in table.items()
            },
        }
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


def _saved_format(folder: Path) -> str:
    """'native' or 'peft': both layouts have adapter_config.json; ours says format: peft-pipelines."""
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no adapter_config.json; it is not a saved adapter")
    return (
        "native"
        if json.loads(config.read_text(encoding="utf-8")).get("format") == "peft-pipelines"
        else "peft"
    )


def _pipeline_exporter(run_dir: Path) -> Any:
    """The run's pipeline's own ``export_peft(source, target)`` (it knows its head), or None."""
    import yaml

    from pipelines.core.registry import RegistryError, get_pipeline_class

    recipe = run_dir / "recipe.yaml"
    if not recipe.is_file():
        return None
    name = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("pipeline")
    try:
        return getattr(get_pipeline_class(name), "export_peft", None) if isinstance(name, str) else None
    except RegistryError:
        return None


def _cmd_export(args: argparse.Namespace) -> int:
    adapters = Path(args.run_dir) / "adapters"
    folders = sorted(p for p in adapters.glob("*") if p.is_dir()) if adapters.is_dir() else []
    if args.adapter:
        folders = [p for p in folders if p.name in args.adapter]
    else:  # other folders (a classification head's files, say) are not adapters
        for other in [p for p in folders if not (p / "adapter_config.json").is_file()]:
            print(f"{other.name}: skipped, not an adapter (no adapter_config.json)")
        folders = [p for p in folders if (p / "adapter_config.json").is_file()]
    if not folders:
        raise FileNotFoundError(
            f"no adapters in {adapters}{' named ' + ', '.join(args.adapter) if args.adapter else ''}"
        )
    out = Path(args.out)
    exporter = _pipeline_exporter(Path(args.run_dir)) if args.format == "peft" else None
    for folder in folders:
        target = out / folder.name
        if target.exists() and not args.force:
            raise FileExistsError(f"{target} exists; choose another --out or pass --force")
        if exporter is not None and _saved_format(folder) != "peft":
            exporter(folder, target)  # the pipeline writes its head as peft's modules_to_save
        elif _saved_format(folder) == args.format:
            shutil.copytree(folder, target, dirs_exist_ok=True)
        else:
            try:
                from pipelines.core.peft import convert_adapter
            except ImportError:
                raise ValueError(
                    f"adapter {folder} is saved as {_saved_format(folder)} and cannot be converted without "
                    f"its model; export with --format {_saved_format(folder)}"
                ) from None
            convert_adapter(folder, target, format=args.format)
        print(f"{folder.name}: {target} ({args.format})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.core.runner import run_demo

    index, failures = run_demo(args.domain, output_dir=args.output_dir)
    print(f"demo index: {index}")
    for domain, message in failures.items():
        print(f"{domain}: {message}", file=sys.stderr)
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``peft-pipelines`` command."""
    from pipelines import __version__

    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser = argparse.ArgumentParser(prog=PROG, description="Parameter-efficient fine-tuning pipelines.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", parents=[debug], help="run a recipe", description="Run a recipe.")
    run.add_argument("recipe", help="a recipe file or shipped name, e.g. imaging/pneumoniamnist_dinov2s_lora")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. stages.0.train.lr=1e-4")
    run.add_argument("--resume", action="store_true", help="continue the newest run of this recipe")
    run.add_argument("--output-dir", help="folder for run directories (replaces the recipe's output_dir)")
    run.set_defaults(handler=_cmd_run)

    validate = commands.add_parser(
        "validate", parents=[debug], help="check recipes", description="Print every error of each recipe."
    )
    validate.add_argument("recipes", nargs="+", metavar="RECIPE")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    validate.set_defaults(handler=_cmd_validate)

    listing = commands.add_parser(
        "list",
        parents=[debug],
        help="list pipelines, recipes or datasets",
        description="List what is available.",
    )
    listing.add_argument("what", nargs="?", metavar="{pipelines,recipes,datasets}", help="default: all three")
    listing.add_argument("pattern", nargs="?", help="shell pattern, e.g. 'imaging/*'")
    listing.add_argument("--verify", action="store_true", help="check dataset checksums (slower)")
    listing.set_defaults(handler=_cmd_list)

    evaluate = commands.add_parser(
        "evaluate",
        parents=[debug],
        help="score a predictions file",
        description="Compute metrics with bootstrap intervals from a CSV (columns y_true, y_score, or "
        "y_score_0.. for class scores) or an NPZ (arrays y_true, y_score).",
    )
    evaluate.add_argument("predictions", help="CSV or NPZ file")
    evaluate.add_argument(
        "--task", required=True, choices=["binary", "multiclass", "multilabel", "regression"]
    )
    evaluate.add_argument("--metrics", help="comma-separated names (default: the task's metrics)")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="resamples for the intervals")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", help="write the results as JSON here")
    evaluate.set_defaults(handler=_cmd_evaluate)

    export = commands.add_parser(
        "export",
        parents=[debug],
        help="export a run's adapters",
        description="Copy or convert adapters/<name>/.",
    )
    export.add_argument("run_dir")
    export.add_argument("--format", choices=["peft", "native"], default="native")
    export.add_argument("--out", required=True, help="destination folder (one subfolder per adapter)")
    export.add_argument("--adapter", action="append", help="only this adapter (repeatable)")
    export.add_argument("--force", action="store_true", help="overwrite existing files")
    export.set_defaults(handler=_cmd_export)

    copy = commands.add_parser(
        "cp", parents=[debug], help="copy a shipped recipe", description="Copy a shipped recipe to edit it."
    )
    copy.add_argument("recipe", help="shipped name, e.g. imaging/pneumoniamnist_dinov2s_lora")
    copy.add_argument("dest", nargs="?", help="file or folder (default: the current folder)")
    copy.add_argument("--force", action="store_true", help="overwrite an existing file")
    copy.set_defaults(handler=cmd_cp)

    demo = commands.add_parser(
        "demo", parents=[debug], help="run the demo recipes", description="Run each domain's demo recipe."
    )
    demo.add_argument("--domain", action="append", help="only this domain (repeatable)")
    demo.add_argument("--output-dir", default="runs")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _one_line(error: BaseException) -> str:
    import pydantic

    from pipelines.core.recipe_yaml import RecipeValidationError

    if isinstance(error, RecipeValidationError):
        lines = [f"recipe {error.source} is invalid:" if error.source else "recipe is invalid:"]
        return "\n".join(lines + [f"  {e.format(show_file=e.file != error.source)}" for e in error.errors])
    if isinstance(error, pydantic.ValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        return f"{where}: {first['msg']}{more}"
    lines = str(error).splitlines()
    if len(lines) > 1 and " in DataLoader worker process " in lines[0]:  # torch re-raises a worker's error
        name, _, message = lines[-1].partition(": ")  # the original error, last line of its traceback
        return message or name
    return lines[0] if lines else type(error).__name__


def _handled() -> tuple[type[BaseException], ...]:
    import pydantic

    from pipelines.core.data import DataError
    from pipelines.core.registry import RegistryError
    from pipelines.core.runner import RunError
    from pipelines.core.train_config import CheckpointError, NonFiniteLossError

    return (
        DataError, RegistryError, RunError, CheckpointError, NonFiniteLossError, OSError, ValueError,
        pydantic.ValidationError,
    )  # fmt: skip


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses the command line; `run` takes its options anywhere, and every KEY=VALUE is an override."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "run":  # argparse stops filling `overrides` at the first option after them
        args.overrides += [item for item in extra if "=" in item and not item.startswith("-")]
        extra = [item for item in extra if not ("=" in item and not item.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _interrupted(args: argparse.Namespace, error: BaseException) -> str:
    """The one line after Ctrl-C: where the checkpoint is and the command that continues the run."""
    from pipelines.core.train_config import TrainingInterrupted

    again, fresh = f"{PROG} run RECIPE --resume", f"{PROG} run RECIPE"
    if args.command == "run":  # the same overrides and output folder, so --resume finds the run
        fresh = again = shlex.join([PROG, "run", args.recipe, *args.overrides])
        again += " --resume"
        where = f" --output-dir {shlex.quote(args.output_dir)}" if args.output_dir else ""
        again, fresh = again + where, fresh + where
    if not isinstance(error, TrainingInterrupted):
        return f"{PROG}: interrupted; continue from the last checkpoint with `{again}`"
    step = f"{error.step}/{error.total_steps}" if error.total_steps else str(error.step)
    if error.checkpoint is None:
        return (
            f"{PROG}: interrupted after step {step}; no checkpoint was written, so start again with `{fresh}`"
        )
    return f"{PROG}: interrupted after step {step}; checkpoint: {error.checkpoint}; continue with `{again}`"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 error, 2 invalid recipe or usage, 130 ^C)."""
    args = _parse(argv)
    debug = getattr(args, "debug", False)
    if args.command in ("run", "demo"):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.handler(args)
    except KeyboardInterrupt as error:  # the training loop's TrainingInterrupted is one too
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process gets the ^C; one says so
            print(_interrupted(args, error), file=sys.stderr)
        return 130
    except Exception as error:
        if debug or not isinstance(error, _handled()):
            raise
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2 if type(error).__name__ == "RecipeValidationError" else 1
