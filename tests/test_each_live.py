"""``mount_each`` with a live-component class as its processor: one live
component per entry, made with the entry's value, made again when the value
changes and unmounted with the entry — also while it runs."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, Recorder, current_tasks, wait_for

import livemap as coco
from livemap import KeyedTarget, LiveMap, TargetBatch

pytestmark = pytest.mark.anyio


class Rows:
    """A KeyedTarget whose sink keeps the rows and every batch."""

    def __init__(self) -> None:
        self.rows: dict[Any, Any] = {}
        self.batches: list[TargetBatch[Any, Any]] = []
        self.target: KeyedTarget[Any, Any] = KeyedTarget("rows", self._apply)

    def _apply(self, batch: TargetBatch[Any, Any]) -> None:
        self.batches.append(batch)
        for key in batch.deletes:
            del self.rows[key]
        self.rows.update(batch.upserts)


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def of(self, what: str) -> list[Any]:
        return [v for e, v in self.events if e == what]


class Entry:
    """One entry's live component: declares ``name -> n * scale`` in its
    ``process()``, marks itself ready, then waits (until cancelled) —
    unless told to ``hold`` before marking ready, or to ``fail``."""

    def __init__(self, value: tuple[str, int], rows: Rows, log: Log, scale: int = 1) -> None:
        self.name, self.n = value
        self.rows = rows
        self.log = log
        self.scale = scale

    def process(self) -> None:
        self.rows.target.declare(self.name, self.n * self.scale)

    async def process_live(self, operator: coco.LiveComponentOperator) -> None:
        self.log.events.append(("start", (self.name, self.n)))
        try:
            if self.n < 0:
                raise ValueError(f"entry {self.name} fails")
            await operator.update_full()
            if self.n == 99:
                await anyio.sleep_forever()  # never ready
            await operator.mark_ready()
            await anyio.sleep_forever()
        finally:
            self.log.events.append(("end", (self.name, self.n)))


async def test_one_live_component_per_entry_of_a_list() -> None:
    rows, log = Rows(), Log()

    async def main() -> None:
        items = [("a", ("a", 1)), ("b", ("b", 2))]
        handle = await coco.mount_each(Entry, items, rows, log, scale=10)
        await handle.ready()

    before = current_tasks()
    with anyio.fail_after(TIMEOUT):
        await coco.App("each-live-list", main).update()
    assert rows.rows == {"a": 10, "b": 20}
    assert sorted(log.of("start")) == [("a", 1), ("b", 2)]
    assert sorted(log.of("end")) == [("a", 1), ("b", 2)]  # cancelled as the run ended
    assert current_tasks() == before


def producer(state: dict[str, int]) -> Any:
    @coco.fn
    def produce(lm: LiveMap[str, tuple[str, int]]) -> None:
        for name, n in state.items():
            lm.declare_entry(name, (name, n))

    return produce


class Control:
    """Re-runs the producer on demand, from a live component (the test's
    hand into the running app)."""

    def __init__(self) -> None:
        self.send, self.recv = anyio.create_memory_object_stream[Any](8)

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.send.close()
        self.recv.close()


class Driver:
    def __init__(self, control: Control, produce: Any, lm: LiveMap[str, Any]) -> None:
        self.control = control
        self.produce = produce
        self.lm = lm

    def process(self) -> None:
        pass

    async def process_live(self, operator: coco.LiveComponentOperator) -> None:
        await (await operator.update("p", self.produce, self.lm)).ready()
        await operator.mark_ready()
        async for _ in self.control.recv:
            await (await operator.update("p", self.produce, self.lm)).ready()


async def test_entries_of_a_live_map_added_updated_and_deleted_while_running() -> None:
    rows, log, control = Rows(), Log(), Control()
    state = {"a": 1, "b": 2}
    recorder = Recorder()

    async def main() -> None:
        lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        await coco.mount(coco.component_subpath("driver"), Driver, control, producer(state), lm)
        await coco.mount_each(coco.component_subpath("each"), Entry, lm, rows, log)

    app = coco.App(coco.AppConfig("each-live-map", exception_handler=recorder), main)
    with control, anyio.fail_after(TIMEOUT):
        async with app.update(live=True) as handle:
            await handle.ready()
            await wait_for(lambda: rows.rows == {"a": 1, "b": 2})
            assert log.of("end") == []  # running
            batches = len(rows.batches)

            # an update while its component runs: the old one ends, a new one starts
            state["a"] = 5
            state["c"] = 3
            await control.send.send(None)
            await wait_for(lambda: rows.rows == {"a": 5, "b": 2, "c": 3})
            assert ("a", 1) in log.of("end")
            assert log.of("start").count(("a", 5)) == 1
            new = rows.batches[batches:]
            assert all(not b.deletes for b in new)  # a -> 5 is an update, never delete + insert

            # a delete while it runs: cancelled, its rows released downstream
            del state["b"]
            await control.send.send(None)
            await wait_for(lambda: "b" not in rows.rows)
            assert ("b", 2) in log.of("end")
            assert handle.stats().by_component[Entry.__qualname__].num_deletes == 1
    assert recorder.calls == []
    assert sorted(log.of("start")) == sorted(log.of("end"))  # every one ended with the run


async def test_a_catch_up_run_over_a_live_map_ends_with_its_entries_in_place() -> None:
    rows, log = Rows(), Log()
    state = {k: i for i, k in enumerate("abcdef")}

    async def main() -> None:
        lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        # the consumer first: it sees the entries as they come
        await coco.mount_each(coco.component_subpath("each"), Entry, lm, rows, log)
        await coco.mount(coco.component_subpath("p"), producer(state), lm)

    app = coco.App("each-live-catch-up", main)
    before = current_tasks()
    with anyio.fail_after(TIMEOUT):
        await app.update()
        assert rows.rows == state
        state.pop("a")
        state["b"] = 20
        await app.update()  # the second run: the same tree
    assert rows.rows == state
    assert current_tasks() == before


async def test_a_failing_entry_is_reported_and_the_others_go_on() -> None:
    rows, log = Rows(), Log()
    recorder = Recorder()
    items = [("a", ("a", 1)), ("bad", ("bad", -1)), ("c", ("c", 3))]

    async def main() -> None:
        await coco.mount_each(coco.component_subpath("each"), Entry, items, rows, log)

    app = coco.App(coco.AppConfig("each-live-fails", exception_handler=recorder), main)
    with anyio.fail_after(TIMEOUT):
        await app.update()
    assert rows.rows == {"a": 1, "c": 3}
    [(exc, ctx)] = recorder.calls
    assert isinstance(exc, ValueError) and "bad" in str(exc)
    assert str(ctx.stable_path) == "/'each'/'bad'"
    assert ctx.processor_name == Entry.__qualname__


async def test_an_entry_deleted_before_its_component_is_ready() -> None:
    rows, log, control = Rows(), Log(), Control()
    state = {"a": 1, "slow": 99}  # 'slow' never marks itself ready

    async def main() -> None:
        lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        await coco.mount(coco.component_subpath("driver"), Driver, control, producer(state), lm)
        await coco.mount_each(coco.component_subpath("each"), Entry, lm, rows, log)

    app = coco.App("each-live-unready", main)
    with control, anyio.fail_after(TIMEOUT):
        async with app.update(live=True):
            await wait_for(lambda: ("slow", 99) in log.of("start"))
            await anyio.sleep(0.01)
            assert rows.rows == {"a": 1, "slow": 99}
            del state["slow"]
            await control.send.send(None)
            # not held back by a component that never marked itself ready
            await wait_for(lambda: ("slow", 99) in log.of("end"))
            await wait_for(lambda: rows.rows == {"a": 1})


async def test_per_entry_live_components_hold_no_slot_of_the_bound() -> None:
    rows, log = Rows(), Log()
    items = [(k, (k, i)) for i, k in enumerate("abcd")]

    async def main() -> None:
        await coco.mount_each(coco.component_subpath("each"), Entry, items, rows, log)

    app = coco.App(coco.AppConfig("each-live-bound", max_inflight_components=1), main)
    with anyio.fail_after(TIMEOUT):
        await app.update()
    assert rows.rows == {k: i for i, k in enumerate("abcd")}


async def test_an_entry_updated_before_its_component_is_ready() -> None:
    rows, log, control = Rows(), Log(), Control()
    state = {"a": 99}  # its first component never marks itself ready

    async def main() -> None:
        lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        await coco.mount(coco.component_subpath("driver"), Driver, control, producer(state), lm)
        await coco.mount_each(coco.component_subpath("each"), Entry, lm, rows, log)

    app = coco.App("each-live-superseded", main)
    with control, anyio.fail_after(TIMEOUT):
        async with app.update(live=True):
            await wait_for(lambda: rows.rows == {"a": 99})
            state["a"] = 7
            await control.send.send(None)
            await wait_for(lambda: rows.rows == {"a": 7})
            assert log.of("end") == [("a", 99)]
            assert log.of("start") == [("a", 99), ("a", 7)]
