"""The work-queue: every key with work to do, and where it stands.

One :class:`WorkQueue` per consumer owns a key's whole consumer-side life.
A hand-written subscriber's consumer has its own; a ``mount_each``'s
consumer uses its host's (so a key of a map consumed by a ``mount_each`` is
in one queue only, from the change that makes it wait to the end of the run
that processed it, and the host's queue outlives one consumer: a key whose
run of an earlier consumer is winding down is still in flight when the next
consumer of the same host starts).

A key is *waiting* (it has work, and no try of it is under way), *in
flight* (a worker took it: a try is under way, its ``finally`` included),
*backing off* (its latest try failed and its try again waits out the retry
policy's delay) or absent.  A key in flight may have work waiting behind
it: a change made after its try read the map (the key is *dirty*), a
cleanup, a run.  A worker takes a key, runs its work, marks it done:
:meth:`WorkQueue.done` is the one place that decides what follows a try
(the work waiting behind it, the settle waiters the try covered, the end
of its count of attempts), with :meth:`WorkQueue.retry` the request of a
failed try to be tried again.

A work is a tuple ``(kind, *what)`` tagged with its :class:`Kind`, made and
read without a Python call.  :data:`DELIVER` carries only the key: its try
reads the key's state from the map when it starts, which is coalescing
stated as a type (a key that changed fifty times while it waited is one
waiting :data:`DELIVER`).  A ``mount_each``'s host adds the runs of its
children (a scan's runs, carrying their values, re-runs, cleanups); its
worker turns a :data:`DELIVER` into one of them when it takes it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeAlias, TypeVar

import anyio

__all__ = ["DELIVER", "DELIVER_WORK", "Kind", "Work", "WorkQueue"]

K = TypeVar("K")


class Kind:
    """What a work is: the first item of every work a :class:`WorkQueue`
    holds (a work is a tuple ``(kind, *what)``, made and read without a
    Python call)."""

    __slots__ = ("goes_first", "name", "replaceable")

    def __init__(self, name: str, *, replaceable: bool = True, goes_first: bool = True) -> None:
        self.name = name
        # Whether a newer work for the key replaces this one while it waits
        # (a run: the newer one runs the latest state); False for work that
        # must happen even so (a cleanup).
        self.replaceable = replaceable
        # Whether, waiting behind the key's try in flight, it is taken
        # before newer keys once that try is done (the rest of one piece of
        # work: a cleanup's run), or after them (a change: a key that keeps
        # changing does not starve the others).
        self.goes_first = goes_first

    def __repr__(self) -> str:
        return f"<work kind {self.name}>"


Work: TypeAlias = tuple[Any, ...]
"""``(kind, *what)``: one piece of work for a key, ``kind`` a :class:`Kind`."""

DELIVER = Kind("deliver", goes_first=False)
"""``(DELIVER,)``: the key changed in the map; its try reads the key's
latest state when it starts and processes that."""

DELIVER_WORK: Work = (DELIVER,)
"""The one :data:`DELIVER` work."""


class _Waiter:
    """One ``settle()`` call: ``keys`` maps each key it waits for to the
    change number a try of it must cover (``-1``: any try of the key)."""

    __slots__ = ("event", "keys")

    def __init__(self, keys: dict[object, int]) -> None:
        self.keys = keys
        self.event = anyio.Event()


class WorkQueue(Generic[K]):
    """Every key with work, and where it stands (internal).

    A key is in at most one of ``order``, ``in_flight`` and ``backoff``,
    except that a key goes into ``backoff`` from the try in flight that
    failed, which ends right after.
    """

    __slots__ = (
        "attempts",
        "backoff",
        "first_due",
        "in_flight",
        "later",
        "order",
        "read",
        "seq",
        "waiters",
        "waiting",
    )

    def __init__(self) -> None:
        # key -> the work it waits to run first.  Invariant: no key is both
        # here and in ``backoff`` (newer work cuts a backoff short).  A key
        # both here and in ``in_flight`` waits behind its try (dirty, if
        # this holds a DELIVER).
        self.waiting: dict[K, Work] = {}
        # key -> the works waiting after its first one, oldest first (rare:
        # a cleanup followed by a run).  Invariant: only keys of ``waiting``,
        # never an empty list, and no two replaceable works in a row across
        # ``waiting[key]`` and ``later[key]`` (a newer run replaces the run
        # waiting last).
        self.later: dict[K, list[Work]] = {}
        # The keys a worker may take now, oldest first.  Invariant: exactly
        # the keys of ``waiting`` not in ``in_flight``, each once.
        self.order: deque[K] = deque()
        # key -> the work of its try under way.  Invariant: one try per key
        # at a time ("never twice at once"); set by :meth:`take` (or
        # :meth:`claim`, a try outside the workers), cleared by :meth:`done`
        # only, after the try is over (its ``finally`` included).  The
        # worker may replace the work by the one a DELIVER turned into.
        self.in_flight: dict[K, Work] = {}
        # key in flight for a DELIVER -> the change number ``seq`` when its
        # try read the map: it covers every change up to it.  Invariant:
        # only keys of ``in_flight``; a try of other work covers no change
        # (``-1``).
        self.read: dict[K, int] = {}
        # key -> (when, work): a failed try waiting out its delay before
        # ``work`` (the try again) waits.  Set by :meth:`retry`; cleared by
        # :meth:`due` at ``when``, or by newer work for the key (:meth:`add`),
        # :meth:`forget`, :meth:`discard` or :meth:`cancel_backoff`.
        self.backoff: dict[K, tuple[float, Work]] = {}
        # no backoff ends before this (``inf``: none waits); may be early
        self.first_due = math.inf
        # key -> the failed tries in a row of the key's latest work (the
        # retry policy's count).  Invariant: only keys backing off, or whose
        # try again waits or is in flight; newer work for the key, or the
        # end of its tries (done without a backoff, giving up) removes it.
        self.attempts: dict[K, int] = {}
        # Counts :meth:`changed` calls (one per commit that changed keys).
        # Never goes down (also across consumers of one queue).
        self.seq = 0
        # The ``settle()`` calls waiting: each holds the keys it waits for,
        # each until a try that covers its need is done, or the key turns
        # out to need no try (:meth:`settled`), or the consumer ends.
        self.waiters: list[_Waiter] = []

    def __len__(self) -> int:
        """How many keys have work waiting."""
        return len(self.waiting)

    def idle(self) -> bool:
        """Whether no key has work: none waits, none is in flight or backs off."""
        return not self.waiting and not self.in_flight and not self.backoff

    # -- adding work ---------------------------------------------------------

    def changed(self) -> int:
        """A commit changed keys: a new change number (then :meth:`add` each)."""
        self.seq += 1
        return self.seq

    def add(self, key: K, work: Work) -> None:
        """``work`` for ``key``: a run replaces the key's run waiting last, if
        any, and a change the change waiting last; other work waits after
        it.  Either cuts a backoff short (a fresh count of attempts).  A key
        in flight keeps it waiting behind its try."""
        if self.attempts:
            self.attempts.pop(key, None)
            self.backoff.pop(key, None)
        waiting = self.waiting
        if key not in waiting:
            waiting[key] = work
            if key not in self.in_flight:
                self.order.append(key)
            return
        first = waiting[key]
        later = self.later.get(key)
        last = first if later is None else later[-1]
        kind = work[0]
        if last[0].replaceable and kind.replaceable and (last[0] is DELIVER) is (kind is DELIVER):
            # the newer run replaces it (a change waits behind a run of the
            # key instead: it reads the map once that run is over)
            if later is None:
                waiting[key] = work
            else:
                later[-1] = work
        elif later is None:
            self.later[key] = [work]
        else:
            later.append(work)

    def discard(self, key: K) -> None:
        """Drop ``key``'s waiting runs (not its cleanups) and its backoff."""
        self.forget(key)
        first = self.waiting.get(key)
        if first is None:
            return
        kept: list[Work] = []
        for work in (first, *self.later.pop(key, ())):
            if not work[0].replaceable:
                kept.append(work)
        if kept:
            self.waiting[key] = kept[0]
            if len(kept) > 1:
                self.later[key] = kept[1:]
            return
        del self.waiting[key]
        if key not in self.in_flight:
            self.order.remove(key)
            self.settled(key)

    def discard_where(self, drop: Callable[[Work], bool]) -> None:
        """Drop the waiting runs of every key with one ``drop`` selects."""
        for key in [k for k in self.waiting if any(map(drop, self._runs(k)))]:
            self.discard(key)

    def latest(self, key: K) -> Work | None:
        """``key``'s work waiting last (a run, if one waits), if any."""
        later = self.later.get(key)
        return self.waiting.get(key) if later is None else later[-1]

    def keys_waiting(self, kind: Kind) -> Iterator[K]:
        """The keys with a waiting run of ``kind``."""
        for key in self.waiting:
            if any(work[0] is kind for work in self._runs(key)):
                yield key

    def _runs(self, key: K) -> Iterator[Work]:
        first = self.waiting.get(key)
        if first is not None and first[0].replaceable:
            yield first
        for work in self.later.get(key, ()):
            if work[0].replaceable:
                yield work

    # -- taking work ---------------------------------------------------------

    def take(self) -> tuple[K, Work] | None:
        """The oldest key a worker may take and its next work, now in flight."""
        order = self.order
        if not order:
            return None
        key = order.popleft()
        work = self.waiting.pop(key)
        later = self.later
        if later and key in later:
            rest = later[key]
            self.waiting[key] = rest.pop(0)
            if not rest:
                del later[key]
        self.in_flight[key] = work
        if work is DELIVER_WORK:
            self.read[key] = self.seq
        return key, work

    def claim(self, key: K, work: Work) -> bool:
        """``key`` goes in flight for ``work`` run outside the workers, at
        once, unless a work of it is in flight already (``False``: then add
        ``work`` to wait its turn).  :meth:`done` ends it as any other."""
        if key in self.in_flight:
            return False
        self.in_flight[key] = work
        if key in self.waiting:
            self.order.remove(key)  # (its turn comes when this one is done)
        return True

    # -- after a try: what follows -------------------------------------------

    def done(self, key: K, *, covers: bool = True) -> None:
        """``key``'s try is over (its ``finally`` included): the one place
        that decides what follows.  The work waiting behind it, if any,
        waits to be taken (before newer keys, unless it is a change); the
        settle waiters the try covered are released (none if not
        ``covers``: a try that only waited for the key's turn); a try that
        did not back off ends the key's count of attempts."""
        del self.in_flight[key]
        covered = self.read.pop(key, -1) if self.read else -1
        waiting = self.waiting.get(key)
        if waiting is not None:
            if waiting[0].goes_first:
                self.order.appendleft(key)
            else:
                self.order.append(key)
        elif self.attempts and key not in self.backoff:
            self.attempts.pop(key, None)  # its tries are over
        if self.waiters and covers:
            self._covered(key, covered)

    def retry(self, key: K, again: Work, max_attempts: int, delay: Callable[[int], float]) -> bool:
        """``key``'s try failed: with tries left (``max_attempts`` in all),
        ``again`` waits ``delay(failed)`` in :attr:`backoff` and ``True``;
        else the key's count ends and ``False`` (the failure stands).  Newer
        work waiting for the key (a change made while the try ran) is what
        runs next, with a fresh count: the failure stands then too."""
        failed = self.attempts.get(key, 0) + 1
        if failed >= max_attempts or key in self.waiting:
            self.attempts.pop(key, None)
            return False
        self.attempts[key] = failed
        when = anyio.current_time() + delay(failed)
        self.backoff[key] = (when, again)
        self.first_due = min(self.first_due, when)
        return True

    def forget(self, key: K) -> None:
        """``key``'s tries are over (it succeeded, gave up, or left): no
        count, no backoff."""
        if self.attempts:
            self.attempts.pop(key, None)
            if self.backoff.pop(key, None) is not None and key not in self.in_flight:
                self.settled(key)

    def backing_off(self, key: K) -> Work | None:
        """The try again ``key`` waits to make, if it backs off."""
        entry = self.backoff.get(key)
        return None if entry is None else entry[1]

    def due(self, now: float) -> None:
        """Backoffs over by ``now``: their tries again wait to be taken."""
        backoff = self.backoff
        first = math.inf
        for key, (when, again) in list(backoff.items()):
            if when > now:
                first = min(first, when)
                continue
            del backoff[key]
            attempts = self.attempts.get(key)
            self.add(key, again)  # (which resets the count: put it back)
            if attempts is not None:
                self.attempts[key] = attempts
        self.first_due = first

    def cancel_backoff(self) -> None:
        """Every backoff ends without its try again (the host stops)."""
        keys = list(self.backoff)
        for key in keys:
            self.attempts.pop(key, None)
        self.backoff.clear()
        self.first_due = math.inf
        for key in keys:
            self.settled(key)

    def clear(self) -> None:
        """Forget every key (a new app run: the old workers are gone); the
        change count goes on."""
        self.waiting.clear()
        self.later.clear()
        self.order.clear()
        self.in_flight.clear()
        self.read.clear()
        self.backoff.clear()
        self.attempts.clear()
        self.first_due = math.inf
        self.waiters.clear()

    # -- settle --------------------------------------------------------------

    def settled(self, key: object) -> None:
        """``key`` needs no try (any more): the map's state is already there,
        or its work was dropped."""
        if self.waiters:
            self._covered(key, self.seq)

    def outside_done(self, key: object) -> None:
        """A run of ``key`` that this queue did not hold (a child's own) is over."""
        if self.waiters:
            self._covered(key, -1)

    def _covered(self, key: object, covered: int) -> None:
        remaining = []
        for waiter in self.waiters:
            keys = waiter.keys
            need = keys.get(key)
            if need is not None and covered >= need:
                del keys[key]
            if keys:
                remaining.append(waiter)
            else:
                waiter.event.set()
        self.waiters = remaining

    def changes_waiting(self, key: K) -> bool:
        """Whether a DELIVER waits for ``key`` (a change its try must read)."""
        first = self.waiting.get(key)
        if first is None:
            return False
        if first is DELIVER_WORK:
            return True
        later = self.later.get(key)
        return later is not None and any(work is DELIVER_WORK for work in later)

    def outstanding(self) -> dict[object, int]:
        """What a ``settle()`` called now waits for: each key with work, and
        the change number a try of it must cover: now, for a change that
        waits; what the try in flight read, for a key with none waiting;
        any try (``-1``) for other work."""
        now = self.seq
        need: dict[object, int] = {}
        read = self.read
        for key in self.waiting:
            need[key] = now if self.changes_waiting(key) else -1
        for key in self.in_flight:
            if key not in need:
                need[key] = read.get(key, -1)
            elif need[key] < 0 and key in read:
                need[key] = read[key]
        for key in self.backoff:
            need.setdefault(key, -1)
        return need

    def outstanding_of(self, keys: Iterable[K]) -> dict[object, int]:
        """:meth:`outstanding` for ``keys`` only, and only for a try waiting
        or under way (not one backing off)."""
        now = self.seq
        need: dict[object, int] = {}
        read = self.read
        for key in keys:
            if key in self.waiting:
                need[key] = now if self.changes_waiting(key) else read.get(key, -1)
            elif key in self.in_flight:
                need[key] = read.get(key, -1)
        return need

    async def settle(self, need: dict[object, int]) -> None:
        """Wait until each key of ``need`` has been covered (see :meth:`outstanding`)."""
        if not need:
            return
        waiter = _Waiter(need)
        self.waiters.append(waiter)
        await waiter.event.wait()

    def release(self) -> None:
        """The consumer ends: every settle waiter returns."""
        for waiter in self.waiters:
            waiter.event.set()
        self.waiters.clear()
