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
    Literal,
    ParamSpec,
    Protocol,
    TypeAlias,
    TypeVar,
    overload,
)

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

__all__ = ["Function", "fn", "is_async", "is_live_class"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
T = TypeVar("T")
U = TypeVar("U")
S = TypeVar("S")
C = TypeVar("C", bound="Coroutine[Any, Any, Any]")

LogicTracking: TypeAlias = Literal["full", "self"] | None
"""CocoIndex's ``logic_tracking`` option (accepted and ignored)."""


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


class _Call:
    """One call of a batching function, waiting for (or in) a batch."""

    __slots__ = ("done", "error", "event", "gone", "item", "lead", "result")

    def __init__(self, item: Any) -> None:
        self.item = item
        self.event: anyio.Event | None = None
        self.done = False  # its output (or error) is in
        self.lead = False  # its turn to run the next batch
        self.gone = False  # its caller stopped waiting (cancelled)
        self.result: Any = None
        self.error: Exception | None = None


class _Queue:
    """The calls of one batching function (one instance, one set of extra
    arguments) on one event loop: ``running`` while a batch runs, ``waiting``
    the calls for the next one."""

    __slots__ = ("running", "waiting")

    def __init__(self) -> None:
        self.running = False
        self.waiting: list[_Call] = []


class _Batching(Function[..., Any]):
    """``fn(batching=True)``: the wrapped function takes a list of inputs and
    returns the list of their outputs; each call passes one input and gets
    its output.

    A call made while no batch runs starts one at once; the calls made while
    a batch runs make up the next (at most ``max_batch_size``).  A batch runs
    in the task of its first call (a sync function in a worker thread).
    Calls with different further arguments, or on different instances, are
    batched apart; calls whose further arguments are not hashable run as
    batches of one.  A batch that raises raises in every call it held; one
    whose first caller is cancelled runs again for the others.  The queues
    are per event loop.
    """

    __slots__ = ()

    def __init__(self, func: Callable[..., Any], max_batch_size: int | None) -> None:
        super().__init__(func)
        self._threaded = not self.is_async
        self.is_async = True
        self._max_batch_size = max_batch_size
        self._queues: RunVar[dict[Any, _Queue]] = RunVar(f"livemap batches {self.__qualname__}")

    async def _run_batch(
        self, items: list[Any], extra: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> list[Any]:
        func: Callable[..., Any] = self.__wrapped__
        if self._threaded:
            outputs = await anyio.to_thread.run_sync(partial(func, items, *extra, **kwargs))
        else:
            outputs = await func(items, *extra, **kwargs)
        outputs = list(outputs)
        if len(outputs) != len(items):
            raise ValueError(
                f"{self.__qualname__}() returned {len(outputs)} outputs for a batch of "
                f"{len(items)} inputs"
            )
        return outputs

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not args:
            raise TypeError(
                f"{self.__qualname__}() takes one input as its first argument (batching=True)"
            )
        item, extra = args[0], args[1:]
        key = (id(self.__dict__.get("__self__")), extra, tuple(sorted(kwargs.items())))
        try:
            hash(key)
        except TypeError:  # further arguments that cannot be told apart: a batch of one
            return (await self._run_batch([item], extra, kwargs))[0]
        queues = self._queues.get(None)
        if queues is None:
            queues = {}
            self._queues.set(queues)
        queue = queues.get(key)
        if queue is None:
            queue = queues[key] = _Queue()
        call = _Call(item)
        queue.waiting.append(call)
        if queue.running:
            event = call.event = anyio.Event()
            try:
                await event.wait()
            except BaseException:
                call.gone = True
                if call.lead:  # it was its turn to run the next batch: pass it on
                    queue.waiting.remove(call)
                    self._hand_on(queues, key, queue)
                elif call in queue.waiting:
                    queue.waiting.remove(call)
                raise
            if call.done:
                if call.error is not None:
                    raise call.error
                return call.result
        else:
            queue.running = True
        return await self._lead(queues, key, queue, call, extra, kwargs)

    async def _lead(
        self,
        queues: dict[Any, _Queue],
        key: Any,
        queue: _Queue,
        call: _Call,
        extra: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Run the next batch (``call`` first) and hand the turn on."""
        waiting = queue.waiting
        size = self._max_batch_size or len(waiting)
        batch = waiting[:size]
        del waiting[:size]
        try:
            outputs = await self._run_batch([c.item for c in batch], extra, kwargs)
        except Exception as exc:
            for c in batch:
                c.error = exc
                c.done = True
        except BaseException:
            # cancelled: the others' inputs go first into the next batch
            waiting[:0] = [c for c in batch if c is not call and not c.gone]
            self._hand_on(queues, key, queue)
            raise
        else:
            for c, output in zip(batch, outputs, strict=True):
                c.result = output
                c.done = True
        for c in batch:
            if c.event is not None:
                c.event.set()
        self._hand_on(queues, key, queue)
        if call.error is not None:
            raise call.error
        return call.result

    @staticmethod
    def _hand_on(queues: dict[Any, _Queue], key: Any, queue: _Queue) -> None:
        if queue.waiting:
            following = queue.waiting[0]
            following.lead = True
            assert following.event is not None
            following.event.set()
        else:
            queue.running = False
            if queues.get(key) is queue:
                del queues[key]


def _options(
    batching: bool, max_batch_size: int | None, logic_tracking: LogicTracking, deps: Any
) -> None:
    if deps is not None and logic_tracking is None:
        raise ValueError(
            "fn(deps=...) needs logic_tracking: with logic_tracking=None the deps "
            "value would be ignored"
        )
    if (
        batching
        and max_batch_size is not None
        and (not isinstance(max_batch_size, int) or max_batch_size < 1)
    ):
        raise ValueError(f"fn(max_batch_size=...) must be a positive int, got {max_batch_size!r}")


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


class _AsyncBatchingDecorator(Protocol):
    @overload
    def __call__(
        self, func: Callable[[list[T]], Coroutine[Any, Any, list[U]]], /
    ) -> Function[[T], Coroutine[object, object, U]]: ...
    @overload
    def __call__(
        self, func: Callable[[S, list[T]], Coroutine[Any, Any, list[U]]], /
    ) -> Function[[S, T], Coroutine[object, object, U]]: ...
    @overload
    def __call__(
        self, func: Callable[..., Coroutine[Any, Any, Any]], /
    ) -> Function[..., Coroutine[object, object, Any]]: ...


class _BatchingDecorator(Protocol):
    @overload
    def __call__(
        self, func: Callable[[list[T]], Coroutine[Any, Any, list[U]]], /
    ) -> Function[[T], Coroutine[object, object, U]]: ...
    @overload
    def __call__(
        self, func: Callable[[S, list[T]], Coroutine[Any, Any, list[U]]], /
    ) -> Function[[S, T], Coroutine[object, object, U]]: ...
    @overload
    def __call__(
        self, func: Callable[[list[T]], list[U]], /
    ) -> Function[[T], Coroutine[object, object, U]]: ...
    @overload
    def __call__(
        self, func: Callable[[S, list[T]], list[U]], /
    ) -> Function[[S, T], Coroutine[object, object, U]]: ...
    @overload
    def __call__(
        self, func: Callable[..., Any], /
    ) -> Function[..., Coroutine[object, object, Any]]: ...


class _FunctionDecorator:
    """The type of :data:`fn` (``help(livemap.fn)`` shows this).

    ``@fn``: mark a function (sync or async) as a component function.

    Works bare (``@fn``) and called (``@fn(...)``), on functions and on
    methods (``instance.method`` is then bound).  The result is a
    :class:`Function`: called, it calls the function as usual (sync stays
    sync, async stays async); mounted, it runs as a component.

    ``@fn.as_async`` (or ``@fn.as_async(...)``) makes the result async
    whatever the function: a sync function then runs in a worker thread,
    when called and when mounted, and does not block the event loop.

    CocoIndex's options, keyword-only:

    * ``batching=True``: the function takes a list of inputs (after ``self``
      for a method) and returns the list of outputs; callers pass one input
      and await its output (``await embed("text")``).  Calls made while a
      batch runs make up the next one, of at most ``max_batch_size``.  It
      needs an async function under ``@fn``; ``@fn.as_async(batching=True)``
      takes a sync one too (it runs in a worker thread).
    * ``memo``, ``memo_key``, ``version``, ``logic_tracking``, ``deps``:
      accepted and ignored, since livemap re-runs a component every time it
      is mounted (``deps`` with ``logic_tracking=None`` is a ``ValueError``,
      as in CocoIndex).
    * ``runner``: accepted and ignored: the function runs in this process,
      in the calling task (or a worker thread, under ``fn.as_async``).  Like
      ``batching``, it needs an async function under ``@fn``.
    """

    __slots__ = ()

    @overload
    def __call__(self, func: Callable[P, R], /) -> Function[P, R]: ...
    @overload
    def __call__(
        self,
        func: None = None,
        /,
        *,
        memo: bool = False,
        memo_key: Any = None,
        batching: Literal[False] = False,
        max_batch_size: int | None = None,
        runner: Any = None,
        version: int | None = None,
        logic_tracking: LogicTracking = "full",
        deps: Any = None,
    ) -> _Decorator: ...
    @overload
    def __call__(
        self,
        func: None = None,
        /,
        *,
        memo: bool = False,
        memo_key: Any = None,
        batching: Literal[True],
        max_batch_size: int | None = None,
        runner: Any = None,
        version: int | None = None,
        logic_tracking: LogicTracking = "full",
        deps: Any = None,
    ) -> _AsyncBatchingDecorator: ...
    @overload
    def __call__(
        self,
        func: None = None,
        /,
        *,
        memo: bool = False,
        memo_key: Any = None,
        batching: bool,
        max_batch_size: int | None = None,
        runner: Any = None,
        version: int | None = None,
        logic_tracking: LogicTracking = "full",
        deps: Any = None,
    ) -> Callable[[Callable[..., Any]], Function[..., Any]]: ...
    def __call__(
        self,
        func: Callable[..., Any] | None = None,
        /,
        *,
        memo: bool = False,
        memo_key: Any = None,
        batching: bool = False,
        max_batch_size: int | None = None,
        runner: Any = None,
        version: int | None = None,
        logic_tracking: LogicTracking = "full",
        deps: Any = None,
    ) -> Any:
        _options(batching, max_batch_size, logic_tracking, deps)

        def decorate(f: Callable[..., Any]) -> Function[..., Any]:
            _checked(f, "fn")
            if (batching or runner is not None) and not is_async(f):
                what = "batching" if batching else "runner"
                raise ValueError(
                    f"fn({what}=...) needs an async function; for the sync "
                    f"{getattr(f, '__qualname__', f)!r} use fn.as_async({what}=...)"
                )
            if batching:
                return _Batching(f, max_batch_size)
            return Function(f)

        return decorate if func is None else decorate(func)

    @overload
    def as_async(self, func: Callable[P, C], /) -> Function[P, C]: ...
    @overload
    def as_async(self, func: Callable[P, R], /) -> Function[P, Coroutine[object, object, R]]: ...
    @overload
    def as_async(
        self,
        func: None = None,
        /,
        *,
        memo: bool = False,
        memo_key: Any = None,
        batching: Literal[False] = False,
        max_batch_size: int | None = None,
        runner: Any = None,
        version: int | None = None,
        logic_tracking: LogicTracking = "full",
        deps: Any = None,
    ) -> _AsyncDecorator: ...
    @overload
    def as_async(
        self,
        func: None = None,
        /,
        *,
        memo: bool = False,
        memo_key: Any = None,
        batching: Literal[True],
        max_batch_size: int | None = None,
        runner: Any = None,
        version: int | None = None,
        logic_tracking: LogicTracking = "full",
        deps: Any = None,
    ) -> _BatchingDecorator: ...
    @overload
    def as_async(
        self,
        func: None = None,
        /,
        *,
        memo: bool = False,
        memo_key: Any = None,
        batching: bool,
        max_batch_size: int | None = None,
        runner: Any = None,
        version: int | None = None,
        logic_tracking: LogicTracking = "full",
        deps: Any = None,
    ) -> Callable[[Callable[..., Any]], Function[..., Any]]: ...
    def as_async(
        self,
        func: Callable[..., Any] | None = None,
        /,
        *,
        memo: bool = False,
        memo_key: Any = None,
        batching: bool = False,
        max_batch_size: int | None = None,
        runner: Any = None,
        version: int | None = None,
        logic_tracking: LogicTracking = "full",
        deps: Any = None,
    ) -> Any:
        """``@fn.as_async``: like ``@fn``, but the result is always async: a
        sync function runs in a worker thread (when called and when
        mounted), so it does not block the event loop; an async one is as
        under ``@fn``.  Takes ``fn``'s options; ``batching`` and ``runner``
        take sync functions too."""
        _options(batching, max_batch_size, logic_tracking, deps)

        def decorate(f: Callable[..., Any]) -> Function[..., Any]:
            _checked(f, "fn.as_async")
            if batching:
                return _Batching(f, max_batch_size)
            if is_async(f):
                return Function(f)
            return _Threaded(f)

        return decorate if func is None else decorate(func)

    def __repr__(self) -> str:
        return "livemap.fn"


fn = _FunctionDecorator()
"""``@fn``: mark a function (sync or async) as a component function.

Works bare (``@fn``) and called (``@fn(...)``), on functions and on
methods (``instance.method`` is then bound).  The result is a
:class:`Function`: called, it calls the function as usual (sync stays
sync, async stays async); mounted, it runs as a component.

``@fn.as_async`` (or ``@fn.as_async(...)``) makes the result async
whatever the function: a sync function then runs in a worker thread,
when called and when mounted, and does not block the event loop.

CocoIndex's options, keyword-only:

* ``batching=True``: the function takes a list of inputs (after ``self``
  for a method) and returns the list of outputs; callers pass one input
  and await its output (``await embed("text")``).  Calls made while a
  batch runs make up the next one, of at most ``max_batch_size``.  It
  needs an async function under ``@fn``; ``@fn.as_async(batching=True)``
  takes a sync one too (it runs in a worker thread).
* ``memo``, ``memo_key``, ``version``, ``logic_tracking``, ``deps``:
  accepted and ignored, since livemap re-runs a component every time it
  is mounted (``deps`` with ``logic_tracking=None`` is a ``ValueError``,
  as in CocoIndex).
* ``runner``: accepted and ignored: the function runs in this process,
  in the calling task (or a worker thread, under ``fn.as_async``).  Like
  ``batching``, it needs an async function under ``@fn``.
"""


def is_live_class(obj: object) -> bool:
    return inspect.isclass(obj) and callable(getattr(obj, "process_live", None))


def is_async(obj: object) -> bool:
    if isinstance(obj, Function):
        return obj.is_async
    return inspect.iscoroutinefunction(obj)
