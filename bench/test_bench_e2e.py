"""End-to-end benchmarks through the public API.

Each scenario runs on the compiled core (``cython``) and the pure core
(``python``) in one process — the fixture swaps the table class the runtime
builds its targets on — and, when the package ``cocoindex`` is importable
(the optional ``compare`` extra), on CocoIndex's own LiveMap doing the same
work.  Scenarios 2 and 3 also have a ``floor``: plain Python doing the same
diff with no framework.

Run: ``pytest bench/test_bench_e2e.py --benchmark-only`` (add
``--benchmark-columns=min,median,max,rounds`` for a compact table).
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
CHURN_N = 10_000
NOOP_N = 10_000
PRODUCERS = 100
KEYS_EACH = 100
IO_CHANGES = 1_000
IO_SLEEP = 0.005
TIMEOUT = 120.0


def _cocoindex() -> Any:
    try:
        return importlib.import_module("cocoindex")
    except ImportError:
        return None


@pytest.fixture(params=["cython", "python", "cocoindex"])
def impl(request: pytest.FixtureRequest) -> Iterator[str]:
    """Which implementation runs the scenario; the core is swapped for the run."""
    name: str = request.param
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


# -- a live harness ----------------------------------------------------------------


class Harness:
    """A live app driven from the benchmark thread through a blocking portal.

    A live producer declares ``state`` into a map on each refresh; the
    consumer's per-entry processor records what it sees; a round waits until
    the recorded view equals the expected one.
    """

    def __init__(
        self,
        impl: str,
        state: dict[str, int],
        *,
        sleep: float = 0.0,
        concurrency: int | None = None,
        fresh: Callable[[Any], Any] | None = None,
        key_of: Callable[[Any], str] | None = None,
    ) -> None:
        self.impl = impl
        self.state = dict(state)
        self.seen: dict[str, int] = {}
        self.sleep = sleep
        self.concurrency = concurrency
        self.fresh = fresh  # makes each declared value a new (equal) object
        self.key_of = key_of or (lambda v: f"k{v % 1_000_000_000}")
        self.calls = 0
        self.waiting: dict[str, int] | None = None
        self.done: anyio.Event | None = None
        self.refresh: Callable[[], Awaitable[None]] | None = None
        self.lm: Any = None
        self.streams: list[Any] = []
        self.noted_at = 0.0
        self.started_at = 0.0

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    def note(self, key: str, value: int) -> None:
        self.calls += 1
        self.seen[key] = value
        self.noted_at = time.perf_counter()
        waiting = self.waiting
        if waiting is not None and waiting.get(key) == value:
            del waiting[key]
            if not waiting and self.done is not None:
                self.done.set()

    def expect(self, expected: dict[str, int]) -> None:
        """Start a round: the changes the consumer must see before it ends.
        (Deleted keys are dropped from the view; the processor sees no deletes.)"""
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
        self.done = None
        self.waiting = None

    async def round(self) -> None:
        """Re-run the producer with ``state`` and wait until the consumer saw it."""
        self.expect(self.state)
        assert self.refresh is not None
        with anyio.fail_after(TIMEOUT):
            self.started_at = time.perf_counter()
            await self.refresh()
            await self.wait()

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
                    await operator.update_full()
                    done.set()

        @coco.fn
        async def process(value: int, key_of: Any) -> None:
            if harness.sleep:
                await anyio.sleep(harness.sleep)
            harness.note(key_of(value), value)

        @coco.fn
        async def main() -> None:
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


def test_fill(benchmark: Any, impl: str) -> None:
    """One producer declares FILL_N entries; mount_each runs a trivial
    processor per entry; catch-up mode."""
    coco, live_map_cls = api(impl)
    count = [0]

    @coco.fn
    async def produce(lm: Any) -> None:
        for i in range(FILL_N):
            lm.declare_entry(f"k{i}", i)

    @coco.fn
    async def process(value: int) -> None:
        count[0] += 1

    @coco.fn
    async def main() -> None:
        lm = await live_map_cls.create()
        h = await coco.mount(produce, lm)
        await h.ready()
        await coco.mount_each(process, lm)

    def run() -> None:
        count[0] = 0
        coco.App(unique("fill"), main).update_blocking()

    rounds = 1 if impl == "cocoindex" else 3
    benchmark.pedantic(run, rounds=rounds, iterations=1)
    assert count[0] == FILL_N
    benchmark.extra_info["entries"] = FILL_N


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


def test_churn(benchmark: Any, impl: str) -> None:
    """Live mode, CHURN_N entries; each round changes 1%, deletes 1%, adds 1%;
    time from the producer's re-run until the consumer has seen every change."""
    live_only_livemap(impl)
    states = churn_rounds(CHURN_N)
    harness = Harness(impl, next(states))

    with running(harness) as portal:
        harness_round = harness.round

        def one() -> None:
            harness.state = next(states)
            portal.call(harness_round)

        benchmark.pedantic(one, rounds=20, iterations=1, warmup_rounds=1)
    assert harness.seen == harness.state
    benchmark.extra_info["entries"] = CHURN_N


def test_churn_floor(benchmark: Any) -> None:
    """The churn round's diff in plain Python: a dict of values, the `==` gate,
    the deleted keys, and a 'delivery' of each change to a dict."""
    states = churn_rounds(CHURN_N)
    held = dict(next(states))
    seen = dict(held)

    def one() -> None:
        new = next(states)
        changes = [(k, v) for k, v in new.items() if held.get(k) != v]
        gone = [k for k in held if k not in new]
        for k, v in changes:
            held[k] = v
            seen[k] = v
        for k in gone:
            del held[k]
            del seen[k]

    benchmark.pedantic(one, rounds=20, iterations=1, warmup_rounds=1)
    assert seen == held


# -- 3. no-op ------------------------------------------------------------------------


def test_noop_redeclare(benchmark: Any, impl: str) -> None:
    """Re-declare NOOP_N equal (but distinct) values: the `==` gate path."""
    live_only_livemap(impl)
    harness = Harness(
        impl,
        {f"k{i}": (i, "payload") for i in range(NOOP_N)},
        fresh=lambda v: (v[0], str(v[1])),  # equal, not identical
        key_of=lambda v: f"k{v[0]}",
    )
    with running(harness) as portal:
        assert harness.refresh is not None
        start = harness.calls
        benchmark.pedantic(lambda: portal.call(harness.refresh), rounds=20, iterations=1)
        assert harness.calls == start  # nothing reached the consumer
    benchmark.extra_info["entries"] = NOOP_N


def test_noop_redeclare_floor(benchmark: Any) -> None:
    """The no-op round in plain Python: build the declared dict, compare each
    value with the held one, find nothing to delete."""
    state = {f"k{i}": (i, "payload") for i in range(NOOP_N)}
    held = {k: (v[0], str(v[1])) for k, v in state.items()}

    def one() -> int:
        declared = {k: (v[0], str(v[1])) for k, v in state.items()}
        changed = [k for k, v in declared.items() if held.get(k) != v]
        gone = [k for k in held if k not in declared] if len(declared) != len(held) else []
        return len(changed) + len(gone)

    result = benchmark.pedantic(one, rounds=20, iterations=1)
    assert result == 0


# -- 4. many producers ---------------------------------------------------------------


def test_many_producers(benchmark: Any, impl: str) -> None:
    """PRODUCERS components x KEYS_EACH keys; each round 10 of them change 10%
    of their keys; time until the consumer saw every change."""
    live_only_livemap(impl)
    coco, live_map_cls = api(impl)
    data = {
        p: {f"p{p}-{k}": value_of(p * KEYS_EACH + k, 0) for k in range(KEYS_EACH)}
        for p in range(PRODUCERS)
    }
    harness = Harness(impl, {})
    send, recv = anyio.create_memory_object_stream[tuple[list[int], anyio.Event]](10)
    harness.streams = [send, recv]

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

    # the processor needs the key: values map back to keys
    key_of = {
        value_of(p * KEYS_EACH + k, 0) % 1_000_000_000: f"p{p}-{k}"
        for p in range(PRODUCERS)
        for k in range(KEYS_EACH)
    }

    @coco.fn
    async def process_keyed(value: int, _: Any) -> None:
        harness.note(key_of[value % 1_000_000_000], value)

    @coco.fn
    async def main_keyed() -> None:
        lm = await live_map_cls.create()
        h = await coco.mount(Producers, lm)
        await h.ready()
        await coco.mount_each(process_keyed, lm, None)

    harness.app = lambda: coco.App(unique("many"), main_keyed)  # type: ignore[method-assign]
    version = [0]

    async def round_() -> None:
        version[0] += 1
        changed = list(range((version[0] * 10) % PRODUCERS, (version[0] * 10) % PRODUCERS + 10))
        changes = {}
        for p in changed:
            for k in range(0, KEYS_EACH, 10):
                key = f"p{p}-{k}"
                data[p][key] = changes[key] = value_of(p * KEYS_EACH + k, version[0])
        harness.waiting = changes
        harness.done = anyio.Event()
        done = anyio.Event()
        with anyio.fail_after(TIMEOUT):
            await send.send((changed, done))
            await done.wait()
            await harness.wait()

    with running(harness) as portal:
        benchmark.pedantic(lambda: portal.call(round_), rounds=20, iterations=1)
    benchmark.extra_info["entries"] = PRODUCERS * KEYS_EACH


# -- 5. latency ----------------------------------------------------------------------


def test_latency(benchmark: Any, impl: str) -> None:
    """One change in a map of 10 entries until the consumer's processor sees it.

    The benchmark's own timing includes the hop from the benchmark thread into
    the event loop; ``extra_info`` has the in-loop latency (p50, p99): from the
    producer's refresh to the processor's call.
    """
    live_only_livemap(impl)
    harness = Harness(impl, {f"k{i}": value_of(i, 0) for i in range(10)})
    version = [0]
    times: list[float] = []

    async def timed_round() -> None:
        await harness.round()
        times.append(harness.noted_at - harness.started_at)

    with running(harness) as portal:

        def one() -> None:
            version[0] += 1
            harness.state["k3"] = value_of(3, version[0])
            portal.call(timed_round)

        benchmark.pedantic(one, rounds=200, iterations=1, warmup_rounds=5)
    times.sort()
    benchmark.extra_info["p50_ms"] = round(times[len(times) // 2] * 1000, 3)
    benchmark.extra_info["p99_ms"] = round(times[max(0, int(len(times) * 0.99) - 1)] * 1000, 3)


# -- 6. I/O-bound consumer -----------------------------------------------------------


def test_io_bound(benchmark: Any, impl: str) -> None:
    """IO_CHANGES changes, each processor call awaits a 5 ms sleep."""
    live_only_livemap(impl)
    harness = Harness(
        impl,
        {f"k{i}": value_of(i, 0) for i in range(IO_CHANGES)},
        sleep=IO_SLEEP,
        concurrency=1024,
    )
    version = [0]
    with running(harness) as portal:

        def one() -> None:
            version[0] += 1
            harness.state = {f"k{i}": value_of(i, version[0]) for i in range(IO_CHANGES)}
            portal.call(harness.round)

        rounds = 1 if impl == "cocoindex" else 5
        benchmark.pedantic(one, rounds=rounds, iterations=1)
    benchmark.extra_info["changes"] = IO_CHANGES


# -- 7. memory -----------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent(
    """
    import gc, json, os, sys
    N = int(sys.argv[1]); impl = sys.argv[2]

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    if impl == "cocoindex":
        import cocoindex as coco
        from cocoindex.resources.live_map import LiveMap
    else:
        import livemap as coco, importlib
        from livemap import LiveMap
        from livemap._runtime import _tables
        _tables.use_core(importlib.import_module(
            "livemap_core._core" if impl == "cython" else "livemap_core._fallback"))
    keys = [f"k{i}" for i in range(N)]
    holder = {}
    size = [10]

    @coco.fn
    async def produce(lm):
        for i, key in enumerate(keys[: size[0]]):
            lm.declare_entry(key, i)

    @coco.fn
    async def process(value):
        pass

    @coco.fn
    async def main():
        lm = await LiveMap.create()
        holder["lm"] = lm
        h = await coco.mount(produce, lm)
        await h.ready()
        await coco.mount_each(process, lm)

    # warm-up: imports and one-time set-up are not per-entry costs
    coco.App("warm-up", main).update_blocking()
    size[0] = N
    app = coco.App("memory", main)
    gc.collect()
    before = rss()
    app.update_blocking()
    gc.collect()
    after = rss()
    print(json.dumps({"bytes_per_entry": (after - before) / N}))
    """
)


def test_memory_per_entry(benchmark: Any, impl: str) -> None:
    """RSS per entry after a FILL_N fill, consumer components included
    (measured in a fresh process; keys are allocated before the baseline, and
    a 10-entry warm-up run does the imports and one-time set-up first)."""
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("RSS is read from /proc")
    result: dict[str, float] = {}

    def run() -> None:
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, str(FILL_N), impl],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["bytes_per_entry"] = round(result["bytes_per_entry"], 1)
    assert result["bytes_per_entry"] > 0
