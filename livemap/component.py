"""The component tree: runs, commits, unmounting and readiness.

A :class:`Component` is one node of an app's tree, at a :data:`StablePath`.
Each *run* calls its function with a fresh :class:`Run` as the current context;
declarations made during the run are buffered per target, and when the
function returns they are committed as one unit per target, children the run
did not mount again are unmounted, and the LiveMaps the component created in
earlier runs are retired.  A run that raises commits nothing.

Readiness: a component is *self-ready* once its latest run committed (or
failed), or, for a live component, once it marked itself ready and is not
busy.  ``_unready`` counts the component itself (when not self-ready) plus each
child whose subtree is not ready, so a subtree is ready exactly when the
count is zero; changes propagate to the parent only on the zero crossings.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from contextvars import Token
from functools import partial
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

import anyio

from livemap.context import (
    ExceptionContext,
    ExceptionHandler,
    MountKind,
    _current_run,
    _handlers,
    current_run,
    dispatch,
    handler_chain,
    processor_name,
)
from livemap.errors import DuplicatePathError
from livemap.paths import (
    ComponentSubpath,
    StableKey,
    StablePath,
    Symbol,
    _prefix,
    check_key,
    current_prefix,
    format_path,
)

if TYPE_CHECKING:
    from livemap.app import App, AppRun
    from livemap.feed import Consumer, RetryPolicy
    from livemap.live_map import LiveMap
    from livemap.targets import TargetBase

__all__ = [
    "Component",
    "ComponentMountHandle",
    "Function",
    "Run",
    "fn",
    "mount",
    "mount_each",
    "use_mount",
]

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


def _is_live_class(obj: object) -> bool:
    return inspect.isclass(obj) and callable(getattr(obj, "process_live", None))


def _is_async(obj: object) -> bool:
    if isinstance(obj, Function):
        return obj.is_async
    return inspect.iscoroutinefunction(obj)


class Run:
    """One run of one component: what it declared, mounted and created."""

    __slots__ = ("buffers", "component", "maps", "mounted", "owner")

    def __init__(self, component: Component) -> None:
        self.component = component
        self.owner = component  # what livemap_core.Declarer records as the owner
        self.buffers: dict[TargetBase[Any, Any], Any] | None = None
        self.mounted: dict[StablePath, Component] | None = None
        self.maps: list[LiveMap[Any, Any]] | None = None


_NOTHING: Any = object()


def _no_processor(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("EachState.configure() was not called")


class KeyedRun(Run):
    """A run of a ``mount_each`` child that has no component yet (see
    :class:`EachState`).  Its component is made the first time the run needs
    one: to declare (the component is the owner), to mount, or to create a
    map.  A run that never does is over once its function returns."""

    __slots__ = ("_made", "each", "key", "scope", "value")

    def __init__(self, each: EachState, scope: anyio.CancelScope) -> None:
        self.buffers = None
        self.mounted = None
        self.maps = None
        self._made: Component | None = None
        self.each = each
        # what it runs (set by EachState.run_keyed; a worker reuses one
        # KeyedRun for consecutive runs that leave nothing behind)
        self.key: Any = None
        self.value: Any = None
        # the scope of the worker running it, while it does
        self.scope: anyio.CancelScope | None = scope

    @property
    def component(self) -> Component:
        made = self._made
        if made is None:
            made = self.each.materialize(self)
        return made

    @component.setter
    def component(self, value: Component) -> None:
        self._made = value

    owner = component  # what livemap_core.Declarer records as the owner


class EachState:
    """What a ``mount_each`` over a feed keeps of its children beyond their
    components.

    Most per-entry runs leave nothing behind: no target entries, children or
    maps.  Such a child needs no component.  ``leaves`` holds the value of
    each child at rest without one; ``pending`` the value of each key whose
    run is queued, and ``running`` the :class:`KeyedRun` of each key whose
    run is under way, both without a component.  A run that needs its
    component (see :class:`KeyedRun`), or fails, gets one, which then stays
    in the tree like any other child until a later run leaves nothing behind
    (:meth:`Component._rest_as_leaf`).  A key is in at most one of
    ``leaves``, ``pending`` and ``running``, and is in the component's
    children only while in none of them, or while running once its run made
    its component.

    While any key is pending or running, the ``mount_each`` component counts
    one unready child for them all.
    """

    __slots__ = (
        "call",
        "component",
        "counted",
        "fargs",
        "fn",
        "handlers",
        "kwargs",
        "leaves",
        "pending",
        "running",
    )

    def __init__(self, component: Component) -> None:
        self.component = component
        self.leaves: dict[Any, Any] = {}
        self.pending: dict[Any, Any] = {}
        self.running: dict[Any, KeyedRun] = {}
        self.counted = False
        self.fn: Any = None  # the processor, and what calling it calls
        self.call: Callable[..., Any] = _no_processor
        self.fargs: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = _EMPTY_KWARGS
        self.handlers: tuple[ExceptionHandler, ...] = ()

    def configure(
        self,
        fn: Any,
        fargs: tuple[Any, ...],
        kwargs: dict[str, Any],
        handlers: tuple[ExceptionHandler, ...],
    ) -> None:
        """What each child runs: ``fn(value, *fargs, **kwargs)``, under ``handlers``."""
        self.fn = fn
        self.call = fn.__wrapped__ if type(fn) is Function else fn
        self.fargs = fargs
        self.kwargs = kwargs or _EMPTY_KWARGS
        self.handlers = handlers

    def hold(self) -> None:
        if not self.counted:
            self.counted = True
            self.component._adjust(1)

    def release_if_idle(self) -> None:
        if self.counted and not self.pending and not self.running:
            self.counted = False
            self.component._adjust(-1)

    def materialize(self, run: KeyedRun) -> Component:
        """The component of ``run``'s key, made now, in the run's generation."""
        comp = self.component
        fargs = self.fargs
        child = Component(
            comp.app,
            comp,
            (run.key,),
            self.fn,
            (run.value, *fargs) if fargs else (run.value,),
            self.kwargs,
            "mount_each",
            self.handlers,
        )
        run._made = child
        child._generation = 1
        child._cancel = run.scope
        child._scope_run = comp.app._active
        children = comp.children
        if children is None:
            children = comp.children = {}
        children[(run.key,)] = child
        comp._adjust(1)
        return child

    async def run_keyed(
        self, key: Any, gen: int, run: KeyedRun
    ) -> tuple[Any, Exception | None] | None:
        """Run ``key``'s pending value (queued by a run of generation ``gen``
        of the ``mount_each`` component) as ``run``, which the pool worker
        made the current run; without a component unless the run needs one.

        ``None``: the run is over (or was not needed) and ``run`` may be used
        again.  Otherwise the run made its component or failed: the worker
        makes ``run`` no longer current and calls :meth:`finish_keyed` with
        the ``(result, error)`` returned.
        """
        comp = self.component
        if not comp._alive or comp._generation != gen:
            return None  # queued by an earlier run of the mount_each: it reset us
        value = self.pending.pop(key, _NOTHING)
        if value is _NOTHING:
            return None  # dropped meanwhile
        run.key = key
        run.value = value
        running = self.running
        running[key] = run
        app_run = comp.app._active
        if app_run is not None:
            app_run.stats.components_run += 1
        handlers = self.handlers
        t_handlers = _handlers.set(handlers) if _handlers.get() is not handlers else None
        t_prefix = _prefix.set(()) if _prefix.get() else None
        result: Any = None
        try:
            fargs = self.fargs
            kwargs = self.kwargs
            result = self.call(value, *fargs, **kwargs) if fargs or kwargs else self.call(value)
            if type(result) is CoroutineType or inspect.isawaitable(result):
                result = await result
        except anyio.get_cancelled_exc_class():
            run.scope = None
            self._finish_key(key, run)
            raise
        except Exception as exc:
            error: Exception | None = exc
        else:
            error = None
        finally:
            if t_handlers is not None:
                _handlers.reset(t_handlers)
            if t_prefix is not None:
                _prefix.reset(t_prefix)
        if running.get(key) is not run:
            return None  # dropped while it ran
        if (
            error is None
            and run._made is None
            and run.buffers is None
            and run.maps is None
            and run.mounted is None
        ):
            # at rest at once: the common case
            del running[key]
            self.leaves[key] = value
            px = comp._x
            if px is not None and px.failures:
                px.failures.pop(key, None)
            self._done(key)
            self.release_if_idle()
            return None
        return result, error

    async def finish_keyed(self, run: KeyedRun, result: Any, error: Exception | None) -> None:
        """The rest of a keyed run that made its component or failed: the
        component (made now if the run did not) takes the run over as a
        first try that already ran."""
        key = run.key
        scope = run.scope
        child = run._made
        try:
            if child is None:
                child = self.materialize(run)
            await child.run_once(
                1, self.fn, child.args, child.kwargs, raise_errors=False, first=(run, result, error)
            )
        finally:
            if child is not None and child._cancel is scope:
                child._cancel = None
            if self.running.get(key) is run:
                run.scope = None  # the worker's part is over
                if child is not None and child._alive and child._unready:
                    # its component's subtree is still busy: the key is, too
                    child.on_ready(partial(self._finish_key, key, run))
                else:
                    self._finish_key(key, run)

    def _finish_key(self, key: Any, run: KeyedRun) -> None:
        if self.running.get(key) is run:
            del self.running[key]
            self._done(key)
            self.release_if_idle()

    def _done(self, key: Any) -> None:
        """Tell the consumer, if it waits for ``key``, that its run is over."""
        x = self.component._x
        consumer = None if x is None else x.consumer
        if consumer is not None and key in consumer.in_flight:
            consumer._finish(key)

    def drop(self, key: Any) -> None:
        """Forget ``key``'s run without a component (cancelled if under way)."""
        self.pending.pop(key, None)
        run = self.running.pop(key, None)
        if run is not None and run.scope is not None:
            run.scope.cancel()
        self.release_if_idle()

    def reset(self) -> None:
        """Cancel every run without a component (a new scan follows)."""
        self.pending.clear()
        self.stop()
        self.running.clear()
        self.release_if_idle()

    def stop(self) -> None:
        for run in self.running.values():
            if run.scope is not None:
                run.scope.cancel()


_EMPTY_KWARGS: dict[str, Any] = {}


class _Extra:
    """The rarely used parts of a component, allocated on first use."""

    __slots__ = (
        "backing_off",
        "busy",
        "consumer",
        "each",
        "escalated",
        "exception",
        "failures",
        "maps",
        "marked_ready",
        "pool",
        "retry",
        "waiters",
    )

    def __init__(self) -> None:
        self.waiters: list[Callable[[], object]] | None = None
        self.failures: dict[Any, BaseException] | None = None
        # mount_each over a feed: its children without a component of their own
        self.each: EachState | None = None
        self.retry: RetryPolicy | None = None
        self.pool: Pool | None = None
        self.escalated: BaseException | None = None
        self.exception: BaseException | None = None
        self.maps: list[LiveMap[Any, Any]] | None = None
        self.marked_ready = False
        self.busy = 0
        self.consumer: Consumer[Any, Any] | None = None
        self.backing_off = False  # waiting before a retry


def event_class() -> Callable[[], anyio.Event]:
    """The running backend's event class.  Calling it makes an event like
    ``anyio.Event()`` does, without looking the backend up each time: for a
    task that parks on a fresh event over and over."""
    return type(anyio.Event())


class Pool:
    """Worker tasks that run a parent's children, ``limit`` at a time.

    ``mount_each`` mounts thousands of children: a task each would cost far
    more than most runs.  A pool starts at most ``limit`` worker tasks, each
    running queued children one after another in its own task.  An idle
    worker parks until there is work again (waking a parked worker is
    cheaper than starting a task); workers end with the app run or when the
    pool is closed.  A run is cancelled by cancelling the scope of the worker
    running it (the worker then opens a fresh scope).

    Workers are woken one at a time: a new item wakes (or starts) a worker
    only when none is free, and a worker that starts a run while more items
    wait makes sure another one is free to take them.  Runs that never
    suspend are then run back to back by one worker, while runs that wait
    on I/O spread over up to ``limit`` workers.
    """

    __slots__ = (
        "_room",
        "app_run",
        "closed",
        "each",
        "free",
        "high",
        "limit",
        "parked",
        "queue",
        "workers",
    )

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # crowded(): several rounds of work queued for every worker
        self.high = max(8 * limit, 1024)
        # (child, generation, None): a run of child; (child, 0, job): job()
        # instead; (None, generation, key): each.run_keyed(key, generation)
        self.queue: deque[tuple[Component | None, int, Any]] = deque()
        self.each: EachState | None = None
        self.workers = 0
        self.free = 0  # workers started or woken that are not in a run
        self.parked: list[anyio.Event] = []
        self.app_run: AppRun | None = None
        self.closed = False
        self._room: anyio.Event | None = None

    def crowded(self) -> bool:
        """Whether the queue holds several rounds of work for every worker."""
        return len(self.queue) >= self.high

    async def room(self) -> None:
        """Wait until the queue is down to about one round of work per
        worker: a bulk producer (a scan of a big map) paces itself on it, so
        that queued runs do not pile up in memory."""
        while len(self.queue) > self.limit and not self.closed:
            if self._room is None:
                self._room = anyio.Event()
            await self._room.wait()

    def submit(
        self,
        child: Component,
        gen: int,
        job: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Queue a run of ``child`` (generation ``gen``), or ``job()`` instead."""
        app_run = child.app._require_run()
        if self.app_run is not app_run:
            self._new_run(app_run)
        self.queue.append((child, gen, job))
        if self.free <= 0:
            self._add_worker(app_run)

    def submit_keyed(self, app_run: AppRun, gen: int, key: Any) -> None:
        """Queue ``each.run_keyed(key, gen)``."""
        if self.app_run is not app_run:
            self._new_run(app_run)
        self.queue.append((None, gen, key))
        if self.free <= 0:
            self._add_worker(app_run)

    def _new_run(self, app_run: AppRun) -> None:
        """A new app run: the old workers are gone."""
        self.app_run = app_run
        self.queue.clear()
        self.parked.clear()
        self.workers = 0
        self.free = 0
        self.closed = False

    def _add_worker(self, app_run: AppRun) -> None:
        if self.parked:
            self.free += 1
            self.parked.pop().set()
        elif self.workers < self.limit:
            self.workers += 1
            self.free += 1
            app_run.tg.start_soon(self._work, app_run)

    def close(self) -> None:
        """Let the workers end once the queue is empty."""
        self.closed = True
        parked, self.parked = self.parked, []
        self.free += len(parked)
        for event in parked:
            event.set()
        self._wake_room()

    def _wake_room(self) -> None:
        room, self._room = self._room, None
        if room is not None:
            room.set()

    async def _work(self, app_run: AppRun) -> None:
        queue = self.queue
        new_event = event_class()
        # a KeyedRun kept current across consecutive keyed runs: setting a
        # context variable costs more than the rest of a trivial run
        slot: KeyedRun | None = None
        token: Token[Run | None] | None = None
        try:
            while True:
                while queue:
                    with anyio.CancelScope() as scope:
                        while queue and not scope.cancel_called:
                            child, gen, job = queue.popleft()
                            if self._room is not None and len(queue) <= self.limit:
                                self._wake_room()
                            if (
                                child is not None
                                and job is None
                                and (gen != child._generation or not child._alive)
                            ):
                                continue  # superseded or unmounted
                            self.free -= 1
                            if queue and self.free <= 0:
                                self._add_worker(app_run)  # in case this run waits
                            try:
                                if child is None:
                                    each = self.each
                                    assert each is not None
                                    if slot is None or slot.each is not each:
                                        if token is not None:
                                            _current_run.reset(token)
                                        slot = KeyedRun(each, scope)
                                        token = _current_run.set(slot)
                                    slot.scope = scope
                                    try:
                                        outcome = await each.run_keyed(job, gen, slot)
                                    except BaseException:
                                        slot = None
                                        _current_run.reset(token)  # type: ignore[arg-type]
                                        token = None
                                        raise
                                    if outcome is not None:
                                        # it made its component or failed: the
                                        # rest runs with no keyed run current
                                        run, slot = slot, None
                                        _current_run.reset(token)  # type: ignore[arg-type]
                                        token = None
                                        await each.finish_keyed(run, *outcome)
                                    continue
                                if token is not None:  # no keyed run is current for others
                                    slot = None
                                    _current_run.reset(token)
                                    token = None
                                if job is not None:
                                    await job()
                                    continue
                                child._cancel = scope
                                child._scope_run = app_run
                                try:
                                    await child.run_once(
                                        gen,
                                        child.processor,
                                        child.args,
                                        child.kwargs,
                                        raise_errors=False,
                                    )
                                finally:
                                    if child._cancel is scope:
                                        child._cancel = None
                            finally:
                                if self.app_run is app_run:
                                    self.free += 1
                if token is not None:  # parked or done: no keyed run is current
                    slot = None
                    _current_run.reset(token)
                    token = None
                if self.closed or self.app_run is not app_run:
                    return
                event = new_event()
                self.parked.append(event)
                self.free -= 1
                await event.wait()
        finally:
            if token is not None:
                _current_run.reset(token)
            if self.app_run is app_run:
                self.workers -= 1
                self.free -= 1


class Component:
    """One node of an app's component tree (internal; users hold
    :class:`ComponentMountHandle` objects)."""

    __slots__ = (
        "_alive",
        "_cancel",
        "_generation",
        "_scope_run",
        "_self_ready",
        "_targets",
        "_unready",
        "_x",
        "app",
        "args",
        "children",
        "handlers",
        "kwargs",
        "mount_kind",
        "parent",
        "processor",
        "rel",
    )

    def __init__(
        self,
        app: App,
        parent: Component | None,
        rel: StablePath,
        processor: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        mount_kind: MountKind,
        handlers: tuple[ExceptionHandler, ...],
    ) -> None:
        self.app = app
        self.parent = parent
        self.rel = rel
        self.processor = processor
        self.args = args
        self.kwargs = kwargs or _EMPTY_KWARGS
        self.mount_kind: MountKind = mount_kind
        self.handlers = handlers
        self.children: dict[StablePath, Component] | None = None
        self._alive = True
        self._self_ready = False
        self._unready = 1
        self._generation = 0
        self._cancel: anyio.CancelScope | None = None
        self._scope_run: AppRun | None = None
        self._targets: set[TargetBase[Any, Any]] | None = None
        self._x: _Extra | None = None

    def __repr__(self) -> str:
        return f"<component {format_path(self.path)}>"

    @property
    def exception(self) -> BaseException | None:
        """The exception of the latest run, if it failed."""
        x = self._x
        return None if x is None else x.exception

    @exception.setter
    def exception(self, value: BaseException | None) -> None:
        if value is not None or self._x is not None:
            self.x.exception = value

    @property
    def path(self) -> StablePath:
        """The component's path from the app's root."""
        parent = self.parent
        return self.rel if parent is None else parent.path + self.rel

    @property
    def path_str(self) -> str:
        return format_path(self.path)

    @property
    def x(self) -> _Extra:
        x = self._x
        if x is None:
            x = self._x = _Extra()
        return x

    def context(self, kind: MountKind | None = None) -> ExceptionContext:
        return ExceptionContext(
            self.path, kind or self.mount_kind, processor_name(self.processor), self.app.name
        )

    # -- readiness -------------------------------------------------------------

    def _adjust(self, delta: int) -> None:
        before = self._unready
        after = before + delta
        self._unready = after
        if before == 0:
            if after > 0 and self._alive and self.parent is not None:
                self.parent._adjust(1)
            return
        if after == 0:
            x = self._x
            if x is not None and x.waiters:
                waiters, x.waiters = x.waiters, None
                for callback in waiters:
                    callback()
            if self.parent is None:
                self.app._notify()
            elif self._alive:
                self.parent._adjust(-1)

    def _set_self_ready(self, ready: bool) -> None:
        if self._self_ready is not ready:
            self._self_ready = ready
            self._adjust(-1 if ready else 1)

    def _refresh_live_ready(self) -> None:
        x = self.x
        self._set_self_ready(x.marked_ready and x.busy == 0)

    def _hold(self, delta: int) -> None:
        """Live components: count work in progress that keeps them unready."""
        self.x.busy += delta
        self._refresh_live_ready()

    def current(self, gen: int) -> bool:
        """Whether run generation ``gen`` is still this component's latest and
        the component is mounted: a commit checks it before changing a table."""
        return self._alive and self._generation == gen

    @property
    def subtree_ready(self) -> bool:
        return self._unready == 0

    def on_ready(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` once this subtree is ready (now, if it is), or
        when the component is unmounted."""
        if self._unready == 0 or not self._alive:
            callback()
            return
        x = self.x
        if x.waiters is None:
            x.waiters = [callback]
        else:
            x.waiters.append(callback)

    async def wait_ready(self) -> None:
        """Wait until this component and all its descendants are ready."""
        while self._unready and self._alive:
            event = anyio.Event()
            self.on_ready(event.set)
            await event.wait()

    def _first_escalated(self) -> BaseException | None:
        stack = [self]
        while stack:
            comp = stack.pop()
            if comp._x is not None and comp._x.escalated is not None:
                return comp._x.escalated
            if comp.children:
                stack.extend(comp.children.values())
        return None

    # -- mounting --------------------------------------------------------------

    def _mount_child(
        self,
        run: Run | None,
        rel: StablePath,
        processor: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        kind: MountKind,
        handlers: tuple[ExceptionHandler, ...],
    ) -> Component:
        mounted = None
        if run is not None:
            mounted = run.mounted
            if mounted is None:
                mounted = run.mounted = {}
            elif rel in mounted:
                raise DuplicatePathError(format_path(self.path + rel))
        children = self.children
        if children is None:
            children = self.children = {}
        child = children.get(rel)
        if child is None:
            child = Component(self.app, self, rel, processor, args, kwargs, kind, handlers)
            children[rel] = child
            self._adjust(1)
        else:
            child.processor = processor
            child.args = args
            child.kwargs = kwargs or _EMPTY_KWARGS
            child.mount_kind = kind
            child.handlers = handlers
        if mounted is not None:
            mounted[rel] = child
        return child

    def _cancel_tasks(self) -> None:
        x = self._x
        if x is not None and x.consumer is not None:
            x.consumer.release()  # frees the map for a new consumer right away
        # A scope of an earlier app run is over (and may belong to another
        # event loop): only one of the current run is cancelled.
        scope = self._cancel
        if scope is not None:
            if self._scope_run is self.app._active:
                scope.cancel()
            self._cancel = None
            self._scope_run = None

    def _begin(self) -> int:
        """Supersede whatever is in flight and start a new generation (a run,
        counted in the app run's stats)."""
        if self._cancel is not None:
            self._cancel_tasks()
        self._generation += 1
        app_run = self.app._active
        if app_run is not None:
            app_run.stats.components_run += 1
        x = self._x
        if x is not None:
            x.exception = None
            x.escalated = None
            x.marked_ready = False
            x.busy = 0
        self._set_self_ready(False)
        return self._generation

    async def launch(self) -> None:
        """Run (or re-run) this component.

        A plain sync function runs inline, in the caller's task.  An async
        function (or a sync one under a retry policy) of a pooled parent
        (``mount_each``) is queued on the parent's pool; otherwise an async
        function or a live component gets a task of its own.
        """
        processor = self.processor
        parent = self.parent
        x = None if parent is None else parent._x
        is_async = _is_async(processor)
        if x is not None and x.pool is not None and (is_async or x.retry is not None):
            self.queue_on(x.pool)
        elif is_async or _is_live_class(processor):
            self.start()
        else:
            gen = self._begin()
            await self.run_once(gen, processor, self.args, self.kwargs, raise_errors=False)

    def queue_on(self, pool: Pool) -> None:
        """Run (or re-run) this component on ``pool``."""
        pool.submit(self, self._begin())

    def start(self) -> None:
        """Run (or re-run) this component in a new task of the current app run."""
        gen = self._begin()
        app_run = self.app._require_run()
        scope = self._cancel = anyio.CancelScope()
        self._scope_run = app_run
        if _is_live_class(self.processor):
            app_run.tg.start_soon(self._live_task, scope, gen)
        else:
            app_run.tg.start_soon(self._run_task, scope, gen)

    async def _run_task(self, scope: anyio.CancelScope, gen: int) -> None:
        with scope:
            await self.run_once(gen, self.processor, self.args, self.kwargs, raise_errors=False)

    async def run_once(
        self,
        gen: int,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        raise_errors: bool,
        kind: MountKind | None = None,
        live: bool = False,
        first: tuple[Run, Any, Exception | None] | None = None,
    ) -> Any:
        """One run: call ``func`` as this component, then commit.

        A run that raises commits nothing.  A run whose commit hits a failing
        sink (a ``TargetApplyError``) counts as failed too.  The failure is
        raised (with ``raise_errors``) or, once the parent's retry policy (if
        any) gives up, reported to the handler chain.  ``first`` is a first
        try that already ran (``(run, result, error)``, see
        :meth:`EachState.run_keyed`): it is taken from where a call would
        have left it.
        """
        failures = 0
        if type(func) is Function:
            func = func.__wrapped__  # one call less per run
        while True:
            error: Exception | None
            if first is not None:
                run, result, error = first
                first = None
            else:
                run = Run(self)
                t_run = _current_run.set(run)
                # the handler chain and subpath prefix are usually right already
                t_handlers = (
                    _handlers.set(self.handlers) if _handlers.get() is not self.handlers else None
                )
                t_prefix = _prefix.set(()) if _prefix.get() else None
                try:
                    result = func(*args, **kwargs)
                    if type(result) is CoroutineType or inspect.isawaitable(result):
                        result = await result
                except anyio.get_cancelled_exc_class():
                    raise
                except Exception as exc:
                    error = exc
                else:
                    error = None
                finally:
                    _current_run.reset(t_run)
                    if t_handlers is not None:
                        _handlers.reset(t_handlers)
                    if t_prefix is not None:
                        _prefix.reset(t_prefix)
            current = gen == self._generation and self._alive
            if error is None:
                if current:
                    if (
                        run.buffers is None
                        and run.maps is None
                        and self._targets is None
                        and (self._x is None or self._x.maps is None)
                        and not self.children
                    ):
                        # nothing to commit: the common case of a leaf
                        parent = self.parent
                        px = None if parent is None else parent._x
                        if px is not None:
                            if px.each is not None and not live:
                                self._rest_as_leaf(px.each.leaves)
                                return result
                            if px.failures:
                                self._note_outcome(None)
                        if not live:
                            self._set_self_ready(True)
                        return result
                    error = await self._commit(run, gen, live)
                    if error is None:
                        return result
                    # a sink failed: the run counts as failed (and may be retried)
                    current = gen == self._generation and self._alive
                else:
                    return result
            elif current and run.maps:
                # Maps made by a failed run stay this component's until its
                # next successful commit retires them with the older ones: the
                # children it mounted before raising may already use them.
                x = self.x
                x.maps = [*(x.maps or ()), *run.maps]
            if not current:
                if raise_errors:
                    raise error
                return None
            app_run = self.app._active
            parent = self.parent
            policy = None
            if not raise_errors and parent is not None and parent._x is not None:
                policy = parent._x.retry
            if policy is not None and failures + 1 < policy.max_attempts:
                failures += 1
                if app_run is not None:
                    app_run.stats.retries += 1
                x = self.x
                x.backing_off = True  # a newer value may cut the wait short
                try:
                    await anyio.sleep(policy.delay(failures))
                finally:
                    x.backing_off = False
                if gen != self._generation or not self._alive:
                    return None
                continue
            self.exception = error
            if app_run is not None:
                app_run.stats.components_failed += 1
            self._note_outcome(error)
            if raise_errors:
                if not live:
                    self._set_self_ready(True)
                raise error
            await self.report(error, kind)
            if not live and gen == self._generation and self._alive:
                self._set_self_ready(True)
            return None

    def _rest_as_leaf(self, leaves: dict[Any, Any]) -> None:
        """A ``mount_each`` child whose run succeeded and left nothing behind
        (no target entries, children or maps) is done: it leaves the tree and
        only its value stays, in the parent's ``leaves``.  A later change of
        its key mounts a fresh component, which is the same as re-running
        this one, since it holds nothing.  Its readiness waiters run as if it
        had become ready."""
        parent = self.parent
        assert parent is not None and parent.children is not None
        key = self.rel[0]
        del parent.children[self.rel]
        leaves[key] = self.args[0]
        px = parent._x
        if px is not None and px.failures:
            px.failures.pop(key, None)
        self._alive = False
        self._self_ready = True
        counted = self._unready > 0
        self._unready = 0
        x = self._x
        if x is not None and x.waiters:
            waiters, x.waiters = x.waiters, None
            for callback in waiters:
                callback()
        if counted:
            parent._adjust(-1)

    def _note_outcome(self, error: BaseException | None) -> None:
        """Keep the parent's record of failing children (``mount_each``) current."""
        parent = self.parent
        if parent is None or parent._x is None:
            return
        failures = parent._x.failures
        if failures is None or (error is None and not failures):
            return
        key = self.rel[0] if len(self.rel) == 1 else self.rel
        if error is None:
            failures.pop(key, None)
        else:
            failures[key] = error

    async def report(self, exc: BaseException, kind: MountKind | None = None) -> None:
        """Send ``exc`` through this component's handler chain."""
        escalated = await dispatch(self.handlers, exc, self.context(kind))
        if escalated is not None:
            self.x.escalated = escalated
            self.app._escalations = True

    async def _commit(self, run: Run, gen: int, live: bool) -> Exception | None:
        """Commit ``run``; returns the first sink failure, if any (the rest of
        the commit still happens, and the component is then left unready)."""
        buffers = run.buffers or {}
        previous = self._targets
        error: Exception | None = None
        if buffers or previous:
            # Known before the first await: an unmount while this commit is
            # paused must release these targets too.
            if buffers:
                self._targets = (previous or set()) | buffers.keys()
            for target, buffer in buffers.items():
                failed = await target._commit(self, buffer, gen)
                error = error or failed
            if previous:
                for target in previous:
                    if target not in buffers:
                        failed = await target._release(self, gen)
                        error = error or failed
            if self._alive:
                self._targets = {t for t in self._targets or () if t._holds(self)} or None
        if gen != self._generation or not self._alive:
            return error
        children = self.children
        if children:
            mounted = run.mounted or {}
            if len(mounted) != len(children):
                for child in [c for rel, c in children.items() if rel not in mounted]:
                    await child.unmount()
        x = self._x
        retired = None if x is None else x.maps
        if run.maps:
            self.x.maps = run.maps
        elif x is not None:
            x.maps = None
        if retired:
            for lm in retired:
                lm._retire()
        if error is not None:
            return error
        if self.parent is not None and self.parent._x is not None:
            self._note_outcome(None)
        if not live:
            self._set_self_ready(True)
        return None

    async def unmount(self) -> None:
        """Unmount this component and its subtree, releasing what they own."""
        if self.detach():
            await self.cleanup()

    def detach(self) -> bool:
        """The synchronous half of :meth:`unmount`: leave the tree and stop the
        whole subtree at once (tasks cancelled, consumers released, readiness
        waiters woken).  False if already detached."""
        if not self._alive:
            return False
        parent = self.parent
        if parent is not None:
            assert parent.children is not None
            del parent.children[self.rel]
            if self._unready > 0:
                parent._adjust(-1)
            px = parent._x
            if px is not None and px.failures:
                px.failures.pop(self.rel[0] if len(self.rel) == 1 else self.rel, None)
        self._stop()
        return True

    def _stop(self) -> None:
        self._alive = False
        self._cancel_tasks()
        x = self._x
        if x is not None:
            if x.each is not None:
                x.each.stop()
            if x.pool is not None:
                x.pool.close()
            if x.waiters:
                waiters, x.waiters = x.waiters, None
                for callback in waiters:
                    callback()
        if self.children:
            for child in self.children.values():
                child._stop()

    async def cleanup(self) -> None:
        """The asynchronous half of :meth:`unmount`, for a detached subtree:
        release every target entry (children first) and retire the LiveMaps
        created there.  Shielded from cancellation: a stop() or an unmount
        of an ancestor meanwhile must not leave entries owned by a component
        that is no longer in any tree."""
        with anyio.CancelScope(shield=True):
            await self._cleanup()

    async def _cleanup(self) -> None:
        children, self.children = self.children, None
        if children:
            for child in children.values():
                await child._cleanup()
        if self._targets:
            targets, self._targets = self._targets, None
            for target in targets:
                failed = await target._release(self)
                if failed is not None:  # kept by the target and retried with its next batch
                    await self.report(failed)
        unmounted = 1
        x = self._x
        if x is not None:
            if x.maps:
                maps, x.maps = x.maps, None
                for lm in maps:
                    lm._retire()
            if x.each is not None:
                unmounted += len(x.each.leaves)
                x.each.leaves.clear()
                x.each.reset()
        app_run = self.app._active
        if app_run is not None:
            app_run.stats.components_unmounted += unmounted

    # -- live components -------------------------------------------------------

    async def _live_task(self, scope: anyio.CancelScope, gen: int) -> None:
        from livemap.live import LiveComponentOperator

        with scope:
            t_run = _current_run.set(None)
            t_handlers = _handlers.set(self.handlers)
            try:
                try:
                    instance = self.processor(*self.args, **self.kwargs)
                except Exception as exc:
                    self.exception = exc
                    app_run = self.app._active
                    if app_run is not None:
                        app_run.stats.components_failed += 1
                    await self.report(exc, "mount")
                    self.x.marked_ready = True
                    self._refresh_live_ready()
                    return
                operator = LiveComponentOperator(self, instance, gen)
                try:
                    await instance.process_live(operator)
                except anyio.get_cancelled_exc_class():
                    raise
                except Exception as exc:
                    if gen == self._generation and self._alive:
                        self.exception = exc
                        app_run = self.app._active
                        if app_run is not None:
                            app_run.stats.components_failed += 1
                        await self.report(exc, "process_live")
                if gen == self._generation and self._alive:
                    self.x.marked_ready = True
                    self._refresh_live_ready()
            finally:
                _current_run.reset(t_run)
                _handlers.reset(t_handlers)


class ComponentMountHandle:
    """What ``mount`` / ``mount_each`` return."""

    __slots__ = ("_component", "_value")

    def __init__(self, component: Component, value: Any = None) -> None:
        self._component = component
        self._value = value

    @property
    def path(self) -> StablePath:
        """The mounted component's path."""
        return self._component.path

    @property
    def exception(self) -> BaseException | None:
        """The exception the component's latest run raised, if it failed."""
        return self._component.exception

    async def ready(self) -> None:
        """Wait until the component committed and all its descendants are ready.

        Does not raise for a failed component, unless an exception handler
        raised (then the first such exception in the subtree is raised here).
        """
        comp = self._component
        await comp.wait_ready()
        if comp.app._escalations:
            escalated = comp._first_escalated()
            if escalated is not None:
                raise escalated

    def __repr__(self) -> str:
        return f"<ComponentMountHandle {format_path(self.path)}>"


def _split(args: tuple[Any, ...], what: str) -> tuple[StablePath | None, Any, tuple[Any, ...]]:
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


def _rel_path(subpath: StablePath | None, processor: Any, what: str) -> StablePath:
    if not callable(processor):
        raise TypeError(f"{what}(): {processor!r} is not callable")
    own = subpath if subpath is not None else (_default_part(processor, what),)
    return current_prefix() + own


async def mount(*args: Any, **kwargs: Any) -> ComponentMountHandle:
    """``mount([subpath,] fn_or_live_class, *args, **kwargs)``: mount a child.

    The child's path is the current component's path / ``subpath`` (default
    ``Symbol(fn.__name__)``).  Returns at once with a handle; ``await
    handle.ready()`` waits for the child.  Raises
    :class:`~livemap.errors.DuplicatePathError` when a sibling is already
    mounted at that path during this run.
    """
    run = current_run("mount()")
    subpath, processor, fargs = _split(args, "mount")
    rel = _rel_path(subpath, processor, "mount")
    child = run.component._mount_child(run, rel, processor, fargs, kwargs, "mount", handler_chain())
    await child.launch()
    return ComponentMountHandle(child)


async def use_mount(*args: Any, **kwargs: Any) -> Any:
    """``use_mount([subpath,] fn, *args, **kwargs)``: mount, wait until ready,
    return the function's value.

    The child runs in the calling task; its failure raises here, into the
    caller.  A live-component class is a ``TypeError``.
    """
    run = current_run("use_mount()")
    subpath, processor, fargs = _split(args, "use_mount")
    if _is_live_class(processor):
        raise TypeError(
            f"use_mount() cannot mount the live component {processor_name(processor)}: "
            "it has no single value; use mount()"
        )
    rel = _rel_path(subpath, processor, "use_mount")
    child = run.component._mount_child(run, rel, processor, fargs, kwargs, "mount", handler_chain())
    gen = child._begin()
    value = await child.run_once(gen, processor, fargs, kwargs, raise_errors=True)
    await ComponentMountHandle(child).ready()
    return value


async def mount_each(*args: Any, **kwargs: Any) -> ComponentMountHandle:
    """``mount_each([subpath,] fn, items, *args, **kwargs)``: one child per entry.

    ``items`` is an iterable or async iterable of ``(key, value)`` pairs, a
    :class:`~livemap.feed.LiveMapView` (a :class:`~livemap.LiveMap`) or a
    :class:`~livemap.feed.LiveMapFeed` (for example ``lm.consumer(...)``).
    Each child runs ``fn(value, *args, **kwargs)`` at path ``.../key``.  Over
    a view or feed the children follow the entries live.
    """
    from livemap.feed import EachLive, is_feed

    run = current_run("mount_each()")
    subpath, processor, rest = _split(args, "mount_each")
    if not rest:
        raise TypeError("mount_each() needs the items to mount after the function")
    items, fargs = rest[0], rest[1:]
    rel = _rel_path(subpath, processor, "mount_each")
    if _is_live_class(processor):
        raise TypeError(
            f"mount_each() mounts a function per entry, not the live component "
            f"{processor_name(processor)}"
        )
    if is_feed(items):
        child = run.component._mount_child(
            run,
            rel,
            EachLive,
            (processor, items, fargs, kwargs),
            {},
            "mount_each",
            handler_chain(),
        )
    elif isinstance(items, (Iterable, AsyncIterable)):
        child = run.component._mount_child(
            run,
            rel,
            _each_static,
            (processor, items, fargs, kwargs),
            {},
            "mount_each",
            handler_chain(),
        )
    else:
        raise TypeError(
            f"mount_each(): items must be an iterable, an async iterable, a LiveMapView or "
            f"a LiveMapFeed, got {type(items).__name__}"
        )
    child.start()
    return ComponentMountHandle(child)


async def _each_static(
    processor: Any,
    items: Iterable[tuple[Any, Any]] | AsyncIterable[tuple[Any, Any]],
    fargs: tuple[Any, ...],
    fkwargs: dict[str, Any],
) -> None:
    from livemap.feed import ConsumerOptions

    run = current_run("mount_each()")
    comp = run.component
    x = comp.x
    if x.pool is None:
        x.pool = Pool(ConsumerOptions().concurrency)
    handlers = handler_chain()

    async def one(pair: Any) -> None:
        key, value = _pair(pair)
        child = comp._mount_child(
            run, (key,), processor, (value, *fargs), fkwargs, "mount_each", handlers
        )
        await child.launch()

    if isinstance(items, AsyncIterable):
        async for pair in items:
            await one(pair)
    else:
        for pair in items:
            await one(pair)


def _pair(pair: Any) -> tuple[StableKey, Any]:
    try:
        key, value = pair
    except (TypeError, ValueError):
        raise TypeError(
            f"mount_each(): each item must be a (key, value) pair, got {pair!r}"
        ) from None
    check_key(key)
    return key, value
