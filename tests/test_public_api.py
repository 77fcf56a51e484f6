"""The public surface: complete ``__all__``, docstrings, documentation."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pkgutil

import pytest

import livemap
import livemap_core

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"

PUBLIC_MODULES = ["livemap", "livemap.errors", "livemap.redis", "livemap_core"]
"""The public modules; every other module of the distribution is private
(``_``-prefixed; ``tests/test_layers.py`` checks that)."""


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_names_exist(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert hasattr(module, "__all__"), f"{module_name} has no __all__"
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []
    assert len(set(module.__all__)) == len(module.__all__)


def test_every_error_is_exported_at_the_top() -> None:
    import livemap.errors

    assert set(livemap.errors.__all__) <= set(livemap.__all__)
    for name in livemap.errors.__all__:
        assert getattr(livemap, name) is getattr(livemap.errors, name)


def test_no_public_module_besides_the_public_ones() -> None:
    names = {
        f"livemap.{m.name}"
        for m in pkgutil.iter_modules(livemap.__path__)
        if not m.name.startswith("_") and m.name != "examples"
    }
    assert names <= set(PUBLIC_MODULES)


@pytest.mark.parametrize("name", sorted(set(livemap.__all__) - {"__version__"}))
def test_public_name_has_docstring_and_is_documented(name: str) -> None:
    obj = getattr(livemap, name)
    defined_here = str(getattr(obj, "__module__", "")).startswith(("livemap", "livemap_core"))
    if defined_here and (inspect.isclass(obj) or inspect.isroutine(obj)):
        # type aliases (StableKey, ExceptionHandler, ...) are documented in docs/ only
        doc = inspect.getdoc(obj)
        assert doc and doc.strip(), f"livemap.{name} has no docstring"
    docs_text = "\n".join(p.read_text(encoding="utf-8") for p in DOCS.glob("*.md"))
    assert f"`{name}" in docs_text or f"{name}(" in docs_text, f"{name} is not in docs/"


def test_version_is_one_string() -> None:
    assert isinstance(livemap.__version__, str)
    assert livemap.__version__.count(".") >= 2


def test_core_exports_the_same_names_on_both_cores() -> None:
    from livemap_core import _fallback

    names = set(livemap_core.__all__) - {
        "IMPLEMENTATION",
        "NO_EXTENSIONS",
        "Symbol",
        "DuplicateDeclarationError",
    }
    assert names <= set(_fallback.__all__)
