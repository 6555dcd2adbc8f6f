"""Pipeline registry: ``register_pipeline``, ``create_pipeline``, ``list_pipelines``.

Pipeline names are ``<domain>/<task>`` (e.g. ``imaging/classification``). A domain is a module named
in the ``peft_pipelines.pipelines`` entry-point group of an installed distribution (this package's
four in its ``pyproject.toml``; a lab adds its own the same way); the entry's name is the domain prefix.
Domain modules are imported lazily: asking for ``imaging/...`` imports the module registered as
``imaging``, which registers its pipelines, so ``import pipelines`` stays light and the core names no
domain.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from dataclasses import dataclass
from importlib import metadata
from typing import Any

__all__ = [
    "ENTRY_POINT_GROUP",
    "domain_modules",
    "PipelineEntry",
    "RegistryError",
    "register_pipeline",
    "create_pipeline",
    "get_pipeline_class",
    "get_pipeline_entry",
    "list_pipelines",
    "import_domains",
    "demo_recipes",
    "describe_pipelines",
    "unregister_pipeline",
]

ENTRY_POINT_GROUP = "peft_pipelines.pipelines"


class RegistryError(LookupError):
    """A pipeline name is unknown, taken twice or its domain cannot be imported."""


@dataclass(frozen=True)
class PipelineEntry:
    """One registered pipeline: its class, the pydantic model validating its recipe options, a line."""

    name: str
    cls: type
    options: type | None = None
    description: str = ""
    demo: str | None = None


_PIPELINES: dict[str, PipelineEntry] = {}
_IMPORT_ERRORS: dict[str, BaseException] = {}
# domain prefix -> (module that registers its pipelines and datasets, distribution that declares it)
_DOMAINS: dict[str, tuple[str, str]] | None = None


def domain_modules() -> dict[str, tuple[str, str]]:
    """Domain prefix -> (module, distribution) from the ``peft_pipelines.pipelines`` entry points."""
    global _DOMAINS
    if _DOMAINS is None:
        found = {}
        for point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(point, "dist", None)
            found.setdefault(point.name, (point.value.split(":")[0], dist.name if dist else "?"))
        _DOMAINS = found
    return _DOMAINS


def register_pipeline(
    name: str,
    cls: type | None = None,
    *,
    options: type | None = None,
    description: str = "",
    demo: str | None = None,
) -> Any:
    """Register a pipeline class under ``name``; usable as ``@register_pipeline("imaging/x")``.

    Args:
        name: ``<domain>/<task>``.
        cls: The pipeline class; omit it to use this function as a decorator.
        options: Pydantic model validating the recipe's options (see :mod:`pipelines.core.recipe`).
        description: One line; defaults to the first line of the class docstring.
        demo: The shipped recipe (``domain/name``) that ``peft-pipelines demo`` runs for this domain.

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
        summary = description or (doc[0] if doc else "")
        _PIPELINES[name] = PipelineEntry(name, pipeline_cls, options, summary, demo)
        return pipeline_cls

    if cls is None:
        return decorate
    return decorate(cls)


def unregister_pipeline(name: str) -> None:
    """Remove a pipeline from the registry (tests use this)."""
    _PIPELINES.pop(name, None)


def _import_domain(prefix: str) -> None:
    module = domain_modules().get(prefix)
    if module is None or prefix in _IMPORT_ERRORS:
        return
    try:
        importlib.import_module(module[0])
    except ImportError as error:
        # an absent domain (or a missing optional dependency) must not break listing the others
        _IMPORT_ERRORS[prefix] = error


def import_domains() -> dict[str, BaseException]:
    """Import every known domain module; return the import errors of those that failed, by prefix."""
    for prefix in domain_modules():
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
        module, distribution = domain_modules()[prefix]
        missing = getattr(error, "name", None) or ""
        if missing and module.startswith(missing):
            fix = f"this installation has no {prefix} domain"
        elif distribution == "peft-pipelines":
            fix = f"install its dependencies: pip install 'peft-pipelines[{prefix}]'"
        else:
            fix = f"install the dependencies of {distribution}"
        message += f"; module {module} failed to import ({error}): {fix}"
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


def demo_recipes() -> dict[str, str]:
    """Domain prefix -> the shipped demo recipe its pipelines declare (imports every domain)."""
    demos = {}
    for entry in describe_pipelines():
        if entry.demo:
            demos.setdefault(entry.name.split("/", 1)[0], entry.demo)
    return demos
