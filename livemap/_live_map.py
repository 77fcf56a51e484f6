"""``LiveMap``: an owned, in-memory keyed target that is also a live view."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

from livemap._feed._consumer import Consumer, scan
from livemap._feed._protocols import (
    ConsumerOptions,
    LiveMapFeed,
    LiveMapSubscriber,
    LiveMapView,
    RetryPolicy,
)
from livemap._runtime._component import Component, current_run
from livemap._runtime._hosting import Owner, current_run_var
from livemap._runtime._session import AppRun
from livemap._runtime._tables import DeclarerDoc, new_declarer
from livemap._runtime._targets import TargetBase
from livemap.errors import ConsumerBusyError, MapRetiredError, NotInComponentError
from livemap_core import Buffer, Commit, Declarer

__all__ = [
    "LiveMap",
    "LiveMapConsumer",
    "LiveMapFeed",
    "LiveMapStats",
    "LiveMapSubscriber",
    "LiveMapView",
]

K = TypeVar("K")
V = TypeVar("V")

_ids = itertools.count(1)
_CREATE = object()

_DECLARE_ENTRY_DOC = """Declare ``key -> value`` as owned by the current component run.

Buffered, and committed when the run returns: a key the component's
previous run declared and this one did not is deleted then, and a value
``==`` to the one held changes nothing.

Raises ``TypeError`` for a key that is not a stable key,
:class:`~livemap.errors.DuplicateDeclarationError` for a key declared twice
in one run (the first declaration stands),
:class:`~livemap.errors.NotInComponentError` outside a component run and
:class:`~livemap.errors.MapRetiredError` once the map is retired.

A key another component holds and still declares is not applied: it is
kept as a claim while the component keeps declaring it, the key passes to
it (one update, no delete) when its owner lets it go, and a
:class:`~livemap.errors.KeyConflictError` goes to the run's
exception-handler chain if the update that made the claim settles with the
claim still pending.  A key the old owner drops in the same update (it
stops declaring it or is unmounted) is a transfer: one update, no error.
"""

# what help(lm.declare_entry) and inspect.signature show: the declarer is the
# core's fast callable, in a subclass that only documents itself
_DECLARE_ENTRY = DeclarerDoc("declare_entry", "LiveMapDeclarer", __name__, _DECLARE_ENTRY_DOC)


@dataclass(frozen=True)
class LiveMapStats:
    """A snapshot of one LiveMap's counters.

    ``entries``: keys held; ``commits``: commits and releases into the map;
    ``changes``: upserts and deletes committed; ``suppressed``: declarations
    the ``==`` gate turned into no-ops; ``conflicts``: declarations rejected
    because another component owns the key; ``eq_errors``: declarations whose
    ``==`` raised; ``deliveries``: ``update``/``delete`` calls made to the
    consumer; ``pending``: keys with changes the consumer has not taken yet
    (its lag); ``in_flight``: keys being processed (a key that changed again
    meanwhile counts here until it is taken again, so ``pending + in_flight``
    never exceeds the number of distinct keys); ``failing``: keys whose
    latest processing failed, with the last error (kept after the consumer
    ends, until a later consumer processes them); ``consumer``: whether a
    consumer is watching.
    """

    entries: int
    commits: int
    changes: int
    suppressed: int
    conflicts: int
    eq_errors: int
    deliveries: int
    pending: int
    in_flight: int
    failing: dict[Any, BaseException]
    consumer: bool


class LiveMap(TargetBase[K, V]):
    """An in-memory keyed collection: producers declare entries as owned
    target states, one consumer follows it live.

    Create it with ``await LiveMap.create()`` inside a component; it belongs
    to that run and is retired when the component's next run commits or the
    component is unmounted.  It is a :class:`~livemap.LiveMapView`:
    ``async for key, value in lm`` scans a snapshot, ``await lm.watch(sub)``
    follows it, and ``mount_each(fn, lm)`` mounts one component per entry.
    """

    __slots__ = {
        "_consumer": None,
        "_creator": None,
        "_deliveries": None,
        "_failing": None,
        "_options": None,
        "_retired": None,
        "declare_entry": "``lm.declare_entry(key, value) -> None``: " + _DECLARE_ENTRY_DOC,
    }

    def __init__(self, _token: object, creator: Component) -> None:
        if _token is not _CREATE:
            raise TypeError("use `await LiveMap.create()` inside a component to make a LiveMap")
        super().__init__(f"LiveMap#{next(_ids)} (created by {creator.path_str})", track_undo=False)
        self.declare_entry: Declarer[K, V] = new_declarer(
            self._table,
            self,
            current_run_var,
            partial(NotInComponentError, "LiveMap.declare_entry()", target=self.name),
            partial(MapRetiredError, self.name),
            doc=_DECLARE_ENTRY,
        )
        """``lm.declare_entry(key, value) -> None``: see ``help(lm.declare_entry)``."""
        self._creator = creator
        self._consumer: Consumer[K, V] | None = None
        self._retired = False
        self._deliveries = 0
        self._failing: dict[Any, BaseException] = {}
        self._options = ConsumerOptions()

    def __repr__(self) -> str:
        state = " retired" if self._retired else ""
        return f"<{self.name} entries={len(self._table)}{state}>"

    @classmethod
    async def create(cls) -> LiveMap[K, V]:
        """A new, empty map owned by the current component run.

        Raises :class:`~livemap.errors.NotInComponentError` outside a run.
        """
        run = current_run("LiveMap.create()")
        lm: LiveMap[K, V] = cls(_CREATE, run.component)
        if run.created is None:
            run.created = []
        run.created.append(lm)
        return lm

    # -- producing ---------------------------------------------------------------

    async def commit_run(
        self, component: Owner, buffer: Buffer[K, V], gen: int
    ) -> Exception | None:
        if self._retired or not component.current(gen):
            return None
        table = self._table
        result = table.commit(buffer, self._defer(component, buffer))
        # The consumer hears of the changes before a handler can hold them up:
        # a report interrupted (the run superseded, stopped or cancelled) must
        # not leave the map ahead of its consumer.
        self._notify(result)
        # (_settled only if it has anything to do: most commits transfer and
        # defer nothing, and its frame is one per per-entry commit)
        if (result.transfers or table.deferred_of(component)) and self._settled(component, result):
            self._notify(table.drop_deferred(component))
        if result.rejections:
            await self._report_rejections(component, result)
        return None

    def _notify(self, result: Commit[K, V]) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        upserts = result.upserts
        deletes = result.deletes
        # (a per-entry child's commit changes one key: its list is made
        # without a comprehension, which costs a frame of its own)
        if not deletes:
            if not upserts:
                return
            if len(upserts) == 1:
                consumer.notify([upserts[0][0]])
                return
            consumer.notify([key for key, _ in upserts])
            return
        keys = [key for key, _ in upserts] if upserts else []
        keys.extend(deletes)
        consumer.notify(keys)

    async def release_owner(self, component: Owner, gen: int | None = None) -> Exception | None:
        if gen is not None and not component.current(gen):
            return None
        result = self._let_go(component)
        self._notify(result)
        if self._settled(component, result):
            self._notify(self._table.drop_deferred(component))
        return None

    async def _apply_deferred(self, component: Owner) -> Exception | None:
        result = self._table.drop_deferred(component)
        self._notify(result)
        self._settled(component, result)
        return None

    async def drop_deferred_batch(self, components: list[Owner], scope: Owner) -> None:
        # one commit for the keys the components of the settled update let go
        result = self._table.drop_deferred_many(components)
        self._notify(result)
        self._dropped(components, result)

    def retire(self) -> None:
        """Retire the map (its creating run was superseded or its component
        unmounted): no more declarations, and its consumer ends."""
        self._retired = True
        self.declare_entry.closed = True
        if self._consumer is not None:
            self._consumer.close()

    def app_run(self) -> AppRun | None:
        """The app run the map belongs to, while it runs (internal)."""
        return self._creator.session.active

    @property
    def retired(self) -> bool:
        """Whether the run that created the map has been superseded (or its
        component unmounted): a retired map takes no declarations and its
        consumer has ended."""
        return self._retired

    # -- consuming ---------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[tuple[K, V]]:
        """A snapshot of the entries as they are now.

        No side effects, except for the watching subscriber itself: a scan
        made by its ``update_all()`` is the snapshot its watch continues
        from (see :meth:`watch`)."""
        return scan(self._consumer, self._table.items())

    def snapshot(self) -> list[tuple[K, V]]:
        """The entries as they are now, as a list (what ``async for`` yields)."""
        return self._table.items()

    def active_consumer(self) -> Consumer[K, V] | None:
        """The consumer watching the map now, if any (for ``mount_each``)."""
        return self._consumer

    async def watch(self, subscriber: LiveMapSubscriber[K, V]) -> None:
        """Follow the map: ``update_all()``, ``mark_ready()``, then every
        later change as ``update(key, value)`` / ``delete(key)``.

        Returns when the map is retired.  A second concurrent watch raises
        :class:`~livemap.ConsumerBusyError`.  The seam is exact whatever
        ``update_all()`` awaits: the scan of the map it makes (``async for``
        over the map) is the snapshot the watch continues from, so no change
        is lost or delivered twice between the snapshot and the watch.
        Without such a scan the watch continues from the map as it stood
        when ``watch()`` was called.
        """
        await self._watch(subscriber, self._options)

    async def _watch(self, subscriber: LiveMapSubscriber[K, V], options: ConsumerOptions) -> None:
        if self._consumer is not None:
            raise ConsumerBusyError(self.name)
        if self._retired:
            return
        consumer = Consumer(self, subscriber, options)
        self._consumer = consumer
        try:
            await consumer.run()
        finally:
            consumer.release()

    def consumer_ended(self, consumer: Consumer[K, V]) -> None:
        """Free the consumer slot (called once per consumer, when it ends)."""
        self._deliveries += consumer.deliveries
        self._failing = consumer.failing_keys()  # stays visible after the consumer ends
        if self._consumer is consumer:
            self._consumer = None

    def consumer(
        self, *, concurrency: int = 64, retry: RetryPolicy | None = None
    ) -> LiveMapConsumer[K, V]:
        """This map as a view with consumer options, for ``mount_each``.

        ``mount_each(fn, lm.consumer(concurrency=8, retry=RetryPolicy()))``
        processes up to 8 keys at once and retries failing entries.
        """
        return LiveMapConsumer(self, ConsumerOptions(concurrency, retry))

    async def settle(self) -> None:
        """Wait until every change committed so far has been processed by the
        consumer (its per-entry components ready).  Returns at once when no
        consumer is watching."""
        consumer = self._consumer
        if consumer is not None:
            await consumer.settle()

    def stats(self) -> LiveMapStats:
        """A snapshot of the map's counters (see :class:`LiveMapStats`)."""
        table = self._table.stats()
        consumer = self._consumer
        deliveries = self._deliveries
        pending = in_flight = 0
        failing = dict(self._failing)
        if consumer is not None:
            deliveries += consumer.deliveries
            pending = len(consumer.queued)
            in_flight = len(consumer.in_flight)
            failing = consumer.failing_keys()
        return LiveMapStats(
            entries=table.entries,
            commits=table.commits,
            changes=table.changes,
            suppressed=table.suppressed,
            conflicts=table.conflicts,
            eq_errors=table.eq_errors,
            deliveries=deliveries,
            pending=pending,
            in_flight=in_flight,
            failing=failing,
            consumer=consumer is not None,
        )


class LiveMapConsumer(Generic[K, V]):
    """A :class:`LiveMap` seen through consumer options (see
    :meth:`LiveMap.consumer`); a :class:`~livemap.LiveMapView`."""

    __slots__ = ("live_map", "options")

    def __init__(self, live_map: LiveMap[K, V], options: ConsumerOptions) -> None:
        self.live_map = live_map
        self.options = options

    def __aiter__(self) -> AsyncIterator[tuple[K, V]]:
        return self.live_map.__aiter__()

    def snapshot(self) -> list[tuple[K, V]]:
        """The map's entries as they are now, as a list."""
        return self.live_map.snapshot()

    async def watch(self, subscriber: LiveMapSubscriber[K, V]) -> None:
        """Like :meth:`LiveMap.watch`, with these options."""
        await self.live_map._watch(subscriber, self.options)

    async def settle(self) -> None:
        """The map's :meth:`LiveMap.settle`."""
        await self.live_map.settle()

    def active_consumer(self) -> Consumer[K, V] | None:
        """The map's :meth:`LiveMap.active_consumer`."""
        return self.live_map.active_consumer()

    def __repr__(self) -> str:
        return f"<consumer of {self.live_map.name} {self.options}>"
