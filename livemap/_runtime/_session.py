"""An app's state as its components see it: the :class:`Session` (one per
app object) and the :class:`AppRun` in progress (one per ``app.update()``).

:class:`App` (in :mod:`._app`) is the public face; components hold the
session, never the app, so the tree sits below the app in the layers.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

import anyio
from anyio.abc import TaskGroup

from livemap._runtime._context import processor_name

__all__ = [
    "AppRun",
    "ComponentStats",
    "RunTasks",
    "Session",
    "UpdateSnapshot",
    "UpdateStats",
    "UpdateStatus",
    "is_interrupt",
]

R = TypeVar("R")


def is_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` is a ``KeyboardInterrupt`` or a ``SystemExit``: raised
    by user code anywhere in a run, it ends the run and comes out of it
    bare."""
    return isinstance(exc, (KeyboardInterrupt, SystemExit))


class ComponentStats(NamedTuple):
    """CocoIndex's counters of one processor (one component function or live
    class) in one app run.

    ``num_execution_starts``: runs started (a run cancelled before it
    finished — superseded by a newer run, unmounted, or ended with the app
    run — is taken back: its successor, if any, counts instead), plus one
    per unmount; ``num_unchanged``: always 0 (livemap does not memoize: every
    mounted component runs); ``num_adds``: runs that succeeded and were the
    component's first; ``num_reprocesses``: runs that succeeded again;
    ``num_deletes``: components unmounted; ``num_errors``: runs that failed
    (after any retries).
    """

    num_execution_starts: int = 0
    num_unchanged: int = 0
    num_adds: int = 0
    num_deletes: int = 0
    num_reprocesses: int = 0
    num_errors: int = 0

    @property
    def num_processed(self) -> int:
        """Runs and unmounts that succeeded."""
        return self.num_unchanged + self.num_adds + self.num_deletes + self.num_reprocesses

    @property
    def num_finished(self) -> int:
        """Runs and unmounts that are over: succeeded or failed."""
        return self.num_processed + self.num_errors

    @property
    def num_in_progress(self) -> int:
        """Runs started and not over yet."""
        return max(0, self.num_execution_starts - self.num_finished)


# the slots of a processor's counters in UpdateStats._groups (ComponentStats' order)
_STARTS, _UNCHANGED, _ADDS, _DELETES, _REPROCESSES, _ERRORS = range(6)


class UpdateStats:
    """Counters of one ``app.update()``, live while it runs.

    livemap's own: ``components_run`` (runs started, also those cancelled
    before they finished), ``components_failed`` (runs that failed, after
    any retries), ``components_unmounted``, and ``retries`` made by
    ``mount_each`` retry policies.  CocoIndex's views of the same run:
    ``by_component`` (processor name → :class:`ComponentStats`) and
    ``total`` (their sum).  ``version`` grows with every change.

    The runtime changes the counters through the methods below; a snapshot
    (``copy()``, what ``UpdateHandle.watch()`` yields) no longer changes.
    """

    __slots__ = (
        "_event",
        "_groups",
        "components_failed",
        "components_run",
        "components_unmounted",
        "retries",
        "version",
    )

    def __init__(
        self,
        components_run: int = 0,
        components_failed: int = 0,
        components_unmounted: int = 0,
        retries: int = 0,
        *,
        by_component: Mapping[str, ComponentStats] | None = None,
    ) -> None:
        self.components_run = components_run
        self.components_failed = components_failed
        self.components_unmounted = components_unmounted
        self.retries = retries
        self.version = 0
        # processor (a function, a live class, or its name) -> its counters,
        # in ComponentStats' order; named only when by_component is read
        self._groups: dict[Any, list[int]] = {
            name: list(group) for name, group in (by_component or {}).items()
        }
        # set at the next change (see changed()); None while nobody waits
        self._event: anyio.Event | None = None

    # -- CocoIndex's views --------------------------------------------------------

    @property
    def by_component(self) -> dict[str, ComponentStats]:
        """Processor name (its qualified name) → its :class:`ComponentStats`, in
        the order the processors first started; a new dict each time."""
        found: dict[str, list[int]] = {}
        for proc, group in self._groups.items():
            name = proc if isinstance(proc, str) else processor_name(proc)
            into = found.get(name)
            if into is None:
                found[name] = list(group)
            else:  # two processors of one name: one group, as in CocoIndex
                for i, n in enumerate(group):
                    into[i] += n
        return {name: ComponentStats(*group) for name, group in found.items()}

    @property
    def total(self) -> ComponentStats:
        """The sum of :attr:`by_component` over every processor."""
        sums = [0] * 6
        for group in self._groups.values():
            for i, n in enumerate(group):
                sums[i] += n
        return ComponentStats(*sums)

    def copy(self) -> UpdateStats:
        """A snapshot: these counters as they are now, detached from the run."""
        other = UpdateStats(
            self.components_run,
            self.components_failed,
            self.components_unmounted,
            self.retries,
        )
        other._groups = {proc: list(group) for proc, group in self._groups.items()}
        other.version = self.version
        return other

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UpdateStats):
            return NotImplemented
        return (
            self.components_run == other.components_run
            and self.components_failed == other.components_failed
            and self.components_unmounted == other.components_unmounted
            and self.retries == other.retries
            and self.by_component == other.by_component
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"UpdateStats(components_run={self.components_run}, "
            f"components_failed={self.components_failed}, "
            f"components_unmounted={self.components_unmounted}, "
            f"retries={self.retries}, by_component={self.by_component!r})"
        )

    # -- what the runtime counts --------------------------------------------------

    def _group(self, proc: Any) -> list[int]:
        group = self._groups.get(proc)
        if group is None:
            group = self._groups[proc] = [0, 0, 0, 0, 0, 0]
        return group

    def touch(self) -> None:
        """Something a snapshot shows changed (a counter, or the run's status)."""
        self.version += 1
        if self._event is not None:
            self._wake()

    def _wake(self) -> None:
        event = self._event
        self._event = None
        if event is not None:
            event.set()

    def changed(self) -> anyio.Event:
        """An event set at the next :meth:`touch`."""
        event = self._event
        if event is None:
            event = self._event = anyio.Event()
        return event

    def run_started(self, proc: Any) -> None:
        """A run of ``proc`` starts (``components_run`` is counted apart: once
        per generation of a component, and per run of a ``mount_each``
        child without one)."""
        group = self._groups.get(proc)
        if group is None:
            group = self._group(proc)
        group[_STARTS] += 1
        self.version += 1  # touch(), inline: once per run
        if self._event is not None:
            self._wake()

    def run_cancelled(self, proc: Any) -> None:
        """A run of ``proc`` ended without finishing (cancelled): it is taken
        back from ``num_execution_starts`` (``components_run`` keeps it)."""
        group = self._group(proc)
        if group[_STARTS] > 0:
            group[_STARTS] -= 1
        self.touch()

    def run_succeeded(self, proc: Any, again: bool) -> None:
        """A run of ``proc`` succeeded; ``again``: not the component's first."""
        group = self._groups.get(proc)
        if group is None:
            group = self._group(proc)
        group[_REPROCESSES if again else _ADDS] += 1
        self.version += 1  # touch(), inline: once per run
        if self._event is not None:
            self._wake()

    def run_failed(self, proc: Any, *, start: bool = False) -> None:
        """A run of ``proc`` failed for good; ``start``: count its start too
        (a live component's task, whose start was not counted)."""
        self.components_failed += 1
        group = self._group(proc)
        group[_ERRORS] += 1
        if start:
            group[_STARTS] += 1
        self.touch()

    def retried(self) -> None:
        """A failed run is tried again."""
        self.retries += 1
        self.touch()

    def unmounted(self, proc: Any, count: int = 1) -> None:
        """``count`` components of ``proc`` were unmounted."""
        self.components_unmounted += count
        group = self._group(proc)
        group[_STARTS] += count
        group[_DELETES] += count
        self.touch()


class UpdateStatus(str, enum.Enum):
    """Where a run stands in an :class:`UpdateSnapshot`: ``RUNNING`` until the
    initial catch-up is done, ``READY`` from then on (also while a live run
    goes on, and in the final snapshot)."""

    RUNNING = "running"
    READY = "ready"

    def __str__(self) -> str:
        return str(self.value)


@dataclass(frozen=True)
class UpdateSnapshot(Generic[R]):
    """What ``UpdateHandle.watch()`` yields: the run's ``stats`` (a copy, as
    they were then), its ``status``, and ``result``: the main function's
    value in the final snapshot, ``None`` before.  Unpacks as
    ``stats, status, result``."""

    stats: UpdateStats
    status: UpdateStatus
    result: R | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.stats, self.status, self.result))


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


class Slots:
    """A bound on the runs executing at once: first come, first served.

    ``free``: slots nobody holds; ``holders``: the runs holding one;
    ``waiting``: the runs waiting for one, in order, each with the event
    that tells it it got one.  Invariants: ``free + len(holders)`` is the
    bound; ``free > 0`` only while nobody waits (a slot given back goes to
    the first waiter directly, who is a holder from then on).
    """

    __slots__ = ("free", "holders", "waiting")

    def __init__(self, bound: int) -> None:
        self.free = bound
        self.holders: set[object] = set()
        self.waiting: deque[tuple[object, anyio.Event]] = deque()

    def take_now(self, holder: object) -> bool:
        """Take a slot for ``holder`` if one is free (or it holds one);
        whether it holds one now.  No event-loop step: the common case."""
        if self.free > 0:
            if holder not in self.holders:
                self.free -= 1
                self.holders.add(holder)
            return True
        return holder in self.holders

    async def take(self, holder: object) -> None:
        """Take a slot for ``holder``: at once when one is free, else once
        one is given back to it.  Cancelled while it waits, it takes none
        (one handed to it meanwhile goes on)."""
        if self.take_now(holder):
            return
        entry = (holder, anyio.Event())
        self.waiting.append(entry)
        try:
            await entry[1].wait()
        except BaseException:
            if entry[1].is_set():
                self.give(holder)  # handed to it as it was cancelled: pass it on
            else:
                self.waiting.remove(entry)
            raise

    def give(self, holder: object) -> None:
        """``holder`` gives its slot back (if it holds one): to the first
        waiter, if any."""
        holders = self.holders
        if holder in holders:
            holders.remove(holder)
            waiting = self.waiting
            if waiting:
                taker, event = waiting.popleft()
                holders.add(taker)
                event.set()
            else:
                self.free += 1


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
    ``tasks_over``: every task of the run has ended (it is being torn
    down): nothing waits for an update to settle any more.
    ``notify()`` wakes whoever waits in :meth:`wait` (the run's main loop)
    to look again.

    ``slots`` bounds the runs executing at once (the app's
    ``max_inflight_components``; see :class:`Slots`).  A run takes its slot
    before its function is called and gives it back when it ends, before a
    retry's wait, or when it mounts its first child (so that a parent
    waiting for its children never holds a slot they need).
    """

    live: bool
    tg: RunTasks = field(init=False)
    stats: UpdateStats = field(default_factory=UpdateStats)
    busy_consumers: int = 0
    live_tasks: int = 0
    producers: set[anyio.CancelScope] = field(default_factory=set)
    closing: bool = False
    stop_requested: bool = False
    tasks_over: bool = False
    failure: BaseException | None = None
    max_inflight: int | None = None
    slots: Slots | None = field(default=None, init=False)
    _waiters: list[anyio.Event] = field(default_factory=list)
    # A live run's initial catch-up (see :meth:`count_first_run`):
    # ``catching_up`` while it is not done; ``first_runs``: the components of
    # the tree (a consumer's per-entry children aside) whose first run of
    # this update is not done yet; ``counted``: those counted so far (each
    # once per update); ``settlers``: per ``mount_each`` over a feed
    # running now, how to wait for what its map has committed so far.
    catching_up: bool = False
    first_runs: int = 0
    # ``waits_inactive``: the main loop waits only for the run to become
    # inactive (a live run after its catch-up).  While a live task runs that
    # wait cannot end but by ``live_ended``, a stop or a failure (each of
    # which notifies), so a root's zero crossing and a consumer going idle
    # do not wake it (see :meth:`notify_idle`).
    waits_inactive: bool = False
    counted: set[object] = field(default_factory=set)
    settlers: dict[object, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    # objects of the run's event loop kept for the run's length, by whoever
    # made them (a target's lock: see SinkTarget)
    loop_cache: dict[object, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.catching_up = self.live

    def count_first_run(self, component: object) -> bool:
        """During a live run's initial catch-up: ``component`` begins a run;
        if it is its first of this update, the catch-up waits for it: True,
        and the caller arranges for :meth:`first_run_done` to be called once
        when that run is done (``readiness.on_first``, or the host of a
        ``mount_each`` child)."""
        if component in self.counted:
            return False
        self.counted.add(component)
        self.first_runs += 1
        return True

    def first_run_done(self) -> None:
        """A run counted by :meth:`count_first_run` is done."""
        self.first_runs -= 1
        if self.first_runs <= 0:
            self.notify()

    def end_catch_up(self) -> None:
        """The initial catch-up is over (done, or the run reached quiescence
        first): nothing is counted any more."""
        self.catching_up = False
        self.counted.clear()

    def bind(self, tg: TaskGroup) -> None:
        """Start the run's tasks in ``tg`` from now on (and make its slots,
        whose waits belong to this event loop)."""
        self.tg = RunTasks(tg, self)
        if self.max_inflight is not None:
            self.slots = Slots(self.max_inflight)

    def keyed_run_begins(self, proc: Any, holder: object) -> bool:
        """A run of a ``mount_each`` child without a component (of ``proc``,
        run as ``holder``) begins: it is counted, and takes a slot if one is
        free; whether it holds one (else it waits in ``slots.take``).  One
        call for the runtime's commonest run."""
        stats = self.stats
        stats.components_run += 1
        group = stats._groups.get(proc)
        if group is None:
            group = stats._group(proc)
        group[_STARTS] += 1
        stats.version += 1
        if stats._event is not None:
            stats._wake()
        slots = self.slots
        if slots is None:
            return True
        if slots.free > 0:  # Slots.take_now, inline
            holders = slots.holders
            if holder not in holders:
                slots.free -= 1
                holders.add(holder)
            return True
        return holder in slots.holders

    def keyed_run_added(self, proc: Any, holder: object) -> None:
        """That run succeeded (it left nothing behind, or the first commit
        of the component it made is in): its slot goes back, and it counts
        as an add (``Slots.give`` and ``run_succeeded``, in one call)."""
        slots = self.slots
        if slots is not None:
            if slots.waiting:
                slots.give(holder)
            elif holder in slots.holders:  # Slots.give, inline
                slots.holders.remove(holder)
                slots.free += 1
        stats = self.stats
        group = stats._groups.get(proc)
        if group is None:
            group = stats._group(proc)
        group[_ADDS] += 1
        stats.version += 1
        if stats._event is not None:
            stats._wake()

    def give_slot(self, holder: object) -> None:
        """``holder`` gives its slot back, if it holds one."""
        slots = self.slots
        if slots is not None:
            slots.give(holder)

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for event in waiters:
            event.set()

    def notify_idle(self) -> None:
        """The root's subtree became ready, or no consumer is busy any more:
        wake the main loop, unless it can only wait on (``waits_inactive``
        while a live task runs: once per change, in a live run, that wake
        was the main loop's only work)."""
        if self._waiters and not (self.waits_inactive and self.live_tasks):
            self.notify()

    def consumer_busy(self, delta: int) -> None:
        self.busy_consumers += delta
        if self.busy_consumers == 0:
            self.notify_idle()

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
    (then ``handle.ready()`` looks for what to raise).  ``owed``: the
    components that have left the tree and not yet released what they own
    (their release is under way, or queued); whatever is left in it when
    a run ends is released then, so nothing stays owned by a component
    that is gone.
    """

    __slots__ = ("active", "escalations", "name", "owed")

    def __init__(self, name: str) -> None:
        self.name = name
        self.active: AppRun | None = None
        self.escalations = False
        self.owed: set[object] = set()

    def require_run(self) -> AppRun:
        """The run in progress, or ``RuntimeError`` if the app is not running."""
        run = self.active
        if run is None:
            raise RuntimeError(f"app {self.name!r} is not running")
        return run

    def notify(self) -> None:
        """Wake the run's main loop (the root's subtree became ready)."""
        if self.active is not None:
            self.active.notify_idle()
