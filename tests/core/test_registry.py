"""Pipeline registry: decorator, creation, listing, close-match errors and lazy domain imports."""

from __future__ import annotations

import sys
import textwrap

import pytest

from pipelines.core import registry
from pipelines.core.registry import (
    RegistryError,
    create_pipeline,
    get_pipeline_class,
    get_pipeline_entry,
    list_pipelines,
    register_pipeline,
)


@pytest.fixture(autouse=True)
def empty_registry(monkeypatch):
    """Each test sees an empty registry and no real domains."""
    monkeypatch.setattr(registry, "_PIPELINES", {})
    monkeypatch.setattr(registry, "_IMPORT_ERRORS", {})
    monkeypatch.setattr(registry, "_DOMAINS", {})


def test_decorator_registers_and_create_passes_kwargs():
    @register_pipeline("toy/classify", description="A toy.")
    class Toy:
        def __init__(self, size: int = 1):
            self.size = size

    assert get_pipeline_class("toy/classify") is Toy
    assert create_pipeline("toy/classify", size=3).size == 3
    assert get_pipeline_entry("toy/classify").description == "A toy."


def test_plain_call_takes_description_from_docstring_and_options():
    class Other:
        """First line.

        More.
        """

    register_pipeline("toy/other", Other, options=dict)
    entry = get_pipeline_entry("toy/other")
    assert (entry.cls, entry.options, entry.description) == (Other, dict, "First line.")


def test_list_pipelines_filters_with_shell_patterns():
    for name in ("imaging/classification", "imaging/segmentation", "protein/regression"):
        register_pipeline(name, type(name.replace("/", "_"), (), {}))
    assert list_pipelines() == ["imaging/classification", "imaging/segmentation", "protein/regression"]
    assert list_pipelines("imaging/*") == ["imaging/classification", "imaging/segmentation"]
    assert list_pipelines("*regression") == ["protein/regression"]


def test_unknown_name_lists_close_matches():
    register_pipeline("imaging/classification", type("A", (), {}))
    register_pipeline("imaging/segmentation", type("B", (), {}))
    with pytest.raises(RegistryError) as error:
        create_pipeline("imaging/clasification")
    assert (
        str(error.value)
        == "unknown pipeline 'imaging/clasification' (did you mean 'imaging/classification'?)"
    )
    with pytest.raises(RegistryError) as error:
        create_pipeline("zzz")
    assert str(error.value) == (
        "unknown pipeline 'zzz'; registered pipelines: imaging/classification, imaging/segmentation"
    )


def test_a_second_class_under_one_name_is_refused():
    register_pipeline("toy/x", type("First", (), {}))
    with pytest.raises(
        RegistryError, match="pipeline 'toy/x' is already registered by .*First; choose another"
    ):
        register_pipeline("toy/x", type("Second", (), {}))


def _write_domain(tmp_path, package: str, body: str) -> None:
    folder = tmp_path / package
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "pipeline.py").write_text(textwrap.dedent(body))


def test_domains_are_imported_lazily_by_prefix(tmp_path, monkeypatch):
    _write_domain(
        tmp_path,
        "fake_domain_pkg",
        """
        from pipelines.core.registry import register_pipeline

        @register_pipeline("fakedomain/thing")
        class Thing:
            '''A thing.'''
            def __init__(self, value=0):
                self.value = value
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_DOMAINS", {"fakedomain": ("fake_domain_pkg.pipeline", "peft-pipelines")})
    monkeypatch.delitem(sys.modules, "fake_domain_pkg.pipeline", raising=False)
    assert "fake_domain_pkg.pipeline" not in sys.modules
    assert create_pipeline("fakedomain/thing", value=5).value == 5
    assert "fake_domain_pkg.pipeline" in sys.modules
    assert list_pipelines("fakedomain/*") == ["fakedomain/thing"]


def test_broken_domain_is_skipped_by_list_but_named_by_create(tmp_path, monkeypatch):
    _write_domain(tmp_path, "broken_domain_pkg", "import not_a_real_module_for_tests\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        registry,
        "_DOMAINS",
        {"broken": ("broken_domain_pkg.pipeline", "peft-pipelines"), "absent": ("no_such_pkg.pipeline", "x")},
    )
    register_pipeline("toy/ok", type("Ok", (), {}))
    assert list_pipelines() == ["toy/ok"]
    with pytest.raises(RegistryError) as error:
        create_pipeline("broken/anything")
    assert str(error.value) == (
        "unknown pipeline 'broken/anything'; module broken_domain_pkg.pipeline failed to import "
        "(No module named 'not_a_real_module_for_tests'): install its dependencies: "
        "pip install 'peft-pipelines[broken]'"
    )
    with pytest.raises(RegistryError, match="this installation has no absent domain"):
        create_pipeline("absent/anything")


def test_a_lab_package_adds_a_domain_through_the_entry_point_group(tmp_path, monkeypatch):
    """A lab's own installed package declares its domain the way pyproject.toml declares ours."""
    _write_domain(
        tmp_path,
        "lab_domain_pkg",
        """
        from pipelines.core.registry import register_pipeline

        @register_pipeline("lab/assay", demo="lab/assay_demo")
        class Assay:
            '''Our assay.'''
        """,
    )
    info = tmp_path / "lab_domain_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lab-domain-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\nlab = lab_domain_pkg.pipeline\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_DOMAINS", None)  # read the entry points again
    assert registry.domain_modules()["lab"] == ("lab_domain_pkg.pipeline", "lab-domain-pkg")
    assert get_pipeline_class("lab/assay").__doc__ == "Our assay."
    assert registry.demo_recipes()["lab"] == "lab/assay_demo"
    assert "imaging" in registry.domain_modules()  # this package's own domains come the same way
