"""The consumer of a map: the worker between one LiveMap and its one
subscriber.

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
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

import anyio

from livemap._feed._each import EachSubscriber, event_class
from livemap._feed._protocols import ConsumerOptions, LiveMapSubscriber, ReadyLike
from livemap._runtime._component import Component
from livemap._runtime._session import AppRun
from livemap._runtime._unmount import cleanup, detach

__all__ = ["ConsumedMap", "Consumer", "scanning_consumer"]

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


@dataclass
class _Waiter:
    """One ``settle()`` call: ``keys`` maps each key it waits for to the
    change sequence number its processing must have started at (or after)
    to cover every change committed before the call."""

    keys: dict[Any, int]
    event: anyio.Event = field(default_factory=anyio.Event)


class Consumer(Generic[K, V]):
    """The worker between one LiveMap and its one subscriber (internal).

    Fields, per key (a key is in at most one of ``queued`` and
    ``in_flight``; ``dirty`` is a subset of ``in_flight``):

    * ``queue`` / ``queued``: keys with changes not taken yet, in order.
    * ``in_flight``: keys being processed; ``dirty``: those of them that
      changed again meanwhile (taken again once their processing is over).
    * ``started_at``: for a key in flight, the change sequence number
      (``seq``) when its processing read the key's state: it covers every
      change up to that number.  ``seq`` counts ``notify()`` calls.
    * ``_waiters``: ``settle()`` calls, each waiting for the keys it saw
      outstanding to be covered up to the changes before the call.
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
        self.queue: deque[K] = deque()
        self.queued: set[K] = set()
        self.in_flight: set[K] = set()
        self.dirty: set[K] = set()
        self.seq = 0
        self.started_at: dict[K, int] = {}
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
        self._waiters: list[_Waiter] = []
        each = subscriber if isinstance(subscriber, EachSubscriber) else None
        self.each = each
        self._component = each.component if each is not None else None
        if each is not None:
            each.host.consumer = self
        # What a generic subscriber has: the map as it stands when the watch
        # starts (``update_all`` scans it before its first await), then every
        # delivery.  ``mount_each``'s children hold their own value instead.
        self.delivered: dict[K, V] = {} if each is not None else dict(live_map.items())

    # -- called from commits (synchronously) ---------------------------------

    def notify(self, keys: list[K]) -> None:
        self.seq += 1
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
        return not self.queue and not self.in_flight

    async def run(self) -> None:
        try:
            token = scanning_consumer.set(self)
            try:
                await self.subscriber.update_all()
            finally:
                scanning_consumer.reset(token)
            await self.subscriber.mark_ready()
            self.started = True
            self.scanned.set()
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
                            self.started_at[key] = self.seq
                            tg.start_soon(self._deliver, key)
                    if self.idle():
                        self._set_busy(False)
                    self._wake = new_event()
                    if not self.closed and not (queue and len(self.in_flight) < limit):
                        await self._wake.wait()
                tg.cancel_scope.cancel()
        finally:
            self.release()

    def rebase(self, snapshot: list[tuple[K, V]]) -> None:
        """The watching subscriber scanned the map during ``update_all()``:
        that scan is what it has, so the watch continues from it.  A change
        notified before the scan is in it (its delivery finds the value
        already delivered, or the key already gone, and is skipped); one
        after it is delivered.  ``mount_each``'s children hold their own
        values, which is the same for it."""
        if self.each is None and not self.started:
            self.delivered = dict(snapshot)

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
        each = self.each
        if each is not None and each.host.consumer is self:
            each.host.consumer = None
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
        if child is None or not child.backing_off:
            return False
        self.deliveries += 1
        self.started_at[key] = self.seq
        value = self.live_map.get(key, _MISSING)
        if value is not _MISSING:
            fargs = each.host.fargs
            child.args = (value, *fargs) if fargs else (value,)
            each.pool.queue_run(child)  # cancels the wait: a new generation
            return True
        if run is not None:
            state.drop(key)  # its hand-back is the cleanup's now
        waiters = child.readiness.waiters
        if waiters:  # likewise for the hand-back of the key's delivery
            finish = self.finish
            child.readiness.waiters = [
                w for w in waiters if not (isinstance(w, partial) and w.func == finish)
            ] or None
        detach(child)  # cancels the wait
        each.pool.submit(child, 0, partial(self._cleanup, child, key))
        return True

    def _deliver_each(self, each: EachSubscriber, key: K) -> None:
        """Deliver to ``mount_each`` without a task: queue the child's run on
        the pool and take the key back when the child is ready."""
        value = self.live_map.get(key, _MISSING)
        state = each.host
        if key in state.pending or key in state.running:
            # still processing an earlier value (from the scan): deliver the
            # latest state once that is done (EachHost tells finish), or
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
                self.started_at[key] = self.seq
                self.deliveries += 1
                if held is not _MISSING:
                    del state.leaves[key]
                each.submit_keyed(key, value)  # EachHost tells finish when it is done
                return
            if value is _MISSING and held is not _MISSING:
                self.deliveries += 1
                each.drop_leaf(key)
            self._settled(key)
            return
        if child.readiness.unready:
            # still processing an earlier value (from the scan, or a retry):
            # deliver the latest state once that is done, or now if it only
            # waits to retry
            self.in_flight.add(key)
            if not self._supersede_retry(each, key):
                self.dirty.add(key)
            if child.alive:  # (a delete that cut a retry short hands back itself)
                child.readiness.on_ready(partial(self.finish, key))
            return
        if value is _MISSING:
            self.in_flight.add(key)
            self.started_at[key] = self.seq
            self.deliveries += 1
            detach(child)
            each.pool.submit(child, 0, partial(self._cleanup, child, key))
            return
        if _same(child.args[0], value):
            self._settled(key)
            return
        self.in_flight.add(key)
        self.started_at[key] = self.seq
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
        """``key``'s processing is over (its run, its ``finally`` included):
        take it again if it changed meanwhile."""
        self.in_flight.discard(key)
        covered = self.started_at.pop(key, -1)
        if key in self.dirty:
            self.dirty.discard(key)
            if key not in self.queued:
                self.queued.add(key)
                self.queue.append(key)
        if self._waiters:
            self._done(key, covered)
        self._poke()

    def scan_run_over(self, key: Any) -> None:
        """A run of ``key`` that the initial scan started is over."""
        if self._waiters:
            self._done(key, -1)

    def _settled(self, key: K) -> None:
        """``key`` needed no processing: its state was already there."""
        if self._waiters:
            self._done(key, self.seq)

    async def _deliver(self, key: K) -> None:
        try:
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
                self.failing.pop(key, None)
            else:
                self.failing[key] = error
        finally:
            self.finish(key)

    def failing_keys(self) -> dict[K, BaseException]:
        """Keys whose latest processing failed, with the last error."""
        each = self.each
        if each is not None and each.host.failures is not None:
            return dict(each.host.failures)
        return dict(self.failing)

    def _done(self, key: K, covered: int) -> None:
        """``key``'s processing that covered changes up to ``covered`` is over."""
        remaining = []
        for waiter in self._waiters:
            keys = waiter.keys
            need = keys.get(key)
            if need is not None and covered >= need:
                del keys[key]
            if keys:
                remaining.append(waiter)
            else:
                waiter.event.set()
        self._waiters = remaining

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
        now = self.seq
        need: dict[Any, int] = dict.fromkeys(self.queued, now)
        dirty = self.dirty
        started_at = self.started_at
        for key in self.in_flight:
            need[key] = now if key in dirty else started_at.get(key, -1)
        each = self.each
        if each is not None:
            host = each.host
            for key in (*host.pending, *host.running):
                need.setdefault(key, -1)  # queued or running since the scan
            for rel, child in list((each.component.children or {}).items()):
                if child.readiness.unready and rel[0] not in need:
                    need[rel[0]] = -1
                    child.readiness.on_ready(partial(self.scan_run_over, rel[0]))
        if not need:
            return
        waiter = _Waiter(need)
        self._waiters.append(waiter)
        await waiter.event.wait()


def _same(a: object, b: object) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False
