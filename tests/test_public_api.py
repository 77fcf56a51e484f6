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

PUBLIC_MODULES = sorted(
    {"livemap", "livemap_core"}
    | {
        f"livemap.{m.name}"
        for m in pkgutil.iter_modules(livemap.__path__)
        if not m.name.startswith("_") and m.name != "examples"
    }
)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_names_exist(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert hasattr(module, "__all__"), f"{module_name} has no __all__"
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []
    assert len(set(module.__all__)) == len(module.__all__)


def test_every_public_name_is_exported_at_the_top() -> None:
    """What the submodules call public, ``livemap`` exports (internals excepted)."""
    internal = {
        "AppRun",
        "Component",
        "Run",
        "Pool",
        "Consumer",
        "EachLive",
        "EachSubscriber",
        "TargetBase",
        "ReadyHandle",
        "ReadyLike",
        "ExceptionHandler",
        "MountKind",
        "is_feed",
        "check_key",
        "is_stable_key",
        "format_path",
        "current_prefix",
        "StablePath",
        "StableKey",
    }
    for module_name in PUBLIC_MODULES:
        if module_name == "livemap_core" or module_name == "livemap":
            continue
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if name in internal or name.endswith("Error"):
                continue
            assert name in livemap.__all__, f"{module_name}.{name} is not in livemap.__all__"


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
