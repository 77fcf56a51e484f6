"""One change's way from a producer's commit to its processor, made hostile.

A ``mount_each``'s pool worker keeps one cancel scope over its runs and its
parks (until a run in it is cancelled), and a consumer goes idle where its
queue does, without waking its task.  These tests try to break what that
must keep: a change arriving while its key runs waits for that run and the
latest value wins, a key never runs twice at once, a run cancelled on a
worker spares the runs after it (also after the worker parked), a
``BaseException`` from a processor on a parked-then-woken worker ends the
run with no task left behind, and a catch-up run still ends only once every
change was processed.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from helpers import LiveDriver as Driver
from helpers import LiveProducer as Producer
from helpers import current_tasks, wait_for

import livemap as coco
from livemap import LiveMap

pytestmark = pytest.mark.anyio

TIMEOUT = 10.0

Value = tuple[str, int]  # (key, version): the processor gets only the value


class Recorder:
    """What the processor saw: each run's value, runs under way, overlaps,
    cancelled runs; ``gates`` holds a run of a value until its event is set."""

    def __init__(self) -> None:
        self.runs: list[Value] = []
        self.finished: list[Value] = []
        self.cancelled: list[Value] = []
        self.active: set[str] = set()
        self.twice: list[str] = []
        self.gates: dict[Value, anyio.Event] = {}
        self.raise_on: dict[Value, BaseException] = {}

    async def run(self, value: Value) -> None:
        key = value[0]
        if key in self.active:
            self.twice.append(key)
        self.active.add(key)
        self.runs.append(value)
        try:
            if value in self.raise_on:
                raise self.raise_on[value]
            gate = self.gates.get(value)
            if gate is not None:
                await gate.wait()
            elif value[1] % 2:
                await anyio.sleep(0)  # odd versions suspend once
            self.finished.append(value)
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(value)
            raise
        finally:
            self.active.discard(key)

    def last(self, key: str) -> Value | None:
        done = [v for v in self.finished if v[0] == key]
        return done[-1] if done else None


def each_app(name: str, driver: Driver, rec: Recorder, holder: dict[str, Any]) -> coco.App:
    @coco.fn
    async def process(value: Value) -> None:
        await rec.run(value)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, Value] = await LiveMap.create()
        holder["lm"] = lm
        producer = await coco.mount(Producer, lm, driver)
        await producer.ready()
        await coco.mount_each(process, lm)

    return coco.App(name, main)


async def test_a_change_while_its_key_runs_waits_for_it_and_the_latest_wins() -> None:
    driver = Driver({"a": 0, "b": 0})
    rec = Recorder()
    holder: dict[str, Any] = {}
    gate = rec.gates[("a", 2)] = anyio.Event()
    before = current_tasks()
    try:
        async with each_app("mid-run", driver, rec, holder).update(live=True) as h:
            with anyio.fail_after(TIMEOUT):
                await h.ready()
            await driver.refresh(a=2)  # its run waits on the gate
            await wait_for(lambda: ("a", 2) in rec.runs)
            for version in (3, 4, 5, 6):  # while it runs: each waits behind it
                await driver.refresh(a=version)
            await driver.refresh(b=1)  # another key is not held back
            await wait_for(lambda: rec.last("b") == ("b", 1))
            assert rec.active == {"a"}
            gate.set()
            with anyio.fail_after(TIMEOUT):
                await holder["lm"].settle()
            # a's changes waited behind its run, coalesced: its latest value
            # ran once, after that run was over
            assert [v for v in rec.runs if v[0] == "a"] == [("a", 0), ("a", 2), ("a", 6)]
            assert rec.last("a") == ("a", 6)
            # a change after the worker parked again still runs
            await driver.refresh(a=7, b=2)
            with anyio.fail_after(TIMEOUT):
                await holder["lm"].settle()
            assert rec.last("a") == ("a", 7) and rec.last("b") == ("b", 2)
            await h.stop()
    finally:
        driver.close()
    assert rec.twice == [] and rec.cancelled == []
    assert current_tasks() == before


async def test_rapid_changes_of_one_key_never_overlap_and_the_latest_wins() -> None:
    driver = Driver({"a": 0, "b": 0})
    rec = Recorder()
    holder: dict[str, Any] = {}
    try:
        async with each_app("rapid", driver, rec, holder).update(live=True) as h:
            with anyio.fail_after(TIMEOUT):
                await h.ready()
            for version in range(1, 201):  # odd versions' runs suspend
                await driver.refresh(a=version, b=version // 3)
            with anyio.fail_after(TIMEOUT):
                await holder["lm"].settle()
            await h.stop()
    finally:
        driver.close()
    assert rec.twice == []
    assert rec.last("a") == ("a", 200) and rec.last("b") == ("b", 66)
    for key in ("a", "b"):  # a key's runs follow its changes, in order
        versions = [v[1] for v in rec.runs if v[0] == key]
        assert versions == sorted(set(versions))


async def test_a_run_cancelled_on_a_worker_spares_the_runs_after_it() -> None:
    """Re-running the ``mount_each`` with another argument cancels the run
    under way; the worker's next runs, before and after it parks, are not
    cancelled."""
    driver = Driver({"a": 0, "b": 0})
    rec = Recorder()
    holder: dict[str, Any] = {}
    tags = anyio.create_memory_object_stream[str](10)
    gate = rec.gates[("a", 2)] = anyio.Event()  # never set: a's run waits until cancelled
    seen: list[tuple[str, Value]] = []

    @coco.fn
    async def process(value: Value, tag: str) -> None:
        seen.append((tag, value))
        await rec.run(value)

    class Consumer:
        def __init__(self, lm: LiveMap[str, Value]) -> None:
            self.lm = lm
            self.tag = "first"

        async def process(self) -> None:
            await coco.mount_each(process, self.lm, self.tag)

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.update_full()
            await op.mark_ready()
            async for tag in tags[1]:
                self.tag = tag
                await op.update_full()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, Value] = await LiveMap.create()
        holder["lm"] = lm
        producer = await coco.mount(Producer, lm, driver)
        await producer.ready()
        await coco.mount(Consumer, lm)

    before = current_tasks()
    try:
        async with coco.App("cancelled", main).update(live=True) as h:
            with anyio.fail_after(TIMEOUT):
                await h.ready()
            await driver.refresh(a=2)
            await wait_for(lambda: ("a", 2) in rec.runs)
            await tags[0].send("second")  # the re-run cancels a's run
            await wait_for(lambda: ("a", 2) in rec.cancelled)
            await wait_for(lambda: ("second", ("b", 0)) in seen and ("second", ("a", 2)) in seen)
            gate.set()  # (a's run on the new scan passes the gate)
            await wait_for(lambda: rec.last("a") == ("a", 2) and not rec.active)
            await anyio.sleep(0.01)  # the workers park
            await driver.refresh(a=3, b=1)
            with anyio.fail_after(TIMEOUT):
                await holder["lm"].settle()
            await wait_for(lambda: rec.last("a") == ("a", 3) and rec.last("b") == ("b", 1))
            await h.stop()
    finally:
        driver.close()
        tags[0].close()
        tags[1].close()
    assert rec.cancelled == [("a", 2)]  # nothing after it was cancelled
    assert ("second", ("a", 3)) in seen and ("second", ("b", 1)) in seen
    assert rec.twice == []
    assert current_tasks() == before


class Stop(BaseException):
    """Not an ``Exception``: nothing may swallow it."""


@pytest.mark.parametrize("exc_type", [SystemExit, Stop])
async def test_a_base_exception_from_a_processor_on_a_woken_worker_ends_the_run(
    exc_type: type[BaseException],
) -> None:
    driver = Driver({"a": 0, "b": 0})
    rec = Recorder()
    holder: dict[str, Any] = {}
    rec.raise_on[("a", 2)] = exc_type()
    before = current_tasks()
    caught: list[BaseException] = []
    try:
        with anyio.fail_after(TIMEOUT):
            try:
                async with each_app("interrupted-worker", driver, rec, holder).update(
                    live=True
                ) as h:
                    await h.ready()
                    await anyio.sleep(0.01)  # the workers park
                    await driver.refresh(a=2)
                    await anyio.sleep_forever()
            except BaseException as exc:  # (what came out is checked below)
                caught.append(exc)
    finally:
        driver.close()
    assert len(caught) == 1
    found = caught[0]
    if exc_type is SystemExit:
        assert type(found) is SystemExit  # bare, as from any other user code
    else:
        leaves: list[BaseException] = []
        stack = [found]
        while stack:
            exc = stack.pop()
            inner = getattr(exc, "exceptions", None)  # an exception group's
            if inner is not None:
                stack.extend(inner)
            else:
                leaves.append(exc)
        assert any(type(exc) is Stop for exc in leaves), leaves
    assert rec.twice == []
    assert current_tasks() == before


async def test_a_catch_up_run_ends_only_once_every_change_is_processed() -> None:
    """The consumer goes idle between the producer's commits (where its
    queue does, without its task waking): the catch-up still waits for the
    producer's last commit and its processing."""
    rec = Recorder()
    seen: dict[str, Value] = {}

    class Slow:
        """Declares into two maps: one a ``mount_each`` consumes, one a
        subscriber of its own."""

        def __init__(self, lm: LiveMap[str, Value], watched: LiveMap[str, Value]) -> None:
            self.lm = lm
            self.watched = watched
            self.version = 0

        def process(self) -> None:
            for key in ("a", "b"):
                self.lm.declare_entry(key, (key, self.version))
                self.watched.declare_entry(key, (key, self.version))

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            for version in range(1, 6):
                self.version = version
                await op.update_full()
                await anyio.sleep(0.005)  # the consumer is idle meanwhile
            await op.mark_ready()

    class Subscriber:
        def __init__(self, lm: LiveMap[str, Value]) -> None:
            self.lm = lm

        async def update_all(self) -> None:
            async for key, value in self.lm:
                seen[key] = value

        async def mark_ready(self) -> None:
            pass

        async def update(self, key: str, value: Value) -> coco.ReadyHandle:
            await anyio.sleep(0)
            seen[key] = value
            return coco.ReadyHandle()

        async def delete(self, key: str) -> coco.ReadyHandle:
            seen.pop(key, None)
            return coco.ReadyHandle()

    class Watcher:
        def __init__(self, lm: LiveMap[str, Value]) -> None:
            self.lm = lm

        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.mark_ready()
            await self.lm.watch(Subscriber(self.lm))

    @coco.fn
    async def process(value: Value) -> None:
        await rec.run(value)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, Value] = await LiveMap.create()
        watched: LiveMap[str, Value] = await LiveMap.create()
        await coco.mount(Watcher, watched)
        await coco.mount(Slow, lm, watched)
        await coco.mount_each(process, lm)

    with anyio.fail_after(TIMEOUT):
        await coco.App("catch-up", main).update()
    assert rec.last("a") == ("a", 5) and rec.last("b") == ("b", 5)
    assert seen == {"a": ("a", 5), "b": ("b", 5)}
    assert rec.twice == []


@pytest.mark.parametrize(
    "backends",
    [("asyncio", "trio", "asyncio"), ("trio", "asyncio", "trio")],
    ids=["asyncio-trio-asyncio", "trio-asyncio-trio"],
)
def test_live_runs_on_one_loop_then_another_with_workers_parked_between(
    backends: tuple[str, str, str],
) -> None:
    """A live run stopped while its pool workers are parked in the scope they
    keep over their parks; the next live run of the same app, on another
    event loop, processes every change (into a target: the realistic
    shape), and no task of either run is left."""
    rows: dict[str, int] = {}

    def apply(batch: coco.TargetBatch[str, int]) -> None:
        for key in batch.deletes:
            rows.pop(key, None)
        rows.update(batch.upserts)

    sink = coco.KeyedTarget[str, int]("rows", apply)
    seen: list[tuple[str, int]] = []

    @coco.fn
    async def process(value: tuple[str, int]) -> None:
        seen.append(value)
        sink.declare(value[0], value[1])

    def one_run(version: int) -> None:
        driver = Driver({"a": version, "b": version, "c": version})

        @coco.fn
        async def main() -> None:
            lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
            await coco.mount(Producer, lm, driver)
            await coco.mount_each(process, lm.consumer(concurrency=2))

        async def go() -> None:
            before = len(current_tasks())
            try:
                async with coco.App("loops", main).update(live=True) as handle:
                    with anyio.fail_after(TIMEOUT):
                        await handle.ready()
                        await wait_for(lambda: rows == {"a": version, "b": version, "c": version})
                        await anyio.sleep(0.01)  # the workers parked
                        await driver.refresh(b=version + 1, c=None)
                        await wait_for(lambda: rows == {"a": version, "b": version + 1})
                    await handle.stop()
            finally:
                driver.close()
            assert len(current_tasks()) == before

        anyio.run(go, backend=backends[version])

    for version in range(3):
        one_run(version)
    assert rows == {"a": 2, "b": 3}
    assert ("b", 3) in seen and ("c", 2) in seen
