"""`peft-pipelines cp`: copy a shipped recipe to edit it, with its `name` set from the copy's file name,
so that every edited copy gets its own run folder (a shared name would share one, and resume would mix them).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

PROG = "peft-pipelines"
_NAME_LINE = re.compile(r"^name:[ \t]*(?P<value>[^#\n]*?)(?P<comment>[ \t]+#[^\n]*)?[ \t]*$", re.MULTILINE)
_RECIPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _renamed_recipe(text: str, name: str, source: Path) -> str:
    """The recipe text with its top-level `name:` line set to `name`; comments and layout kept."""
    import yaml

    renamed, count = _NAME_LINE.subn(lambda m: f"name: {name}{m.group('comment') or ''}", text, count=1)
    data = yaml.safe_load(renamed) if count else None
    if not isinstance(data, dict) or data.get("name") != name:
        raise ValueError(
            f"{source} has no top-level `name:` line to set; copy it by hand and set name: {name}"
        )
    return renamed


def cmd_cp(args: argparse.Namespace) -> int:
    """`peft-pipelines cp RECIPE [DEST]`: copy a shipped recipe, named after the copy's file."""
    import yaml

    from pipelines.core.recipe import find_recipe

    source = find_recipe(args.recipe)
    dest = Path(args.dest) if args.dest else Path.cwd()
    if dest.is_dir() or args.dest is None or str(args.dest).endswith(("/", "\\")):
        dest = dest / source.name
    if dest.exists() and not args.force:
        raise FileExistsError(f"{dest} exists; pass --force to overwrite it or choose another destination")
    text = source.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    shipped = data.get("name") if isinstance(data, dict) else None
    renamed = ""
    if dest.stem != shipped:  # its own name, so its runs get their own folder
        if not _RECIPE_NAME.match(dest.stem):
            raise ValueError(
                f"{dest.name}: the copy's name comes from its file name, and {dest.stem!r} is not a recipe "
                "name (letters, digits, _ . -, starting with a letter or digit); choose another file name"
            )
        text = _renamed_recipe(text, dest.stem, source)
        output_dir = data.get("output_dir") or "runs"
        renamed = f" with name: {dest.stem} (was {shipped}), so its runs go to {output_dir}/{dest.stem}/"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text, encoding="utf-8")
    print(f"copied {source} to {dest}{renamed}; edit it, then `{PROG} run {dest}`")
    return 0
