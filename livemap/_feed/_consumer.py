"""The consumer of a map: the worker between one LiveMap and its one
subscriber.

The consumer is where a LiveMap meets its consumer.  A commit adds the
changed keys to the consumer's :class:`~._queue.WorkQueue`; a worker takes a
key, reads its current state from the map at that moment, delivers
``update(key, value)`` or ``delete(key)``, and marks the key done.  Reading
the latest state at delivery time is what coalesces, and the queue never
hands out a key that is in flight, so one key is never processed twice at
once and its deliveries arrive in the order of its changes.

A hand-written subscriber's deliveries run on up to ``concurrency`` worker
tasks, started as needed and parked when there is nothing to take, so that
deliveries that never wait run back to back in one task.  ``mount_each``'s
subscriber is skipped: its per-entry runs are queued on its pool straight
from the commit (:meth:`Consumer._deliver_each`), and the pool hands each
key back when its run is over.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextvars import ContextVar
from functools import partial
from typing import Any, Generic, Protocol, TypeVar
from weakref import WeakKeyDictionary

import anyio
import anyio.abc

from livemap._feed._each import EachHost, EachLiveSubscriber, EachSubscriber, event_class
from livemap._feed._protocols import ConsumerOptions, LiveMapSubscriber, ReadyLike
from livemap._feed._queue import WorkQueue
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


class Consumer(Generic[K, V]):
    """The worker between one LiveMap and its one subscriber (internal).

    ``queue`` holds every key with work and where it stands (see
    :class:`~._queue.WorkQueue` for its invariants).  Besides it:

    * ``delivered``: for a hand-written subscriber, what it has (the map as
      its scan saw it, then every delivery); a try that finds the key's
      state already there delivers nothing.
    * ``failing``: keys whose latest delivery failed, with the error.
    * ``each``: the subscriber of a ``mount_each`` of a function, whose runs
      it queues on the pool itself; ``host``: the host of the ``mount_each``
      it feeds, of a function or of a live-component class (its
      :attr:`~._each.EachHost.consumer` is this consumer until it is released).
    * ``started``: the subscriber's ``update_all()`` and ``mark_ready()``
      returned; no key is taken before.  ``closed``: no key is taken any
      more; ``released``: the map's consumer slot is free again.
    * ``_workers`` / ``_free`` / ``_parked``: the worker tasks of a
      hand-written subscriber (at most ``concurrency``): how many run, how
      many of them are not in a delivery, and the events of the parked ones.
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
        self.queue: WorkQueue[K] = WorkQueue()
        self.failing: dict[K, BaseException] = {}
        self.deliveries = 0
        self.closed = False
        self.released = False
        self.started = False
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
    def queued(self) -> set[K]:
        """Keys with changes not taken yet."""
        return self.queue.waiting

    @property
    def in_flight(self) -> dict[K, int]:
        """Keys being processed (a try of each is under way)."""
        return self.queue.in_flight

    # -- called from commits (synchronously) ---------------------------------

    def notify(self, keys: list[K]) -> None:
        queue = self.queue
        queue.changed()
        in_flight = queue.in_flight
        self._set_busy(True)
        # mount_each, past its initial scan: deliver at once while there is
        # room, from the committing task (no hop through the worker loop)
        each = self.each if self.started and not self.closed else None
        if each is None:
            for key in keys:
                queue.add(key)
            if self.started:
                self._kick()
            else:
                self._poke()
            return
        limit = self.options.concurrency
        for key in keys:
            if key in in_flight:
                if not self._supersede_retry(each, key):
                    queue.add(key)  # dirty
            elif key not in queue.waiting:
                if not queue.order and len(in_flight) < limit:
                    self._deliver_each(each, key)
                else:
                    queue.add(key)
        self._poke()

    def close(self) -> None:
        self.closed = True
        self._poke()
        self._unpark()

    # -- the worker ----------------------------------------------------------

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

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
        return self.queue.idle()

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
            self.scanned.set()
            async with anyio.create_task_group() as tg:
                if self.each is not None:
                    await self._run_each(self.each)
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

    async def _run_each(self, each: EachSubscriber) -> None:
        """``mount_each``: take the keys that could not be delivered at once
        (during the scan, or beyond ``concurrency``) as room frees up."""
        limit = self.options.concurrency
        queue = self.queue
        new_event = event_class()
        while not self.closed:
            while queue.order and len(queue.in_flight) < limit:
                key = queue.pop()
                assert key is not None
                self._deliver_each(each, key)
            if queue.idle():
                self._set_busy(False)
            self._wake = new_event()
            if not self.closed and not (queue.order and len(queue.in_flight) < limit):
                await self._wake.wait()

    async def _run_workers(self, tg: anyio.abc.TaskGroup) -> None:
        """A hand-written subscriber: workers take the keys (see :meth:`_work`);
        this task waits until the consumer closes, then ends them."""
        self._tg = tg
        new_event = event_class()
        self._kick()
        while not self.closed:
            if self.queue.idle():
                self._set_busy(False)
            self._wake = new_event()
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
                key = queue.take()
                if key is None:
                    if queue.idle():
                        self._poke()  # the consumer is idle: its task says so
                    event = new_event()
                    self._parked.append(event)
                    self._free -= 1
                    await event.wait()
                    continue
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
        self.scanned.set()
        self._set_busy(False)
        self.queue.release()
        self._poke()
        self._unpark()
        host = self.host
        if host is not None and host.consumer is self:
            host.consumer = None
        self.live_map.consumer_ended(self)

    def _supersede_retry(self, each: EachSubscriber, key: K) -> bool:
        """A change to a key (in flight) whose child waits to retry a failed
        run: apply it now instead of retrying the old value.  A new value
        runs at once, with a fresh count of attempts; the readiness callback
        of the key's delivery hands it back as usual.  A delete unmounts the
        child at once; its cleanup hands the key back.  False (the change
        waits) if the child is not waiting to retry."""
        state = each.host
        run = state.running.get(key)
        if run is not None:
            child = run.made
        else:
            children = each.component.children
            child = None if children is None else children.get((key,))  # type: ignore[arg-type]
        if child is None or not each.host.backing_off(child):
            return False
        self.deliveries += 1
        self.queue.restart(key)
        value = self.live_map.get(key, _MISSING)
        if value is not _MISSING:
            fargs = each.host.fargs
            child.args = (value, *fargs) if fargs else (value,)
            each.pool.queue_run(child)  # cuts the backoff short: a newer run
            return True
        if run is not None:
            state.drop(key)  # its hand-back is the cleanup's now
        waiters = child.readiness.waiters
        if waiters:  # likewise for the hand-back of the key's delivery
            finish = self.finish
            child.readiness.waiters = [
                w for w in waiters if not (isinstance(w, partial) and w.func == finish)
            ] or None
        detach(child)  # drops its try again
        each.pool.cleanup(child, partial(self._cleanup, child, key))
        return True

    def _deliver_each(self, each: EachSubscriber, key: K) -> None:
        """Deliver to ``mount_each`` without a task: queue the child's run on
        the pool and take the key back when the child is ready."""
        queue = self.queue
        value = self.live_map.get(key, _MISSING)
        state = each.host
        if key in state.running or state.pending(key):
            # still processing an earlier value (from the scan): deliver the
            # latest state once that is done (EachHost tells finish), or
            # now if it only waits to retry
            queue.hold(key)
            if not self._supersede_retry(each, key):
                queue.add(key)  # dirty
            return
        children = each.component.children
        child = None if children is None else children.get((key,))  # type: ignore[arg-type]
        if child is None:
            # at rest (a leaf: only its value is kept), or not mounted
            held = state.leaves.get(key, _MISSING)
            if value is not _MISSING and (held is _MISSING or not _same(held, value)):
                queue.begin(key)
                self.deliveries += 1
                if held is not _MISSING:
                    del state.leaves[key]
                each.submit_keyed(key, value)  # EachHost tells finish when it is done
                return
            if value is _MISSING and held is not _MISSING:
                self.deliveries += 1
                each.drop_leaf(key)
            queue.settled(key)
            return
        if child.readiness.unready:
            # still processing an earlier value (from the scan, or a retry):
            # deliver the latest state once that is done, or now if it only
            # waits to retry
            queue.hold(key)
            if not self._supersede_retry(each, key):
                queue.add(key)  # dirty
            if child.alive:  # (a delete that cut a retry short hands back itself)
                child.readiness.on_ready(partial(self.finish, key))
            return
        if value is _MISSING:
            queue.begin(key)
            self.deliveries += 1
            detach(child)
            each.pool.cleanup(child, partial(self._cleanup, child, key))
            return
        if _same(child.args[0], value):
            queue.settled(key)
            return
        queue.begin(key)
        self.deliveries += 1
        child = each.child(key, value)
        each.pool.queue_run(child)
        child.readiness.on_ready(partial(self.finish, key))

    async def _cleanup(self, child: Component, key: K) -> None:
        try:
            await cleanup(child)
        finally:
            self.finish(key)

    def finish(self, key: K) -> None:
        """``mount_each``: ``key``'s run (its ``finally`` included) is over:
        the queue decides what follows, and the loop takes the next keys."""
        self.queue.done(key)
        self._poke()

    def scan_run_over(self, key: Any) -> None:
        """A run of ``key`` that the initial scan started is over."""
        self.queue.outside_done(key)

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
        need = self.queue.outstanding()
        each = self.each
        if each is not None:
            host = each.host
            for key in (*host.pending_keys(), *host.running):
                need.setdefault(key, -1)  # queued or running since the scan
            comp = each.component
            children = comp.children
            # The children still busy from runs this queue did not start
            # (the scan's, or a child's own): looked for only if the
            # component's count of unready children says there are more
            # than the keys already waited for.
            if children:
                readiness = comp.readiness
                busy = readiness.unready - (not readiness.self_ready) - host.counted
                if busy > 0:
                    for key in need:
                        child = children.get((key,))  # type: ignore[arg-type]
                        if child is not None and child.readiness.unready:
                            busy -= 1
                if busy > 0:
                    for rel, child in list(children.items()):
                        if child.readiness.unready and rel[0] not in need:
                            need[rel[0]] = -1
                            child.readiness.on_ready(partial(self.scan_run_over, rel[0]))
        await self.queue.settle(need)
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
