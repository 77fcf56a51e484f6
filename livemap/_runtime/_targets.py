"""Keyed targets: collections of owned target states, diffed by
``livemap_core`` and applied through a sink.

Every target keeps a :class:`livemap_core.Table`: for each key, the value and
the component that declared it.  A component's declarations are buffered
during its run and committed when it returns; the table turns them into
upserts and deletes, which the target applies.  :class:`LiveMap` is one
target; :class:`KeyedTarget` is the same machinery with a user-given sink.
"""

from __future__ import annotations

import inspect
import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio
from anyio.lowlevel import RunVar

from livemap._paths import StablePath, format_path
from livemap._runtime._hosting import Owner, current_run_var
from livemap._runtime._tables import DeclarerDoc, new_declarer, new_table
from livemap.errors import (
    KeyConflictError,
    NotInComponentError,
    TargetApplyError,
    ValueComparisonError,
)
from livemap_core import CONFLICT, Buffer, Commit, Declarer, Table, TableStats

__all__ = ["KeyedTarget", "SinkGate", "SinkTarget", "TargetBase", "TargetBatch"]

K = TypeVar("K")
V = TypeVar("V")

_ids = itertools.count(1)


class TargetBatch(Generic[K, V]):
    """One commit's changes, as a sink receives them.

    ``upserts``: ``(key, value)`` for keys that appeared or changed under
    ``==``; ``deletes``: keys that disappeared; ``owner``: the committing
    component's path; ``first_seq`` / ``last_seq``: the changes' sequence
    numbers (upserts first, then deletes).

    Read-only: setting a field raises ``AttributeError``.  Two batches are
    equal when their fields are.
    """

    # (fields behind read-only properties, not a frozen dataclass: its
    # constructor cost most of a one-key commit's sink call; ``_of``: the
    # committing owner whose path ``owner`` is, made on first read, since
    # most sinks never read it)
    __slots__ = ("_deletes", "_first_seq", "_last_seq", "_of", "_owner", "_upserts")

    def __init__(
        self,
        upserts: list[tuple[K, V]],
        deletes: list[K],
        owner: StablePath,
        first_seq: int,
        last_seq: int,
    ) -> None:
        self._upserts = upserts
        self._deletes = deletes
        self._owner: StablePath | None = owner
        self._of: Owner | None = None
        self._first_seq = first_seq
        self._last_seq = last_seq

    @property
    def upserts(self) -> list[tuple[K, V]]:
        return self._upserts

    @property
    def deletes(self) -> list[K]:
        return self._deletes

    @property
    def owner(self) -> StablePath:
        owner = self._owner
        if owner is None:
            assert self._of is not None
            owner = self._owner = self._of.path  # (a component's path never changes)
            self._of = None
        return owner

    @property
    def first_seq(self) -> int:
        return self._first_seq

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def __len__(self) -> int:
        return len(self._upserts) + len(self._deletes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TargetBatch):
            return NotImplemented
        return (
            self._upserts == other._upserts
            and self._deletes == other._deletes
            and self.owner == other.owner
            and self._first_seq == other._first_seq
            and self._last_seq == other._last_seq
        )

    __hash__ = None  # type: ignore[assignment]  # (its lists make it unhashable)

    def __repr__(self) -> str:
        return (
            f"TargetBatch(upserts={self._upserts!r}, deletes={self._deletes!r}, "
            f"owner={self.owner!r}, first_seq={self._first_seq!r}, "
            f"last_seq={self._last_seq!r})"
        )


class SinkGate:
    """A target's lock on one event loop: the commits that reach its sink
    go one at a time, in the order they asked.

    A free gate is taken without an event-loop step and without asking the
    loop anything (a commit per per-entry run made the lock's own cost a
    good part of that run's); a busy one queues an :class:`anyio.Event`
    per waiter, made by the waiter on its own loop.  ``busy``: a task holds
    the gate; ``waiters``: the tasks waiting, in order.  Invariant: a
    waiter's event is set only as the gate passes to it (``busy`` stays
    true), so the task that wakes holds it.  Not re-entrant.
    """

    __slots__ = ("busy", "waiters")

    def __init__(self) -> None:
        self.busy = False
        self.waiters: deque[anyio.Event] = deque()

    async def wait(self) -> None:
        """Wait for the busy gate to pass to this task."""
        event = anyio.Event()
        self.waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                self.release()  # it passed to us as we were cancelled: pass it on
            else:
                self.waiters.remove(event)
            raise

    async def acquire(self) -> None:
        if self.busy:
            await self.wait()
        else:
            self.busy = True

    def release(self) -> None:
        waiters = self.waiters
        if waiters:
            waiters.popleft().set()  # (busy stays true: the gate passes on)
        else:
            self.busy = False

    __aenter__ = acquire  # (no frame of its own: a commit takes it each time)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class TargetBase(Generic[K, V]):
    """The runtime's keyed targets: a table of owned entries, committed into
    by component runs (it implements :class:`._hosting.Target`)."""

    __slots__ = ("__weakref__", "_table", "name")

    def __init__(self, name: str, *, track_undo: bool) -> None:
        self.name = name
        self._table: Table[K, V] = new_table(name, track_undo=track_undo)

    def holds(self, component: Owner) -> bool:
        """Whether ``component`` holds or claims a key of this target."""
        table = self._table
        return table.count_of(component) > 0 or bool(table.claims_of(component))

    def _defer(self, component: Owner, buffer: Buffer[K, V]) -> bool:
        """Whether a commit of ``buffer`` by ``component`` defers the drops it
        makes (:attr:`Owner.defers_drops`): asked only if the commit can let
        go of a key (``Table.lets_go``), since an owner that declares again
        every key it holds has nothing to drop (a per-entry child's first
        commit, or its re-run with a new value: the common cases)."""
        return self._table.lets_go(buffer) and component.defers_drops

    def _settled(self, component: Owner, result: Commit[K, V]) -> bool:
        """After a commit (or release) ``result`` of ``component`` reached the
        sink: claimants that got keys hold this target now, and drops the
        commit deferred wait for its update to settle.  True if they cannot
        (the update ended meanwhile): then the caller applies them at once."""
        if result.transfers:
            self._adopt_transfers(result, component)
        if self._table.deferred_of(component):
            job = partial(self._drop_deferred, component)
            return not component.settle_after(
                (self, component), job, on_stop=True, batch=self.drop_deferred_batch
            )
        return False

    def _adopt_transfers(self, result: Commit[K, V], committer: Owner | None = None) -> None:
        """The claimants that got keys in ``result`` (``committer`` aside:
        it holds this target already) hold this target now."""
        for _, _, new in result.transfers:
            if new is not committer:
                owner: Owner = new  # type: ignore[assignment]  # the table's owners are Owners
                owner.adopt(self)

    def _dropped(self, components: list[Owner], result: Commit[K, V]) -> None:
        """After the deferred drops of ``components`` (one commit, ``result``)
        reached the sink: claimants that got keys hold this target now, and
        a component that holds nothing here any more lets go of it."""
        if result.transfers:
            self._adopt_transfers(result)
        for component in components:
            if not self.holds(component):
                component.disown(self)  # (a run that leaves nothing may rest then)

    async def drop_deferred_batch(self, components: list[Owner], scope: Owner) -> None:
        """Delete the keys ``components`` dropped in the update of ``scope``,
        which has settled, and nobody took: here one component after the
        other; a target that can sends them as one batch."""
        for component in components:
            await self._drop_deferred(component)

    def _let_go(self, component: Owner) -> Commit[K, V]:
        """``component`` lets go of every key it holds here (it declared none
        this time, or it is unmounted): within an update in progress, as a
        commit of nothing whose drops wait for the update to settle."""
        table = self._table
        if component.defers_drops:
            return table.commit(table.buffer(component), True)
        return table.release(component)

    async def _drop_deferred(self, component: Owner) -> None:
        """Delete the keys ``component`` dropped in its update and nobody took."""
        if not self._table.deferred_of(component):
            return  # declared again, taken over or released meanwhile
        failed = await self._apply_deferred(component)
        if failed is not None:
            await component.report(failed)
        elif not self.holds(component):
            component.disown(self)  # (a run that leaves nothing may rest then)

    async def _apply_deferred(self, component: Owner) -> Exception | None:
        raise NotImplementedError

    async def _report_rejections(self, component: Owner, result: Commit[K, V]) -> None:
        for rejection in result.rejections:
            if rejection.kind == CONFLICT:
                # a claim: reported once the update that made it has settled,
                # unless the key has passed to the claimant by then
                key, holder = rejection.key, rejection.holder
                job = partial(self._report_claim, component, key, holder)
                if not component.settle_after((self, component, key), job, holder):
                    await job()
                continue
            exc = ValueComparisonError(rejection.key, self.name, rejection.error)
            exc.__cause__ = rejection.error
            await component.report(exc)

    async def _report_claim(self, claimant: Owner, key: Any, holder: Any) -> None:
        """Report ``claimant``'s claim on ``key`` if it is still pending."""
        table = self._table
        if not claimant.alive or claimant not in table.claimants(key):
            return  # withdrawn, or the key has passed to the claimant
        holder = table.owner_of(key, holder)
        exc = KeyConflictError(
            key,
            self.name,
            getattr(holder, "path_str", repr(holder)),
            claimant.path_str,
            owner_app=getattr(holder, "app_name", None),
            declarer_app=claimant.app_name,
        )
        await claimant.report(exc)

    async def commit_run(
        self, component: Owner, buffer: Buffer[K, V], gen: int
    ) -> Exception | None:
        """Commit one run's buffer (unless run ``gen`` of ``component`` has been
        superseded or unmounted by then); return the sink's failure, if any."""
        raise NotImplementedError

    async def release_owner(self, component: Owner, gen: int | None = None) -> Exception | None:
        """Delete everything ``component`` holds (for a commit of run ``gen``:
        unless it has been superseded); return the sink's failure, if any."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, key: object) -> bool:
        return key in self._table

    def get(self, key: K, default: Any = None) -> Any:
        """The value currently held for ``key``, or ``default``."""
        return self._table.get(key, default)

    def items(self) -> list[tuple[K, V]]:
        """A snapshot of every ``(key, value)``."""
        return self._table.items()

    def owner_path(self, key: K) -> StablePath | None:
        """The path of the component owning ``key``, or ``None``."""
        owner = self._table.owner_of(key)
        return None if owner is None else owner.path

    def table_stats(self) -> TableStats:
        """The core's counters: entries, commits, changes, suppressed, conflicts, eq_errors."""
        return self._table.stats()


Sink = Callable[[TargetBatch[K, V]], "Awaitable[None] | None"]

_DECLARE_DOC = """Declare ``key -> value`` as owned by the current component run.

Buffered, and committed when the run returns: the target's ``apply`` then
gets the changes.

Raises ``TypeError`` for a key that is not a stable key,
:class:`~livemap.errors.DuplicateDeclarationError` for a key declared twice
in one run (the first declaration stands) and
:class:`~livemap.errors.NotInComponentError` outside a component run.  A key
another component holds and still declares is not applied: it is kept as
a claim while the component keeps declaring it, the key passes to it
(without a delete) when its owner lets it go, and a
:class:`~livemap.errors.KeyConflictError` goes to the run's
exception-handler chain if the update that made the claim settles with the
claim still pending.  A key the old owner drops in the same update (it
stops declaring it or is unmounted) is a transfer: one upsert, no error.
"""

# what help(target.declare) and inspect.signature show (see DeclarerDoc)
_DECLARE = DeclarerDoc("declare", "KeyedTargetDeclarer", __name__, _DECLARE_DOC)


class SinkTarget(TargetBase[K, V]):
    """A target whose commits reach an outside sink, one at a time under a
    lock: what :class:`KeyedTarget` and a Redis-backed map share.

    The lock (a :class:`SinkGate`) is kept per event loop, and a target may
    be used on one loop after another (each ``anyio.run`` or
    ``update_blocking`` makes its own): one gate per loop, kept by the loop
    and gone with it, so a loop that ended with the gate held leaves nothing
    behind for the next.  A committing component's app run keeps the gate
    it found (``Owner.loop_cache``), so a commit finds it with a dict
    look-up instead of asking the loop.
    ``_orphans``: components whose deletes the sink did not take (an
    unmounted one's release, or the held drops of any one that reached the
    sink after its update settled); each stays listed until they are
    applied, retried before every commit.  (A listed component that holds
    drops for an update still in progress has them applied by that retry
    too: after a failed sink, a transfer may become a delete and an insert,
    never a lost delete.)
    A subclass sends changes with :meth:`_send_drops` (for releases and
    deferred drops) and commits with its own ``commit_run``.
    """

    __slots__ = ("_locks", "_orphans")

    def __init__(self, name: str, *, track_undo: bool) -> None:
        super().__init__(name, track_undo=track_undo)
        self._locks: RunVar[SinkGate] = RunVar(f"livemap target {name} #{next(_ids)}")
        self._orphans: list[Owner] = []

    def _get_lock(self, owner: Owner | None = None) -> SinkGate:
        """The target's gate on the running event loop (made on first use);
        ``owner``: the component on whose behalf, whose app run's
        ``loop_cache`` keeps it."""
        cache = None if owner is None else owner.loop_cache
        if cache is not None:
            gate: SinkGate | None = cache.get(self)
            if gate is not None:
                return gate
        gate = self._locks.get(None)
        if gate is None:
            gate = SinkGate()
            self._locks.set(gate)
        if cache is not None:
            cache[self] = gate
        return gate

    async def _send_drops(self, component: Owner, result: Commit[K, V]) -> Exception | None:
        """Send a release or a deferred drop of ``component`` to the sink; on
        failure the table goes back to before ``result`` and the error is
        returned."""
        raise NotImplementedError

    async def _retry_orphans(self) -> None:
        # Each stays listed until its deletes are applied: a retry cut short
        # (the committing run cancelled in the sink) leaves it for the next.
        orphans = self._orphans
        table = self._table
        for component in list(orphans):
            # a mounted one keeps what it declares: only its drops go
            result = table.drop_deferred(component) if component.alive else table.release(component)
            if await self._send_drops(component, result) is None:
                orphans.remove(component)
                self._settled(component, result)

    def _keep_unsent(self, components: list[Owner]) -> None:
        """Held drops of ``components`` were cut short before the sink took
        them (not sent, or taken back): those still held are retried with
        the next batch."""
        deferred_of = self._table.deferred_of
        for component in components:
            if deferred_of(component):
                self._orphan(component)

    def _orphan(self, component: Owner) -> None:
        """``component``'s deletes did not reach the sink: retry them."""
        if component not in self._orphans:
            self._orphans.append(component)

    async def release_owner(self, component: Owner, gen: int | None = None) -> Exception | None:
        async with self._get_lock(component):
            if self._orphans:
                await self._retry_orphans()
            if gen is not None and not component.current(gen):
                return None
            result = self._let_go(component)
            failed = await self._send_drops(component, result)
            drop_now = failed is None and self._settled(component, result)
            if failed is not None and not component.alive:
                self._orphan(component)
        if drop_now:
            failed = await self._drop_now(component)
        return failed

    async def _drop_now(self, component: Owner) -> Exception | None:
        """Apply the drops a commit (or release) of ``component`` deferred for
        an update that ended before they could wait for it to settle: nobody
        else will.  Interrupted (cancelled at the gate or in the sink, or a
        ``BaseException``), they are applied again, shielded, before the
        interruption goes on; if the sink fails that time too, they stay
        listed (see ``_orphans``) and the first interruption goes on."""
        try:
            return await self._apply_deferred(component)
        except BaseException:
            with anyio.CancelScope(shield=True):
                try:
                    await self._apply_deferred(component)
                except BaseException:  # (listed by _apply_deferred)
                    pass
            raise

    async def _apply_deferred(self, component: Owner) -> Exception | None:
        table = self._table
        async with self._get_lock(component):
            try:
                if self._orphans:
                    await self._retry_orphans()
                result = table.drop_deferred(component)
                failed = await self._send_drops(component, result)
            except BaseException:
                self._keep_unsent([component])
                raise
            if failed is None:
                self._settled(component, result)  # (nothing is deferred any more)
            else:  # mounted or not: nothing else would send these deletes again
                self._orphan(component)
            return failed


class KeyedTarget(SinkTarget[K, V]):
    """A user-defined keyed target: owned entries applied through ``apply``.

    ``apply(batch)`` (sync or async) receives a :class:`TargetBatch` for each
    commit that changed something, in commit order, never two at once.
    Components declare entries with :meth:`declare` during their runs; an
    entry disappears when its component stops declaring it or is unmounted.

    If ``apply`` raises, the batch counts as not applied: the target's record
    goes back to what it was before it, so the owner's next commit sends the
    same changes again, and the owner's run counts as failed with a
    :class:`~livemap.errors.TargetApplyError` (the original exception is its
    ``__cause__``): reported to its exception-handler chain, retried under a
    ``mount_each`` retry policy.  Deletes of an unmounted component that
    failed to apply are retried with the target's next batch.
    """

    __slots__ = {
        "_apply": None,
        "declare": "``target.declare(key, value) -> None``: " + _DECLARE_DOC,
    }

    def __init__(self, name: str, apply: Sink[K, V]) -> None:
        super().__init__(name, track_undo=True)
        self.declare: Declarer[K, V] = new_declarer(
            self._table,
            self,
            current_run_var,
            partial(NotInComponentError, f"{name}.declare()", target=name),
            partial(RuntimeError, f"{name} takes no declarations"),
            doc=_DECLARE,
        )
        """``target.declare(key, value) -> None``: see ``help(target.declare)``."""
        self._apply = apply

    def __repr__(self) -> str:
        return f"<KeyedTarget {self.name} entries={len(self._table)}>"

    async def _send(self, component: Owner, result: Commit[K, V]) -> Exception | None:
        if not result:
            return None
        # the batch of ``result``, made here rather than by a constructor of
        # its own (a frame per commit); its ``owner`` is read on first use
        batch: TargetBatch[K, V] = TargetBatch.__new__(TargetBatch)
        batch._upserts = result.upserts
        batch._deletes = result.deletes
        batch._owner = None
        batch._of = component
        batch._first_seq = result.first_seq
        batch._last_seq = result.last_seq
        try:
            outcome = self._apply(batch)
            if outcome is not None and inspect.isawaitable(outcome):
                await outcome
        except BaseException as exc:
            self._table.revert(result)
            if isinstance(exc, Exception):
                error = TargetApplyError(
                    self.name, format_path(component.path), len(batch.upserts), len(batch.deletes)
                )
                error.__cause__ = exc
                return error
            raise
        return None

    _send_drops = _send  # a release is sent like a commit

    async def drop_deferred_batch(self, components: list[Owner], scope: Owner) -> None:
        """The keys ``components`` dropped in ``scope``'s update, which has
        settled, go as one commit and one batch (its ``owner``: ``scope``'s
        path).  If the sink raises, the batch is taken back and it is as if
        each component's own batch had failed: each one with keys in it gets
        a :class:`TargetApplyError` naming it (the sink's exception is the
        cause), and its deletes are retried with the target's next batch."""
        if len(components) == 1:
            await self._drop_deferred(components[0])
            return
        table = self._table
        failures: list[tuple[Owner, Exception]] = []
        async with self._get_lock(scope):
            try:
                if self._orphans:
                    await self._retry_orphans()
                result = table.drop_deferred_many(components)
                failed = await self._send(scope, result)
            except BaseException:
                self._keep_unsent(components)
                raise
            if failed is None:
                self._dropped(components, result)
                return
            for component in components:
                keys = table.deferred_of(component)
                if keys:
                    own = TargetApplyError(self.name, format_path(component.path), 0, len(keys))
                    own.__cause__ = failed.__cause__
                    failures.append((component, own))
                    self._orphan(component)
        for component, exc in failures:  # (outside the lock, as a commit's reports)
            await component.report(exc)

    async def commit_run(
        self, component: Owner, buffer: Buffer[K, V], gen: int
    ) -> Exception | None:
        gate = self._get_lock(component)
        if gate.busy:
            await gate.wait()
        else:
            gate.busy = True  # (the gate's acquire, without its frame)
        try:
            if self._orphans:
                await self._retry_orphans()
            if not component.current(gen):
                return None  # superseded while waiting: the newer run decides
            table = self._table
            result = table.commit(buffer, self._defer(component, buffer))
            # The sink gets the changes before a handler can hold them up: a
            # report interrupted (the run superseded, stopped or cancelled)
            # must not leave the record ahead of the sink.
            failed = await self._send(component, result) if result else None
            # (_settled only if it has anything to do: most commits transfer
            # and defer nothing, and its frame is one per per-entry commit)
            drop_now = (
                failed is None
                and bool(result.transfers or table.deferred_of(component))
                and self._settled(component, result)
            )
        finally:
            gate.release()
        if drop_now:
            failed = await self._drop_now(component)
        if result.rejections:
            # (outside the lock: a slow handler holds back no other commit)
            await self._report_rejections(component, result)
        return failed
