"""One key is never processed twice at once, also across a re-mount of the
component holding the ``mount_each``: the old run of a key (its ``finally``
included) has finished before the key runs again."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, Recorder, wait_for

import livemap as coco
from livemap import KeyedTarget, LiveMap

pytestmark = pytest.mark.anyio

KEYS = [f"k{i}" for i in range(20)]


class Tracker:
    def __init__(self) -> None:
        self.active: dict[str, int] = {}
        self.overlaps: list[str] = []
        self.runs = 0

    def enter(self, key: str) -> None:
        self.runs += 1
        self.active[key] = self.active.get(key, 0) + 1
        if self.active[key] > 1:
            self.overlaps.append(key)

    def leave(self, key: str) -> None:
        self.active[key] -= 1


@pytest.mark.parametrize("shape", ["trivial", "declares"])
async def test_a_key_never_runs_twice_at_once_across_remounts(shape: str) -> None:
    tracker = Tracker()
    sink = KeyedTarget[str, int]("rows", lambda batch: None)
    rounds = 30

    @coco.fn
    async def process(value: tuple[str, int]) -> None:
        key, _ = value
        tracker.enter(key)
        try:
            if shape == "declares":
                sink.declare(key, value[1])
            await anyio.sleep(0.001)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.002)  # a slow cleanup
                tracker.leave(key)

    @coco.fn
    async def produce(lm: LiveMap[str, tuple[str, int]], n: int) -> None:
        for key in KEYS:
            lm.declare_entry(key, (key, n))

    class Parent:
        """Re-runs its process() (which mounts the mount_each) over and over."""

        def __init__(self) -> None:
            self.n = 0

        async def process(self) -> None:
            lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
            await coco.mount(produce, lm, self.n)
            # the consumer options change between runs too
            await coco.mount_each(process, lm.consumer(concurrency=4 + 4 * (self.n % 2)))

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.update_full()
            await op.mark_ready()
            for n in range(1, rounds):
                self.n = n
                with anyio.move_on_after(0.003):
                    await op.update_full()

    @coco.fn
    async def main() -> None:
        await coco.mount(Parent)

    async with coco.App("remount", main).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
            while tracker.runs < rounds * 5:
                await anyio.sleep(0.005)
    assert tracker.runs >= rounds * 5
    assert tracker.overlaps == []


async def test_a_key_never_runs_twice_at_once_when_its_value_changes_mid_run() -> None:
    """A new value for a key whose run (with a slow shielded cleanup) is
    cancelled by the change waits for that run to end."""
    tracker = Tracker()
    holder: dict[str, Any] = {}
    values = {"k": 0}
    step = anyio.Event()

    @coco.fn
    async def process(value: int) -> None:
        tracker.enter("k")
        try:
            await anyio.sleep(0.001)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.002)
                tracker.leave("k")

    class Producer:
        def __init__(self, lm: LiveMap[str, int]) -> None:
            self.lm = lm

        def process(self) -> None:
            self.lm.declare_entry("k", values["k"])

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.update_full()
            await op.mark_ready()
            await step.wait()
            for n in range(1, 60):
                values["k"] = n
                await op.update_full()
                await anyio.sleep(0.0005)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        holder["lm"] = lm
        await coco.mount(Producer, lm)
        await coco.mount_each(process, lm)

    async with coco.App("change", main).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
            step.set()
            while values["k"] < 59:
                await anyio.sleep(0.005)
            await holder["lm"].settle()
    assert tracker.overlaps == []
    assert tracker.runs >= 2


def _fill_app(n: int, done: set[str], gate: dict[str, bool]) -> coco.App:
    @coco.fn
    async def process(value: str) -> None:
        if gate["slow"]:
            await anyio.sleep(1)
        done.add(value)

    @coco.fn
    async def produce(lm: LiveMap[str, str]) -> None:
        for i in range(n):
            lm.declare_entry(f"k{i}", f"k{i}")

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, str] = await LiveMap.create()
        await coco.mount(produce, lm)
        await coco.mount_each(process, lm.consumer(concurrency=4))

    return coco.App("fill", main)


@pytest.mark.parametrize(
    "backends", [("asyncio", "trio"), ("trio", "asyncio"), ("asyncio", "asyncio")]
)
def test_nothing_bound_to_one_event_loop_outlives_its_run(backends: tuple[str, str]) -> None:
    """A run stopped while the initial scan waits for room in the pool's
    queue leaves nothing of its event loop behind: the next run, on another
    loop, processes every entry."""
    n = 5000
    done: set[str] = set()
    gate = {"slow": True}
    app = _fill_app(n, done, gate)

    async def stopped_run() -> None:
        with anyio.move_on_after(0.3):
            await app.update()

    async def full_run() -> None:
        with anyio.fail_after(TIMEOUT * 3):
            await app.update()

    anyio.run(stopped_run, backend=backends[0])
    assert len(done) < n
    gate["slow"] = False
    anyio.run(full_run, backend=backends[1])
    assert len(done) == n


@pytest.mark.parametrize("swap", ["processor", "subpath", "arguments"])
async def test_a_mount_each_replaced_by_its_parent_takes_over_the_map(swap: str) -> None:
    """The parent re-runs and mounts the consumer with another processor (or
    at another subpath, or the same with other arguments): the new mount_each
    is the map's consumer at once, not a second one; every entry is processed
    again and its rows replace the old ones without a delete."""
    reported: list[BaseException] = []
    batches: list[tuple[list[Any], list[Any]]] = []
    sink = KeyedTarget[str, int](
        "rows", lambda b: batches.append((list(b.upserts), list(b.deletes)))
    )
    done = anyio.Event()

    tracker = Tracker()

    async def process(value: tuple[str, int], offset: int) -> None:
        tracker.enter(value[0])
        try:
            sink.declare(value[0], value[1] + offset)
            await anyio.sleep(0.001)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.002)  # a slow cleanup
                tracker.leave(value[0])

    @coco.fn
    async def first(value: tuple[str, int], offset: int) -> None:
        await process(value, offset)

    @coco.fn
    async def second(value: tuple[str, int], offset: int) -> None:
        await process(value, offset)

    @coco.fn
    async def host(lm: LiveMap[str, tuple[str, int]], n: int) -> None:
        fn = second if n and swap == "processor" else first
        if swap == "processor":  # the path is the processor's name: a new path
            await coco.mount_each(fn, lm, 100 * n)
            return
        sub = coco.component_subpath("each", n if swap == "subpath" else 0)
        await coco.mount_each(sub, fn, lm, 100 * n)

    class Driver:
        def __init__(self, lm: LiveMap[str, tuple[str, int]]) -> None:
            self.lm = lm

        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.mark_ready()
            # (main's entries commit once this component is ready)
            await wait_for(lambda: self.lm.stats().entries == 5)
            await op.update("consumer", host, self.lm, 0)
            # re-mounted while the first one's runs are under way
            await wait_for(lambda: any(tracker.active.values()))
            h = await op.update("consumer", host, self.lm, 1)
            with anyio.fail_after(TIMEOUT):
                await h.ready()
                await self.lm.settle()
            done.set()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        for i, key in enumerate(KEYS[:5]):
            lm.declare_entry(key, (key, i))
        await coco.mount(Driver, lm)

    config = coco.AppConfig("takeover", exception_handler=lambda e, c: reported.append(e))
    handle = coco.App(config, main).update(live=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(handle.result)
        with anyio.fail_after(TIMEOUT):
            await done.wait()
            await handle.stop()
    assert reported == []
    assert tracker.overlaps == []
    deletes = [k for _, d in batches for k in d]
    assert deletes == []
    final: dict[str, int] = {}
    for upserts, _ in batches:
        final.update(upserts)
    assert final == {key: i + 100 for i, key in enumerate(KEYS[:5])}


async def test_a_failing_key_deleted_across_a_remount_fails_no_more() -> None:
    """A key whose processing failed is deleted while its consumer is being
    re-mounted: the new scan does not see it, and it is not reported as
    failing any more."""
    done = anyio.Event()

    @coco.fn
    async def process(value: int, round_: int) -> None:
        if value < 0:
            raise ValueError(f"bad value {value}")

    @coco.fn
    async def host(lm: LiveMap[str, int], round_: int) -> None:
        if round_ == 0:
            retry = coco.RetryPolicy(max_attempts=2, initial_backoff=0.0)
            await coco.mount_each(process, lm.consumer(concurrency=8, retry=retry), round_)
        else:
            await coco.mount_each(process, lm.consumer(concurrency=1), round_)

    @coco.fn
    async def produce(lm: LiveMap[str, int], values: dict[str, int]) -> None:
        for key, n in values.items():
            lm.declare_entry(key, n)

    class Driver:
        def __init__(self, lm: LiveMap[str, int]) -> None:
            self.lm = lm

        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.mark_ready()
            with anyio.fail_after(TIMEOUT):
                await (await op.update("p", produce, self.lm, {"bad": -1, "ok": 1})).ready()
                await (await op.update("consumer", host, self.lm, 0)).ready()
                await self.lm.settle()
            assert set(self.lm.stats().failing) == {"bad"}
            # re-mount the consumer and drop the failing key in one breath
            h = await op.update("consumer", host, self.lm, 1)
            with anyio.fail_after(TIMEOUT):
                await (await op.update("p", produce, self.lm, {"ok": 1})).ready()
                await h.ready()
                await self.lm.settle()
            assert self.lm.stats().failing == {}
            done.set()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        await coco.mount(Driver, lm)

    config = coco.AppConfig("failing-gone", exception_handler=lambda e, c: None)
    handle = coco.App(config, main).update(live=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(handle.result)
        with anyio.fail_after(TIMEOUT):
            await done.wait()
            await handle.stop()


@pytest.mark.parametrize("what", ["same value", "gone and back"])
async def test_a_run_dropped_in_its_cleanup_leaves_nothing_behind(what: str) -> None:
    """A key's run declares, then waits in a shielded ``finally`` while its
    consumer is re-mounted with new arguments (the key's run is dropped; the
    entry stays, or is deleted before the re-mount and declared again
    after it).  The worker that ran it goes on with
    the key's next run: that run starts clean (it declares the same row again
    without a ``DuplicateDeclarationError``), and its row is the one that
    stays."""
    rows: dict[str, int] = {}

    def apply(batch: coco.TargetBatch[str, int]) -> None:
        rows.update(batch.upserts)
        for key in batch.deletes:
            rows.pop(key, None)

    sink = KeyedTarget[str, int](f"dropped-{what}", apply)
    in_cleanup = anyio.Event()
    release = anyio.Event()
    calls: list[tuple[int, int]] = []
    reports = Recorder()
    done = anyio.Event()
    hosts: list[int] = []

    @coco.fn
    async def process(value: int, tag: int) -> None:
        calls.append((value, tag))
        sink.declare("row", 10 * value + tag)
        try:
            await anyio.sleep(0)
        finally:
            if not in_cleanup.is_set():
                with anyio.CancelScope(shield=True):
                    in_cleanup.set()
                    await release.wait()

    @coco.fn
    async def host(lm: LiveMap[str, int], tag: int) -> None:
        await coco.mount_each(process, lm.consumer(concurrency=1), tag)
        hosts.append(tag)

    @coco.fn
    async def produce(lm: LiveMap[str, int], values: dict[str, int]) -> None:
        for key, n in values.items():
            lm.declare_entry(key, n)

    class Driver:
        def __init__(self, lm: LiveMap[str, int]) -> None:
            self.lm = lm

        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.mark_ready()
            with anyio.fail_after(TIMEOUT):
                await (await op.update("p", produce, self.lm, {"k": 1})).ready()
                consumer = await op.update("consumer", host, self.lm, 0)
                await in_cleanup.wait()
                if what == "gone and back":
                    await (await op.update("p", produce, self.lm, {})).ready()
                consumer = await op.update("consumer", host, self.lm, 1)
                await wait_for(lambda: hosts[-1:] == [1])
                if what == "gone and back":
                    await (await op.update("p", produce, self.lm, {"k": 2})).ready()
                # (the consumer's side of the change: a few turns of the loop)
                await anyio.sleep(0.01)
                release.set()
                await consumer.ready()
                await self.lm.settle()
            done.set()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        await coco.mount(Driver, lm)

    config = coco.AppConfig(f"dropped-{what}", exception_handler=reports)
    handle = coco.App(config, main).update(live=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(handle.result)
        with anyio.fail_after(TIMEOUT):
            await done.wait()
            await handle.stop()
    assert reports.calls == []
    last = (1, 1) if what == "same value" else (2, 1)
    assert calls[0] == (1, 0) and calls[-1] == last, calls
    assert rows == {"row": 10 * last[0] + last[1]}
