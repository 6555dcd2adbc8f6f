"""peft-pipelines: parameter-efficient fine-tuning pipelines for domain scientists.

`import pipelines` stays light: the entry points below import their modules on first use, and no domain
library (transformers, timm, MONAI, fair-esm, torchaudio) is imported until a pipeline needs it.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["create_pipeline", "list_pipelines", "run_recipe", "__version__"]


def create_pipeline(name: str, **kwargs: Any) -> Any:
    """Builds the registered pipeline `name` (e.g. "imaging/classification") for use from lab code."""
    from pipelines.core.registry import create_pipeline as create

    return create(name, **kwargs)


def list_pipelines(pattern: str = "*") -> list[str]:
    """Names of the registered pipelines matching a glob pattern."""
    from pipelines.core.registry import list_pipelines as names

    return names(pattern)


def run_recipe(recipe: Any, overrides: Any = (), resume: bool = False, **kwargs: Any) -> Any:
    """Runs a recipe file (or Recipe) end to end and returns its run directory."""
    from pipelines.core.runner import run_recipe as run

    return run(recipe, overrides=overrides, resume=resume, **kwargs)
