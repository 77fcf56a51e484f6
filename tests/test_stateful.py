"""A stateful test of the runtime and LiveMap against a plain-Python model.

A hypothesis ``RuleBasedStateMachine`` drives one live app per example.  The
app runs in a background thread (an anyio blocking portal); each rule sends
a job to a live *controller* component inside the app, which mounts, re-runs
and unmounts producer components with random declaration sets (equal values,
conflicts between producers, duplicate keys in one run, runs that raise,
bursts of runs that change a key and change it back), and starts, stops and
restarts the consumer (a ``mount_each`` over the map whose per-entry
components declare into a ``KeyedTarget``, the downstream view) with varying
speed, concurrency, retry policy, and a processor that may fail on some
values.  Hostile steps: a producer run cancelled by a re-mount or an unmount
while it waits (it must commit nothing), a declaration made in a finished
run's context (``NotInComponentError``, nothing changes), a slow async
exception handler, and the consumer re-mounted with new arguments while its
keys run (their cleanups await).  Each example's ``App`` has the same name,
so it continues the tree the previous example left, as a restarted process
would.

After every step the map (entries, owners, counters, reported exceptions)
equals the model; after every settle (``lm.settle()`` plus the consumer's
readiness) the downstream view equals the model too (a key whose current
value fails keeps the last value processed, and is among ``failing``).
Throughout, every consumer call must answer a real change (never a call for
the value the consumer already has, retries of a failed value aside), each
key's calls must follow the order of that key's changes, and no key is
processed twice at once (the processor's cleanup awaits).

Profiles (``HYPOTHESIS_PROFILE``): ``livemap-stateful`` (the default, also
used for ``ci``: 200 examples of up to 50 steps on each backend) and
``livemap-stateful-long`` (alias ``long``: 1,000 examples of up to 100
steps).  Other values leave the default in place.  The profiles are applied
to this machine only (never loaded globally).
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
import anyio.from_thread
import pytest
from anyio.from_thread import BlockingPortal
from helpers import TIMEOUT, current_tasks
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

import livemap as coco
from livemap import KeyedTarget, LiveMap, Symbol, TargetBatch

settings.register_profile(
    "livemap-stateful",
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "livemap-stateful-long",
    max_examples=1_000,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
_requested = os.environ.get("HYPOTHESIS_PROFILE", "")
LONG = _requested in ("long", "livemap-stateful-long")
PROFILE = settings.get_profile("livemap-stateful-long" if LONG else "livemap-stateful")

KEYS: tuple[Any, ...] = ("a", "b", "c", "d", ("t", 1), 7)
SLOTS = 3
POISON = 2  # a consumer started with ``poison`` fails on values ``[key, POISON]``
ABSENT = "<absent>"  # a key's state in a history: not in the map
DELETED = "<deleted>"  # an observation: the consumer's per-entry component was removed


class ProducerFailure(RuntimeError):
    """What a producer run that is meant to fail raises."""


# -- the world the app sees ----------------------------------------------------------


@dataclass
class Epoch:
    """One consumer (one mount of the ``mount_each``): what it was called with."""

    start: dict[Any, int]  # per key: index of the key's state in the history at start
    poison: bool = False  # whether processing a value ``[key, POISON]`` raises
    attempts: int = 1  # the retry policy's max_attempts (1: no retry policy)
    seen: dict[Any, Any] = field(default_factory=dict)  # the value of the key's latest call
    fails: dict[Any, int] = field(default_factory=dict)  # failed calls with that value
    last_ok: dict[Any, Any] = field(default_factory=dict)  # the latest value processed
    obs: dict[Any, list[Any]] = field(default_factory=dict)
    calls: int = 0
    violations: list[str] = field(default_factory=list)
    sync: bool = False  # which processor (sync or async: two paths)
    # the consumer this one re-mounted at the same path, if any: the rows its
    # per-entry components committed stay until this one's commit replaces them
    inherits: Epoch | None = None
    ok: dict[Any, list[Any]] = field(default_factory=dict)  # every value processed
    # it replaced a consumer at another path (the other processor): that
    # one's rows are deleted where this one's components commit none
    replaces: bool = False

    def committed(self, key: Any) -> list[Any]:
        """The values this consumer's components (or those of the consumers
        it continues) may have left as ``key``'s row."""
        values: list[Any] = []
        epoch: Epoch | None = self
        while epoch is not None:
            values.extend(epoch.ok.get(key, ()))
            epoch = epoch.inherits
        return values


@dataclass
class Job:
    fn: Callable[[coco.LiveComponentOperator], Awaitable[Any]]
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Any = None
    error: BaseException | None = None


class World:
    """Everything the app's components share with the driver (touched only on
    the event loop's thread)."""

    def __init__(self) -> None:
        self.rows: dict[Any, Any] = {}
        self.down: KeyedTarget[Any, Any] = KeyedTarget("down", self._apply)
        self.epoch: Epoch | None = None
        self.delays: dict[Any, float] = {}
        self.duplicates: list[coco.DuplicateDeclarationError] = []
        self.reported: list[tuple[BaseException, coco.ExceptionContext]] = []
        self.lm: LiveMap[Any, list[Any]] | None = None
        self.consumer: coco.ComponentMountHandle | None = None
        self.send, self.recv = anyio.create_memory_object_stream[Job](10)
        # per key: how many consumer calls are running now, across consumers
        # (a re-mounted consumer's old runs included)
        self.running: dict[Any, int] = {}
        self.overlaps: list[Any] = []
        self.handler_delay = 0.0  # the (async) handler sleeps this long
        self.context: contextvars.Context | None = None  # a copy taken by a run
        # keys seen absent from the map after a producer's commit: a consumer
        # call for such a key afterwards is for a new entry (its per-entry
        # component was unmounted), not a repeat, even when the downstream
        # row never went away (the new component took it over)
        self.gone: set[Any] = set()

    def note_gone(self) -> None:
        """A producer change has committed: note the keys the map lost."""
        lm = self.lm
        assert lm is not None
        for key in KEYS:
            if key not in lm:
                self.gone.add(key)

    def _apply(self, batch: TargetBatch[Any, Any]) -> None:
        epoch = self.epoch
        for key in batch.deletes:
            del self.rows[key]
            if epoch is not None:
                # (not the end of the calls' record: the delete of a removed
                # component's row may come after its successor's first
                # calls; a new entry's calls are told apart by ``gone``)
                epoch.last_ok.pop(key, None)
                epoch.obs.setdefault(key, []).append(DELETED)
        for key, value in batch.upserts:
            self.rows[key] = value
            if epoch is not None and value in epoch.ok.get(key, ()):
                # a successor's commit after the late delete of its
                # predecessor's row (which forgot ``last_ok`` above)
                epoch.last_ok[key] = value

    async def handler(self, exc: BaseException, ctx: coco.ExceptionContext) -> None:
        self.reported.append((exc, ctx))
        if self.handler_delay:
            await anyio.sleep(self.handler_delay)

    def enter(self, key: Any) -> None:
        count = self.running.get(key, 0)
        if count:
            self.overlaps.append(key)
        self.running[key] = count + 1

    def leave(self, key: Any) -> None:
        self.running[key] -= 1


@coco.fn
async def producer(
    world: World, lm: LiveMap[Any, list[Any]], decls: list[tuple[Any, int]], raises: bool
) -> None:
    declare(world, lm, decls, raises)


@coco.fn
def sync_producer(
    world: World, lm: LiveMap[Any, list[Any]], decls: list[tuple[Any, int]], raises: bool
) -> None:
    declare(world, lm, decls, raises)


@coco.fn
async def gated_producer(
    world: World, lm: LiveMap[Any, list[Any]], decls: list[tuple[Any, int]], gate: anyio.Event
) -> None:
    """Declares, then waits for an event nobody sets: only cancellation (a
    re-mount or an unmount) ends this run, and it must commit nothing."""
    declare(world, lm, decls, False)
    await gate.wait()


@coco.fn
async def keeping_producer(
    world: World, lm: LiveMap[Any, list[Any]], decls: list[tuple[Any, int]]
) -> None:
    """Declares, and leaves a copy of its context behind (as a task or a
    thread it started would keep)."""
    declare(world, lm, decls, False)
    world.context = contextvars.copy_context()


def declare(
    world: World, lm: LiveMap[Any, list[Any]], decls: list[tuple[Any, int]], raises: bool
) -> None:
    for key, n in decls:
        try:
            # a fresh list each time: equal values are never the same object
            lm.declare_entry(key, [key, n])
        except coco.DuplicateDeclarationError as exc:
            world.duplicates.append(exc)
    if raises:
        raise ProducerFailure("producer run failed on purpose")


class Poisoned(ValueError):
    """What processing a poison value raises."""


def observe(world: World, epoch: Epoch, value: list[Any]) -> bool:
    """Record a consumer call; returns whether it must fail (a poison value)."""
    key, n = value
    epoch.calls += 1
    repeat = key in epoch.seen and epoch.seen[key] == value
    fresh = key in world.gone  # (a new entry's component: not a repeat)
    world.gone.discard(key)
    if world.lm is not None and world.lm.get(key) != value:
        # a value the map no longer holds (queued before it changed): the
        # change that followed is delivered next, so is the next call's
        world.gone.add(key)
    failed = epoch.fails.get(key, 0)
    if repeat and not failed and not fresh:
        epoch.violations.append(f"call for key {key!r} with its unchanged value {value!r}")
    if not repeat:
        # (a repeat after a failure is a retry, or a new child after the failed
        # one was removed: neither is a state of its own)
        epoch.obs.setdefault(key, []).append(n)
        failed = 0
    epoch.seen[key] = value
    if epoch.poison and n == POISON:
        epoch.fails[key] = failed + 1
        return True
    epoch.fails.pop(key, None)
    epoch.last_ok[key] = value
    epoch.ok.setdefault(key, []).append(value)
    return False


@coco.fn
async def process_entry(value: list[Any], world: World, epoch: Epoch) -> None:
    world.enter(value[0])
    try:
        poisoned = observe(world, epoch, value)
        delay = world.delays.get(value[0], 0.0)
        if delay:
            await anyio.sleep(delay)
        else:
            await anyio.sleep(0)
        if poisoned:
            raise Poisoned(f"poison value {value!r}")
        world.down.declare(value[0], value)
    finally:
        # a cleanup that awaits: the key must not run again before it is done
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0)
            world.leave(value[0])


@coco.fn
def process_entry_sync(value: list[Any], world: World, epoch: Epoch) -> None:
    world.enter(value[0])
    try:
        if observe(world, epoch, value):
            raise Poisoned(f"poison value {value!r}")
        world.down.declare(value[0], value)
    finally:
        world.leave(value[0])


@coco.fn
async def consumer_host(
    world: World, lm: LiveMap[Any, list[Any]], epoch: Epoch, concurrency: int | None, sync: bool
) -> None:
    retry = None
    if epoch.attempts > 1:
        retry = coco.RetryPolicy(max_attempts=epoch.attempts, initial_backoff=0.0)
    source: Any = lm
    if concurrency is not None or retry is not None:
        source = lm.consumer(concurrency=concurrency or 64, retry=retry)
    await coco.mount_each(process_entry_sync if sync else process_entry, source, world, epoch)


class Controller:
    """A live component running the driver's jobs, one at a time, in its own task."""

    def __init__(self, world: World) -> None:
        self.world = world

    def process(self) -> None:
        pass

    async def process_live(self, op: coco.LiveComponentOperator) -> None:
        await op.mark_ready()
        async with self.world.recv:
            async for job in self.world.recv:
                try:
                    job.result = await job.fn(op)
                except Exception as exc:
                    job.error = exc
                finally:
                    job.done.set()


CONTROLLER = (Symbol("Controller"),)


def producer_path(slot: int) -> tuple[Any, ...]:
    return (*CONTROLLER, "p", slot)


# -- the model -------------------------------------------------------------------------


class Model:
    """The contract, in plain Python: who owns what, what the map holds."""

    def __init__(self) -> None:
        self.entries: dict[Any, tuple[int, int]] = {}  # key -> (owner slot, n)
        self.history: dict[Any, list[Any]] = {key: [ABSENT] for key in KEYS}
        self.changes = 0
        self.suppressed = 0
        self.conflicts = 0
        # key -> the slots claiming it, first claim first; slot -> {key: n}
        self.claims: dict[Any, list[int]] = {}
        self.claimed: dict[int, dict[Any, int]] = {}

    def _unclaim(self, slot: int, key: Any) -> int:
        n = self.claimed[slot].pop(key)
        self.claims[key].remove(slot)
        if not self.claims[key]:
            del self.claims[key]
        return n

    def _let_go(self, key: Any) -> None:
        """The owner of ``key`` lets it go: its first claimant gets it (one
        change, or none if the value is equal), or it is deleted."""
        waiting = self.claims.get(key)
        if waiting:
            claimant = waiting[0]
            n = self._unclaim(claimant, key)
            held = self.entries[key][1]
            self.entries[key] = (claimant, n)
            if n == held:
                self.suppressed += 1
            else:
                self._set(key, n)
            return
        del self.entries[key]
        self._set(key, ABSENT)

    def _set(self, key: Any, state: Any) -> None:
        self.history[key].append(state)
        self.changes += 1

    def produce(
        self, slot: int, decls: list[tuple[Any, int]], raises: bool
    ) -> tuple[int, list[tuple[str, Any]]]:
        """Apply one run; returns (duplicates raised, exceptions reported)."""
        effective: dict[Any, int] = {}
        for key, n in decls:
            effective.setdefault(key, n)
        duplicates = len(decls) - len(effective)
        if raises:
            return duplicates, [("failure", slot)]
        reported: list[tuple[str, Any]] = []
        for key, n in effective.items():
            held = self.entries.get(key)
            if held is None:
                self.entries[key] = (slot, n)
                self._set(key, n)
            elif held[0] != slot:  # a claim, remembered
                self.conflicts += 1
                reported.append(("conflict", key))
                if key not in self.claimed.setdefault(slot, {}):
                    self.claims.setdefault(key, []).append(slot)
                self.claimed[slot][key] = n
            elif held[1] == n:
                self.suppressed += 1
            else:
                self.entries[key] = (slot, n)
                self._set(key, n)
        for key in [k for k in self.claimed.get(slot, {}) if k not in effective]:
            self._unclaim(slot, key)
        for key in [k for k, (s, _) in self.entries.items() if s == slot and k not in effective]:
            self._let_go(key)
        return duplicates, reported

    def release(self, slot: int) -> None:
        for key in list(self.claimed.get(slot, {})):
            self._unclaim(slot, key)
        for key in [k for k, (s, _) in self.entries.items() if s == slot]:
            self._let_go(key)

    def expected_rows(self) -> dict[Any, list[Any]]:
        return {key: [key, n] for key, (_, n) in self.entries.items()}


def is_subsequence(observed: list[Any], history: list[Any]) -> bool:
    """Whether ``observed`` embeds in order into ``history`` (``DELETED`` matches
    ``ABSENT``)."""
    it = iter(history)
    for item in observed:
        want = ABSENT if item == DELETED else item
        if not any(state == want for state in it):
            return False
    return True


# -- the driver (runs on the event loop's thread) -------------------------------------


class Driver:
    def __init__(self) -> None:
        self.world = World()
        self.app: coco.App | None = None
        self.handle: coco.UpdateHandle | None = None
        self.tasks_before = 0

    async def start(self) -> None:
        world = self.world
        self.tasks_before = len(current_tasks())

        @coco.fn
        async def main() -> None:
            lm: LiveMap[Any, list[Any]] = await LiveMap.create()
            world.lm = lm
            await coco.mount(Controller, world)

        self.app = coco.App(coco.AppConfig("stateful", exception_handler=world.handler), main)
        self.handle = self.app.update(live=True)

    async def wait_ready(self) -> None:
        assert self.handle is not None
        with anyio.fail_after(TIMEOUT):
            await self.handle.ready()

    async def job(self, fn: Callable[[coco.LiveComponentOperator], Awaitable[Any]]) -> Any:
        job = Job(fn)
        with anyio.fail_after(TIMEOUT):
            await self.world.send.send(job)
            await job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    @property
    def lm(self) -> LiveMap[Any, list[Any]]:
        assert self.world.lm is not None
        return self.world.lm

    def check_map(self, model: Model) -> None:
        lm = self.lm
        assert dict(lm.items()) == model.expected_rows()
        for key, (slot, _) in model.entries.items():
            assert lm.owner_path(key) == producer_path(slot), key
        stats = lm.stats()
        assert (stats.entries, stats.changes, stats.suppressed, stats.conflicts) == (
            len(model.entries),
            model.changes,
            model.suppressed,
            model.conflicts,
        )
        assert stats.eq_errors == 0
        assert stats.pending + stats.in_flight <= len(KEYS)
        assert self.world.overlaps == [], "a key ran twice at once"
        epoch = self.world.epoch
        if epoch is not None:
            assert epoch.violations == []

    async def settle(self, model: Model) -> None:
        world = self.world
        with anyio.fail_after(TIMEOUT):
            await self.lm.settle()
            if world.consumer is not None:
                await world.consumer.ready()
        stats = self.lm.stats()
        assert (stats.pending, stats.in_flight) == (0, 0)
        epoch = world.epoch
        if epoch is None:
            assert world.rows == {}
            return
        assert stats.consumer
        assert epoch.violations == []
        expected = model.expected_rows()
        poisoned = set()
        if epoch.poison:
            poisoned = {key for key, value in expected.items() if value[1] == POISON}
        assert set(stats.failing) == poisoned
        for key in poisoned:
            assert isinstance(stats.failing[key], Poisoned)
            # a failed run commits nothing: the latest value processed stays
            if key in epoch.last_ok:
                expected[key] = epoch.last_ok[key]
            elif epoch.inherits is not None and key in world.rows:
                # what a component at the same path committed before the
                # re-mount (its last successful run, not known exactly)
                assert world.rows[key] in epoch.committed(key), (key, world.rows[key])
                expected[key] = world.rows[key]
            else:
                del expected[key]
        assert world.rows == expected
        for key, observed in epoch.obs.items():
            history = model.history[key][epoch.start[key] :]
            # The calls follow the map's history.  A row's delete may come
            # later than the calls of the entry that replaced it: a key a
            # removed component lets go is deleted once the consumer's
            # update has settled, if the new component did not take it over
            # (so only the final rows, checked above, say where it ends).
            observed = [state for state in observed if state != DELETED]
            assert is_subsequence(observed, history), (key, observed, history)

    async def stop(self) -> None:
        assert self.handle is not None
        with anyio.fail_after(TIMEOUT):
            await self.handle.stop()
        self.world.send.close()

    async def tasks_left(self) -> int:
        await anyio.sleep(0)
        return len(current_tasks()) - self.tasks_before


# -- the machine ------------------------------------------------------------------------

decl_lists = st.lists(st.tuples(st.sampled_from(KEYS), st.integers(0, 2)), max_size=6)
slots = st.integers(0, SLOTS - 1)
# a consumer: (concurrency or None for the default, sync processor, poison, max_attempts)
consumers = st.tuples(
    st.sampled_from([None, 1, 2, 8]), st.booleans(), st.booleans(), st.sampled_from([1, 1, 2, 3])
)
delays = st.sampled_from([0.0, 0.0, 0.0002, 0.001])


class LiveMapMachine(RuleBasedStateMachine):
    portal: ClassVar[BlockingPortal | None] = None

    def __init__(self) -> None:
        super().__init__()
        portal = LiveMapMachine.portal
        assert portal is not None
        self.portal = portal
        self.model = Model()
        self.mounted: set[int] = set()
        self.consuming = False
        self.driver = Driver()
        self.run_future: Future[None] | None = None
        self.reported_seen = 0
        self.duplicates_seen = 0

    def call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return self.portal.call(fn, *args)

    @initialize()
    def start_app(self) -> None:
        self.call(self.driver.start)
        assert self.driver.handle is not None
        self.run_future = self.portal.start_task_soon(self.driver.handle.result)
        self.call(self.driver.wait_ready)

    def step(
        self,
        fn: Callable[[coco.LiveComponentOperator], Awaitable[Any]],
        expected: list[tuple[str, Any]] = (),  # type: ignore[assignment]
        duplicates: int = 0,
    ) -> None:
        """Run ``fn`` in the controller, then check the map against the model
        and the exceptions reported during the step against ``expected``."""
        driver = self.driver

        async def go() -> None:
            await driver.job(fn)
            world = driver.world
            new = world.reported[self.reported_seen :]
            self.reported_seen = len(world.reported)
            got: list[tuple[str, Any]] = []
            for exc, ctx in new:
                if isinstance(exc, coco.KeyConflictError):
                    got.append(("conflict", exc.key))
                    assert exc.declarer_path == ctx.path
                    assert repr(exc.key) in str(exc) and exc.owner_path in str(exc)
                elif isinstance(exc, ProducerFailure):
                    got.append(("failure", ctx.stable_path[-1]))
                elif isinstance(exc, Poisoned):
                    assert ctx.mount_kind == "mount_each"
                    assert ctx.stable_path[:2] == (*CONTROLLER, "consumer")
                    assert repr(ctx.stable_path[-1]) in str(exc)
                else:
                    raise AssertionError(f"unexpected report {exc!r} from {ctx.path}")
            assert got == list(expected)
            dups = world.duplicates[self.duplicates_seen :]
            self.duplicates_seen = len(world.duplicates)
            assert len(dups) == duplicates
            driver.check_map(self.model)

        self.call(go)

    @rule(slot=slots, decls=decl_lists, raises=st.integers(0, 4), sync=st.booleans())
    def produce(self, slot: int, decls: list[tuple[Any, int]], raises: int, sync: bool) -> None:
        failing = raises == 0
        driver = self.driver
        fn = sync_producer if sync else producer

        async def job(op: coco.LiveComponentOperator) -> None:
            h = await op.update(("p", slot), fn, driver.world, driver.lm, decls, failing)
            with anyio.fail_after(TIMEOUT):
                await h.ready()
            driver.world.note_gone()

        self.mounted.add(slot)
        duplicates, expected = self.model.produce(slot, decls, failing)
        self.step(job, expected, duplicates)

    @rule(
        slot=slots,
        runs=st.lists(
            st.tuples(decl_lists, st.booleans(), st.integers(0, 2)), min_size=2, max_size=4
        ),
    )
    def burst(self, slot: int, runs: list[tuple[list[tuple[Any, int]], bool, int]]) -> None:
        """Several runs of one producer back to back, with 0-2 yields between
        them: a key can change and change back while the consumer is busy."""
        driver = self.driver

        async def job(op: coco.LiveComponentOperator) -> None:
            for decls, sync, yields in runs:
                fn = sync_producer if sync else producer
                h = await op.update(("p", slot), fn, driver.world, driver.lm, decls, False)
                with anyio.fail_after(TIMEOUT):
                    await h.ready()
                driver.world.note_gone()
                for _ in range(yields):
                    await anyio.sleep(0)

        self.mounted.add(slot)
        duplicates = 0
        expected: list[tuple[str, Any]] = []
        for decls, _, _ in runs:
            dups, reported = self.model.produce(slot, decls, False)
            duplicates += dups
            expected.extend(reported)
        self.step(job, expected, duplicates)

    @rule(slot=slots)
    def unmount_producer(self, slot: int) -> None:
        world = self.driver.world

        async def job(op: coco.LiveComponentOperator) -> None:
            await (await op.delete(("p", slot))).ready()
            world.note_gone()

        self.mounted.discard(slot)
        self.model.release(slot)
        self.step(job)

    @rule(
        slot=slots,
        first=decl_lists,
        second=decl_lists,
        yields=st.integers(0, 3),
        unmount=st.booleans(),
    )
    def cancel_producer(
        self,
        slot: int,
        first: list[tuple[Any, int]],
        second: list[tuple[Any, int]],
        yields: int,
        unmount: bool,
    ) -> None:
        """A run that declares and then waits is cancelled by a re-mount (or an
        unmount) after 0-3 yields: none of its declarations commit, wherever
        it was when it was cancelled."""
        driver = self.driver
        first = list(dict(first).items())  # no duplicates: they may never be raised
        gate = anyio.Event()

        async def job(op: coco.LiveComponentOperator) -> None:
            world, lm = driver.world, driver.lm
            await op.update(("p", slot), gated_producer, world, lm, first, gate)
            for _ in range(yields):
                await anyio.sleep(0)
            if unmount:
                await (await op.delete(("p", slot))).ready()
            else:
                h = await op.update(("p", slot), producer, world, lm, second, False)
                with anyio.fail_after(TIMEOUT):
                    await h.ready()
            world.note_gone()

        duplicates = 0
        expected: list[tuple[str, Any]] = []
        if unmount:
            self.mounted.discard(slot)
            self.model.release(slot)
        else:
            self.mounted.add(slot)
            duplicates, expected = self.model.produce(slot, second, False)
        self.step(job, expected, duplicates)

    @rule(slot=slots, decls=decl_lists, key=st.sampled_from(KEYS))
    def declare_late(self, slot: int, decls: list[tuple[Any, int]], key: Any) -> None:
        """A declaration made in a run's context after the run has committed
        raises at the call, names the map and the path, and changes nothing."""
        driver = self.driver
        world = driver.world

        async def job(op: coco.LiveComponentOperator) -> None:
            lm = driver.lm
            h = await op.update(("p", slot), keeping_producer, world, lm, decls)
            with anyio.fail_after(TIMEOUT):
                await h.ready()
            world.note_gone()
            context, world.context = world.context, None
            assert context is not None
            with pytest.raises(coco.NotInComponentError) as info:
                context.run(lm.declare_entry, key, [key, 9])
            message = str(info.value)
            assert f"'p'/{slot}" in message and "LiveMap" in message, message

        self.mounted.add(slot)
        duplicates, expected = self.model.produce(slot, decls, False)
        self.step(job, expected, duplicates)

    def _start_job(
        self, spec: tuple[int | None, bool, bool, int], remount: bool = False
    ) -> Callable[[coco.LiveComponentOperator], Awaitable[None]]:
        concurrency, sync, poison, attempts = spec
        start = {key: len(self.model.history[key]) - 1 for key in KEYS}
        epoch = Epoch(start, poison=poison, attempts=attempts, sync=sync)
        world = self.driver.world
        before = world.epoch
        if remount and before is not None and before.sync == sync:
            epoch.inherits = before
        elif remount and before is not None:
            epoch.replaces = True
        lm = self.driver.lm

        async def job(op: coco.LiveComponentOperator) -> None:
            world.epoch = epoch
            world.consumer = await op.update(
                "consumer", consumer_host, world, lm, epoch, concurrency, sync
            )

        return job

    @precondition(lambda self: not self.consuming)
    @rule(spec=consumers)
    def start_consumer(self, spec: tuple[int | None, bool, bool, int]) -> None:
        self.consuming = True
        self.step(self._start_job(spec))

    @precondition(lambda self: self.consuming)
    @rule()
    def stop_consumer(self) -> None:
        world = self.driver.world

        async def job(op: coco.LiveComponentOperator) -> None:
            world.epoch = None
            world.consumer = None
            await (await op.delete("consumer")).ready()

        self.consuming = False
        self.step(job)

    @precondition(lambda self: self.consuming)
    @rule(spec=consumers)
    def restart_consumer(self, spec: tuple[int | None, bool, bool, int]) -> None:
        """Stop the consumer and start a new one in the same breath."""
        world = self.driver.world
        start = self._start_job(spec)

        async def job(op: coco.LiveComponentOperator) -> None:
            world.epoch = None
            world.consumer = None
            await (await op.delete("consumer")).ready()
            await start(op)

        self.step(job)

    @precondition(lambda self: self.consuming)
    @rule(spec=consumers, yields=st.integers(0, 2))
    def remount_consumer(self, spec: tuple[int | None, bool, bool, int], yields: int) -> None:
        """Re-mount the consumer's parent with new arguments (the same kind
        of processor, so the same paths) while its keys may be running: the
        new consumer starts from a fresh scan, and no key runs in both at
        once (the old run's ``finally`` included).  (A replacement at other
        paths is pinned by tests/test_each_remount.py.)"""
        world = self.driver.world
        if world.epoch is not None:
            concurrency, _, poison, attempts = spec
            spec = (concurrency, world.epoch.sync, poison, attempts)
        start = self._start_job(spec, remount=True)

        async def job(op: coco.LiveComponentOperator) -> None:
            for _ in range(yields):
                await anyio.sleep(0)
            await start(op)

        self.step(job)

    @rule(delay=st.sampled_from([0.0, 0.0, 0.0005, 0.002]))
    def set_handler_speed(self, delay: float) -> None:
        """The (async) exception handler takes this long from now on."""
        world = self.driver.world

        async def go() -> None:
            world.handler_delay = delay

        self.call(go)

    @rule(key_delays=st.dictionaries(st.sampled_from(KEYS), delays, max_size=3))
    def set_speed(self, key_delays: dict[Any, float]) -> None:
        world = self.driver.world

        async def go() -> None:
            world.delays = key_delays

        self.call(go)

    @rule()
    def settle(self) -> None:
        self.call(self.driver.settle, self.model)

    def teardown(self) -> None:
        driver = self.driver
        if driver.handle is None:
            return
        try:
            if self.run_future is not None and not self.run_future.done():
                self.call(driver.settle, self.model)
        finally:
            self.call(driver.stop)
            if self.run_future is not None:
                self.run_future.result(timeout=TIMEOUT)
        assert self.call(driver.tasks_left) == 0


@contextmanager
def machine_portal(backend: str) -> Iterator[BlockingPortal]:
    with anyio.from_thread.start_blocking_portal(backend) as portal:
        LiveMapMachine.portal = portal
        try:
            yield portal
        finally:
            LiveMapMachine.portal = None


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_runtime_and_livemap_match_the_model(backend: str) -> None:
    with machine_portal(backend):
        run_state_machine_as_test(LiveMapMachine, settings=PROFILE)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_poisoned_key_keeps_the_row_its_successor_committed(backend: str) -> None:
    """A sequence the machine found: a key dropped and declared again with
    its value while the consumer is busy gets a new per-entry component,
    whose first call comes before the late delete of its predecessor's row
    and whose commit after it; a poison value for the key then fails, and
    the row stays the successor's (a failed run commits nothing)."""
    with machine_portal(backend):
        machine = LiveMapMachine()
        try:
            machine.start_app()
            machine.start_consumer(spec=(None, False, True, 1))
            machine.burst(runs=[([], False, 0), ([("c", 0)], False, 0)], slot=0)
            machine.burst(
                runs=[([("b", 0)], True, 0), ([("b", 1)], False, 2), ([("c", 0)], True, 0)],
                slot=0,
            )
            machine.burst(runs=[([], False, 0), ([("c", POISON)], False, 0)], slot=1)
            machine.declare_late(decls=[], key="a", slot=0)
            machine.settle()
            assert machine.driver.world.rows == {"c": ["c", 0]}
        finally:
            machine.teardown()


def test_profiles_meet_the_minimum() -> None:
    default = settings.get_profile("livemap-stateful")
    assert default.max_examples >= 200 and default.stateful_step_count >= 50
    long = settings.get_profile("livemap-stateful-long")
    assert long.max_examples > default.max_examples
    assert long.stateful_step_count > default.stateful_step_count


def test_subsequence_helper() -> None:
    assert is_subsequence([1, DELETED, 2], [ABSENT, 1, 0, ABSENT, 2])
    assert not is_subsequence([2, 1], [ABSENT, 1, 2])
    assert not is_subsequence([1, 1], [1])
