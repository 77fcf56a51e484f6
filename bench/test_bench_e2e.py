"""End-to-end benchmarks through the public API.

Each scenario runs on the compiled core (``cython``) and the pure core
(``python``) in one process — the fixture swaps the table class the runtime
builds its targets on — on a ``floor`` (plain Python doing the same work with
dicts, no framework) and, when the package ``cocoindex`` is importable (the
optional ``compare`` extra), on CocoIndex's own LiveMap doing the same work.

Every scenario comes in two consumer shapes (the ``shape`` parameter):

* ``trivial``: the per-entry processor records what it saw and leaves
  nothing behind.
* ``realistic``: the per-entry processor declares its entry into a
  downstream LiveMap, watched by a hand-written subscriber that keeps the
  consumer's view, and into a ``KeyedTarget`` whose sink applies each batch
  to a dict.  A round is over once the subscriber's view has every change
  (and, through ``settle()``, every delete).  Its floor does the same two
  levels with dicts: the producer's diff, each child's record of what it
  declared, the downstream diff, the view and the sink.

Run: ``pytest bench/test_bench_e2e.py --benchmark-only`` (add
``--benchmark-columns=min,median,max,rounds --benchmark-group-by=func``
for a compact table).  ``LIVEMAP_BENCH_SCALE=1000000`` makes the scale scenario
(a realistic fill, its time and peak RSS, in a fresh process) fill a million
entries; it fills ``LIVEMAP_BENCH_FILL`` entries otherwise.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.from_thread
import pytest

import livemap
from livemap._runtime import _tables

FILL_N = int(os.environ.get("LIVEMAP_BENCH_FILL", "100000"))
SCALE_N = int(os.environ.get("LIVEMAP_BENCH_SCALE", str(FILL_N)))
CHURN_N = 10_000
NOOP_N = 10_000
PRODUCERS = 100
KEYS_EACH = 100
IO_CHANGES = 1_000
IO_SLEEP = 0.005
IO_CONCURRENCY = 64  # the consumer's default
TIMEOUT = 120.0
SHAPES = ["trivial", "realistic"]


def _cocoindex() -> Any:
    try:
        return importlib.import_module("cocoindex")
    except ImportError:
        return None


@pytest.fixture(params=["cython", "python", "floor", "cocoindex"])
def impl(request: pytest.FixtureRequest) -> Iterator[str]:
    """Which implementation runs the scenario; the core is swapped for the run."""
    name: str = request.param
    if name == "floor":
        yield name
        return
    if name == "cocoindex":
        if _cocoindex() is None:
            pytest.skip("cocoindex is not installed (pip install livemap[compare])")
        with tempfile.TemporaryDirectory() as db:
            os.environ.setdefault("COCOINDEX_DB", db)
            yield name
        return
    module = "livemap_core._core" if name == "cython" else "livemap_core._fallback"
    try:
        core = importlib.import_module(module)
    except ImportError as exc:
        pytest.skip(f"compiled core not available: {exc}")
    _tables.use_core(core)
    try:
        yield name
    finally:
        _tables.use_core(None)


@pytest.fixture(params=SHAPES)
def shape(request: pytest.FixtureRequest, impl: str) -> str:
    """The consumer's shape: ``trivial`` or ``realistic`` (see the module doc)."""
    name: str = request.param
    if impl == "cocoindex" and name == "realistic":
        pytest.skip(
            "the realistic shape's KeyedTarget and hand-written subscriber are livemap's; "
            "CocoIndex runs the trivial shape only"
        )
    return name


COCOINDEX_LIVE = (
    "the live harness cannot drive CocoIndex 1.0.26's live mode: its live components run on "
    "the engine's own event loop and never see this harness's anyio streams (rounds time "
    "out); bench/README.md quotes CocoIndex's own figures for this scenario"
)


def live_only_livemap(impl: str) -> None:
    if impl == "cocoindex":
        pytest.skip(COCOINDEX_LIVE)


def api(impl: str) -> tuple[Any, Any]:
    """``(coco, LiveMap)`` for the implementation under test."""
    if impl == "cocoindex":
        coco = importlib.import_module("cocoindex")
        live_map = importlib.import_module("cocoindex.resources.live_map")
        return coco, live_map.LiveMap
    return livemap, livemap.LiveMap


def unique(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


# -- the realistic consumer ----------------------------------------------------------


class Downstream:
    """What a realistic consumer writes to: a downstream LiveMap (made per
    app run, ``down``), watched by a hand-written subscriber whose view is
    ``view``, and a ``KeyedTarget`` whose sink applies batches to ``sink``.

    ``on_update(key, value)`` is called for each update the subscriber gets.
    """

    def __init__(self, on_update: Callable[[str, Any], None] | None = None) -> None:
        self.view: dict[str, Any] = {}
        self.sink: dict[str, Any] = {}
        self.down: Any = None
        self.on_update = on_update
        self.target: livemap.KeyedTarget[str, Any] = livemap.KeyedTarget(unique("sink"), self.apply)

    def apply(self, batch: livemap.TargetBatch[str, Any]) -> None:
        sink = self.sink
        for key, value in batch.upserts:
            sink[key] = value
        for key in batch.deletes:
            del sink[key]

    async def create(self) -> None:
        """Make the downstream map and a fresh target (in the app's main
        function: a target keeps its owners across app runs, and a new run's
        components are new owners of the same keys) and mount the watcher."""
        self.down = await livemap.LiveMap.create()
        self.target = livemap.KeyedTarget(unique("sink"), self.apply)
        self.view.clear()
        self.sink.clear()
        await livemap.mount(ViewWatcher, self)

    async def settle(self) -> None:
        if self.down is not None:
            await self.down.settle()


class ViewSubscriber:
    """The hand-written subscriber of the downstream map: it keeps a view."""

    def __init__(self, downstream: Downstream) -> None:
        self.downstream = downstream
        self.view = downstream.view
        self.on_update = downstream.on_update
        self.done = livemap.ReadyHandle()

    async def update_all(self) -> None:
        async for key, value in self.downstream.down:
            self.view[key] = value

    async def mark_ready(self) -> None:
        pass

    async def update(self, key: str, value: Any) -> livemap.ReadyHandle:
        self.view[key] = value
        if self.on_update is not None:
            self.on_update(key, value)
        return self.done

    async def delete(self, key: str) -> livemap.ReadyHandle:
        del self.view[key]
        return self.done


class ViewWatcher:
    """A live component that watches the downstream map with a ViewSubscriber."""

    def __init__(self, downstream: Downstream) -> None:
        self.downstream = downstream

    def process(self) -> None:
        pass

    async def process_live(self, operator: livemap.LiveComponentOperator) -> None:
        await operator.mark_ready()
        await self.downstream.down.watch(ViewSubscriber(self.downstream))


class FloorChildren:
    """The realistic consumer's floor: each child's record of what it
    declared (one key in each of two targets), the downstream map's diff
    with its `==` gate, the subscriber's view and the sink, all dicts."""

    def __init__(self) -> None:
        self.records: dict[str, Any] = {}  # child key -> the value it declared
        self.down: dict[str, Any] = {}
        self.view: dict[str, Any] = {}
        self.sink: dict[str, Any] = {}

    def run(self, key: str, value: Any) -> None:
        """A child's run: declare ``key -> value`` downstream and into the target."""
        old = self.records.get(key, self)
        self.records[key] = value
        if old is self or old != value:
            self.down[key] = value
            self.view[key] = value  # the downstream subscriber's update
            self.sink[key] = value  # the target's batch of one upsert

    def unmount(self, key: str) -> None:
        del self.records[key]
        del self.down[key]
        del self.view[key]
        del self.sink[key]


def check_realistic(downstream: Downstream, expected: dict[str, Any]) -> None:
    assert downstream.view == expected
    assert downstream.sink == expected


# -- a live harness ----------------------------------------------------------------


class Harness:
    """A live app driven from the benchmark thread through a blocking portal.

    A live producer declares ``state`` into a map on each refresh; the
    consumer's per-entry processor records what it sees (``trivial``), or
    declares it downstream, where a subscriber records it (``realistic``); a
    round waits until the recorded view equals the expected one.
    """

    def __init__(
        self,
        impl: str,
        state: dict[str, Any],
        *,
        shape: str = "trivial",
        sleep: float = 0.0,
        concurrency: int | None = None,
        fresh: Callable[[Any], Any] | None = None,
        key_of: Callable[[Any], str] | None = None,
    ) -> None:
        self.impl = impl
        self.shape = shape
        self.state = dict(state)
        self.seen: dict[str, Any] = {}
        self.sleep = sleep
        self.concurrency = concurrency
        self.fresh = fresh  # makes each declared value a new (equal) object
        self.key_of = key_of or (lambda v: f"k{v % 1_000_000_000}")
        self.calls = 0
        self.waiting: dict[str, Any] | None = None
        self.done: anyio.Event | None = None
        self.refresh: Callable[[], Awaitable[None]] | None = None
        self.lm: Any = None
        self.streams: list[Any] = []
        self.noted_at = 0.0
        self.started_at = 0.0
        self.woke_at = 0.0  # when the producer got the refresh signal
        self.downstream = Downstream(self.note) if shape == "realistic" else None
        if self.downstream is not None:
            self.seen = self.downstream.view

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    def note(self, key: str, value: Any) -> None:
        self.calls += 1
        if self.downstream is None:
            self.seen[key] = value
        self.noted_at = time.perf_counter()
        waiting = self.waiting
        if waiting is not None and waiting.get(key) == value:
            del waiting[key]
            if not waiting and self.done is not None:
                self.done.set()

    def expect(self, expected: dict[str, Any]) -> None:
        """Start a round: the changes the consumer must see before it ends.
        (Deleted keys are dropped from the trivial view; the processor sees
        no deletes.  The realistic view's subscriber applies them.)"""
        if self.downstream is None:
            for key in [k for k in self.seen if k not in expected]:
                del self.seen[key]
        self.waiting = {k: v for k, v in expected.items() if self.seen.get(k) != v}
        self.done = anyio.Event()

    async def wait(self) -> None:
        """Wait for the changes of :meth:`expect` (and, with a settle barrier,
        for the deletions to be applied too)."""
        assert self.done is not None
        if self.waiting:
            await self.done.wait()
        if self.lm is not None and hasattr(self.lm, "settle"):
            await self.lm.settle()
        if self.downstream is not None:
            await self.downstream.settle()
        self.done = None
        self.waiting = None

    async def round(self) -> None:
        """Re-run the producer with ``state`` and wait until the consumer saw it."""
        self.expect(self.state)
        await self.run_round()

    async def run_round(self) -> None:
        """:meth:`round` once :meth:`expect` has been called."""
        assert self.refresh is not None
        with anyio.fail_after(TIMEOUT):
            self.started_at = time.perf_counter()
            await self.refresh()
            await self.wait()

    def processor(self) -> Callable[..., Awaitable[None]]:
        """The per-entry processor of this harness's shape."""
        coco, _ = api(self.impl)
        harness = self
        downstream = self.downstream
        if downstream is None:

            @coco.fn
            async def process(value: Any, key_of: Any) -> None:
                if harness.sleep:
                    await anyio.sleep(harness.sleep)
                harness.note(key_of(value), value)

            return process  # type: ignore[no-any-return]

        @coco.fn
        async def declare(value: Any, key_of: Any) -> None:
            if harness.sleep:
                await anyio.sleep(harness.sleep)
            key = key_of(value)
            downstream.down.declare_entry(key, value)
            downstream.target.declare(key, value)

        return declare  # type: ignore[no-any-return]

    def app(self) -> Any:
        coco, live_map_cls = api(self.impl)
        harness = self
        send, recv = anyio.create_memory_object_stream[anyio.Event](10)
        self.streams = [send, recv]

        async def refresh() -> None:
            done = anyio.Event()
            await send.send(done)
            await done.wait()

        self.refresh = refresh

        class Producer:
            def __init__(self, lm: Any) -> None:
                self.lm = lm

            def process(self) -> None:
                fresh = harness.fresh
                if fresh is None:
                    for key, value in harness.state.items():
                        self.lm.declare_entry(key, value)
                else:
                    for key, value in harness.state.items():
                        self.lm.declare_entry(key, fresh(value))

            async def process_live(self, operator: Any) -> None:
                await operator.update_full()
                await operator.mark_ready()
                async for done in recv:
                    harness.woke_at = time.perf_counter()
                    await operator.update_full()
                    done.set()

        process = self.processor()

        @coco.fn
        async def main() -> None:
            if harness.downstream is not None:
                await harness.downstream.create()
            lm = await live_map_cls.create()
            harness.lm = lm
            producer = await coco.mount(Producer, lm)
            await producer.ready()
            source = lm
            if self.concurrency is not None and hasattr(lm, "consumer"):
                source = lm.consumer(concurrency=self.concurrency)
            await coco.mount_each(process, source, harness.key_of)

        return coco.App(unique("bench"), main)


@contextmanager
def running(harness: Harness) -> Iterator[anyio.from_thread.BlockingPortal]:
    """Start ``harness``'s app in live mode on a portal thread."""
    with anyio.from_thread.start_blocking_portal("asyncio") as portal:
        app = harness.app()
        handle = app.update(live=True)
        ready = anyio.Event()
        finished = portal.call(anyio.Event)

        async def run() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(handle.result)
                with anyio.fail_after(TIMEOUT):
                    await live_ready(handle)
                    if harness.downstream is not None:
                        await harness.downstream.settle()
                ready.set()
                await finished.wait()
                if hasattr(handle, "stop"):
                    await handle.stop()
                else:  # CocoIndex: a live update ends when its task is cancelled
                    tg.cancel_scope.cancel()

        future = portal.start_task_soon(run)
        try:
            while not ready.is_set():
                time.sleep(0.001)
                if future.done():
                    future.result()
            yield portal
        finally:
            portal.call(finished.set)
            future.result(timeout=TIMEOUT)
            harness.close()


async def live_ready(handle: Any) -> None:
    """Wait for a live update's initial catch-up (CocoIndex reports it through
    ``watch()`` snapshots; livemap has ``ready()``)."""
    if hasattr(handle, "ready"):
        await handle.ready()
        return
    async for snapshot in handle.watch():
        if snapshot.status.name == "READY":
            return


def value_of(key_num: int, version: int) -> int:
    """Values encode their key so the processor can tell which key it got."""
    return version * 1_000_000_000 + key_num


# -- 1. fill -------------------------------------------------------------------------


def test_fill(benchmark: Any, impl: str, shape: str) -> None:
    """One producer declares FILL_N entries; mount_each runs a processor per
    entry (trivial: counts; realistic: declares downstream); catch-up mode."""
    if impl == "floor":
        fill_floor(benchmark, shape, FILL_N)
        return
    coco, live_map_cls = api(impl)
    count = [0]
    downstream = Downstream() if shape == "realistic" else None

    @coco.fn
    async def produce(lm: Any) -> None:
        for i in range(FILL_N):
            lm.declare_entry(f"k{i}", i)

    @coco.fn
    async def count_one(value: int) -> None:
        count[0] += 1

    process: Any = count_one
    if downstream is not None:

        @coco.fn
        async def declare(value: int) -> None:
            key = f"k{value}"
            downstream.down.declare_entry(key, value)
            downstream.target.declare(key, value)

        process = declare

    @coco.fn
    async def main() -> None:
        if downstream is not None:
            await downstream.create()
        lm = await live_map_cls.create()
        h = await coco.mount(produce, lm)
        await h.ready()
        await coco.mount_each(process, lm)

    def run() -> None:
        count[0] = 0
        coco.App(unique("fill"), main).update_blocking()

    rounds = 1 if impl == "cocoindex" else 3
    benchmark.pedantic(run, rounds=rounds, iterations=1)
    if downstream is None:
        assert count[0] == FILL_N
    else:
        assert len(downstream.view) == len(downstream.sink) == FILL_N
    benchmark.extra_info["entries"] = FILL_N


def fill_floor(benchmark: Any, shape: str, n: int) -> None:
    """The fill in plain Python: the producer's declarations into a dict, the
    diff against the (empty) held dict, and one call per entry to the
    processor (trivial: a counter; realistic: :class:`FloorChildren`)."""
    result: dict[str, int] = {}

    def run() -> None:
        held: dict[str, int] = {}
        declared: dict[str, int] = {}
        for i in range(n):
            declared[f"k{i}"] = i
        changes = [(k, v) for k, v in declared.items() if held.get(k, held) != v]
        held.update(changes)
        if shape == "trivial":
            count = 0
            for _key, _value in changes:
                count += 1
            result["n"] = count
        else:
            children = FloorChildren()
            for key, value in changes:
                children.run(key, value)
            result["n"] = len(children.view)

    benchmark.pedantic(run, rounds=3, iterations=1)
    assert result["n"] == n


class _BareRun:
    """A run of the bare runtime: what the core's ``Declarer`` needs."""

    __slots__ = ("buffers", "owner")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.buffers: dict[str, Any] | None = None


class _BareBatch:
    __slots__ = ("deletes", "upserts")

    def __init__(self, upserts: list[tuple[str, int]], deletes: list[str]) -> None:
        self.upserts = upserts
        self.deletes = deletes


class _Missing(Exception):
    pass


def _drive(coro: Any) -> None:
    """Run a coroutine that does not suspend to its end, without a loop."""
    try:
        coro.send(None)
    except StopIteration:
        return
    raise RuntimeError("the bare runtime's coroutines must not suspend")


@pytest.mark.parametrize("core", ["cython", "python"])
def test_fill_bare_runtime(benchmark: Any, core: str) -> None:
    """The least a runtime on this core does for a realistic fill of FILL_N
    entries, as a bound below any design that keeps one async processor call
    per entry and commits through the core's tables: the producer declares
    through a ``Declarer`` and commits; each entry gets an owner, its
    processor's coroutine driven to its end (two declarations through
    ``Declarer``s), one commit into each of two tables, a batch handed to
    the sink and an async update of the subscriber's view.  No event loop,
    no readiness, no handlers, no cancellation, no ownership transfer: none
    of the contract, only the work that cannot be left out."""
    import contextvars

    try:
        core_mod: Any = importlib.import_module(
            "livemap_core._core" if core == "cython" else "livemap_core._fallback"
        )
    except ImportError as exc:
        pytest.skip(f"compiled core not available: {exc}")
    current: contextvars.ContextVar[_BareRun | None] = contextvars.ContextVar(
        "bare_run", default=None
    )
    n = FILL_N
    result: dict[str, int] = {}

    def run() -> None:
        src, down, tgt = core_mod.Table("src"), core_mod.Table("down"), core_mod.Table("tgt")
        src_decl = core_mod.Declarer(src, "src", current, _Missing, _Missing)
        down_decl = core_mod.Declarer(down, "down", current, _Missing, _Missing)
        tgt_decl = core_mod.Declarer(tgt, "tgt", current, _Missing, _Missing)
        view: dict[str, int] = {}
        sink: dict[str, int] = {}

        def apply(batch: _BareBatch) -> None:
            for key, value in batch.upserts:
                sink[key] = value
            for key in batch.deletes:
                del sink[key]

        async def update(key: str, value: int) -> None:
            view[key] = value

        async def process(value: int) -> None:
            key = f"k{value}"
            down_decl(key, value)
            tgt_decl(key, value)

        producer = _BareRun("producer")
        token = current.set(producer)
        for i in range(n):
            src_decl(f"k{i}", i)
        current.reset(token)
        assert producer.buffers is not None
        for _key, value in src.commit(producer.buffers["src"]).upserts:
            child = _BareRun(object())
            token = current.set(child)
            _drive(process(value))
            current.reset(token)
            buffers = child.buffers
            assert buffers is not None
            for k, v in down.commit(buffers["down"]).upserts:
                _drive(update(k, v))
            done = tgt.commit(buffers["tgt"])
            apply(_BareBatch(done.upserts, done.deletes))
        result["n"] = len(view) if len(view) == len(sink) else -1

    benchmark.pedantic(run, rounds=3, iterations=1)
    assert result["n"] == n
    benchmark.extra_info["entries"] = n


# -- 2. churn ------------------------------------------------------------------------


def churn_rounds(n: int) -> Iterator[dict[str, int]]:
    """Successive states: each changes 1%, deletes 1% and adds 1% of n keys."""
    state = {f"k{i}": value_of(i, 0) for i in range(n)}
    next_key = n
    version = 0
    while True:
        version += 1
        keys = list(state)
        step = len(keys) // (n // 100)
        for key in keys[0::step][: n // 100]:
            state[key] = value_of(int(key[1:]), version)
        for key in keys[1::step][: n // 100]:
            del state[key]
        for _ in range(n // 100):
            state[f"k{next_key}"] = value_of(next_key, version)
            next_key += 1
        yield dict(state)


def test_churn(benchmark: Any, impl: str, shape: str) -> None:
    """Live mode, CHURN_N entries; each round changes 1%, deletes 1%, adds 1%;
    time from the producer's re-run until the consumer has seen every change."""
    live_only_livemap(impl)
    states = churn_rounds(CHURN_N)
    if impl == "floor":
        churn_floor(benchmark, shape, states)
        return
    harness = Harness(impl, next(states), shape=shape)

    with running(harness) as portal:
        run_round = harness.run_round

        def setup() -> None:
            # (what the consumer must see, worked out before the clock starts)
            harness.state = next(states)
            portal.call(harness.expect, harness.state)

        def one() -> None:
            portal.call(run_round)

        benchmark.pedantic(one, setup=setup, rounds=20, iterations=1, warmup_rounds=1)
    assert harness.seen == harness.state
    if harness.downstream is not None:
        check_realistic(harness.downstream, harness.state)
    benchmark.extra_info["entries"] = CHURN_N


def churn_floor(benchmark: Any, shape: str, states: Iterator[dict[str, int]]) -> None:
    """The churn round's diff in plain Python: a dict of values, the `==` gate,
    the deleted keys, and a 'delivery' of each change (trivial: to a dict;
    realistic: a child run, :class:`FloorChildren`)."""
    held = dict(next(states))
    seen = dict(held)
    children = FloorChildren()
    for key, value in held.items():
        children.run(key, value)
    realistic = shape == "realistic"
    new: dict[str, int] = {}

    def setup() -> None:
        nonlocal new
        new = next(states)

    def one() -> None:
        changes = [(k, v) for k, v in new.items() if held.get(k) != v]
        gone = [k for k in held if k not in new]
        for k, v in changes:
            held[k] = v
            if realistic:
                children.run(k, v)
            else:
                seen[k] = v
        for k in gone:
            del held[k]
            if realistic:
                children.unmount(k)
            else:
                del seen[k]

    benchmark.pedantic(one, setup=setup, rounds=20, iterations=1, warmup_rounds=1)
    assert (children.view if realistic else seen) == held


# -- 3. no-op ------------------------------------------------------------------------


def test_noop_redeclare(benchmark: Any, impl: str, shape: str) -> None:
    """Re-declare NOOP_N equal (but distinct) values: the `==` gate path."""
    live_only_livemap(impl)
    if impl == "floor":
        noop_floor(benchmark, shape)
        return
    harness = Harness(
        impl,
        {f"k{i}": (i, "payload") for i in range(NOOP_N)},
        shape=shape,
        fresh=_fresh_payload,
        key_of=lambda v: f"k{v[0]}",
    )
    with running(harness) as portal:
        assert harness.refresh is not None
        start = harness.calls
        benchmark.pedantic(lambda: portal.call(harness.refresh), rounds=20, iterations=1)
        assert harness.calls == start  # nothing reached the consumer
    if harness.downstream is not None:
        check_realistic(harness.downstream, harness.state)
    benchmark.extra_info["entries"] = NOOP_N


def _fresh_payload(value: tuple[int, str]) -> tuple[int, str]:
    """A value equal to ``value``, not identical to it."""
    return (value[0], str(value[1]))


def noop_floor(benchmark: Any, shape: str) -> None:
    """The no-op round in plain Python: build the declared dict (one call of
    the same ``fresh`` per value as the producer), compare each value with
    the held one, find nothing to delete.  (Nothing changes, so nothing
    reaches the consumer: both shapes' floors are the same.)"""
    state = {f"k{i}": (i, "payload") for i in range(NOOP_N)}
    fresh = _fresh_payload
    held = {k: fresh(v) for k, v in state.items()}

    def one() -> int:
        declared = {}
        for k, v in state.items():
            declared[k] = fresh(v)
        changed = [k for k, v in declared.items() if held.get(k) != v]
        gone = [k for k in held if k not in declared] if len(declared) != len(held) else []
        return len(changed) + len(gone)

    result = benchmark.pedantic(one, rounds=20, iterations=1)
    assert result == 0


# -- 4. many producers ---------------------------------------------------------------


def test_many_producers(benchmark: Any, impl: str, shape: str) -> None:
    """PRODUCERS components x KEYS_EACH keys; each round 10 of them change 10%
    of their keys; time until the consumer saw every change."""
    live_only_livemap(impl)
    data = {
        p: {f"p{p}-{k}": value_of(p * KEYS_EACH + k, 0) for k in range(KEYS_EACH)}
        for p in range(PRODUCERS)
    }
    # the processor needs the key: values map back to keys
    key_names = {
        value_of(p * KEYS_EACH + k, 0) % 1_000_000_000: f"p{p}-{k}"
        for p in range(PRODUCERS)
        for k in range(KEYS_EACH)
    }
    version = [0]

    def next_changes() -> tuple[list[int], dict[str, int]]:
        version[0] += 1
        first = (version[0] * 10) % PRODUCERS
        changed = list(range(first, first + 10))
        changes = {}
        for p in changed:
            for k in range(0, KEYS_EACH, 10):
                key = f"p{p}-{k}"
                data[p][key] = changes[key] = value_of(p * KEYS_EACH + k, version[0])
        return changed, changes

    if impl == "floor":
        many_producers_floor(benchmark, shape, data, next_changes)
        return
    coco, live_map_cls = api(impl)
    harness = Harness(impl, {}, shape=shape, key_of=lambda v: key_names[v % 1_000_000_000])
    send, recv = anyio.create_memory_object_stream[tuple[list[int], anyio.Event]](10)

    @coco.fn
    async def produce(lm: Any, p: int) -> None:
        for key, value in data[p].items():
            lm.declare_entry(key, value)

    class Producers:
        def __init__(self, lm: Any) -> None:
            self.lm = lm

        def process(self) -> None:
            pass

        async def process_live(self, operator: Any) -> None:
            handles = [await operator.update(f"p{p}", produce, self.lm, p) for p in data]
            for h in handles:
                await h.ready()
            await operator.mark_ready()
            async for changed, done in recv:
                handles = [await operator.update(f"p{p}", produce, self.lm, p) for p in changed]
                for h in handles:
                    await h.ready()
                done.set()

    process = harness.processor()

    @coco.fn
    async def main() -> None:
        if harness.downstream is not None:
            await harness.downstream.create()
        lm = await live_map_cls.create()
        harness.lm = lm
        h = await coco.mount(Producers, lm)
        await h.ready()
        await coco.mount_each(process, lm, harness.key_of)

    harness.app = lambda: coco.App(unique("many"), main)  # type: ignore[method-assign]
    harness.streams = [send, recv]

    async def round_() -> None:
        changed, changes = next_changes()
        harness.waiting = changes
        harness.done = anyio.Event()
        done = anyio.Event()
        with anyio.fail_after(TIMEOUT):
            await send.send((changed, done))
            await done.wait()
            await harness.wait()

    with running(harness) as portal:
        benchmark.pedantic(lambda: portal.call(round_), rounds=20, iterations=1)
    expected = {k: v for keys in data.values() for k, v in keys.items()}
    assert harness.seen == expected
    if harness.downstream is not None:
        check_realistic(harness.downstream, expected)
    benchmark.extra_info["entries"] = PRODUCERS * KEYS_EACH


def many_producers_floor(
    benchmark: Any,
    shape: str,
    data: dict[int, dict[str, int]],
    next_changes: Callable[[], tuple[list[int], dict[str, int]]],
) -> None:
    """The many-producers round in plain Python: each changed producer's
    declarations diffed against its own record, then each change delivered
    (trivial: to a dict; realistic: a child run, :class:`FloorChildren`)."""
    records = {p: dict(keys) for p, keys in data.items()}
    seen = {k: v for keys in data.values() for k, v in keys.items()}
    children = FloorChildren()
    for key, value in seen.items():
        children.run(key, value)
    realistic = shape == "realistic"

    def one() -> None:
        changed, _ = next_changes()
        for p in changed:
            record = records[p]
            declared = dict(data[p].items())
            changes = [(k, v) for k, v in declared.items() if record.get(k) != v]
            for k, v in changes:
                record[k] = v
                if realistic:
                    children.run(k, v)
                else:
                    seen[k] = v

    benchmark.pedantic(one, rounds=20, iterations=1)
    expected = {k: v for keys in data.values() for k, v in keys.items()}
    assert (children.view if realistic else seen) == expected


# -- 5. latency ----------------------------------------------------------------------


def test_latency(benchmark: Any, impl: str, shape: str) -> None:
    """One change in a map of 10 entries until the consumer's processor sees
    it (realistic: until the downstream subscriber sees it).

    The benchmark's own timing includes the hop from the benchmark thread into
    the event loop; ``extra_info`` has the in-loop latency (p50, p99): from the
    producer's refresh to the processor's (or subscriber's) call; and the
    same from the moment the producer's task has the refresh signal
    (``p50_from_wake_us``: without the signal's own hop, a memory-stream send
    and receive, which is the benchmark's, not the library's).
    """
    live_only_livemap(impl)
    if impl == "floor":
        pytest.skip("latency is measured in an event loop: it has no floor")
    harness = Harness(impl, {f"k{i}": value_of(i, 0) for i in range(10)}, shape=shape)
    version = [0]
    times: list[float] = []
    from_wake: list[float] = []

    async def timed_round() -> None:
        await harness.round()
        times.append(harness.noted_at - harness.started_at)
        from_wake.append(harness.noted_at - harness.woke_at)

    with running(harness) as portal:

        def one() -> None:
            version[0] += 1
            harness.state["k3"] = value_of(3, version[0])
            portal.call(timed_round)

        benchmark.pedantic(one, rounds=200, iterations=1, warmup_rounds=5)
    times.sort()
    benchmark.extra_info["p50_us"] = round(times[len(times) // 2] * 1e6, 1)
    benchmark.extra_info["p99_us"] = round(times[max(0, int(len(times) * 0.99) - 1)] * 1e6, 1)
    from_wake.sort()
    benchmark.extra_info["p50_from_wake_us"] = round(from_wake[len(from_wake) // 2] * 1e6, 1)


# -- 6. I/O-bound consumer -----------------------------------------------------------


def test_io_bound(benchmark: Any, impl: str, shape: str) -> None:
    """IO_CHANGES changes, each processor call awaits a 5 ms sleep, at the
    default concurrency (64).  The floor is the ideal at that concurrency:
    the same sleeps in 64 anyio tasks at a time, nothing else."""
    live_only_livemap(impl)
    if impl == "floor":
        io_floor(benchmark)
        return
    harness = Harness(
        impl,
        {f"k{i}": value_of(i, 0) for i in range(IO_CHANGES)},
        shape=shape,
        sleep=IO_SLEEP,
        concurrency=IO_CONCURRENCY,
    )
    version = [0]
    with running(harness) as portal:

        def one() -> None:
            version[0] += 1
            harness.state = {f"k{i}": value_of(i, version[0]) for i in range(IO_CHANGES)}
            portal.call(harness.round)

        rounds = 1 if impl == "cocoindex" else 5
        benchmark.pedantic(one, rounds=rounds, iterations=1)
    if harness.downstream is not None:
        check_realistic(harness.downstream, harness.state)
    benchmark.extra_info["changes"] = IO_CHANGES


def io_floor(benchmark: Any) -> None:
    """The ideal at IO_CONCURRENCY: that many tasks, each sleeping its share
    of the IO_CHANGES sleeps one after another, nothing else."""
    with anyio.from_thread.start_blocking_portal("asyncio") as portal:

        async def one_round() -> None:
            todo = iter(range(IO_CHANGES))

            async def worker() -> None:
                for _ in todo:
                    await anyio.sleep(IO_SLEEP)

            async with anyio.create_task_group() as tg:
                for _ in range(IO_CONCURRENCY):
                    tg.start_soon(worker)

        benchmark.pedantic(lambda: portal.call(one_round), rounds=5, iterations=1)
    benchmark.extra_info["ideal_ms"] = -(-IO_CHANGES // IO_CONCURRENCY) * IO_SLEEP * 1000


# -- 7. memory -----------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent(
    """
    import gc, json, os, resource, sys, time
    N = int(sys.argv[1]); impl = sys.argv[2]; shape = sys.argv[3]

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    keys = [f"k{i}" for i in range(N)]
    size = [10]
    result = {}

    if impl == "floor":
        sys.path.insert(0, os.getcwd())
        from bench.test_bench_e2e import FloorChildren

        def fill():
            held = {}
            for i, key in enumerate(keys[: size[0]]):
                held[key] = i
            if shape == "trivial":
                seen = dict(held)  # what a consumer keeps of each child: its value
                return held, seen
            children = FloorChildren()
            for key, value in held.items():
                children.run(key, value)
            return held, children

        fill()
        size[0] = N
        gc.collect()
        before = rss()
        t0 = time.perf_counter()
        kept = fill()
        took = time.perf_counter() - t0
    else:
        import livemap as coco, importlib
        from livemap import KeyedTarget, LiveMap
        from livemap._runtime import _tables
        _tables.use_core(importlib.import_module(
            "livemap_core._core" if impl == "cython" else "livemap_core._fallback"))
        if shape == "realistic":
            sys.path.insert(0, os.getcwd())
            from bench.test_bench_e2e import Downstream
            downstream = Downstream()

        @coco.fn
        async def produce(lm):
            for i, key in enumerate(keys[: size[0]]):
                lm.declare_entry(key, i)

        @coco.fn
        async def count(value):
            pass

        @coco.fn
        async def declare(value):
            key = keys[value]
            downstream.down.declare_entry(key, value)
            downstream.target.declare(key, value)

        process = count if shape == "trivial" else declare

        @coco.fn
        async def main():
            if shape == "realistic":
                await downstream.create()
            lm = await LiveMap.create()
            h = await coco.mount(produce, lm)
            await h.ready()
            await coco.mount_each(process, lm)

        # warm-up: imports and one-time set-up are not per-entry costs
        coco.App("warm-up", main).update_blocking()
        size[0] = N
        app = coco.App("memory", main)
        gc.collect()
        before = rss()
        t0 = time.perf_counter()
        app.update_blocking()
        took = time.perf_counter() - t0
        if shape == "realistic":
            assert len(downstream.view) == len(downstream.sink) == N
    gc.collect()
    after = rss()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"bytes_per_entry": (after - before) / N, "seconds": took,
                      "peak_rss": peak}))
    """
)


def memory_run(n: int, impl: str, shape: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(n), impl, shape],
        check=True,
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_memory_per_entry(benchmark: Any, impl: str, shape: str) -> None:
    """RSS per entry after a FILL_N fill, consumer components included
    (measured in a fresh process; keys are allocated before the baseline, and
    a 10-entry warm-up run does the imports and one-time set-up first).  The
    floor keeps what its fill made: the held dict and the consumer's dicts."""
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("RSS is read from /proc")
    if impl == "cocoindex":
        pytest.skip("measured with the trivial shape on CocoIndex in earlier runs (README)")
    result: dict[str, float] = {}

    def run() -> None:
        result.update(memory_run(FILL_N, impl, shape))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["bytes_per_entry"] = round(result["bytes_per_entry"], 1)
    assert result["bytes_per_entry"] > 0


# -- 8. scale ------------------------------------------------------------------------


def test_scale_fill(benchmark: Any, impl: str) -> None:
    """A realistic fill of SCALE_N entries (LIVEMAP_BENCH_SCALE; a million for
    the scale figures) in a fresh process: its time, the process's peak RSS
    and the bytes per entry it keeps (``extra_info``; the benchmark's own
    time includes the process's start and a 10-entry warm-up)."""
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("RSS is read from /proc")
    if impl == "cocoindex":
        pytest.skip("the realistic shape runs on livemap only")
    result: dict[str, float] = {}

    def run() -> None:
        result.update(memory_run(SCALE_N, impl, "realistic"))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["entries"] = SCALE_N
    benchmark.extra_info["fill_s"] = round(result["seconds"], 3)
    benchmark.extra_info["peak_rss_mb"] = round(result["peak_rss"] / 2**20, 1)
    benchmark.extra_info["bytes_per_entry"] = round(result["bytes_per_entry"], 1)
    assert result["seconds"] > 0
