"""`import pipelines` and the core stay light: no domain library is imported until a pipeline needs it."""

from __future__ import annotations

import json
import subprocess
import sys

DOMAIN_LIBRARIES = ["transformers", "timm", "monai", "esm", "torchaudio", "peft", "onnx", "soundfile"]


def test_core_imports_no_domain_library():
    code = (
        "import json, sys\n"
        "import pipelines, pipelines.core.peft, pipelines.core.training, pipelines.core.evaluation\n"
        "import pipelines.core.recipe, pipelines.core.runner, pipelines.core.data, pipelines.cli\n"
        f"print(json.dumps([m for m in {DOMAIN_LIBRARIES!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_core_never_imports_a_domain():
    """Only the registry reaches domains, by module name on demand (`imaging/...` -> pipelines.imaging)."""
    from pathlib import Path

    core = Path(__file__).resolve().parents[1] / "pipelines" / "core"
    offenders = [
        f"{path.relative_to(core)}: {line.strip()}"
        for path in core.rglob("*.py")
        for line in path.read_text().splitlines()
        if line.strip().startswith(("import pipelines.", "from pipelines."))
        and any(f"pipelines.{d}" in line for d in ("imaging", "clinical", "protein", "speech"))
    ]
    assert offenders == []


def _imports(path, module: str, modules: set[str]) -> set[str]:
    """The pipelines modules that ``module`` imports (anywhere in the file, not under TYPE_CHECKING)."""
    import ast

    def known(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {known(a.name) for a in node.names if a.name.startswith("pipelines")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith("pipelines"):
                found |= {
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else known(base) for a in node.names
                }
    return found - {module, ""}


def test_no_import_cycles_among_the_package_modules():
    """Walk every import (function-level ones too) and look for a strongly connected group of modules."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    paths = {}
    for path in (root / "pipelines").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {module: _imports(path, module, set(paths)) for module, path in paths.items()}
    cycles, index, low, stack, order = [], {}, {}, [], [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = order[0]
        order[0] += 1
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in graph:
        if module not in index:
            visit(module)
    assert cycles == []
