"""Stable keys, symbols and component paths."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextvars import ContextVar, Token
from typing import TypeAlias

from livemap_core import Symbol, check_key, is_stable_key, normalize_key

__all__ = [
    "ComponentPath",
    "ComponentSubpath",
    "StableKey",
    "StablePath",
    "Symbol",
    "check_key",
    "component_subpath",
    "format_path",
    "is_stable_key",
    "normalize_key",
]

StableKey: TypeAlias = (
    bool | int | str | bytes | uuid.UUID | Symbol | tuple["StableKey", ...] | None
)
"""A key usable in paths and as a LiveMap key: ``None``, ``bool``, ``int``,
``str``, ``bytes``, ``uuid.UUID``, :class:`Symbol`, or a tuple of these."""

StablePath: TypeAlias = tuple[StableKey, ...]
"""A component's path from the app's root: a tuple of stable keys."""


def _format_part(part: StableKey) -> str:
    if isinstance(part, Symbol):
        return part.name
    return repr(part)


def format_path(path: StablePath) -> str:
    """``/`` for the root, else ``/part/part``: symbols by name, other keys by repr."""
    return "/" + "/".join(_format_part(p) for p in path)


class ComponentPath(tuple[StableKey, ...]):
    """A component's path as an :class:`~livemap.ExceptionContext` gives it.

    A tuple of the path's stable keys: it equals (and hashes as) the plain
    tuple, so ``ctx.stable_path == (Symbol("child"), "a")`` holds, and it
    indexes and slices as one (a slice is a plain tuple).  ``str()`` gives
    the printable form, ``/child/'a'`` (see :func:`format_path`), ``/`` for
    the root.
    """

    __slots__ = ()

    def __str__(self) -> str:
        return format_path(self)


prefix_var: ContextVar[StablePath] = ContextVar("livemap_subpath_prefix", default=())


class ComponentSubpath:
    """A relative component path: one or more stable keys.

    Pass it as the first argument of ``mount`` / ``mount_each`` / ``use_mount``,
    or use it as a context manager (``with component_subpath("a"):``) to
    prefix every mount inside the block.
    """

    __slots__ = ("_token", "parts")

    def __init__(self, *parts: StableKey) -> None:
        if not parts:
            raise ValueError("a component subpath needs at least one part")
        self.parts: StablePath = tuple(normalize_key(part) for part in parts)
        self._token: list[Token[StablePath]] = []

    def __truediv__(self, other: StableKey | ComponentSubpath) -> ComponentSubpath:
        more = other.parts if isinstance(other, ComponentSubpath) else (other,)
        return ComponentSubpath(*self.parts, *more)

    def __enter__(self) -> ComponentSubpath:
        self._token.append(prefix_var.set(prefix_var.get() + self.parts))
        return self

    def __exit__(self, *exc_info: object) -> None:
        prefix_var.reset(self._token.pop())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ComponentSubpath):
            return self.parts == other.parts
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.parts)

    def __iter__(self) -> Iterator[StableKey]:
        return iter(self.parts)

    def __repr__(self) -> str:
        return f"component_subpath({', '.join(repr(p) for p in self.parts)})"


def component_subpath(*parts: StableKey) -> ComponentSubpath:
    """A :class:`ComponentSubpath` of ``parts``; also a context manager that
    prefixes the mounts made inside its block."""
    return ComponentSubpath(*parts)


def current_prefix() -> StablePath:
    """The subpath prefix of the enclosing ``with component_subpath(...)`` blocks."""
    return prefix_var.get()
