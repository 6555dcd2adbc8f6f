"""Pipeline registry: ``register_pipeline``, ``create_pipeline``, ``list_pipelines``.

Pipeline names are ``<domain>/<task>`` (e.g. ``imaging/classification``). Domain modules are imported
lazily: asking for ``imaging/...`` imports ``pipelines.imaging.pipeline``, which registers its pipelines,
so ``import pipelines`` stays light and core never imports a domain at import time.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DOMAINS",
    "PipelineEntry",
    "RegistryError",
    "register_pipeline",
    "create_pipeline",
    "get_pipeline_class",
    "get_pipeline_entry",
    "list_pipelines",
    "import_domains",
    "describe_pipelines",
    "unregister_pipeline",
]

# name prefix -> module that registers that domain's pipelines (and, through its data module, datasets)
DOMAINS: dict[str, str] = {
    "imaging": "pipelines.imaging.pipeline",
    "clinical": "pipelines.clinical.pipeline",
    "protein": "pipelines.protein.pipeline",
    "speech": "pipelines.speech.pipeline",
}


class RegistryError(LookupError):
    """A pipeline name is unknown, taken twice or its domain cannot be imported."""


@dataclass(frozen=True)
class PipelineEntry:
    """One registered pipeline: its class, the pydantic model validating its recipe options, a line."""

    name: str
    cls: type
    options: type | None = None
    description: str = ""


_PIPELINES: dict[str, PipelineEntry] = {}
_IMPORT_ERRORS: dict[str, BaseException] = {}


def register_pipeline(
    name: str, cls: type | None = None, *, options: type | None = None, description: str = ""
) -> Any:
    """Register a pipeline class under ``name``; usable as ``@register_pipeline("imaging/x")``.

    Args:
        name: ``<domain>/<task>``.
        cls: The pipeline class; omit it to use this function as a decorator.
        options: Pydantic model validating the recipe's options (see :mod:`pipelines.core.recipe`).
        description: One line; defaults to the first line of the class docstring.

    Returns:
        The class (so the decorator leaves it unchanged).
    """

    def decorate(pipeline_cls: type) -> type:
        existing = _PIPELINES.get(name)
        if existing is not None and existing.cls is not pipeline_cls:
            same = existing.cls.__qualname__ == pipeline_cls.__qualname__ and (
                existing.cls.__module__ == pipeline_cls.__module__
            )
            if not same:  # re-registering a reloaded module's class is fine; a clash is not
                raise RegistryError(
                    f"pipeline '{name}' is already registered by {existing.cls.__module__}."
                    f"{existing.cls.__qualname__}; choose another name"
                )
        doc = (pipeline_cls.__doc__ or "").strip().splitlines()
        _PIPELINES[name] = PipelineEntry(name, pipeline_cls, options, description or (doc[0] if doc else ""))
        return pipeline_cls

    if cls is None:
        return decorate
    return decorate(cls)


def unregister_pipeline(name: str) -> None:
    """Remove a pipeline from the registry (tests use this)."""
    _PIPELINES.pop(name, None)


def _import_domain(prefix: str) -> None:
    module = DOMAINS.get(prefix)
    if module is None or prefix in _IMPORT_ERRORS:
        return
    try:
        importlib.import_module(module)
    except ImportError as error:
        # an absent domain (or a missing optional dependency) must not break listing the others
        _IMPORT_ERRORS[prefix] = error


def import_domains() -> dict[str, BaseException]:
    """Import every known domain module; return the import errors of those that failed, by prefix."""
    for prefix in DOMAINS:
        _import_domain(prefix)
    return dict(_IMPORT_ERRORS)


def get_pipeline_entry(name: str) -> PipelineEntry:
    """Return the registry entry of ``name``, importing its domain on demand.

    Raises:
        RegistryError: Unknown name (with close matches) or a domain that failed to import.
    """
    if name not in _PIPELINES:
        prefix = name.split("/", 1)[0]
        _import_domain(prefix)
    if name in _PIPELINES:
        return _PIPELINES[name]
    import_domains()
    matches = difflib.get_close_matches(name, list(_PIPELINES), n=3, cutoff=0.7)
    message = f"unknown pipeline '{name}'"
    if matches:
        message += f" (did you mean {', '.join(repr(m) for m in matches)}?)"
    prefix = name.split("/", 1)[0]
    if prefix in _IMPORT_ERRORS:
        error = _IMPORT_ERRORS[prefix]
        missing = getattr(error, "name", None) or ""
        if missing and DOMAINS[prefix].startswith(missing):
            fix = f"this installation has no {prefix} domain"
        else:
            fix = f"install its dependencies: pip install 'peft-pipelines[{prefix}]'"
        message += f"; module {DOMAINS[prefix]} failed to import ({error}): {fix}"
    elif not matches:
        message += f"; registered pipelines: {', '.join(sorted(_PIPELINES)) or 'none'}"
    raise RegistryError(message)


def get_pipeline_class(name: str) -> type:
    """Return the class registered as ``name``."""
    return get_pipeline_entry(name).cls


def create_pipeline(name: str, **kwargs: Any) -> Any:
    """Build the pipeline ``name`` with its lab-code constructor, e.g. ``create_pipeline("x", backbone=...)``.

    Returns:
        The pipeline instance.
    """
    return get_pipeline_class(name)(**kwargs)


def list_pipelines(pattern: str = "*") -> list[str]:
    """Return sorted names of registered pipelines matching a shell pattern (imports every domain)."""
    import_domains()
    return sorted(n for n in _PIPELINES if fnmatch.fnmatch(n, pattern))


def describe_pipelines(pattern: str = "*") -> list[PipelineEntry]:
    """Return the registry entries whose names match ``pattern``, sorted by name."""
    return [_PIPELINES[n] for n in list_pipelines(pattern)]
