"""Work-queues: every key with work to do, and where it stands.

Two queues, one per worker set: a consumer's :class:`WorkQueue` (the keys
of a map with changes to deliver) and a pool's :class:`RunQueue` (the runs
of a ``mount_each``'s children, by key).  Each owns the whole life of a key
on its side: a worker takes a key, runs it, marks it done, and the queue
alone decides what follows.

**The consumer's queue.**
One :class:`WorkQueue` per consumer holds each key's consumer-side life: it
is *waiting* (changed, not taken yet), *in flight* (taken: a try of it is
under way), *dirty* (in flight and changed again since its try read the
map), or absent (nothing to do).  A worker takes a key, runs one try of it
(reads the key's latest state from the map and delivers it), and marks it
done; :meth:`WorkQueue.done` is the one place that decides what happens
after a try: a dirty key waits again, and the ``settle()`` waiters the try
covered are released.

Coalescing comes from the map: a key that changed fifty times while it
waited is one waiting key, and its try reads the latest state, so the work
waiting is bounded by the number of distinct keys.  A key is never in
flight twice, so it is never processed twice at once, and its tries run in
the order of its changes.

**The pool's queue.**  :class:`RunQueue` holds what a pool's workers run,
by the key of the child it is for: the work *waiting* for each key (its
latest run, after any cleanup still to do), the keys *in flight* (a worker
runs one of their works), and the keys *backing off* (a failed try waits
out its retry policy's delay).  A key in flight is not taken again until
it is done, also when a re-mount or a newer value cancelled its run; a
newer run replaces the one waiting (coalescing) and cuts a backoff short,
with a fresh count of attempts.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeAlias, TypeVar

import anyio

__all__ = ["Kind", "RunQueue", "Work", "WorkQueue"]

K = TypeVar("K")


class _Waiter:
    """One ``settle()`` call: ``keys`` maps each key it waits for to the
    change number its try must have started at (or after) to cover every
    change made before the call."""

    __slots__ = ("event", "keys")

    def __init__(self, keys: dict[object, int]) -> None:
        self.keys = keys
        self.event = anyio.Event()


class WorkQueue(Generic[K]):
    """The keys a consumer has work for (internal).

    Invariants, for every key:

    * ``order`` holds each key of ``waiting`` once, oldest change first;
      ``waiting`` and ``in_flight`` never share a key.
    * ``in_flight`` maps a key taken by a worker (or handed straight to a
      per-entry run) to the change number ``seq`` at which its try read the
      map: the try covers every change up to it.  ``-1``: a try that did not
      read the map for this queue (one the initial scan started), which
      covers nothing the queue counted.
    * ``dirty`` is a subset of ``in_flight``: keys that changed after their
      try read the map; :meth:`done` makes them wait again.
    * ``seq`` counts :meth:`changed` calls (one per commit); a ``settle()``
      waiter needs each key it waits for covered at the ``seq`` of its call.
    * ``waiters`` hold the keys they wait for, each until a try that covers
      the waiter's changes is done, or the key turns out to need no try.
    """

    __slots__ = ("dirty", "in_flight", "order", "seq", "waiters", "waiting")

    def __init__(self) -> None:
        self.order: deque[K] = deque()
        self.waiting: set[K] = set()
        self.in_flight: dict[K, int] = {}
        self.dirty: set[K] = set()
        self.seq = 0
        self.waiters: list[_Waiter] = []

    def __len__(self) -> int:
        """How many keys have work: waiting or in flight."""
        return len(self.waiting) + len(self.in_flight)

    def idle(self) -> bool:
        return not self.order and not self.in_flight

    # -- changes -------------------------------------------------------------

    def changed(self) -> int:
        """A commit changed keys: a new change number (then :meth:`add` each)."""
        self.seq += 1
        return self.seq

    def add(self, key: K) -> None:
        """``key`` changed: it waits (once), or, in flight, is dirty."""
        if key in self.in_flight:
            self.dirty.add(key)
        elif key not in self.waiting:
            self.waiting.add(key)
            self.order.append(key)

    # -- taking keys ---------------------------------------------------------

    def take(self) -> K | None:
        """The oldest waiting key, now in flight; ``None`` if none waits."""
        order = self.order
        if not order:
            return None
        key = order.popleft()
        self.waiting.discard(key)
        self.in_flight[key] = self.seq
        return key

    def pop(self) -> K | None:
        """The oldest waiting key, no longer waiting and not in flight yet
        (the caller puts it in flight, or finds it needs no try)."""
        order = self.order
        if not order:
            return None
        key = order.popleft()
        self.waiting.discard(key)
        return key

    def begin(self, key: K) -> None:
        """``key`` (not waiting) goes in flight at once, read now."""
        self.in_flight[key] = self.seq

    def hold(self, key: K) -> None:
        """``key`` (not waiting) goes in flight behind a try this queue did
        not start (the initial scan's), which covers nothing it counted."""
        self.in_flight.setdefault(key, -1)

    def restart(self, key: K) -> None:
        """``key``'s try in flight starts over now with the latest state (a
        retry cut short by a newer value)."""
        self.in_flight[key] = self.seq

    # -- after a try ---------------------------------------------------------

    def done(self, key: K) -> None:
        """``key``'s try is over (its ``finally`` included): the one place
        that decides what follows.  Dirty, it waits again; the settle
        waiters its try covered are released."""
        covered = self.in_flight.pop(key, -1)
        if key in self.dirty:
            self.dirty.discard(key)
            if key not in self.waiting:
                self.waiting.add(key)
                self.order.append(key)
        if self.waiters:
            self._covered(key, covered)

    def settled(self, key: K) -> None:
        """``key`` needed no try: the map's state was already there."""
        if self.waiters:
            self._covered(key, self.seq)

    def outside_done(self, key: K) -> None:
        """A try of ``key`` that this queue did not start (the initial
        scan's) is over."""
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

    # -- settle --------------------------------------------------------------

    def outstanding(self) -> dict[object, int]:
        """What a ``settle()`` called now waits for: each key with work, and
        the change number a try of it must cover."""
        now = self.seq
        need: dict[object, int] = dict.fromkeys(self.waiting, now)
        dirty = self.dirty
        for key, covered in self.in_flight.items():
            need[key] = now if key in dirty else covered
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


class Kind:
    """What a work is: the first item of every work a :class:`RunQueue`
    holds (a work is a tuple ``(kind, *what)``, made and read without a
    Python call)."""

    __slots__ = ("name", "replaceable")

    def __init__(self, name: str, *, replaceable: bool = True) -> None:
        self.name = name
        # Whether a newer work for the key replaces this one while it waits
        # (a run: the newer one runs the latest state); False for work that
        # must happen even so (a cleanup).
        self.replaceable = replaceable

    def __repr__(self) -> str:
        return f"<work kind {self.name}>"


Work: TypeAlias = tuple[Any, ...]
"""``(kind, *what)``: one piece of work for a key, ``kind`` a :class:`Kind`."""


class RunQueue(Generic[K]):
    """The runs a pool's workers take, by key (internal).

    One field per state of a key.  A key is in at most one of ``order``,
    ``in_flight`` and ``backoff``, except that a key goes into ``backoff``
    from the try in flight that failed, which ends right after; a key in
    flight may have work in ``waiting`` (its turn comes when it is done).
    """

    __slots__ = (
        "attempts",
        "backoff",
        "first_due",
        "in_flight",
        "later",
        "order",
        "waiting",
    )

    def __init__(self) -> None:
        # key -> the work it waits to run first.  Invariant: no key is both
        # here and in ``backoff`` (newer work cuts a backoff short).
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
        # key -> the work a worker runs for it.  Invariant: one work per key
        # at a time ("never twice at once"); set by :meth:`take`, cleared by
        # :meth:`done` only, after the run is over (its ``finally`` included).
        self.in_flight: dict[K, Work] = {}
        # key -> (when, work): a failed try waiting out its delay before
        # ``work`` (the try again) waits.  Set by :meth:`retry`; cleared by
        # :meth:`due` at ``when``, or by newer work for the key (:meth:`add`),
        # :meth:`forget`, :meth:`discard` or :meth:`cancel_backoff`.
        self.backoff: dict[K, tuple[float, Work]] = {}
        # no backoff ends before this (``inf``: none waits); may be early
        self.first_due = math.inf
        # key -> the failed tries in a row of the key's latest value (the
        # retry policy's count).  Invariant: only keys backing off, or whose
        # try again waits or is in flight; newer work for the key, or the
        # end of its tries (done without a backoff, giving up) removes it.
        self.attempts: dict[K, int] = {}

    def __len__(self) -> int:
        """How many keys have work waiting."""
        return len(self.waiting)

    # -- adding work ---------------------------------------------------------

    def add(self, key: K, work: Work) -> None:
        """``work`` for ``key``: a run replaces the key's run waiting last, if
        any, other work waits after it; either cuts a backoff short (a fresh
        count of attempts)."""
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
        if last[0].replaceable and work[0].replaceable:  # the newer run replaces it
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

    def done(self, key: K) -> None:
        """``key``'s work in flight is over (its ``finally`` included): the
        key's next waiting work, if any, is taken before newer keys."""
        del self.in_flight[key]
        if key in self.waiting:
            self.order.appendleft(key)
        elif self.attempts and key not in self.backoff:
            self.attempts.pop(key, None)  # its tries are over

    def retry(self, key: K, again: Work, max_attempts: int, delay: Callable[[int], float]) -> bool:
        """``key``'s try failed: with tries left (``max_attempts`` in all),
        ``again`` waits ``delay(failed)`` in :attr:`backoff` and ``True``;
        else the key's count ends and ``False`` (the failure stands)."""
        failed = self.attempts.get(key, 0) + 1
        if failed >= max_attempts:
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
            self.backoff.pop(key, None)

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
        for key in self.backoff:
            self.attempts.pop(key, None)
        self.backoff.clear()
        self.first_due = math.inf

    def clear(self) -> None:
        """Forget everything (a new app run: the old workers are gone)."""
        self.waiting.clear()
        self.later.clear()
        self.order.clear()
        self.in_flight.clear()
        self.backoff.clear()
        self.attempts.clear()
        self.first_due = math.inf
