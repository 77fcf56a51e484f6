"""Objects both cores share: they are plain Python so that the two twins hand
out the very same classes (an ``except`` clause written against one core
catches the other's errors too)."""

from __future__ import annotations

from typing import Final

__all__ = ["DuplicateDeclarationError", "LiveMapError", "Symbol"]


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
