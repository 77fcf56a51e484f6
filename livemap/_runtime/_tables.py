"""The one seam where the runtime binds ``livemap_core``'s implementation.

Targets make their tables and declarers through :func:`new_table` and
:func:`new_declarer`, so that one call, :func:`use_core`, swaps the
implementation for what is made afterwards (the benchmarks compare both
cores in one process this way).  Everything else takes the core's types from
``livemap_core`` directly.
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any

import livemap_core

__all__ = ["DeclarerDoc", "new_declarer", "new_table", "use_core"]

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


class _InstanceDoc:
    """A declarer class's ``__doc__``: the user-facing text on its instances,
    the core's on the class (``pydoc`` shows an object's own doc only when it
    is not its class's)."""

    __slots__ = ("class_doc", "doc")

    def __init__(self, doc: str, class_doc: str | None) -> None:
        self.doc = doc
        self.class_doc = class_doc

    def __get__(self, obj: object, objtype: type | None = None) -> str | None:
        return self.class_doc if obj is None else self.doc


def _same(declarer: object, obj: object, objtype: type | None = None) -> object:
    return declarer


_KEY_VALUE = inspect.Signature(
    [
        inspect.Parameter("key", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("value", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ],
    return_annotation=None,
)


class DeclarerDoc:
    """What ``help()`` and ``inspect.signature`` say of a target's declarer
    (``lm.declare_entry``, ``target.declare``): ``name(key, value) -> None``
    and ``doc``, not the core's ``Declarer``.

    The declarer is an instance of a subclass of the core's ``Declarer``
    made here (one per core class), which adds no Python code to a call: it
    only documents itself, and its ``__get__`` (returning the declarer) makes
    ``pydoc`` present it as a routine.
    """

    __slots__ = ("_classes", "class_name", "doc", "module", "name")

    def __init__(self, name: str, class_name: str, module: str, doc: str) -> None:
        self.name = name
        self.class_name = class_name
        self.module = module
        self.doc = inspect.cleandoc(doc)
        self._classes: dict[type, type] = {}

    def declarer_class(self, base: type[livemap_core.Declarer[Any, Any]]) -> type:
        """The documented subclass of the core class ``base`` (as fast to
        call as ``base``: see ``Declarer._subclassed``)."""
        cls = self._classes.get(base)
        if cls is None:
            name = self.name

            def __repr__(declarer: Any) -> str:
                return f"<{name} of {declarer.target!r}>"

            cls = self._classes[base] = type(
                self.class_name,
                (base,),
                {
                    "__slots__": (),
                    "__module__": self.module,
                    "__doc__": _InstanceDoc(
                        self.doc,
                        f"A ``{base.__module__}.{base.__qualname__}`` that documents "
                        f"itself as ``{self.name}``.",
                    ),
                    "__name__": self.name,
                    "__signature__": _KEY_VALUE,
                    "__get__": _same,
                    "__repr__": __repr__,
                },
            )
            base._subclassed(cls)
        return cls


def new_declarer(*args: Any, doc: DeclarerDoc | None = None) -> livemap_core.Declarer[Any, Any]:
    """The core's ``Declarer(*args)``, documented by ``doc`` if given."""
    cls = _core.Declarer if doc is None else doc.declarer_class(_core.Declarer)
    declarer: livemap_core.Declarer[Any, Any] = cls(*args)
    return declarer
