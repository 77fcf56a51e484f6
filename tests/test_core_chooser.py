"""Which core ``livemap_core`` picks, and that both expose the same API.

``test_compiled_core_preferred_by_default`` is the guard against a silent
fallback: unless the pure core was asked for, the compiled one must be in use.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

from _cores import PURE_ONLY

import livemap_core
import livemap_core._fallback as fallback
from livemap_core import _shared

CORE_NAMES = [
    "CONFLICT",
    "EQ_ERROR",
    "MAX_KEY_DEPTH",
    "Buffer",
    "Commit",
    "Declarer",
    "Rejection",
    "Table",
    "TableStats",
    "check_key",
    "is_stable_key",
    "normalize_key",
]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that finds ``livemap_core`` where we do."""
    full_env = {k: v for k, v in os.environ.items() if k != "LIVEMAP_NO_EXTENSIONS"}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
    )


def test_compiled_core_preferred_by_default() -> None:
    if PURE_ONLY:
        assert livemap_core.IMPLEMENTATION == "python"
        assert livemap_core.NO_EXTENSIONS is True
        assert livemap_core.Table is fallback.Table
    else:
        assert livemap_core.IMPLEMENTATION == "cython", (
            "the compiled core did not import: livemap_core fell back to pure Python"
        )
        assert livemap_core.NO_EXTENSIONS is False
        compiled = importlib.import_module("livemap_core._core")
        for name in CORE_NAMES:
            assert getattr(livemap_core, name) is getattr(compiled, name), name


def test_both_cores_have_the_same_api() -> None:
    assert fallback.__all__ == CORE_NAMES
    if PURE_ONLY:
        return  # no compiled core in this run to compare with
    compiled = importlib.import_module("livemap_core._core")
    assert compiled.__all__ == fallback.__all__
    for name in CORE_NAMES:
        ours, reference = getattr(compiled, name), getattr(fallback, name)
        if isinstance(reference, type):
            assert isinstance(ours, type), name
        elif callable(reference):
            assert callable(ours), name
        else:
            assert ours == reference, name
    for cls in ("Buffer", "Commit", "Declarer", "Rejection", "Table", "TableStats"):
        public = {n for n in dir(getattr(fallback, cls)) if not n.startswith("_")}
        assert public == {n for n in dir(getattr(compiled, cls)) if not n.startswith("_")}, cls


def test_chooser_exports() -> None:
    for name in livemap_core.__all__:
        assert hasattr(livemap_core, name), name
    assert set(CORE_NAMES) <= set(livemap_core.__all__)
    assert livemap_core.DuplicateDeclarationError is _shared.DuplicateDeclarationError
    assert livemap_core.Symbol is _shared.Symbol


def test_no_extensions_env_picks_pure_core_quietly() -> None:
    proc = run_python(
        "import livemap_core; print(livemap_core.IMPLEMENTATION)", LIVEMAP_NO_EXTENSIONS="1"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "python\n"
    assert proc.stderr == ""


def test_default_import_is_quiet() -> None:
    proc = run_python("import livemap_core; print(livemap_core.IMPLEMENTATION)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    expected = "python" if sys.implementation.name != "cpython" else "cython"
    if PURE_ONLY and sys.implementation.name == "cpython":
        # this run asked for the pure core, so the build may be absent on purpose
        assert proc.stdout in ("python\n", "cython\n")
    else:
        assert proc.stdout == f"{expected}\n"
