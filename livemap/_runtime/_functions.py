"""Component functions: what ``@fn`` makes, and how the runtime tells a
function from a live-component class."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from functools import partial
from types import MethodType
from typing import (
    Any,
    Concatenate,
    Generic,
    ParamSpec,
    Protocol,
    TypeVar,
    overload,
)

import anyio
import anyio.to_thread

__all__ = ["Function", "fn", "is_async", "is_live_class"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
T = TypeVar("T")
S = TypeVar("S")
C = TypeVar("C", bound="Coroutine[Any, Any, Any]")


class Function(Generic[P, R]):
    """A component function made by :func:`fn`.

    Calling it calls the wrapped function as usual; mounting it runs it as a
    component.  ``is_async`` tells whether calling it returns an awaitable.
    On a class it is a method: ``instance.method`` is a ``Function`` with
    ``instance`` bound (``__self__``), which mounts like any other
    (``mount(h.run, 21)``, default subpath ``Symbol("run")``).  ``await
    f.as_async(*args)`` calls it from async code: a sync function in a worker
    thread, an async one as usual.
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

    @overload
    async def as_async(
        self: Function[P2, Coroutine[Any, Any, T]], *args: P2.args, **kwargs: P2.kwargs
    ) -> T: ...
    @overload
    async def as_async(self: Function[P2, T], *args: P2.args, **kwargs: P2.kwargs) -> T: ...
    async def as_async(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function from async code: a sync one runs in a worker
        thread (not blocking the event loop), an async one is awaited."""
        if self.is_async:
            awaitable: Any = self(*args, **kwargs)
            return await awaitable
        return await anyio.to_thread.run_sync(partial(self.__wrapped__, *args, **kwargs))

    def __repr__(self) -> str:
        if "__self__" in self.__dict__:
            return f"<livemap.fn {self.__qualname__} of {self.__dict__['__self__']!r}>"
        return f"<livemap.fn {self.__qualname__}>"


class _Threaded(Function[P, Any]):
    """``fn.as_async`` of a sync function: calling it returns a coroutine that
    runs the function in a worker thread; mounted, it runs there too."""

    __slots__ = ()

    def __init__(self, func: Callable[P, Any]) -> None:
        super().__init__(func)
        self.is_async = True

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        return await anyio.to_thread.run_sync(partial(self.__wrapped__, *args, **kwargs))


def _checked(func: object, what: str) -> None:
    if not callable(func):
        raise TypeError(f"{what} decorates a function, got {func!r}")


class _Decorator(Protocol):
    def __call__(self, func: Callable[P, R], /) -> Function[P, R]: ...


class _AsyncDecorator(Protocol):
    @overload
    def __call__(self, func: Callable[P, C], /) -> Function[P, C]: ...
    @overload
    def __call__(self, func: Callable[P, R], /) -> Function[P, Coroutine[object, object, R]]: ...


class _FunctionDecorator:
    """``@fn``: mark a function (sync or async) as a component function.

    Works bare (``@fn``) and called (``@fn()``), on functions and on methods
    (``instance.method`` is then bound).  The result is a
    :class:`Function`: called, it calls the function as usual (sync stays
    sync, async stays async); mounted, it runs as a component.

    ``@fn.as_async`` (or ``@fn.as_async()``) makes the result async whatever
    the function: a sync function then runs in a worker thread, when called
    and when mounted, and does not block the event loop.

    Keyword options other projects accept (``memo=...`` and the like) are
    accepted and ignored: livemap re-runs a component every time it is
    mounted.
    """

    __slots__ = ()

    @overload
    def __call__(self, func: Callable[P, R], /) -> Function[P, R]: ...
    @overload
    def __call__(self, func: None = None, /, **options: Any) -> _Decorator: ...
    def __call__(self, func: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        def decorate(f: Callable[..., Any]) -> Function[..., Any]:
            _checked(f, "fn")
            return Function(f)

        return decorate if func is None else decorate(func)

    @overload
    def as_async(self, func: Callable[P, C], /) -> Function[P, C]: ...
    @overload
    def as_async(self, func: Callable[P, R], /) -> Function[P, Coroutine[object, object, R]]: ...
    @overload
    def as_async(self, func: None = None, /, **options: Any) -> _AsyncDecorator: ...
    def as_async(self, func: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """``@fn.as_async``: like ``@fn``, but the result is always async: a
        sync function runs in a worker thread (when called and when
        mounted), so it does not block the event loop; an async one is as
        under ``@fn``."""

        def decorate(f: Callable[..., Any]) -> Function[..., Any]:
            _checked(f, "fn.as_async")
            if is_async(f):
                return Function(f)
            return _Threaded(f)

        return decorate if func is None else decorate(func)

    def __repr__(self) -> str:
        return "livemap.fn"


fn = _FunctionDecorator()
"""``@fn`` / ``@fn(...)`` / ``@fn.as_async``: mark a component function (see
:class:`Function`)."""


def is_live_class(obj: object) -> bool:
    return inspect.isclass(obj) and callable(getattr(obj, "process_live", None))


def is_async(obj: object) -> bool:
    if isinstance(obj, Function):
        return obj.is_async
    return inspect.iscoroutinefunction(obj)
