"""An app's state as its components see it: the :class:`Session` (one per
app object) and the :class:`AppRun` in progress (one per ``app.update()``).

:class:`App` (in :mod:`._app`) is the public face; components hold the
session, never the app, so the tree sits below the app in the layers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup

from livemap._runtime._readiness import Readiness

__all__ = ["AppRun", "RunTasks", "Session", "UpdateStats", "is_interrupt"]


def is_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` is a ``KeyboardInterrupt`` or a ``SystemExit``: raised
    by user code anywhere in a run, it ends the run and comes out of it
    bare."""
    return isinstance(exc, (KeyboardInterrupt, SystemExit))


@dataclass
class UpdateStats:
    """Counters of one ``app.update()``: component runs started, runs that
    failed (after any retries), components unmounted, and retries made by
    ``mount_each`` retry policies."""

    components_run: int = 0
    components_failed: int = 0
    components_unmounted: int = 0
    retries: int = 0


class RunTasks:
    """The task group of an app run, as the run's code sees it: every task
    started here is guarded, so that a ``KeyboardInterrupt`` or ``SystemExit``
    raised in it ends the run (see :meth:`AppRun.interrupt`) instead of
    escaping through the task machinery (where asyncio would re-raise it in
    the event loop and trio would wrap it in an exception group)."""

    __slots__ = ("_run", "_tg")

    def __init__(self, tg: TaskGroup, run: AppRun) -> None:
        self._tg = tg
        self._run = run

    def start_soon(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self._tg.start_soon(self._guard, func, args, name=getattr(func, "__qualname__", None))

    async def _guard(self, func: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        try:
            await func(*args)
        except (KeyboardInterrupt, SystemExit) as exc:
            self._run.interrupt(exc)


@dataclass(eq=False)
class AppRun:
    """One ``app.update()`` in progress.

    ``tg`` is the run's task group: every task the run starts (component
    tasks, pool workers, background cleanups) is started in it, so none
    outlives the run.  ``busy_consumers`` counts the consumers holding
    undelivered changes; the run is quiescent when the root's subtree is
    ready and it is zero.  ``live_tasks`` counts the live tasks running
    (live components' ``process_live`` and ``mount_each`` watches);
    ``producers`` holds the cancel scopes of the running live components
    (the live tasks that are not ``mount_each`` watches).  ``closing``: a
    catch-up run reached quiescence and is ending its live components.
    ``notify()`` wakes whoever waits in :meth:`wait` (the run's main loop)
    to look again.
    """

    live: bool
    tg: RunTasks = field(init=False)
    stats: UpdateStats = field(default_factory=UpdateStats)
    busy_consumers: int = 0
    live_tasks: int = 0
    producers: set[anyio.CancelScope] = field(default_factory=set)
    closing: bool = False
    stop_requested: bool = False
    failure: BaseException | None = None
    _waiters: list[anyio.Event] = field(default_factory=list)
    # A live run's initial catch-up (see :meth:`count_first_run`):
    # ``catching_up`` while it is not done; ``first_runs``: the components of
    # the tree (a consumer's per-entry children aside) whose first run of
    # this update is not done yet; ``counted``: those counted so far (each
    # once per update); ``settlers``: per ``mount_each`` over a feed
    # running now, how to wait for what its map has committed so far.
    catching_up: bool = False
    first_runs: int = 0
    counted: set[object] = field(default_factory=set)
    settlers: dict[object, Callable[[], Awaitable[None]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.catching_up = self.live

    def count_first_run(self, component: object, readiness: Readiness) -> None:
        """During a live run's initial catch-up: ``component`` begins a run;
        if it is its first of this update, the catch-up waits for it
        (``readiness.on_first`` tells when it is done)."""
        if component in self.counted:
            return
        self.counted.add(component)
        self.first_runs += 1
        readiness.on_first = self._first_run_done

    def _first_run_done(self) -> None:
        self.first_runs -= 1
        if self.first_runs <= 0:
            self.notify()

    def end_catch_up(self) -> None:
        """The initial catch-up is over (done, or the run reached quiescence
        first): nothing is counted any more."""
        self.catching_up = False
        self.counted.clear()

    def bind(self, tg: TaskGroup) -> None:
        """Start the run's tasks in ``tg`` from now on."""
        self.tg = RunTasks(tg, self)

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for event in waiters:
            event.set()

    def consumer_busy(self, delta: int) -> None:
        self.busy_consumers += delta
        if self.busy_consumers == 0:
            self.notify()

    def interrupt(self, exc: BaseException) -> None:
        """A ``KeyboardInterrupt`` or ``SystemExit`` came out of a task of the
        run: the run ends and raises it (the first one, if several)."""
        if self.failure is None or not is_interrupt(self.failure):
            self.failure = exc
        self.notify()

    def live_started(self, scope: anyio.CancelScope, producer: bool) -> None:
        """A live task starts in ``scope``; ``producer``: it is a live
        component's (it can commit at any time), not a ``mount_each`` watch.
        A live component that starts while the run is closing is cancelled
        at once."""
        self.live_tasks += 1
        if producer:
            self.producers.add(scope)
            if self.closing:
                scope.cancel()

    def live_ended(self, scope: anyio.CancelScope) -> None:
        self.live_tasks -= 1
        self.producers.discard(scope)
        self.notify()

    def close(self) -> None:
        """A catch-up run is quiescent: cancel every live component (what
        their last steps commit is still delivered before the run ends)."""
        self.closing = True
        for scope in self.producers:
            scope.cancel()

    def quiescent(self, tree_ready: bool) -> bool:
        """Whether the run has nothing left to do, given whether the root's
        subtree is ready: no consumer holds undelivered changes."""
        return tree_ready and self.busy_consumers == 0

    def inactive(self, tree_ready: bool) -> bool:
        """Quiescent, and no live task is running: nothing in the run can
        change any more (a live run ends by itself then)."""
        return self.live_tasks == 0 and self.quiescent(tree_ready)

    async def wait(self) -> None:
        event = anyio.Event()
        self._waiters.append(event)
        await event.wait()


class Session:
    """What the components of one app share.

    ``active`` is the :class:`AppRun` in progress, ``None`` between runs; it
    is set and cleared by the app's update handle only.  ``escalations``
    becomes true once an exception handler re-raised somewhere in the tree
    (then ``handle.ready()`` looks for what to raise).
    """

    __slots__ = ("active", "escalations", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.active: AppRun | None = None
        self.escalations = False

    def require_run(self) -> AppRun:
        """The run in progress, or ``RuntimeError`` if the app is not running."""
        run = self.active
        if run is None:
            raise RuntimeError(f"app {self.name!r} is not running")
        return run

    def notify(self) -> None:
        """Wake the run's main loop (the root's readiness changed)."""
        if self.active is not None:
            self.active.notify()
