"""How the mounting calls read their arguments: an optional subpath first,
then the function (or live-component class), then its own arguments."""

from __future__ import annotations

from typing import Any

from livemap._paths import ComponentSubpath, StablePath, Symbol, current_prefix

__all__ = ["child_path", "split_args"]


def split_args(args: tuple[Any, ...], what: str) -> tuple[StablePath | None, Any, tuple[Any, ...]]:
    """``([subpath,] fn, *rest)`` as ``(subpath parts or None, fn, rest)``."""
    if not args:
        raise TypeError(f"{what}() needs a component function")
    first = args[0]
    if isinstance(first, ComponentSubpath):
        if len(args) < 2:
            raise TypeError(f"{what}() needs a component function after the subpath")
        return first.parts, args[1], args[2:]
    return None, first, args[1:]


def _default_part(processor: Any, what: str) -> Symbol:
    name = getattr(processor, "__name__", None)
    if not isinstance(name, str):
        raise TypeError(f"{what}(): {processor!r} is not a function or live-component class")
    return Symbol(name)


def child_path(subpath: StablePath | None, processor: Any, what: str) -> StablePath:
    """The relative path of a child running ``processor``: the current
    ``component_subpath`` prefix, then ``subpath`` (default
    ``Symbol(processor.__name__)``)."""
    if not callable(processor):
        raise TypeError(f"{what}(): {processor!r} is not callable")
    own = subpath if subpath is not None else (_default_part(processor, what),)
    return current_prefix() + own
