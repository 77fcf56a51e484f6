"""The consumer of a map: the worker between one LiveMap and its one
subscriber.

The consumer is where a LiveMap meets its consumer.  A commit adds the
changed keys to the consumer's :class:`~._queue.WorkQueue` (a
:data:`~._queue.DELIVER` each); a worker takes a key, reads its current
state from the map at that moment, delivers it, and marks the key done.
Reading the latest state at delivery time is what coalesces, and the queue
never hands out a key that is in flight, so one key is never processed
twice at once and its deliveries arrive in the order of its changes.

A hand-written subscriber's deliveries run on up to ``concurrency`` worker
tasks, started as needed and parked when there is nothing to take, so that
deliveries that never wait run back to back in one task: ``update(key,
value)`` or ``delete(key)``, then the handle's ``ready()``.  ``mount_each``'s
subscriber is skipped: the consumer uses its host's queue, whose pool
workers take the keys and run the children (:meth:`Consumer.resolve` turns
a key's change into the child's run), so a key is in one queue from its
change to the end of its run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextvars import ContextVar
from functools import partial
from typing import Any, Generic, Protocol, TypeVar
from weakref import WeakKeyDictionary

import anyio
import anyio.abc

from livemap._feed._each import (
    CLEANUP,
    RUN_CHILD,
    RUN_KEYED,
    WAIT,
    EachHost,
    EachLiveSubscriber,
    EachSubscriber,
    event_class,
)
from livemap._feed._protocols import ConsumerOptions, LiveMapSubscriber, ReadyLike
from livemap._feed._queue import DELIVER_WORK, Work, WorkQueue
from livemap._runtime._component import Component
from livemap._runtime._session import AppRun
from livemap._runtime._unmount import cleanup, detach

__all__ = ["ConsumedMap", "Consumer", "scan", "scanning_consumer"]

K = TypeVar("K")
V = TypeVar("V")

_MISSING: Any = object()


scanning_consumer: ContextVar[Consumer[Any, Any] | None] = ContextVar(
    "livemap_scanning_consumer", default=None
)
"""The consumer whose subscriber's ``update_all()`` is running in this
context: a scan of the map made there is the snapshot the watch continues
from (:meth:`Consumer.rebase`).  It follows ``update_all()``'s awaits and the
tasks it starts, and nothing else."""


_superseded: WeakKeyDictionary[Any, list[EachHost]] = WeakKeyDictionary()
"""Per map: the hosts of the ``mount_each`` consumers of it that were
superseded (their ``mount_each`` re-ran, was unmounted or was taken over),
whose cancelled runs may still be winding down.  A later consumer of the
map fed by another host starts once their runs have ended (their
``finally`` included), so that a key never runs in two hosts at once
(:meth:`Consumer.run`); one fed by the same host need not wait, its pool
keeps each key's runs apart.  A host leaves the list once it has no run of
the current app run under way, or when a later consumer of its own ends
without being superseded."""


class _Snapshot(Generic[K, V]):
    """An async iterator over a list of entries taken at once."""

    __slots__ = ("_it",)

    def __init__(self, items: list[tuple[K, V]]) -> None:
        self._it = iter(items)

    def __aiter__(self) -> _Snapshot[K, V]:
        return self

    async def __anext__(self) -> tuple[K, V]:
        try:
            return next(self._it)
        except StopIteration:
            raise StopAsyncIteration from None


def scan(consumer: Consumer[K, V] | None, items: list[tuple[K, V]]) -> AsyncIterator[tuple[K, V]]:
    """What ``async for`` over a view yields: ``items``, the view's entries
    now.  Made by the subscriber of ``consumer`` (the view's watch) in its
    ``update_all()``, the scan is also the snapshot the watch continues from."""
    scanning = scanning_consumer.get()
    if scanning is not None and scanning is consumer:
        scanning.rebase(items)
    return _Snapshot(items)


class ConsumedMap(Protocol[K, V]):
    """What a consumer needs of the map it consumes (a LiveMap)."""

    def get(self, key: K, default: Any = None) -> Any:
        """The value held for ``key`` now, or ``default``."""
        ...

    def items(self) -> list[tuple[K, V]]: ...

    def app_run(self) -> AppRun | None:
        """The app run the map belongs to, while it runs."""
        ...

    def consumer_ended(self, consumer: Consumer[K, V]) -> None:
        """``consumer`` has ended: free the map's consumer slot."""
        ...


class _Count:
    """A size, for the stats (``len()`` of it)."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class Consumer(Generic[K, V]):
    """The worker between one LiveMap and its one subscriber (internal).

    ``queue`` holds every key with work and where it stands (see
    :class:`~._queue.WorkQueue` for its invariants): the consumer's own for
    a hand-written subscriber, its host's for ``mount_each``.  Besides it:

    * ``delivered``: for a hand-written subscriber, what it has (the map as
      its scan saw it, then every delivery); a try that finds the key's
      state already there delivers nothing.
    * ``failing``: keys whose latest delivery failed, with the error.
    * ``each``: the subscriber of a ``mount_each`` of a function, whose
      children its host's workers run (:meth:`resolve`); ``host``: the host
      of the ``mount_each`` it feeds, of a function or of a live-component
      class (its :attr:`~._each.EachHost.consumer` is this consumer until it
      is released).
    * ``early``: ``mount_each`` only, while its initial scan is under way
      (``None`` after): the keys changed meanwhile, in order.  The scan's
      runs carry the values of its snapshot, which a change after it makes
      older: these keys join the queue once the scan is done, behind the
      scan's runs, and their tries read the map.
    * ``started``: the subscriber's ``update_all()`` and ``mark_ready()``
      returned; no change is taken before.  ``closed``: no key is taken any
      more; ``released``: the map's consumer slot is free again.
    * ``_workers`` / ``_free`` / ``_parked``: the worker tasks of a
      hand-written subscriber (at most ``concurrency``): how many run, how
      many of them are not in a delivery, and the events of the parked ones.
    * ``_resolving``: ``mount_each`` only, while :meth:`notify` decides what
      a commit's changes run (the queue may be empty for a moment then: the
      consumer is not idle before every key is in).
    """

    def __init__(
        self,
        live_map: ConsumedMap[K, V],
        subscriber: LiveMapSubscriber[K, V],
        options: ConsumerOptions,
    ) -> None:
        self.live_map = live_map
        self.subscriber = subscriber
        self.options = options
        self.failing: dict[K, BaseException] = {}
        self.deliveries = 0
        self.closed = False
        self.released = False
        self.started = False
        # a commit's changes are being resolved (see notify)
        self._resolving = False
        # set once update_all() and mark_ready() have returned
        self.scanned = anyio.Event()
        self._busy_run: AppRun | None = None
        self._holding: Component | None = None
        self._wake: anyio.Event | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._workers = 0
        self._free = 0
        self._parked: list[anyio.Event] = []
        each = subscriber if isinstance(subscriber, EachSubscriber) else None
        self.each = each
        self._component = each.component if each is not None else None
        self.early: dict[K, None] | None = None
        self.queue: WorkQueue[K]
        if each is not None:
            # one queue for the key's whole life: the host's, on this app run
            self.queue = each.pool.join(each.app_run)
            self.early = {}
        else:
            self.queue = WorkQueue()
        # the host of the mount_each it feeds (its processor a function or a
        # live-component class): a re-run or an unmount of that mount_each
        # ends this consumer at once (EachHost.supersede), so that its next
        # watch, or the one replacing it, finds the map free
        host: EachHost | None = None
        if isinstance(subscriber, (EachSubscriber, EachLiveSubscriber)):
            host = subscriber.host
            host.consumer = self
        self.host = host
        # What a generic subscriber has: the map as it stands when the watch
        # starts (``update_all`` scans it before its first await), then every
        # delivery.  ``mount_each``'s children hold their own value instead.
        self.delivered: dict[K, V] = {} if each is not None else dict(live_map.items())

    @property
    def queued(self) -> _Count:
        """How many keys have changes not taken yet."""
        queue = self.queue
        n = len(queue.order)
        early = self.early
        if early:  # (a key the scan queued too counts once)
            waiting, in_flight = queue.waiting, queue.in_flight
            n += sum(1 for key in early if key not in waiting and key not in in_flight)
        return _Count(n)

    @property
    def in_flight(self) -> _Count:
        """How many keys are being processed (a try of each is under way, or
        waits out its backoff)."""
        queue = self.queue
        return _Count(len(queue.in_flight) + len(queue.backoff))

    # -- called from commits (synchronously) ---------------------------------

    def notify(self, keys: list[K]) -> None:
        if self.closed:
            return
        queue = self.queue
        queue.changed()
        if self._busy_run is None:  # (once busy, _set_busy(True) does nothing)
            self._set_busy(True)
        each = self.each
        if each is None:
            for key in keys:
                queue.add(key, DELIVER_WORK)
            if self.started:
                self._kick()
            else:
                self._poke()
            return
        early = self.early
        if early is not None:  # (the initial scan is under way)
            for key in keys:
                early[key] = None
            return
        # mount_each: what a change of a key with nothing queued runs is
        # decided now, from the committing task, while there is room for it
        # to start (and for a delete always: the child leaves the tree at
        # once, also while every worker is busy); it is queued for the
        # host's workers.  Otherwise, and for a key in flight or queued (its
        # change waits behind that work: dirty), the key waits as a change,
        # whose try reads the map when it starts (a change and its undo
        # queued meanwhile run nothing).
        # A key's resolve may empty the queue for a moment (a delete drops
        # the child's try again, then its release is queued): the consumer
        # is idle or not once every key is in (``_resolving``).
        add, in_flight, waiting, order = queue.add, queue.in_flight, queue.waiting, queue.order
        limit = self.options.concurrency
        get = self.live_map.get
        self._resolving = True
        try:
            for key in keys:
                if key in in_flight or key in waiting:
                    add(key, DELIVER_WORK)
                    continue
                if (order or len(in_flight) >= limit) and get(key, _MISSING) is not _MISSING:
                    add(key, DELIVER_WORK)
                    continue
                work = self.resolve(key)
                if work is None:
                    queue.settled(key)
                elif work[0] is WAIT:  # (its child is busy: a worker waits for it)
                    add(key, DELIVER_WORK)
                else:
                    add(key, work)  # (a newer run cuts a backoff short)
        finally:
            self._resolving = False
        if queue.idle():
            # nothing to run (a child at rest dropped, a value it has): no
            # try will end to say the consumer is idle again
            self.went_idle()
            return
        each.pool.wake(each.app_run)

    def close(self) -> None:
        self.closed = True
        self._poke()
        self._unpark()

    # -- the worker ----------------------------------------------------------

    def _poke(self) -> None:
        """Something the consumer's task waits for happened (it closed)."""
        if self._wake is not None:
            self._wake.set()

    def went_idle(self) -> None:
        """Its queue (or its host's) may have gone idle: once its scan is
        done, the consumer is idle from now on, said here rather than by
        waking its task (which would find only that to do, once per change)."""
        if self.started and not self.closed and not self._resolving and self.idle():
            self._set_busy(False)

    def _set_busy(self, busy: bool) -> None:
        if busy:
            if self._busy_run is None:
                run = self.live_map.app_run()
                if run is not None:
                    self._busy_run = run
                    run.consumer_busy(1)
                    comp = self._component
                    if comp is not None and comp.alive:
                        self._holding = comp
                        comp.readiness.hold(1)
        elif self._busy_run is not None:
            run, self._busy_run = self._busy_run, None
            holding, self._holding = self._holding, None
            if holding is not None and holding.alive:
                holding.readiness.hold(-1)
            run.consumer_busy(-1)

    def idle(self) -> bool:
        return self.queue.idle() and not self.early

    async def run(self) -> None:
        try:
            await self._after_superseded()
            if self.closed:  # superseded (or its map retired) while it waited
                return
            token = scanning_consumer.set(self)
            try:
                await self.subscriber.update_all()
            finally:
                scanning_consumer.reset(token)
            await self.subscriber.mark_ready()
            self.started = True
            each = self.each
            early, self.early = self.early, None
            if each is not None and early and not self.closed:
                # the changes made during the scan, behind its runs
                queue = self.queue
                for key in early:
                    queue.add(key, DELIVER_WORK)
                each.pool.wake(each.app_run)
            self.scanned.set()
            async with anyio.create_task_group() as tg:
                if each is not None:
                    await self._run_each()
                else:
                    await self._run_workers(tg)
                tg.cancel_scope.cancel()
        finally:
            self.release()

    async def _after_superseded(self) -> None:
        """Wait until no run of another host that consumed this map before
        and was superseded is under way (see :data:`_superseded`)."""
        hosts = _superseded.get(self.live_map)
        if hosts is None:
            return
        app_run = self.live_map.app_run()
        while True:
            # (runs of an earlier app run ended with it)
            hosts[:] = [h for h in hosts if h.pool.queue.in_flight and h.pool.app_run is app_run]
            others = [h for h in hosts if h is not self.host]
            if not others:
                break
            await others[0].pool.wait_idle()
        if not hosts:
            _superseded.pop(self.live_map, None)

    async def _run_each(self) -> None:
        """``mount_each``: the host's workers take the keys (the queue going
        idle says so: :meth:`went_idle`); this task waits until the consumer
        closes."""
        self.went_idle()  # (its scan's runs may all be over)
        while not self.closed:
            self._wake = anyio.Event()
            if not self.closed:
                await self._wake.wait()

    async def _run_workers(self, tg: anyio.abc.TaskGroup) -> None:
        """A hand-written subscriber: workers take the keys (see :meth:`_work`);
        this task waits until the consumer closes, then ends them."""
        self._tg = tg
        self._kick()
        self.went_idle()  # (nothing changed since its scan)
        while not self.closed:
            self._wake = anyio.Event()
            if not self.closed:
                await self._wake.wait()

    def _kick(self) -> None:
        """Make sure a worker is free to take the waiting keys: wake a
        parked one, or start one while there are fewer than ``concurrency``."""
        if self._free > 0 or self.closed or not self.queue.order:
            return
        if self._parked:
            self._free += 1
            self._parked.pop().set()
        elif self._tg is not None and self._workers < self.options.concurrency:
            self._workers += 1
            self._free += 1
            self._tg.start_soon(self._work)

    def _unpark(self) -> None:
        parked, self._parked = self._parked, []
        self._free += len(parked)
        for event in parked:
            event.set()

    async def _work(self) -> None:
        """A worker: take a key, run its try, mark it done; park when no key
        waits.  One that starts a try while more keys wait makes sure
        another worker is free to take them, so tries that wait on I/O
        spread over the workers."""
        queue = self.queue
        new_event = event_class()
        try:
            while not self.closed:
                taken = queue.take()
                if taken is None:
                    self.went_idle()
                    event = new_event()
                    self._parked.append(event)
                    self._free -= 1
                    await event.wait()
                    continue
                key = taken[0]
                self._free -= 1
                if queue.order:
                    self._kick()
                try:
                    await self._deliver(key)
                finally:
                    self._free += 1
                    queue.done(key)
        finally:
            self._workers -= 1
            self._free -= 1

    def rebase(self, snapshot: list[tuple[K, V]]) -> None:
        """The watching subscriber scanned the map during ``update_all()``:
        that scan is what it has, so the watch continues from it.  A change
        notified before the scan is in it (its delivery finds the value
        already delivered, or the key already gone, and is skipped); one
        after it is delivered.  ``mount_each``'s children hold their own
        values, which is the same for it."""
        if self.each is None and not self.started:
            self.delivered = dict(snapshot)

    def supersede(self) -> None:
        """The ``mount_each`` this consumer feeds re-runs, is unmounted or is
        taken over: its runs are cancelled, and may still be winding down.
        End now (:meth:`release`); the next consumer of the map, if fed by
        another host, waits for those runs to end."""
        host = self.host
        if host is not None and not self.released:
            hosts = _superseded.get(self.live_map)
            if hosts is None:
                _superseded[self.live_map] = [host]
            elif host not in hosts:
                hosts.append(host)
        self._end(superseded=True)

    def release(self) -> None:
        """End this consumer now: free the map's consumer slot (a new consumer
        may start at once), release quiescence and settle waiters.  Called
        when the watch ends and, for ``mount_each``, as soon as its component
        is unmounted or re-run, before its task has wound down
        (:meth:`supersede`)."""
        self._end(superseded=False)

    def _end(self, *, superseded: bool) -> None:
        if self.released:
            return
        host = self.host
        if host is not None and not superseded:
            # the watch ended by itself: whatever its host still runs is not
            # winding down for a successor
            hosts = _superseded.get(self.live_map)
            if hosts is not None and host in hosts:
                hosts.remove(host)
        self.released = True
        self.closed = True
        self.early = None
        self.scanned.set()
        self._set_busy(False)
        self.queue.release()
        self._poke()
        self._unpark()
        host = self.host
        if host is not None and host.consumer is self:
            host.consumer = None
        self.live_map.consumer_ended(self)

    # -- mount_each: what a change of a key runs -------------------------------

    def resolve(self, key: K) -> Work | None:
        """``mount_each``: a worker took ``key`` for a change (a
        :data:`~._queue.DELIVER`): what its try runs, from the key's state in
        the map now and its child's.  ``None``: nothing (the child has that
        state already); a :data:`~._each.WAIT` work: the key's child is
        still busy with a run of its own, the change waits for it."""
        each = self.each
        if each is None or self.closed:
            return None  # (a consumer of the host's that ended)
        value = self.live_map.get(key, _MISSING)
        host = each.host
        extra = each.component.extra  # (its children: a read per change)
        children = None if extra is None else extra.children
        child = None if children is None else children.get((key,))  # type: ignore[arg-type]
        if child is None:
            # at rest (a leaf: only its value is kept), or not mounted
            held = host.leaves.get(key, _MISSING)
            if value is not _MISSING:
                if held is not _MISSING:
                    if _same(held, value):
                        return None
                    del host.leaves[key]
                self.deliveries += 1
                if not host.counted:
                    host.hold()
                return (RUN_KEYED, value, each.gen)
            if held is not _MISSING:
                self.deliveries += 1
                each.drop_leaf(key)
            return None
        readiness = child  # (its own readiness record)
        if readiness.unready and readiness.self_ready:
            return (WAIT, child)  # its subtree is busy with runs of its own
        if value is _MISSING:
            self.deliveries += 1
            detach(child)  # (drops a try again it waited to make)
            return (CLEANUP, partial(cleanup, child))
        if not readiness.unready and _same(child.given, value):  # (its value)
            return None
        # (a child that waited to try a failed run again runs the newer
        # value now, with a fresh count of attempts)
        self.deliveries += 1
        child = each.child(key, value)
        return (RUN_CHILD, child, child.begin(), False)

    async def _deliver(self, key: K) -> None:
        """One try of ``key`` for a hand-written subscriber: deliver its
        state now unless the subscriber has it already."""
        value = self.live_map.get(key, _MISSING)
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
            if self.failing:
                self.failing.pop(key, None)
        else:
            self.failing[key] = error

    def failing_keys(self) -> dict[K, BaseException]:
        """Keys whose latest processing failed, with the last error."""
        each = self.each
        if each is not None and each.host.failures is not None:
            return dict(each.host.failures)
        return dict(self.failing)

    async def settle(self) -> None:
        """Wait until every change committed before the call has been
        processed, and nothing else: a key that changes again meanwhile
        counts as settled once the processing that covered the earlier
        change is over.  During ``mount_each``'s initial scan, the scan's own
        runs count as changes before the call (its submission is waited for,
        not a moment when the whole subtree happens to be ready)."""
        if self.each is not None and not self.started and not self.closed:
            await self.scanned.wait()
        if self.closed:
            return
        queue = self.queue
        need = queue.outstanding()
        each = self.each
        if each is not None:
            comp = each.component
            children = comp.children
            # The children still busy with runs this queue does not hold (a
            # child's own, or its children's): looked for only if the
            # component's count of unready children says there are more
            # than the keys already waited for.
            if children:
                readiness = comp.readiness
                busy = readiness.unready - (not readiness.self_ready) - each.host.counted
                if busy > 0:
                    for key in need:
                        child = children.get((key,))  # type: ignore[arg-type]
                        if child is not None and child.readiness.unready:
                            busy -= 1
                if busy > 0:
                    for rel, child in list(children.items()):
                        if child.readiness.unready and rel[0] not in need:
                            need[rel[0]] = -1
                            child.readiness.on_ready(partial(queue.outside_done, rel[0]))
        await queue.settle(need)
        if self.host is not None:
            # keys its children let go meanwhile, deleted once that settled
            await self.host.settling.settled()


def _same(a: object, b: object) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False
