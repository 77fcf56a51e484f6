"""Objects both cores share: they are plain Python so that the two twins hand
out the very same classes (an ``except`` clause written against one core
catches the other's errors too)."""

from __future__ import annotations

import reprlib
import uuid
from typing import Final

__all__ = [
    "MAX_KEY_DEPTH",
    "DuplicateDeclarationError",
    "LiveMapError",
    "StableKeyError",
    "Symbol",
]

MAX_KEY_DEPTH: Final = 64
"""How deep a stable key may nest: at most this many tuples (or lists) inside
one another.  ``1`` has depth 0, ``(1,)`` and ``[1]`` depth 1, ``((1,),)``
depth 2; a key nested deeper is not a stable key."""


class Symbol:
    """A path part or key part that never equals a string.

    ``Symbol("x") == Symbol("x")``, but ``Symbol("x") != "x"``.  Symbols are
    interned per name, so identity and equality agree.
    """

    __slots__ = ("_name",)
    _interned: Final[dict[str, Symbol]] = {}
    _name: str

    def __new__(cls, name: str) -> Symbol:
        if type(name) is not str:
            raise TypeError(f"Symbol name must be a str, got {type(name).__name__}: {name!r}")
        sym = cls._interned.get(name)
        if sym is None:
            sym = object.__new__(cls)
            object.__setattr__(sym, "_name", name)
            cls._interned[name] = sym
        return sym

    @property
    def name(self) -> str:
        """The symbol's name."""
        return self._name

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Symbol is immutable")

    def __repr__(self) -> str:
        return f"Symbol({self._name!r})"

    def __str__(self) -> str:
        return f"<{self._name}>"

    def __reduce__(self) -> tuple[type[Symbol], tuple[str]]:
        return (Symbol, (self._name,))

    def __lt__(self, other: object) -> bool:
        if isinstance(other, Symbol):
            return self._name < other._name
        return NotImplemented


class LiveMapError(Exception):
    """The base class of every error livemap raises or reports on purpose.

    Where a builtin exception is part of the contract it is a base too (a
    duplicate declaration is also a ``ValueError``, a call outside a
    component also a ``RuntimeError``).  Defined here, in the lowest layer,
    so that the core's own errors belong to the one hierarchy;
    ``livemap.errors`` re-exports it.
    """


class StableKeyError(LiveMapError, TypeError):
    """A key (or path part) that is not a stable key: raised at the call.

    A ``TypeError`` too, as the contract has it; the message names the key
    (cut short when it is too deep to print) and what a stable key is.
    """


class DuplicateDeclarationError(LiveMapError, ValueError):
    """A key was declared twice into one target during one component run.

    Raised at the second ``declare``; the first declaration stands.
    ``key`` is the key, ``owner`` the declaring component (or owner object).
    """

    def __init__(self, key: object, owner: object, target: str) -> None:
        super().__init__(
            f"key {key!r} was already declared into {target} during this run of {owner!r}; "
            "the first declaration stands"
        )
        self.key = key
        self.owner = owner
        self.target = target


# -- what both cores say about keys that are not stable --------------------------------
#
# Only the error paths use these; the cores decide on their own (fast) whether
# a key is stable, and call :func:`_key_error` for the exception to raise.

_SCALARS: Final[frozenset[type]] = frozenset({type(None), bool, int, str, bytes, uuid.UUID, Symbol})
"""The exact types of the scalar stable keys."""

_KEY_HELP: Final = (
    "a stable key is None, bool, int, str, bytes, uuid.UUID, Symbol, or a tuple or list "
    f"of these nested at most {MAX_KEY_DEPTH} levels deep"
)

_short = reprlib.Repr()
_short.maxlevel = 4
_short.maxstring = 40
_short.maxother = 40


def _key_repr(key: object) -> str:
    # A key too deep for repr() (a RecursionError) is shown cut short.
    try:
        return repr(key)
    except RecursionError:
        return _short.repr(key)


def _key_error(key: object) -> StableKeyError:
    """The :class:`StableKeyError` for ``key``, which is not a stable key.

    The key is walked depth first, left to right, and the first problem met is
    the one reported: a part nested more than :data:`MAX_KEY_DEPTH` levels
    deep, or a part that is not a stable key.  The walk never goes deeper than
    the limit (so a list that contains itself is simply too deep).
    """
    if type(key) is tuple or type(key) is list:
        stack = [iter(key)]
        while stack:
            for part in stack[-1]:
                t = type(part)
                if t in _SCALARS:
                    continue
                if t is tuple or t is list:
                    if len(stack) >= MAX_KEY_DEPTH:
                        return StableKeyError(
                            f"{_short.repr(key)} ({type(key).__name__}) is not a stable key: "
                            f"it is nested at least {MAX_KEY_DEPTH + 1} levels deep, and a "
                            f"stable key nests tuples or lists at most MAX_KEY_DEPTH = "
                            f"{MAX_KEY_DEPTH} levels deep"
                        )
                    stack.append(iter(part))
                    break
                return StableKeyError(
                    f"{_key_repr(key)} ({type(key).__name__}) is not a stable key: {_KEY_HELP}"
                )
            else:
                stack.pop()
    return StableKeyError(
        f"{_key_repr(key)} ({type(key).__name__}) is not a stable key: {_KEY_HELP}"
    )
