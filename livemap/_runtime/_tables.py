"""The one seam where the runtime binds ``livemap_core``'s implementation.

Targets make their tables and declarers through :func:`new_table` and
:func:`new_declarer`, so that one call, :func:`use_core`, swaps the
implementation for what is made afterwards (the benchmarks compare both
cores in one process this way).  Everything else takes the core's types from
``livemap_core`` directly.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import livemap_core

__all__ = ["new_declarer", "new_table", "use_core"]

_core: Any = livemap_core


def use_core(module: ModuleType | None) -> None:
    """Make targets created from now on use ``module``'s ``Table`` and
    ``Declarer`` (``livemap_core._core`` or ``livemap_core._fallback``);
    ``None`` goes back to the one ``livemap_core`` picked."""
    global _core
    _core = livemap_core if module is None else module


def new_table(name: str, *, track_undo: bool) -> livemap_core.Table[Any, Any]:
    table: livemap_core.Table[Any, Any] = _core.Table(name, track_undo=track_undo)
    return table


def new_declarer(*args: Any) -> livemap_core.Declarer[Any, Any]:
    declarer: livemap_core.Declarer[Any, Any] = _core.Declarer(*args)
    return declarer
