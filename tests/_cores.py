"""The ``core`` fixture: a test that takes it runs once per implementation of
``livemap_core`` (ids ``c`` and ``py``).

The compiled core must import: a missing or broken build fails the ``c`` tests
instead of silently testing the pure-Python twin twice.  Only a run that asks
for the pure core (``LIVEMAP_NO_EXTENSIONS`` set to a non-empty value, or an
interpreter other than CPython) skips them.

The fixture is named ``core``; its function is ``core_fixture`` so that a test
module can import it (``from _cores import core_fixture``, like ``helpers``)
without the import clashing with the ``core`` parameters of its tests.
``tests/conftest.py`` may import it too, to make it available everywhere.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import pytest

__all__ = ["IMPL_IDS", "PURE_ONLY", "PURE_ONLY_REASON", "core_fixture", "load_core"]

IMPL_IDS = ("c", "py")

PURE_ONLY: bool = bool(os.environ.get("LIVEMAP_NO_EXTENSIONS")) or (
    sys.implementation.name != "cpython"
)
"""True when this run tests the pure-Python core only."""

PURE_ONLY_REASON = (
    "pure-Python run (LIVEMAP_NO_EXTENSIONS)"
    if os.environ.get("LIVEMAP_NO_EXTENSIONS")
    else f"pure-Python run ({sys.implementation.name} has no compiled core)"
)


def load_core(impl: str) -> ModuleType:
    """The core module for ``impl`` (``"c"`` or ``"py"``); skips or fails as above."""
    if impl == "py":
        return importlib.import_module("livemap_core._fallback")
    if impl != "c":
        raise ValueError(f"unknown core implementation {impl!r}")
    if PURE_ONLY:
        pytest.skip(PURE_ONLY_REASON)
    try:
        return importlib.import_module("livemap_core._core")
    except ImportError as exc:
        pytest.fail(
            f"the compiled core livemap_core._core does not import ({exc!r}); build it "
            "(python setup.py build_ext --inplace) or set LIVEMAP_NO_EXTENSIONS=1",
            pytrace=False,
        )


# A pure-Python run collects the ``py`` tests only (no skipped ``c`` twins).
@pytest.fixture(params=("py",) if PURE_ONLY else IMPL_IDS, name="core")
def core_fixture(request: pytest.FixtureRequest) -> ModuleType:
    """``livemap_core._core`` (id ``c``) or ``livemap_core._fallback`` (id ``py``)."""
    return load_core(request.param)
