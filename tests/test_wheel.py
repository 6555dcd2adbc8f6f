"""A non-editable install (a built wheel) carries the shipped recipes, data cards and report schema."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_install_lists_validates_and_copies_the_shipped_recipes(tmp_path):
    source = (
        tmp_path / "source"
    )  # setuptools writes build/ beside the sources: build a copy, not the checkout
    skipped = shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".*_cache"
    )
    shutil.copytree(ROOT, source, symlinks=True, ignore=skipped)
    pip = [sys.executable, "-m", "pip"]
    command = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)]
    build = subprocess.run(command, capture_output=True, text=True)
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(tmp_path.glob("peft_pipelines-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "pipelines/recipes/protein/gb1_lora.yaml" in names and "pipelines/data_cards/fsdd.md" in names
    assert "pipelines/core/evaluation/report.schema.json" in names
    target = tmp_path / "installed"
    install = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-index",
        "--target",
        str(target),
        str(wheel),
    ]
    subprocess.run(install, check=True, capture_output=True)  # fmt: skip
    work = tmp_path / "elsewhere"  # away from the checkout, so nothing resolves through its source tree
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}

    def cli(*args: str) -> str:
        code = "import sys; from pipelines.cli import main; sys.exit(main(sys.argv[1:]))"
        done = subprocess.run(
            [sys.executable, "-c", code, *args], cwd=work, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    where = subprocess.run([sys.executable, "-c", "import pipelines; print(pipelines.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert where.startswith(str(target))
    assert "protein/gb1_lora" in cli("list", "recipes")
    assert cli("validate", "protein/gb1_lora").strip().endswith("ok")
    cli("cp", "protein/gb1_lora", str(work / "mine.yaml"))
    assert "name: mine" in (work / "mine.yaml").read_text()
