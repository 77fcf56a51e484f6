"""livemap's hot path: owned keyed tables, declaration buffers, the ``==``
gate and key-conflict detection.

Two implementations with one API: the compiled ``livemap_core._core``
(Cython) and the pure-Python ``livemap_core._fallback``.  The compiled one is
used when it imports, unless the environment variable ``LIVEMAP_NO_EXTENSIONS``
is set to a non-empty value or the interpreter is not CPython.
:data:`IMPLEMENTATION` says which one is in use: ``"cython"`` or ``"python"``.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from livemap_core._shared import DuplicateDeclarationError, Symbol

__all__ = [
    "CONFLICT",
    "EQ_ERROR",
    "IMPLEMENTATION",
    "MAX_KEY_DEPTH",
    "NO_EXTENSIONS",
    "Buffer",
    "Commit",
    "Declarer",
    "DuplicateDeclarationError",
    "Rejection",
    "Symbol",
    "Table",
    "TableStats",
    "check_key",
    "is_stable_key",
    "normalize_key",
]

NO_EXTENSIONS: bool = bool(os.environ.get("LIVEMAP_NO_EXTENSIONS")) or (
    sys.implementation.name != "cpython"
)
"""True when the pure-Python core was asked for (or the interpreter is not CPython)."""

IMPLEMENTATION: str
"""``"cython"`` when the compiled core is in use, else ``"python"``."""

_COMPILED = False
if not TYPE_CHECKING and not NO_EXTENSIONS:
    try:
        import livemap_core._core  # noqa: F401

        _COMPILED = True
    except ImportError:  # no compiled core in this install: the pure one serves
        pass

if TYPE_CHECKING or not _COMPILED:  # type checkers see the pure-Python core
    from livemap_core._fallback import (
        CONFLICT,
        EQ_ERROR,
        MAX_KEY_DEPTH,
        Buffer,
        Commit,
        Declarer,
        Rejection,
        Table,
        TableStats,
        check_key,
        is_stable_key,
        normalize_key,
    )

    IMPLEMENTATION = "python"
else:
    from livemap_core._core import (
        CONFLICT,
        EQ_ERROR,
        MAX_KEY_DEPTH,
        Buffer,
        Commit,
        Declarer,
        Rejection,
        Table,
        TableStats,
        check_key,
        is_stable_key,
        normalize_key,
    )

    IMPLEMENTATION = "cython"
