"""Component functions: what ``@fn`` makes, and how the runtime tells a
function from a live-component class."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import MethodType
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

__all__ = ["Function", "fn", "is_async", "is_live_class"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
S = TypeVar("S")


class Function(Generic[P, R]):
    """A component function made by :func:`fn`.

    Calling it calls the wrapped function as usual; mounting it runs it as a
    component.  ``is_async`` tells whether calling it returns an awaitable.
    On a class it is a method: ``instance.method`` is a ``Function`` with
    ``instance`` bound (``__self__``), which mounts like any other
    (``mount(h.run, 21)``, default subpath ``Symbol("run")``).
    """

    __slots__ = ("__dict__", "__wrapped__", "is_async")

    def __init__(self, func: Callable[P, R]) -> None:
        self.__wrapped__ = func
        self.__name__: str = getattr(func, "__name__", "component")
        self.__qualname__: str = getattr(func, "__qualname__", self.__name__)
        self.__doc__ = getattr(func, "__doc__", None)
        self.__module__ = getattr(func, "__module__", __name__)
        self.is_async = is_async(func)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.__wrapped__(*args, **kwargs)

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> Function[P, R]: ...
    @overload
    def __get__(
        self: Function[Concatenate[S, P2], R], instance: S, owner: type[Any] | None = None
    ) -> Function[P2, R]: ...
    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Function[Any, R]:
        """On a class: the function itself; on an instance: the function with
        the instance bound as its first argument (like a method)."""
        if instance is None or "__self__" in self.__dict__:
            return self
        cls = type(self)
        bound = cls.__new__(cls)
        bound.__dict__.update(self.__dict__)
        bound.__wrapped__ = MethodType(self.__wrapped__, instance)
        bound.is_async = self.is_async
        bound.__dict__["__self__"] = instance
        bound.__dict__["__func__"] = self
        return bound

    def __repr__(self) -> str:
        if "__self__" in self.__dict__:
            return f"<livemap.fn {self.__qualname__} of {self.__dict__['__self__']!r}>"
        return f"<livemap.fn {self.__qualname__}>"


@overload
def fn(func: Callable[P, R], /) -> Function[P, R]: ...
@overload
def fn(func: None = None, /, **options: Any) -> Callable[[Callable[P, R]], Function[P, R]]: ...
def fn(
    func: Callable[P, R] | None = None, /, **options: Any
) -> Function[P, R] | Callable[[Callable[P, R]], Function[P, R]]:
    """Mark a function (sync or async) as a component function.

    Works bare (``@fn``) and called (``@fn()``).  Keyword options other
    projects accept (``memo=...`` and the like) are accepted and ignored:
    livemap re-runs a component every time it is mounted.
    """
    if func is not None:
        return Function(func)

    def decorate(f: Callable[P, R]) -> Function[P, R]:
        return Function(f)

    return decorate


def is_live_class(obj: object) -> bool:
    return inspect.isclass(obj) and callable(getattr(obj, "process_live", None))


def is_async(obj: object) -> bool:
    if isinstance(obj, Function):
        return obj.is_async
    return inspect.iscoroutinefunction(obj)
