"""A key passing between the per-entry components of one ``mount_each`` is a
transfer (SPEC section 4, Ownership): an entry renamed, whose component
declares the same downstream key, is one upsert downstream (nothing if the
values are equal), never a delete then an insert, and no conflict is
reported.  In a catch-up re-run (the scan's sweep unmounts the old entry's
component before the new one has committed) and while live (the consumer
delivers the delete and the insert), for every processor kind."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import wait_for

import livemap as coco
from livemap import KeyedTarget, LiveMap, TargetBatch

pytestmark = pytest.mark.anyio

_names = itertools.count()

KINDS = ["sync", "async", "live"]
# (the old entry's value, the new entry's value): equal, then different
VALUES = [("same", "same"), ("one", "two")]


class Sink:
    """A keyed target that records every batch and every reported error."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[tuple[str, Any]], list[str]]] = []
        self.errors: list[BaseException] = []
        self.target: KeyedTarget[str, Any] = KeyedTarget("out", self._apply)

    def _apply(self, batch: TargetBatch[str, Any]) -> None:
        self.batches.append((list(batch.upserts), list(batch.deletes)))

    @property
    def deletes(self) -> list[str]:
        return [key for _, deletes in self.batches for key in deletes]

    @property
    def upserts(self) -> list[tuple[str, Any]]:
        return [pair for upserts, _ in self.batches for pair in upserts]

    async def handler(self, exc: BaseException, ctx: coco.ExceptionContext) -> None:
        self.errors.append(exc)


def processor(kind: str, sink: Sink, key: str | None = "doc") -> Any:
    """A per-entry processor of ``kind`` declaring ``key -> value`` (with
    ``key=None``: ``"row-<value>" -> value``)."""
    target = sink.target

    def declare(value: Any) -> None:
        target.declare(f"row-{value}" if key is None else key, value)

    @coco.fn
    def sync_proc(value: Any) -> None:
        declare(value)

    @coco.fn
    async def async_proc(value: Any) -> None:
        await anyio.lowlevel.checkpoint()
        declare(value)

    class LiveProc:
        def __init__(self, value: Any) -> None:
            self.value = value

        def process(self) -> None:
            declare(self.value)

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.update_full()
            await operator.mark_ready()
            await anyio.sleep_forever()

    return {"sync": sync_proc, "async": async_proc, "live": LiveProc}[kind]


@pytest.mark.parametrize("values", VALUES, ids=["equal", "changed"])
@pytest.mark.parametrize("kind", KINDS)
async def test_catch_up_rerun_renamed_entry_is_one_upsert(
    kind: str, values: tuple[str, str]
) -> None:
    sink = Sink()
    proc = processor(kind, sink)
    state = {"key": "a", "value": values[0]}

    @coco.fn
    def produce(lm: LiveMap[str, str]) -> None:
        lm.declare_entry(state["key"], state["value"])

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(sink.handler):
            lm: LiveMap[str, str] = await LiveMap.create()
            await coco.mount(produce, lm)
            h = await coco.mount_each(proc, lm)
            await h.ready()  # main's run (the update) spans the consumer's work

    app = coco.App(f"rename-{kind}-{next(_names)}", main)
    with anyio.fail_after(5):
        await app.update()
        assert sink.batches == [([("doc", values[0])], [])]
        sink.batches.clear()
        state.update(key="b", value=values[1])
        await app.update()
    # "doc" passes from entry "a"'s component to entry "b"'s in one update
    assert sink.deletes == [], sink.batches
    assert sink.upserts == ([] if values[0] == values[1] else [("doc", values[1])])
    assert sink.errors == []
    assert sink.target.get("doc") == values[1]
    assert sink.target.owner_path("doc") == (coco.Symbol(proc.__name__), "b")


@pytest.mark.parametrize("kind", KINDS)
async def test_catch_up_rerun_renamed_entry_without_awaiting_the_consumer(kind: str) -> None:
    """The main function does not wait for the consumer: the update the
    key passes in is the ``mount_each``'s scan."""
    sink = Sink()
    proc = processor(kind, sink)
    state = {"key": "a"}

    @coco.fn
    def produce(lm: LiveMap[str, str]) -> None:
        lm.declare_entry(state["key"], state["key"])

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(sink.handler):
            lm: LiveMap[str, str] = await LiveMap.create()
            await coco.mount(produce, lm)
            await coco.mount_each(proc, lm)

    app = coco.App(f"rename-early-{kind}-{next(_names)}", main)
    with anyio.fail_after(5):
        await app.update()
        sink.batches.clear()
        state["key"] = "b"
        await app.update()
    assert sink.batches == [([("doc", "b")], [])]
    assert sink.errors == []


@pytest.mark.parametrize("kind", KINDS)
async def test_catch_up_swept_entry_without_a_successor_is_deleted(kind: str) -> None:
    """The deferral does not keep a key nobody takes over: the entry's row is
    deleted once the scan's update has settled, within the update."""
    sink = Sink()
    target = sink.target
    proc = processor(kind, sink, None)
    state = {"keys": ["a", "b"]}

    @coco.fn
    def produce(lm: LiveMap[str, str]) -> None:
        for key in state["keys"]:
            lm.declare_entry(key, key)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, str] = await LiveMap.create()
        await coco.mount(produce, lm)
        await coco.mount_each(proc, lm)

    app = coco.App(f"sweep-{kind}-{next(_names)}", main)
    with anyio.fail_after(5):
        await app.update()
        assert sorted(k for k, _ in target.items()) == ["row-a", "row-b"]
        sink.batches.clear()
        state["keys"] = ["b"]
        await app.update()
    assert sink.batches == [([], ["row-a"])]
    assert "row-a" not in target


@pytest.mark.parametrize("values", VALUES, ids=["equal", "changed"])
@pytest.mark.parametrize("kind", KINDS)
async def test_live_renamed_entry_is_one_upsert(kind: str, values: tuple[str, str]) -> None:
    sink = Sink()
    proc = processor(kind, sink)
    state = {"key": "a", "value": values[0]}
    go, renamed = anyio.Event(), anyio.Event()
    maps: list[LiveMap[str, str]] = []

    class Producer:
        def __init__(self, lm: LiveMap[str, str]) -> None:
            self.lm = lm

        def process(self) -> None:
            self.lm.declare_entry(state["key"], state["value"])

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.update_full()
            await operator.mark_ready()
            await go.wait()
            state.update(key="b", value=values[1])
            await operator.update_full()  # one commit: "a" deleted, "b" added
            renamed.set()
            await anyio.sleep_forever()

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(sink.handler):
            lm: LiveMap[str, str] = await LiveMap.create()
            maps.append(lm)
            await coco.mount(Producer, lm)
            await coco.mount_each(proc, lm)

    app = coco.App(f"live-rename-{kind}-{next(_names)}", main)
    with anyio.fail_after(5):
        async with app.update(live=True) as h:
            await h.ready()
            # mount() returns at once: the consumer may have scanned before the
            # producer's first commit, and a live processor counts as having
            # processed its entry once started, so wait for the row itself
            await maps[0].settle()
            await wait_for(lambda: sink.batches)
            assert sink.batches == [([("doc", values[0])], [])]
            sink.batches.clear()
            go.set()
            await renamed.wait()
            await maps[0].settle()
            batches = list(sink.batches)
            owner = sink.target.owner_path("doc")
            await h.stop()
    assert [d for _, ds in batches for d in ds] == [], batches
    assert batches == ([] if values[0] == values[1] else [([("doc", values[1])], [])])
    assert sink.errors == []
    assert owner == (coco.Symbol(proc.__name__), "b")


@pytest.mark.parametrize("kind", KINDS)
async def test_live_deleted_entry_row_is_gone_once_settled(kind: str) -> None:
    """A deleted entry's row, which nobody takes over, is deleted by the
    time the map's ``settle()`` returns, while other entries keep changing."""
    sink = Sink()
    target = sink.target
    go, changed = anyio.Event(), anyio.Event()
    maps: list[LiveMap[str, int]] = []
    state: dict[str, int] = {"a": 0, "b": 0, "c": 0}

    @coco.fn
    async def proc(value: int, key: str) -> None:
        await anyio.lowlevel.checkpoint()
        target.declare(key, value)

    class Entry:
        def __init__(self, value: tuple[str, int]) -> None:
            self.value = value

        def process(self) -> None:
            target.declare(*self.value)

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.update_full()
            await operator.mark_ready()
            await anyio.sleep_forever()

    @coco.fn
    async def per_entry(value: tuple[str, int]) -> None:
        await proc(value[1], value[0])

    each: Any = Entry if kind == "live" else per_entry

    class Producer:
        def __init__(self, lm: LiveMap[str, tuple[str, int]]) -> None:
            self.lm = lm

        def process(self) -> None:
            for key, n in state.items():
                self.lm.declare_entry(key, (key, n))

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.update_full()
            await operator.mark_ready()
            await go.wait()
            del state["a"]
            state["b"] = 1
            await operator.update_full()
            changed.set()
            await anyio.sleep_forever()

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(sink.handler):
            lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
            maps.append(lm)  # type: ignore[arg-type]
            await coco.mount(Producer, lm)
            await coco.mount_each(each, lm)

    app = coco.App(f"live-delete-{kind}-{next(_names)}", main)
    with anyio.fail_after(5):
        async with app.update(live=True) as h:
            await h.ready()
            go.set()
            await changed.wait()
            await maps[0].settle()
            rows = dict(target.items())
            await h.stop()
    assert rows == {"b": 1, "c": 0}
    assert sink.errors == []


async def test_two_entries_declaring_one_key_still_conflict() -> None:
    """A real conflict between two entries' components is reported once the
    consumer's update has settled; when the owner's entry goes, the
    claimant's component gets the key without running again."""
    sink = Sink()
    target = sink.target
    calls: list[str] = []
    go, dropped = anyio.Event(), anyio.Event()
    maps: list[LiveMap[str, str]] = []
    state = {"keys": ["a", "b"]}

    @coco.fn
    def proc(value: str) -> None:
        calls.append(value)
        target.declare("doc", value)

    class Producer:
        def __init__(self, lm: LiveMap[str, str]) -> None:
            self.lm = lm

        def process(self) -> None:
            for key in state["keys"]:
                self.lm.declare_entry(key, key)

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.update_full()
            await operator.mark_ready()
            await go.wait()
            state["keys"] = ["b"]
            await operator.update_full()
            dropped.set()
            await anyio.sleep_forever()

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(sink.handler):
            lm: LiveMap[str, str] = await LiveMap.create()
            maps.append(lm)
            await coco.mount(Producer, lm)
            await coco.mount_each(proc, lm)

    app = coco.App(f"conflict-{next(_names)}", main)
    with anyio.fail_after(5):
        async with app.update(live=True) as h:
            await h.ready()
            await maps[0].settle()
            assert [type(e) for e in sink.errors] == [coco.KeyConflictError]
            (error,) = sink.errors
            assert isinstance(error, coco.KeyConflictError)
            assert "'a'" in error.owner_path and "'b'" in error.declarer_path
            assert target.get("doc") == "a"
            calls.clear()
            go.set()
            await dropped.wait()
            await maps[0].settle()
            after = (target.get("doc"), target.owner_path("doc"), list(calls))
            await h.stop()
    assert after == ("b", (coco.Symbol("proc"), "b"), [])
    assert sink.deletes == []
    assert len(sink.errors) == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_static_mount_each_renamed_item_is_one_upsert(kind: str) -> None:
    """The same over a plain list: the ``mount_each``'s run is the update."""
    sink = Sink()
    proc = processor(kind, sink)
    state = {"items": [("a", "x")]}

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(sink.handler):
            await coco.mount_each(proc, list(state["items"]))

    app = coco.App(f"static-{kind}-{next(_names)}", main)
    with anyio.fail_after(5):
        await app.update()
        sink.batches.clear()
        state["items"] = [("b", "y")]
        await app.update()
    assert sink.batches == [([("doc", "y")], [])]
    assert sink.errors == []


async def test_unmounting_the_mount_each_applies_the_drops_it_kept() -> None:
    """A deleted entry's row waits for the consumer's update (another entry's
    run never ends); unmounting the ``mount_each`` meanwhile deletes every
    row, the waiting one included."""
    sink = Sink()
    target = sink.target
    go, stuck, unmounted = anyio.Event(), anyio.Event(), anyio.Event()
    state = {"keys": ["a"]}
    maps: list[LiveMap[str, str]] = []

    @coco.fn
    async def proc(value: str) -> None:
        target.declare(value, value)
        if value == "b":
            stuck.set()
            await anyio.sleep_forever()  # never commits

    @coco.fn
    async def consumer(lm: LiveMap[str, str]) -> None:
        await coco.mount_each(proc, lm)

    class Producer:
        def __init__(self, lm: LiveMap[str, str]) -> None:
            self.lm = lm

        def process(self) -> None:
            for key in state["keys"]:
                self.lm.declare_entry(key, key)

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.update_full()
            await operator.mark_ready()
            await go.wait()
            state["keys"] = ["b"]  # "a" deleted, "b" (stuck) added
            await operator.update_full()
            await anyio.sleep_forever()

    class Controller:
        def __init__(self, lm: LiveMap[str, str]) -> None:
            self.lm = lm

        def process(self) -> None:
            pass

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            handle = await operator.update("consumer", consumer, self.lm)
            await handle.ready()
            await operator.mark_ready()
            await stuck.wait()
            await (await operator.delete("consumer")).ready()
            unmounted.set()
            await anyio.sleep_forever()

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(sink.handler):
            lm: LiveMap[str, str] = await LiveMap.create()
            maps.append(lm)
            await coco.mount(Producer, lm)
            await coco.mount(Controller, lm)

    app = coco.App(f"unmount-each-{next(_names)}", main)
    with anyio.fail_after(5):
        async with app.update(live=True) as h:
            await h.ready()
            await maps[0].settle()  # the consumer may have scanned first
            assert dict(target.items()) == {"a": "a"}
            go.set()
            await unmounted.wait()
            rows = dict(target.items())
            await h.stop()
    assert rows == {}
    assert sink.errors == []
