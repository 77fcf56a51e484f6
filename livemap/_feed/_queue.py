"""A consumer's work-queue: every key with work to do, and where it stands.

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
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import anyio

__all__ = ["WorkQueue"]

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
