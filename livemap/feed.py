"""Live views and feeds, their subscribers, and the consumer worker.

The consumer worker is where a LiveMap meets its consumer.  A commit marks
the changed keys *pending*; the worker takes pending keys that are not in
flight, reads each key's current state from the map at that moment, and
delivers ``update(key, value)`` or ``delete(key)``.  Reading the latest state
at delivery time is what coalesces: a key that changed fifty times while it
waited is one pending key, so pending work is bounded by the number of
distinct keys.  A key that changes while in flight is taken again when its
delivery is done, so one key is never processed twice at once and its
deliveries arrive in the order of its changes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

import anyio

from livemap.component import (
    Component,
    ComponentMountHandle,
    EachState,
    Pool,
    _is_async,
    _is_live_class,
    event_class,
)
from livemap.live import LiveComponentOperator, ReadyHandle

if TYPE_CHECKING:
    from livemap.app import AppRun
    from livemap.live_map import LiveMap

__all__ = [
    "ConsumerOptions",
    "EachLive",
    "LiveMapFeed",
    "LiveMapSubscriber",
    "LiveMapView",
    "ReadyLike",
    "RetryPolicy",
    "is_feed",
]

K = TypeVar("K")
V = TypeVar("V")
K_contra = TypeVar("K_contra", contravariant=True)
V_contra = TypeVar("V_contra", contravariant=True)
K_co = TypeVar("K_co", covariant=True)
V_co = TypeVar("V_co", covariant=True)

_MISSING: Any = object()


@runtime_checkable
class ReadyLike(Protocol):
    """Something whose ``ready()`` can be awaited."""

    async def ready(self) -> None: ...


@runtime_checkable
class LiveMapSubscriber(Protocol[K_contra, V_contra]):
    """What a feed talks to.

    A feed calls ``update_all()`` (the subscriber re-reads everything: for a
    view, it scans it), then ``mark_ready()``, then ``update(key, value)`` /
    ``delete(key)`` for each later change.  ``update`` and ``delete`` return a
    handle whose ``ready()`` says the change has been processed.
    """

    async def update_all(self) -> None: ...

    async def mark_ready(self) -> None: ...

    async def update(self, key: K_contra, value: V_contra) -> ReadyLike: ...

    async def delete(self, key: K_contra) -> ReadyLike: ...


@runtime_checkable
class LiveMapFeed(Protocol[K_co, V_co]):
    """A source of live changes: ``await feed.watch(subscriber)`` runs until
    the feed ends (or the watching task is cancelled)."""

    async def watch(self, subscriber: LiveMapSubscriber[Any, Any]) -> None: ...


@runtime_checkable
class LiveMapView(LiveMapFeed[K_co, V_co], Protocol[K_co, V_co]):
    """A feed that can also be scanned: ``async for key, value in view``."""

    def __aiter__(self) -> AsyncIterator[tuple[K_co, V_co]]: ...


def is_feed(obj: object) -> bool:
    """Whether ``obj`` is a :class:`LiveMapFeed` (anything with ``watch``)."""
    return callable(getattr(obj, "watch", None)) and not isinstance(obj, (list, tuple, dict))


@dataclass(frozen=True)
class RetryPolicy:
    """Retry a failing per-entry component with exponential backoff.

    A per-entry run that raises is run again after ``initial_backoff``
    seconds, then ``multiplier`` times longer each time (at most
    ``max_backoff``), up to ``max_attempts`` runs in all; the component stays
    unready (and its key in flight) meanwhile.  Only the last failure goes to
    the exception-handler chain.  A key still failing after that stays
    visible in ``LiveMap.stats().failing`` (with its last error) until a
    later run of it succeeds or it is deleted.  A change to a key that waits
    to retry cuts the wait short: a new value runs at once, with a fresh
    count of attempts, instead of the old one, and a delete unmounts the
    child at once.  A change that arrives while a try is running waits until
    that try is over.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.05
    multiplier: float = 2.0
    max_backoff: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("RetryPolicy backoffs must be >= 0 and the multiplier >= 1")

    def delay(self, failures: int) -> float:
        """The wait before the try after ``failures`` failed ones."""
        return float(
            min(self.max_backoff, self.initial_backoff * self.multiplier ** (failures - 1))
        )


@dataclass(frozen=True)
class ConsumerOptions:
    """How a LiveMap's consumer processes changes.

    ``concurrency``: how many keys are processed at once (one key is never
    processed twice at once); ``retry``: a :class:`RetryPolicy` for failing
    per-entry components, or ``None`` to try each change once.
    """

    concurrency: int = 64
    retry: RetryPolicy | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")


@dataclass
class _Waiter:
    keys: set[Any]
    event: anyio.Event = field(default_factory=anyio.Event)


class Consumer(Generic[K, V]):
    """The worker between one LiveMap and its one subscriber (internal)."""

    def __init__(
        self,
        live_map: LiveMap[K, V],
        subscriber: LiveMapSubscriber[K, V],
        options: ConsumerOptions,
    ) -> None:
        self.live_map = live_map
        self.subscriber = subscriber
        self.options = options
        self.queue: deque[K] = deque()
        self.queued: set[K] = set()
        self.in_flight: set[K] = set()
        self.dirty: set[K] = set()
        self.failing: dict[K, BaseException] = {}
        self.deliveries = 0
        self.closed = False
        self.released = False
        self.started = False
        self.scanned = anyio.Event()
        self._busy_run: AppRun | None = None
        self._holding: Component | None = None
        self._wake: anyio.Event | None = None
        self._waiters: list[_Waiter] = []
        each = subscriber if isinstance(subscriber, EachSubscriber) else None
        self.each = each
        self._component = each.component if each is not None else None
        if each is not None:
            each.component.x.consumer = self
        # What a generic subscriber has: the map as it stands when the watch
        # starts (``update_all`` scans it before its first await), then every
        # delivery.  ``mount_each``'s children hold their own value instead.
        self.delivered: dict[K, V] = {} if each is not None else dict(live_map._table.items())

    # -- called from commits (synchronously) ---------------------------------

    def notify(self, keys: list[K]) -> None:
        in_flight = self.in_flight
        queued = self.queued
        self._set_busy(True)
        # mount_each, past its initial scan: deliver at once while there is
        # room, from the committing task (no hop through the worker loop)
        each = self.each if self.started and not self.closed else None
        limit = self.options.concurrency
        for key in keys:
            if key in in_flight:
                if each is None or not self._supersede_retry(each, key):
                    self.dirty.add(key)
            elif key not in queued:
                if each is not None and not self.queue and len(in_flight) < limit:
                    self._deliver_each(each, key)
                else:
                    queued.add(key)
                    self.queue.append(key)
        self._poke()

    def close(self) -> None:
        self.closed = True
        self._poke()

    def _caught_up(self) -> None:
        """``mount_each``'s subtree was ready once after the initial scan."""
        self.scanned.set()

    # -- the worker ----------------------------------------------------------

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _set_busy(self, busy: bool) -> None:
        if busy:
            if self._busy_run is None:
                run = self.live_map._app_run()
                if run is not None:
                    self._busy_run = run
                    run.consumer_busy(1)
                    comp = self._component
                    if comp is not None and comp._alive:
                        self._holding = comp
                        comp._hold(1)
        elif self._busy_run is not None:
            run, self._busy_run = self._busy_run, None
            holding, self._holding = self._holding, None
            if holding is not None and holding._alive:
                holding._hold(-1)
            run.consumer_busy(-1)

    def idle(self) -> bool:
        return not self.queue and not self.in_flight

    async def run(self) -> None:
        try:
            await self.subscriber.update_all()
            await self.subscriber.mark_ready()
            self.started = True
            if self._component is not None:
                # settle() waits for the children the scan mounted: they are
                # done once the component's subtree has been ready once
                self._component.on_ready(self._caught_up)
            limit = self.options.concurrency
            new_event = event_class()
            async with anyio.create_task_group() as tg:
                while not self.closed:
                    queue = self.queue
                    each = self.each
                    while queue and len(self.in_flight) < limit:
                        key = queue.popleft()
                        self.queued.discard(key)
                        if each is not None:
                            self._deliver_each(each, key)
                        else:
                            self.in_flight.add(key)
                            tg.start_soon(self._deliver, key)
                    if self.idle():
                        self._set_busy(False)
                    self._wake = new_event()
                    if not self.closed and not (queue and len(self.in_flight) < limit):
                        await self._wake.wait()
                tg.cancel_scope.cancel()
        finally:
            self.release()

    def release(self) -> None:
        """End this consumer now: free the map's consumer slot (a new consumer
        may start at once), release quiescence and settle waiters.  Called
        when the watch ends and, for ``mount_each``, as soon as its component
        is unmounted or re-run, before its task has wound down."""
        if self.released:
            return
        self.released = True
        self.closed = True
        self.scanned.set()
        self._set_busy(False)
        for waiter in self._waiters:
            waiter.event.set()
        self._waiters.clear()
        self._poke()
        comp = self._component
        if comp is not None and comp._x is not None and comp._x.consumer is self:
            comp._x.consumer = None
        self.live_map._consumer_ended(self)

    def _supersede_retry(self, each: EachSubscriber, key: K) -> bool:
        """A change to a key (in flight) whose child waits to retry a failed
        run: apply it now instead of retrying the old value.  A new value
        runs at once, with a fresh count of attempts; the readiness callback
        of the key's delivery hands it back as usual.  A delete unmounts the
        child at once; its cleanup hands the key back.  False (the change
        waits) if the child is not waiting to retry."""
        state = each.state
        run = state.running.get(key)
        if run is not None:
            child = run._made
        else:
            children = each.component.children
            child = None if children is None else children.get((key,))  # type: ignore[arg-type]
        x = None if child is None else child._x
        if child is None or x is None or not x.backing_off:
            return False
        self.deliveries += 1
        value = self.live_map._table.get(key, _MISSING)
        if value is not _MISSING:
            fargs = each.each.args
            child.args = (value, *fargs) if fargs else (value,)
            child.queue_on(each.pool)  # cancels the wait: a new generation
            return True
        if run is not None:
            state.drop(key)  # its hand-back is the cleanup's now
        if x.waiters:  # likewise for the hand-back of the key's delivery
            finish = self._finish
            x.waiters = [
                w for w in x.waiters if not (isinstance(w, partial) and w.func == finish)
            ] or None
        child.detach()  # cancels the wait
        each.pool.submit(child, 0, partial(self._cleanup, child, key))
        return True

    def _deliver_each(self, each: EachSubscriber, key: K) -> None:
        """Deliver to ``mount_each`` without a task: queue the child's run on
        the pool and take the key back when the child is ready."""
        value = self.live_map._table.get(key, _MISSING)
        state = each.state
        if key in state.pending or key in state.running:
            # still processing an earlier value (from the scan): deliver the
            # latest state once that is done (EachState tells _finish), or
            # now if it only waits to retry
            self.in_flight.add(key)
            if not self._supersede_retry(each, key):
                self.dirty.add(key)
            return
        children = each.component.children
        child = None if children is None else children.get((key,))  # type: ignore[arg-type]
        if child is None:
            # at rest (a leaf: only its value is kept), or not mounted
            held = state.leaves.get(key, _MISSING)
            if value is not _MISSING and (held is _MISSING or not _same(held, value)):
                self.in_flight.add(key)
                self.deliveries += 1
                if held is not _MISSING:
                    del state.leaves[key]
                each.submit_keyed(key, value)  # EachState tells _finish when it is done
                return
            if value is _MISSING and held is not _MISSING:
                self.deliveries += 1
                each.drop_leaf(key)
            self._settled(key)
            return
        if child._unready:
            # still processing an earlier value (from the scan, or a retry):
            # deliver the latest state once that is done, or now if it only
            # waits to retry
            self.in_flight.add(key)
            if not self._supersede_retry(each, key):
                self.dirty.add(key)
            if child._alive:  # (a delete that cut a retry short hands back itself)
                child.on_ready(partial(self._finish, key))
            return
        if value is _MISSING:
            self.in_flight.add(key)
            self.deliveries += 1
            child.detach()
            each.pool.submit(child, 0, partial(self._cleanup, child, key))
            return
        if _same(child.args[0], value):
            self._settled(key)
            return
        self.in_flight.add(key)
        self.deliveries += 1
        child = each._child(key, value)
        child.queue_on(each.pool)
        child.on_ready(partial(self._finish, key))

    async def _cleanup(self, child: Component, key: K) -> None:
        try:
            await child.cleanup()
        finally:
            self._finish(key)

    def _finish(self, key: K) -> None:
        self.in_flight.discard(key)
        if key in self.dirty:
            self.dirty.discard(key)
            if key not in self.queued:
                self.queued.add(key)
                self.queue.append(key)
        else:
            self._settled(key)
        self._poke()

    def _settled(self, key: K) -> None:
        if self._waiters:
            self._done(key)

    async def _deliver(self, key: K) -> None:
        try:
            value = self.live_map._table.get(key, _MISSING)
            had = self.delivered.get(key, _MISSING)
            if value is _MISSING:
                if had is _MISSING:
                    return
                del self.delivered[key]
                self.failing.pop(key, None)
                handle: ReadyLike = await self.subscriber.delete(key)
            else:
                if had is not _MISSING and _same(had, value):
                    return
                self.delivered[key] = value
                handle = await self.subscriber.update(key, value)
            self.deliveries += 1
            error: BaseException | None
            try:
                await handle.ready()
                error = getattr(handle, "exception", None)
            except Exception as exc:  # a handler re-raised: the key counts as failing
                error = exc
            if error is None:
                self.failing.pop(key, None)
            else:
                self.failing[key] = error
        finally:
            self._finish(key)

    def failing_keys(self) -> dict[K, BaseException]:
        """Keys whose latest processing failed, with the last error."""
        comp = self._component
        if comp is not None and comp._x is not None and comp._x.failures is not None:
            return dict(comp._x.failures)
        return dict(self.failing)

    def _done(self, key: K) -> None:
        remaining = []
        for waiter in self._waiters:
            waiter.keys.discard(key)
            if waiter.keys:
                remaining.append(waiter)
            else:
                waiter.event.set()
        self._waiters = remaining

    async def settle(self) -> None:
        if self._component is not None and not self.scanned.is_set() and not self.closed:
            await self.scanned.wait()
        outstanding = self.queued | self.in_flight | self.dirty
        if not outstanding or self.closed:
            return
        waiter = _Waiter(outstanding)
        self._waiters.append(waiter)
        await waiter.event.wait()


def _same(a: object, b: object) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


class EachSubscriber:
    """``mount_each``'s subscriber: one child component per key (internal).

    ``update_all()`` opens an epoch and mounts a child for every entry of a
    view's snapshot; ``mark_ready()`` closes it, unmounting the children of
    keys the epoch did not see.  ``update`` / ``delete`` then follow changes.
    A LiveMap's consumer skips the protocol and queues runs directly
    (:meth:`submit_keyed`, or the child's component on :attr:`pool`).
    """

    def __init__(
        self, operator: LiveComponentOperator, each: EachLive, pool: Pool, state: EachState
    ) -> None:
        self.operator = operator
        self.each = each
        self.pool = pool
        self.component: Component = operator._component
        self.gen = operator._gen
        self.app_run = self.component.app._require_run()
        # the children without a component of their own
        self.state = state
        self._epoch: set[Hashable] | None = None

    def drop_leaf(self, key: Any) -> None:
        """Unmount the child of ``key`` while it is at rest: nothing to release."""
        del self.state.leaves[key]
        app_run = self.component.app._active
        if app_run is not None:
            app_run.stats.components_unmounted += 1

    def _child(self, key: Any, value: Any) -> Component:
        """The component of ``key``'s child, (re)mounted with ``value``."""
        each = self.each
        if self._epoch is not None:
            self._epoch.add(key)
        state = self.state
        if state.leaves:
            state.leaves.pop(key, None)
        if state.counted:
            state.drop(key)
        fargs = each.args
        return self.component._mount_child(
            None,
            (key,),
            each.fn,
            (value, *fargs) if fargs else (value,),
            each.kwargs,
            "mount_each",
            self.operator._handlers,
        )

    def submit(self, key: Any, value: Any) -> None:
        """Run ``key``'s child with ``value`` on the pool: as a run without a
        component (see EachState) unless the child has one already."""
        children = self.component.children
        if children is not None and (key,) in children:
            self._child(key, value).queue_on(self.pool)
            return
        if self.state.leaves:
            self.state.leaves.pop(key, None)
        self.submit_keyed(key, value)

    def submit_keyed(self, key: Any, value: Any) -> None:
        """:meth:`submit` for a key known to have neither a component nor a
        value at rest."""
        if self._epoch is not None:
            self._epoch.add(key)
        state = self.state
        if not state.counted:
            state.hold()
        state.pending[key] = value
        self.pool.submit_keyed(self.app_run, self.gen, key)

    async def update_all(self) -> None:
        # an epoch is only needed to sweep children that were there before
        state = self.state
        self._epoch = set() if self.component.children or state.leaves or state.counted else None
        source = self.each.source
        if callable(getattr(source, "__aiter__", None)):
            # a LiveMap hands its table's items over without an await per item
            snapshot_of = getattr(source, "_snapshot", None)
            snapshot = snapshot_of() if snapshot_of is not None else [pair async for pair in source]
            if _is_async(self.each.fn) or self.each.retry is not None:
                pool = self.pool
                queue, high = pool.queue, pool.high
                # the common first scan: no child yet, so no lookups per key
                fresh = not self.component.children and not state.leaves
                submit = self.submit_keyed if fresh else self.submit
                for key, value in snapshot:
                    submit(key, value)
                    if len(queue) >= high:  # pool.crowded(), inline
                        await pool.room()
            else:
                for key, value in snapshot:
                    await self._child(key, value).launch()

    async def mark_ready(self) -> None:
        epoch = self._epoch
        if epoch is not None:
            self._epoch = None
            state = self.state
            for key in [k for k in state.pending if k not in epoch]:
                state.drop(key)
            for key in [k for k in state.leaves if k not in epoch]:
                self.drop_leaf(key)
            children = self.component.children or {}
            for child in [c for rel, c in children.items() if rel[0] not in epoch]:
                await child.unmount()
        await self.operator.mark_ready()

    async def update(self, key: Any, value: Any) -> ReadyLike:
        child = self._child(key, value)
        await child.launch()
        return ComponentMountHandle(child)

    async def delete(self, key: Any) -> ReadyLike:
        if self._epoch is not None:
            self._epoch.discard(key)
        state = self.state
        if state.counted:
            state.drop(key)
        if key in state.leaves:
            self.drop_leaf(key)
            return ReadyHandle()
        return await self.operator.delete((key,))


class EachLive:
    """The live component ``mount_each`` mounts over a view or a feed (internal)."""

    def __init__(self, fn: Any, source: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if _is_live_class(fn):
            raise TypeError("mount_each() mounts a function per entry, not a live component")
        self.fn = fn
        self.source = source
        self.args = args
        self.kwargs = kwargs
        options = getattr(source, "options", None)
        if not isinstance(options, ConsumerOptions):
            options = ConsumerOptions()
        self.concurrency = options.concurrency
        self.retry = options.retry

    def process(self) -> None:
        return None

    async def process_live(self, operator: LiveComponentOperator) -> None:
        operator._kind = "mount_each"
        x = operator._component.x
        x.retry = self.retry
        if x.failures is None:
            x.failures = {}
        if x.pool is None or x.pool.limit != self.concurrency:
            x.pool = Pool(self.concurrency)
        state = x.each
        if state is None:
            state = x.each = EachState(operator._component)
        else:
            state.reset()  # runs queued by an earlier run of this mount_each
        state.configure(self.fn, self.args, self.kwargs, operator._handlers)
        x.pool.each = state
        subscriber = EachSubscriber(operator, self, x.pool, state)
        try:
            await self.source.watch(subscriber)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            await operator._component.report(exc, "mount_each")
