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
