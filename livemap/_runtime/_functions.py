"""Component functions: what ``@fn`` makes, and how the runtime tells a
function from a live-component class."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TypeVar, overload

__all__ = ["Function", "fn", "is_async", "is_live_class"]

P = ParamSpec("P")
R = TypeVar("R")


class Function(Generic[P, R]):
    """A component function made by :func:`fn`.

    Calling it calls the wrapped function as usual; mounting it runs it as a
    component.  ``is_async`` tells whether it returns an awaitable.
    """

    __slots__ = ("__dict__", "__wrapped__", "is_async")

    def __init__(self, func: Callable[P, R]) -> None:
        self.__wrapped__ = func
        self.__name__: str = getattr(func, "__name__", "component")
        self.__qualname__: str = getattr(func, "__qualname__", self.__name__)
        self.__doc__ = getattr(func, "__doc__", None)
        self.__module__ = getattr(func, "__module__", __name__)
        self.is_async = inspect.iscoroutinefunction(func)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.__wrapped__(*args, **kwargs)

    def __repr__(self) -> str:
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
