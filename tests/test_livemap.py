"""LiveMap end to end: ownership, the == gate, conflicts, the live view."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
import pytest
from helpers import TIMEOUT, Recorder, run_app, wait_for

import livemap as coco
from livemap import KeyedTarget, LiveMap, Symbol, TargetBatch

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _close_controls() -> Any:
    yield
    while Control.created:
        Control.created.pop().close()


# -- test machinery ----------------------------------------------------------------


class Downstream:
    """A KeyedTarget mirroring what a consumer's per-entry components hold."""

    def __init__(self, name: str = "down") -> None:
        self.rows: dict[Any, Any] = {}
        self.target: KeyedTarget[Any, Any] = KeyedTarget(name, self._apply)

    def _apply(self, batch: TargetBatch[Any, Any]) -> None:
        for key in batch.deletes:
            del self.rows[key]
        self.rows.update(batch.upserts)


class Control:
    """Drives a live producer: change ``state``, then ``await refresh()``."""

    created: ClassVar[list[Control]] = []

    def __init__(self, state: dict[Any, Any] | None = None) -> None:
        self.state: dict[Any, Any] = dict(state or {})
        self.send, self.recv = anyio.create_memory_object_stream[anyio.Event](100)
        Control.created.append(self)

    def close(self) -> None:
        self.send.close()
        self.recv.close()

    async def refresh(self) -> None:
        done = anyio.Event()
        with anyio.fail_after(TIMEOUT):
            await self.send.send(done)
            await done.wait()


class LiveProducer:
    """A live component declaring ``control.state`` into ``lm`` on each refresh."""

    def __init__(self, lm: LiveMap[Any, Any], control: Control) -> None:
        self.lm = lm
        self.control = control

    def process(self) -> None:
        for key, value in self.control.state.items():
            self.lm.declare_entry(key, value)

    async def process_live(self, op: coco.LiveComponentOperator) -> None:
        await op.update_full()
        await op.mark_ready()
        async for done in self.control.recv:
            await op.update_full()
            done.set()


def each_app(
    name: str,
    control: Control,
    fn: Any,
    holder: dict[str, Any],
    source: Any = lambda lm: lm,
    *,
    producer_first: bool = False,
) -> coco.App:
    """A live producer of ``control.state`` into a map, and ``mount_each(fn,
    source(lm))`` (once the producer is ready, with ``producer_first``); the
    map and the mount_each handle go to ``holder``."""

    @coco.fn
    async def main() -> None:
        lm: LiveMap[Any, Any] = await LiveMap.create()
        holder["lm"] = lm
        producer = await coco.mount(LiveProducer, lm, control)
        if producer_first:
            await producer.ready()
        holder["each"] = await coco.mount_each(fn, source(lm))

    return coco.App(name, main)


@dataclass
class Item:
    """A plain (unhashable) dataclass value."""

    key: str
    n: int
    tags: list[str]


# -- the seed example, imports changed ---------------------------------------------

FETCHED = [("a", "alpha"), ("b", "beta"), ("c", "gamma")]


def fetch_items() -> list[tuple[str, str]]:
    return list(FETCHED)


def make_seed_app(processed: list[str]) -> coco.App:
    @coco.fn
    async def produce_entries(lm: LiveMap[str, str]) -> None:
        for key, text in fetch_items():
            lm.declare_entry(key, text)

    @coco.fn
    async def process_entry(value: str) -> None:
        processed.append(value)

    @coco.fn
    async def app_main() -> None:
        lm: LiveMap[str, str] = await LiveMap.create()

        await coco.mount(produce_entries, lm)
        await coco.mount_each(process_entry, lm)

    return coco.App("seed", app_main)


async def test_seed_example_catch_up() -> None:
    processed: list[str] = []
    await run_app(make_seed_app(processed))
    assert sorted(processed) == ["alpha", "beta", "gamma"]


async def test_seed_example_live_mode() -> None:
    processed: list[str] = []
    app = make_seed_app(processed)
    async with app.update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
        assert sorted(processed) == ["alpha", "beta", "gamma"]


async def test_producer_ready_before_consumer_gives_one_call_per_entry() -> None:
    calls: list[str] = []

    @coco.fn
    async def produce(lm: LiveMap[str, int]) -> None:
        await anyio.sleep(0.01)
        for i in range(20):
            lm.declare_entry(f"k{i}", i)

    @coco.fn
    async def consume(value: int) -> None:
        calls.append(f"k{value}")

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        h = await coco.mount(produce, lm)
        await h.ready()
        await coco.mount_each(consume, lm)

    await run_app(coco.App("t", main))
    assert sorted(calls) == sorted(f"k{i}" for i in range(20))


async def test_consumer_mounted_before_producer_catches_up() -> None:
    down = Downstream()

    @coco.fn
    async def produce(lm: LiveMap[str, int]) -> None:
        await anyio.sleep(0.02)
        for i in range(50):
            lm.declare_entry(f"k{i}", i)

    @coco.fn
    async def consume(value: int) -> None:
        await anyio.sleep(0)
        down.target.declare(value, value * 10)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        await coco.mount_each(consume, lm)
        await coco.mount(produce, lm)

    await run_app(coco.App("t", main))
    assert down.rows == {i: i * 10 for i in range(50)}


# -- ownership, gate, conflicts ------------------------------------------------------


async def test_several_producers_one_map_and_two_maps_isolated() -> None:
    seen: dict[str, list[Any]] = {"one": [], "two": []}

    @coco.fn
    async def produce(lm: LiveMap[str, int], keys: list[str], base: int) -> None:
        for i, key in enumerate(keys):
            lm.declare_entry(key, base + i)

    @coco.fn
    async def consume(value: int, name: str) -> None:
        seen[name].append(value)

    @coco.fn
    async def main() -> None:
        one: LiveMap[str, int] = await LiveMap.create()
        two: LiveMap[str, int] = await LiveMap.create()
        assert one is not two
        await coco.mount(coco.component_subpath("p1"), produce, one, ["a", "b"], 0)
        await coco.mount(coco.component_subpath("p2"), produce, one, ["c"], 10)
        await coco.mount(coco.component_subpath("p3"), produce, two, ["a"], 100)
        await coco.mount_each(coco.component_subpath("c1"), consume, one, "one")
        await coco.mount_each(coco.component_subpath("c2"), consume, two, "two")

    await run_app(coco.App("t", main))
    assert sorted(seen["one"]) == [0, 1, 10]
    assert seen["two"] == [100]


async def test_unhashable_values_and_snapshot_iteration() -> None:
    snapshot: list[tuple[str, Item]] = []
    got: list[Item] = []

    @coco.fn
    async def produce(lm: LiveMap[str, Item]) -> None:
        lm.declare_entry("x", Item("x", 1, ["a"]))
        lm.declare_entry("y", Item("y", 2, []))

    @coco.fn
    async def consume(value: Item) -> None:
        got.append(value)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, Item] = await LiveMap.create()
        h = await coco.mount(produce, lm)
        await h.ready()
        async for key, value in lm:
            snapshot.append((key, value))
        await coco.mount_each(consume, lm)

    await run_app(coco.App("t", main))
    assert sorted(snapshot, key=lambda kv: kv[0]) == [
        ("x", Item("x", 1, ["a"])),
        ("y", Item("y", 2, [])),
    ]
    assert sorted(got, key=lambda i: i.key) == [Item("x", 1, ["a"]), Item("y", 2, [])]


async def test_conflict_first_owner_keeps_key_and_error_names_both_paths() -> None:
    rec = Recorder()
    holder: dict[str, LiveMap[str, int]] = {}

    @coco.fn
    async def first(lm: LiveMap[str, int]) -> None:
        lm.declare_entry("shared", 1)

    @coco.fn
    async def second(lm: LiveMap[str, int]) -> None:
        lm.declare_entry("shared", 2)
        lm.declare_entry("own", 3)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        holder["lm"] = lm
        h = await coco.mount(first, lm)
        await h.ready()
        async with coco.exception_handler(rec):
            await coco.mount(second, lm)

    await run_app(coco.App("t", main))
    lm = holder["lm"]
    assert dict(lm.items()) == {"shared": 1, "own": 3}
    assert lm.owner_path("shared") == (Symbol("first"),)
    [(exc, ctx)] = rec.calls
    assert isinstance(exc, coco.KeyConflictError)
    assert exc.key == "shared"
    assert "'shared'" in str(exc) and "/first" in str(exc) and "/second" in str(exc)
    assert ctx.stable_path == (Symbol("second"),)
    assert lm.stats().conflicts == 1


async def test_rejected_declaration_is_not_remembered() -> None:
    holder: dict[str, LiveMap[str, int]] = {}
    state = {"first_has": True, "second_declares": True}

    @coco.fn
    async def first(lm: LiveMap[str, int]) -> None:
        if state["first_has"]:
            lm.declare_entry("k", 1)

    @coco.fn
    async def second(lm: LiveMap[str, int]) -> None:
        if state["second_declares"]:
            lm.declare_entry("k", 2)

    class Main:
        """Keeps the map across re-runs: a live component re-running process()."""

    control = Control()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        holder["lm"] = lm

        class Both:
            def process(self) -> None:
                pass

            async def process_live(self, op: coco.LiveComponentOperator) -> None:
                h = await op.update("first", first, lm)
                await h.ready()
                h = await op.update("second", second, lm)
                await h.ready()
                await op.mark_ready()
                async for done in control.recv:
                    h1 = await op.update("first", first, lm)
                    await h1.ready()
                    if state["second_declares"] is not None:
                        h2 = await op.update("second", second, lm)
                        await h2.ready()
                    done.set()

        await coco.mount(Both)

    app = coco.App(coco.AppConfig("t", exception_handler=lambda e, c: None), main)
    async with app.update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
        lm = holder["lm"]
        assert dict(lm.items()) == {"k": 1}
        # the first owner drops the key; the second does not declare it again
        state.update(first_has=False, second_declares=False)
        await control.refresh()
        assert dict(lm.items()) == {}
        # the second declares it on a later run: now it gets it
        state["second_declares"] = True
        await control.refresh()
        assert dict(lm.items()) == {"k": 2}
        assert lm.owner_path("k") == (Symbol("Both"), "second")


async def test_duplicate_key_raises_at_call_and_first_stands() -> None:
    caught: list[BaseException] = []
    holder: dict[str, LiveMap[str, int]] = {}

    @coco.fn
    async def produce(lm: LiveMap[str, int]) -> None:
        lm.declare_entry("a", 1)
        try:
            lm.declare_entry("a", 2)
        except coco.DuplicateDeclarationError as exc:
            caught.append(exc)
        lm.declare_entry("b", 3)

    @coco.fn
    async def main() -> None:
        holder["lm"] = lm = await LiveMap.create()
        await coco.mount(produce, lm)

    await run_app(coco.App("t", main))
    assert dict(holder["lm"].items()) == {"a": 1, "b": 3}
    assert len(caught) == 1 and "'a'" in str(caught[0])


async def test_unstable_key_is_type_error_naming_key() -> None:
    caught: list[BaseException] = []

    @coco.fn
    async def produce(lm: LiveMap[Any, int]) -> None:
        for bad in ([1.5], {"a": 1}, 1.5, object()):
            try:
                lm.declare_entry(bad, 1)
            except TypeError as exc:
                caught.append(exc)
        lm.declare_entry(("ok", 1, None, b"x", Symbol("s")), 1)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[Any, int] = await LiveMap.create()
        await coco.mount(produce, lm)

    await run_app(coco.App("t", main))
    assert len(caught) == 4
    assert "[1.5]" in str(caught[0]) and "{'a': 1}" in str(caught[1]) and "1.5" in str(caught[2])


class RaisingEq:
    def __init__(self, n: int) -> None:
        self.n = n

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("cannot compare")

    __hash__ = None  # type: ignore[assignment]


# -- live behaviour -------------------------------------------------------------------


def live_app(
    control: Control,
    down: Downstream,
    calls: list[Any],
    holder: dict[str, Any],
    *,
    consumer_opts: dict[str, Any] | None = None,
    delay: float = 0.0,
    handler: Any = None,
) -> coco.App:
    @coco.fn
    async def consume(value: Any, key_of: Any) -> None:
        calls.append(value)
        if delay:
            await anyio.sleep(delay)
        down.target.declare(key_of(value), value)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[Any, Any] = await LiveMap.create()
        holder["lm"] = lm
        producer = await coco.mount(LiveProducer, lm, control)
        await producer.ready()
        source = lm.consumer(**consumer_opts) if consumer_opts else lm
        await coco.mount_each(consume, source, lambda v: v[0])

    return coco.App(coco.AppConfig("live", exception_handler=handler), main)


async def test_live_add_update_equal_redeclare_delete() -> None:
    control = Control({"a": ("a", 1), "b": ("b", 1)})
    down, calls, holder = Downstream(), [], {}
    async with live_app(control, down, calls, holder).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
        lm: LiveMap[str, Any] = holder["lm"]
        assert down.rows == {"a": ("a", 1), "b": ("b", 1)}

        control.state["c"] = ("c", 1)  # add
        control.state["a"] = ("a", 2)  # update
        await control.refresh()
        with anyio.fail_after(TIMEOUT):
            await lm.settle()
        assert down.rows == {"a": ("a", 2), "b": ("b", 1), "c": ("c", 1)}

        n_calls = len(calls)
        control.state["b"] = ("b", 1)  # equal, distinct object: suppressed
        await control.refresh()
        with anyio.fail_after(TIMEOUT):
            await lm.settle()
        assert len(calls) == n_calls
        assert lm.stats().suppressed >= 1

        del control.state["a"]  # delete
        await control.refresh()
        with anyio.fail_after(TIMEOUT):
            await lm.settle()
        assert down.rows == {"b": ("b", 1), "c": ("c", 1)}
        stats = lm.stats()
        assert stats.entries == 2
        assert stats.pending == 0


async def test_whole_producer_unmounted_deletes_its_entries() -> None:
    down = Downstream()
    holder: dict[str, Any] = {}
    state = {"second": True}

    @coco.fn
    async def produce(lm: LiveMap[str, tuple[str, int]], keys: list[str]) -> None:
        for key in keys:
            lm.declare_entry(key, (key, 1))

    @coco.fn
    async def consume(value: tuple[str, int]) -> None:
        down.target.declare(value[0], value[1])

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        holder["lm"] = lm
        p1 = await coco.mount(coco.component_subpath("one"), produce, lm, ["a", "b"])
        await p1.ready()
        if state["second"]:
            p2 = await coco.mount(coco.component_subpath("two"), produce, lm, ["c", "d"])
            await p2.ready()
        await coco.mount_each(consume, lm)

    app = coco.App("t", main)
    await run_app(app)
    assert sorted(k for k, _ in holder["lm"].items()) == ["a", "b", "c", "d"]
    assert down.rows == {"a": 1, "b": 1, "c": 1, "d": 1}
    state["second"] = False
    stats = await run_app(app)
    assert sorted(k for k, _ in holder["lm"].items()) == ["a", "b"]
    assert down.rows == {"a": 1, "b": 1}
    assert stats.components_unmounted >= 1


async def test_producer_unmounted_in_live_mode_cascades_to_consumer() -> None:
    down = Downstream()
    holder: dict[str, Any] = {}
    control = Control()

    @coco.fn
    async def produce(lm: LiveMap[str, tuple[str, int]], keys: list[str]) -> None:
        for key in keys:
            lm.declare_entry(key, (key, 1))

    @coco.fn
    async def consume(value: tuple[str, int]) -> None:
        down.target.declare(value[0], value[1])

    class Producers:
        def __init__(self, lm: LiveMap[str, tuple[str, int]]) -> None:
            self.lm = lm

        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.update("one", produce, self.lm, ["a", "b"])
            h = await op.update("two", produce, self.lm, ["c", "d"])
            await h.ready()
            await op.mark_ready()
            async for done in control.recv:
                await (await op.delete("two")).ready()
                done.set()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        holder["lm"] = lm
        await coco.mount(Producers, lm)
        await coco.mount_each(consume, lm)

    async with coco.App("t", main).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
        assert down.rows == {"a": 1, "b": 1, "c": 1, "d": 1}
        await control.refresh()
        with anyio.fail_after(TIMEOUT):
            await holder["lm"].settle()
        assert down.rows == {"a": 1, "b": 1}


async def test_chained_maps_cascade_deletions() -> None:
    final = Downstream("final")
    holder: dict[str, Any] = {}
    control = Control({"x": ("x", 1), "y": ("y", 2)})

    @coco.fn
    async def stage_one(value: tuple[str, int], second: LiveMap[str, tuple[str, int]]) -> None:
        key, n = value
        second.declare_entry(f"{key}-doubled", (f"{key}-doubled", n * 2))

    @coco.fn
    async def stage_two(value: tuple[str, int]) -> None:
        final.target.declare(value[0], value[1])

    @coco.fn
    async def main() -> None:
        first: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        second: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        holder.update(first=first, second=second)
        await coco.mount(LiveProducer, first, control)
        await coco.mount_each(coco.component_subpath("one"), stage_one, first, second)
        await coco.mount_each(coco.component_subpath("two"), stage_two, second)

    async with coco.App("t", main).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
        assert final.rows == {"x-doubled": 2, "y-doubled": 4}
        del control.state["x"]
        control.state["y"] = ("y", 5)
        await control.refresh()
        with anyio.fail_after(TIMEOUT):
            await holder["first"].settle()
            await holder["second"].settle()
        assert final.rows == {"y-doubled": 10}


async def test_rerun_app_with_changed_and_identical_input() -> None:
    down = Downstream()
    data = {"a": 1, "b": 2}
    calls: list[Any] = []

    @coco.fn
    async def produce(lm: LiveMap[str, tuple[str, int]]) -> None:
        for key, n in data.items():
            lm.declare_entry(key, (key, n))

    @coco.fn
    async def consume(value: tuple[str, int]) -> None:
        calls.append(value)
        down.target.declare(value[0], value[1])

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        h = await coco.mount(produce, lm)
        await h.ready()
        await coco.mount_each(consume, lm)

    app = coco.App("t", main)
    await run_app(app)
    assert down.rows == {"a": 1, "b": 2}
    await run_app(app)  # identical input
    assert down.rows == {"a": 1, "b": 2}
    data.pop("a")
    data["b"] = 3
    data["c"] = 4
    await run_app(app)  # changed input
    assert down.rows == {"b": 3, "c": 4}


async def test_raising_eq_is_reported_and_held_value_stays() -> None:
    rec = Recorder()
    control = Control({"k": RaisingEq(1)})
    holder: dict[str, Any] = {}

    @coco.fn
    async def consume(value: RaisingEq) -> None:
        pass

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, RaisingEq] = await LiveMap.create()
        holder["lm"] = lm
        async with coco.exception_handler(rec):
            await coco.mount(LiveProducer, lm, control)
        await coco.mount_each(consume, lm)

    async with coco.App("t", main).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
        first = holder["lm"].get("k")
        control.state["k"] = RaisingEq(2)
        await control.refresh()
        assert holder["lm"].get("k") is first
    assert any("cannot compare" in repr(e.__cause__) and "'k'" in str(e) for e, _ in rec.calls)


# -- consumers ------------------------------------------------------------------------


async def test_second_consumer_watch_raises_and_mount_each_reports() -> None:
    rec = Recorder()
    errors: list[BaseException] = []
    seen: list[Any] = []

    class Sub:
        async def update_all(self) -> None:
            pass

        async def mark_ready(self) -> None:
            pass

        async def update(self, key: Any, value: Any) -> Any:
            return coco.ReadyHandle()

        async def delete(self, key: Any) -> Any:
            return coco.ReadyHandle()

    @coco.fn
    async def consume(value: int) -> None:
        seen.append(value)

    @coco.fn
    async def produce(lm: LiveMap[str, int]) -> None:
        lm.declare_entry("a", 1)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        await coco.mount(produce, lm)
        h = await coco.mount_each(coco.component_subpath("first"), consume, lm)
        await wait_for(lambda: lm.stats().consumer)
        try:
            await lm.watch(Sub())
        except RuntimeError as exc:
            errors.append(exc)
        async with coco.exception_handler(rec):
            await coco.mount_each(coco.component_subpath("second"), consume, lm)
        await h.ready()

    await run_app(coco.App("t", main))
    assert len(errors) == 1 and "LiveMap#" in str(errors[0])
    [(exc, ctx)] = rec.calls
    assert isinstance(exc, RuntimeError)
    assert ctx.mount_kind == "mount_each"
    assert ctx.stable_path == ("second",)
    assert seen == [1]


class Watcher:
    """A live component that marks itself ready, then watches ``lm`` with the
    subscriber ``make(lm)`` gives."""

    def __init__(self, lm: LiveMap[str, int], make: Callable[[LiveMap[str, int]], Any]) -> None:
        self.lm = lm
        self.make = make

    def process(self) -> None:
        pass

    async def process_live(self, op: coco.LiveComponentOperator) -> None:
        await op.mark_ready()
        await self.lm.watch(self.make(self.lm))


def watching_app(
    control: Control, holder: dict[str, Any], make: Callable[[LiveMap[str, int]], Any]
) -> coco.App:
    """A live producer driven by ``control`` into a map (``holder["lm"]``),
    and a :class:`Watcher` of it, mounted once the producer is ready."""

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        holder["lm"] = lm
        h = await coco.mount(LiveProducer, lm, control)
        await h.ready()
        await coco.mount(Watcher, lm, make)

    return coco.App("t", main)


async def test_seam_is_exact_while_update_all_is_held_open() -> None:
    """Changes landing while update_all() is still running are each delivered once."""
    control = Control({"a": 1, "b": 1})
    holder: dict[str, Any] = {}
    log: list[tuple[str, Any, Any]] = []
    gate = anyio.Event()
    in_update_all = anyio.Event()

    class HoldingSubscriber:
        async def update_all(self) -> None:
            async for key, value in holder["lm"]:
                log.append(("scan", key, value))
            in_update_all.set()
            await gate.wait()

        async def mark_ready(self) -> None:
            log.append(("ready", None, None))

        async def update(self, key: Any, value: Any) -> Any:
            log.append(("update", key, value))
            return coco.ReadyHandle()

        async def delete(self, key: Any) -> Any:
            log.append(("delete", key, None))
            return coco.ReadyHandle()

    async with watching_app(control, holder, lambda lm: HoldingSubscriber()).update(
        live=True
    ) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
            await in_update_all.wait()
        control.state["a"] = 2  # change
        control.state["c"] = 1  # add
        del control.state["b"]  # delete
        await control.refresh()
        control.state["a"] = 3  # and again, while still held
        await control.refresh()
        gate.set()
        await wait_for(lambda: len(log) >= 6)
        await anyio.sleep(0.02)
    scans = sorted((k, v) for kind, k, v in log if kind == "scan")
    later = sorted((kind, k, v) for kind, k, v in log if kind in ("update", "delete"))
    assert scans == [("a", 1), ("b", 1)]
    assert later == [("delete", "b", None), ("update", "a", 3), ("update", "c", 1)]
    assert [kind for kind, _, _ in log].index("ready") == 2


class _AwaitingSubscriber:
    """A subscriber whose ``update_all()`` awaits ``gate`` before it scans."""

    def __init__(self, lm: LiveMap[str, int], gate: anyio.Event, waiting: anyio.Event) -> None:
        self.lm = lm
        self.gate = gate
        self.waiting = waiting
        self.log: list[tuple[str, Any, Any]] = []

    async def update_all(self) -> None:
        self.waiting.set()
        await self.gate.wait()
        async for key, value in self.lm:
            self.log.append(("scan", key, value))

    async def mark_ready(self) -> None:
        self.log.append(("ready", None, None))

    async def update(self, key: Any, value: Any) -> Any:
        self.log.append(("update", key, value))
        return coco.ReadyHandle()

    async def delete(self, key: Any) -> Any:
        self.log.append(("delete", key, None))
        return coco.ReadyHandle()


async def test_seam_is_exact_when_update_all_awaits_before_it_scans() -> None:
    """The scan update_all() makes after an await is the snapshot the watch
    continues from: an update, a delete and an add that landed before it are
    in the scan and are not delivered again; a later change is delivered
    once.  A scan by another task meanwhile changes nothing."""
    control = Control({"a": 1, "b": 1})
    holder: dict[str, Any] = {}
    gate = anyio.Event()
    waiting = anyio.Event()

    def subscriber(lm: LiveMap[str, int]) -> _AwaitingSubscriber:
        return holder.setdefault("sub", _AwaitingSubscriber(lm, gate, waiting))

    async with watching_app(control, holder, subscriber).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
            await waiting.wait()
        control.state["a"] = 2  # update
        del control.state["b"]  # delete
        control.state["c"] = 1  # add
        await control.refresh()
        # a scan from another task during update_all(): no side effect
        assert sorted([pair async for pair in holder["lm"]]) == [("a", 2), ("c", 1)]
        gate.set()
        sub = holder["sub"]
        await wait_for(lambda: ("ready", None, None) in sub.log)
        await anyio.sleep(0.02)
        control.state["a"] = 3
        await control.refresh()
        await wait_for(lambda: ("update", "a", 3) in sub.log)
        await anyio.sleep(0.02)
    log = holder["sub"].log
    assert sorted(entry for entry in log if entry[0] == "scan") == [
        ("scan", "a", 2),
        ("scan", "c", 1),
    ]
    assert [entry for entry in log if entry[0] in ("update", "delete")] == [("update", "a", 3)]


async def test_seam_without_a_scan_continues_from_the_watch_start() -> None:
    """A subscriber whose update_all() does not scan the map gets every
    change made after watch() was called, once."""
    control = Control({"a": 1, "b": 1})
    holder: dict[str, Any] = {}
    gate = anyio.Event()
    waiting = anyio.Event()

    class NoScan(_AwaitingSubscriber):
        async def update_all(self) -> None:
            self.waiting.set()
            await self.gate.wait()

    def subscriber(lm: LiveMap[str, int]) -> NoScan:
        return holder.setdefault("sub", NoScan(lm, gate, waiting))

    async with watching_app(control, holder, subscriber).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
            await waiting.wait()
        control.state["a"] = 2
        del control.state["b"]
        control.state["c"] = 1
        await control.refresh()
        gate.set()
        sub = holder["sub"]
        await wait_for(lambda: len([e for e in sub.log if e[0] != "ready"]) >= 3)
        await anyio.sleep(0.02)
    changes = sorted(entry for entry in holder["sub"].log if entry[0] != "ready")
    assert changes == [("delete", "b", None), ("update", "a", 2), ("update", "c", 1)]


async def test_slow_key_is_coalesced_and_does_not_hold_back_others() -> None:
    """A consumer blocked on one key while it changes 50 times sees the final
    value in at most 3 calls; other keys keep flowing meanwhile."""
    control = Control({"slow": ("slow", 0)})
    holder: dict[str, Any] = {}
    calls: list[tuple[str, int]] = []
    release = anyio.Event()
    blocked = anyio.Event()

    @coco.fn
    async def consume(value: tuple[str, int]) -> None:
        calls.append(value)
        if value[0] == "slow" and value[1] == 1:
            blocked.set()
            await release.wait()

    app = each_app("t", control, consume, holder, lambda lm: lm.consumer(concurrency=4))
    async with app.update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
        lm: LiveMap[str, tuple[str, int]] = holder["lm"]
        control.state["slow"] = ("slow", 1)
        await control.refresh()
        with anyio.fail_after(TIMEOUT):
            await blocked.wait()
        for n in range(2, 52):
            control.state["slow"] = ("slow", n)
            control.state[f"other{n}"] = (f"other{n}", n)
            await control.refresh()
            if n % 10 == 0:
                # other keys are delivered while "slow" is still blocked
                await wait_for(lambda n=n: ("other" + str(n), n) in calls)
        assert lm.stats().pending <= 1 + 50  # bounded by distinct keys
        release.set()
        with anyio.fail_after(TIMEOUT):
            await lm.settle()
    slow_calls = [v for v in calls if v[0] == "slow"]
    assert slow_calls[0] == ("slow", 0)
    after_initial = slow_calls[1:]
    assert after_initial[-1] == ("slow", 51)
    assert len(after_initial) <= 3
    assert sorted(v[1] for v in calls if v[0] != "slow") == list(range(2, 52))


async def test_concurrency_limit_and_one_key_never_twice_at_once() -> None:
    control = Control({f"k{i}": (f"k{i}", 0) for i in range(20)})
    holder: dict[str, Any] = {}
    active: set[str] = set()
    peak = [0]
    overlaps: list[str] = []

    @coco.fn
    async def consume(value: tuple[str, int]) -> None:
        key = value[0]
        if key in active:
            overlaps.append(key)
        active.add(key)
        peak[0] = max(peak[0], len(active))
        await anyio.sleep(0.005)
        active.discard(key)

    app = each_app("t", control, consume, holder, lambda lm: lm.consumer(concurrency=3))
    async with app.update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
        peak[0] = 0
        for rnd in range(1, 4):
            for i in range(20):
                control.state[f"k{i}"] = (f"k{i}", rnd)
            await control.refresh()
        with anyio.fail_after(TIMEOUT):
            await holder["lm"].settle()
    assert overlaps == []
    assert 1 < peak[0] <= 3


async def test_retry_with_backoff_and_failing_keys_visible() -> None:
    control = Control({"ok": ("ok", 1), "flaky": ("flaky", 1), "bad": ("bad", 1)})
    holder: dict[str, Any] = {}
    attempts: dict[str, int] = {}

    @coco.fn
    async def consume(value: tuple[str, int]) -> None:
        key = value[0]
        attempts[key] = attempts.get(key, 0) + 1
        if key == "bad" or (key == "flaky" and attempts[key] < 3):
            raise ValueError(f"cannot process {key}")

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        holder["lm"] = lm
        h = await coco.mount(LiveProducer, lm, control)
        await h.ready()
        policy = coco.RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.01)
        await coco.mount_each(consume, lm.consumer(retry=policy))

    app = coco.App(coco.AppConfig("t", exception_handler=lambda e, c: None), main)
    async with app.update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
            await wait_for(lambda: attempts.get("bad", 0) >= 4)
            await holder["lm"].settle()
        stats = holder["lm"].stats()
        assert attempts == {"ok": 1, "flaky": 3, "bad": 4}
        assert list(stats.failing) == ["bad"]
        assert "cannot process bad" in str(stats.failing["bad"])
        # a change to the failing key starts over
        control.state["bad"] = ("bad", 2)
        await control.refresh()
        await wait_for(lambda: attempts["bad"] >= 8)


async def test_settle_and_stats() -> None:
    control = Control({f"k{i}": (f"k{i}", 0) for i in range(10)})
    down, calls, holder = Downstream(), [], {}
    app = live_app(control, down, calls, holder, delay=0.002)
    async with app.update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
        lm: LiveMap[str, Any] = holder["lm"]
        for i in range(10):
            control.state[f"k{i}"] = (f"k{i}", 1)
        await control.refresh()
        with anyio.fail_after(TIMEOUT):
            await lm.settle()
        assert down.rows == {f"k{i}": (f"k{i}", 1) for i in range(10)}
        stats = lm.stats()
        assert stats.entries == 10
        assert stats.changes == 20
        assert stats.deliveries == 10
        assert stats.pending == 0 and stats.in_flight == 0
        assert stats.consumer
        assert stats.failing == {}


async def test_map_retired_when_creator_reruns() -> None:
    maps: list[LiveMap[str, int]] = []
    errors: list[BaseException] = []

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        maps.append(lm)

    app = coco.App("t", main)
    await run_app(app)
    assert not maps[0].retired
    await run_app(app)
    assert maps[0].retired and not maps[1].retired

    @coco.fn
    async def late() -> None:
        try:
            maps[0].declare_entry("a", 1)
        except coco.MapRetiredError as exc:
            errors.append(exc)

    await run_app(coco.App("t2", late))
    assert len(errors) == 1 and "retired" in str(errors[0])


async def test_mount_each_over_a_custom_feed() -> None:
    down = Downstream()

    class Feed:
        async def watch(self, sub: coco.LiveMapSubscriber[str, int]) -> None:
            await sub.update_all()
            h = await sub.update("a", 1)
            await h.ready()
            await sub.update("b", 2)
            await sub.mark_ready()
            await sub.delete("a")
            await anyio.sleep_forever()

    @coco.fn
    async def consume(value: int) -> None:
        down.target.declare(value, value)

    @coco.fn
    async def main() -> None:
        feed = Feed()
        assert isinstance(feed, coco.LiveMapFeed)
        await coco.mount_each(consume, feed)

    await run_app(coco.App("t", main))
    assert down.rows == {2: 2}


async def test_livemap_is_a_view() -> None:
    holder: dict[str, Any] = {}

    @coco.fn
    async def main() -> None:
        holder["lm"] = await LiveMap.create()

    await run_app(coco.App("t", main))
    assert isinstance(holder["lm"], coco.LiveMapView)
    assert isinstance(holder["lm"], coco.LiveMapFeed)
    with pytest.raises(TypeError, match=r"LiveMap\.create"):
        LiveMap(object(), None)  # type: ignore[arg-type]


async def test_settle_waits_for_the_initial_scan() -> None:
    holder: dict[str, Any] = {}
    processed: list[int] = []
    settled_after: list[int] = []

    @coco.fn
    async def produce(lm: LiveMap[str, int]) -> None:
        for i in range(3):
            lm.declare_entry(f"k{i}", i)

    @coco.fn
    async def slow(value: int) -> None:
        await anyio.sleep(0.05)
        processed.append(value)

    class Settler:
        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await anyio.sleep(0.01)  # the consumer's scan has started by now
            with anyio.fail_after(TIMEOUT):
                await holder["lm"].settle()
            settled_after.append(len(processed))

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        holder["lm"] = lm
        h = await coco.mount(produce, lm)
        await h.ready()
        await coco.mount_each(slow, lm)
        await coco.mount(Settler)

    await run_app(coco.App("t", main))
    assert settled_after == [3]


async def test_operator_subpath_must_be_stable() -> None:
    errors: list[BaseException] = []

    @coco.fn
    async def leaf() -> None:
        pass

    class Live:
        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            for bad in (1.5, ("a", [1.5])):
                try:
                    await op.update(bad, leaf)  # type: ignore[arg-type]
                except TypeError as exc:
                    errors.append(exc)

    @coco.fn
    async def main() -> None:
        await coco.mount(Live)

    await run_app(coco.App("t", main))
    assert len(errors) == 2
    assert "1.5" in str(errors[0]) and "[1.5]" in str(errors[1])


async def test_second_live_update_in_async_with_raises() -> None:
    @coco.fn
    async def main() -> None:
        # something live, so that the first run does not end by itself
        await coco.mount(coco.auto_refresh(lambda: None, interval=60))

    app = coco.App("t", main)
    async with app.update(live=True) as first:
        with anyio.fail_after(TIMEOUT):
            await first.ready()
        with pytest.raises(RuntimeError, match="already running"):
            async with app.update(live=True) as second:
                with anyio.fail_after(TIMEOUT):
                    await second.ready()


async def test_maps_made_by_a_failed_run_are_kept_until_the_next_commit() -> None:
    maps: list[LiveMap[str, int]] = []
    state = {"fail": False}

    @coco.fn
    async def produce(lm: LiveMap[str, int]) -> None:
        lm.declare_entry("a", 1)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        maps.append(lm)
        h = await coco.mount(produce, lm)
        await h.ready()
        if state["fail"]:
            raise RuntimeError("main failed after moving its producer")

    app = coco.App("t", main)
    await run_app(app)
    state["fail"] = True
    with pytest.raises(RuntimeError):
        await run_app(app)
    # the producer moved to the failed run's map: it stays usable, not orphaned
    assert not maps[1].retired and dict(maps[1].items()) == {"a": 1}
    state["fail"] = False
    await run_app(app)
    assert maps[0].retired and maps[1].retired and not maps[2].retired
    assert dict(maps[2].items()) == {"a": 1}


# -- children at rest and the pool ---------------------------------------------------


async def test_children_at_rest_keep_only_their_value() -> None:
    """A per-entry child whose run left nothing behind is kept as its value
    alone; one that holds target entries stays a component.  Changes,
    equal re-declarations and deletions behave the same for both."""
    # value: (key, version, whether the child holds a downstream row)
    control = Control({f"k{i}": (f"k{i}", 0, i % 10 == 0) for i in range(50)})
    holder: dict[str, Any] = {}
    down = Downstream()
    calls: list[tuple[str, int]] = []

    @coco.fn
    async def consume(value: tuple[str, int, bool]) -> None:
        key, version, holds = value
        calls.append((key, version))
        if holds:
            down.target.declare(key, version)

    async with each_app("rest", control, consume, holder).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
        each = holder["each"]._component
        leaves = each.host.leaves
        assert sorted(leaves) == sorted(f"k{i}" for i in range(50) if i % 10)
        assert sorted(rel[0] for rel in each.children) == sorted(f"k{i}" for i in range(0, 50, 10))
        assert down.rows == {f"k{i}": 0 for i in range(0, 50, 10)}

        calls.clear()
        control.state["k1"] = ("k1", 0, False)  # equal: nothing to do
        control.state["k2"] = ("k2", 1, False)  # a leaf changes
        control.state["k3"] = ("k3", 1, True)  # a leaf starts holding a row
        control.state["k10"] = ("k10", 1, False)  # a component stops holding its row
        control.state["k20"] = ("k20", 1, True)  # a component's row changes
        await control.refresh()
        with anyio.fail_after(TIMEOUT):
            await holder["lm"].settle()
        assert sorted(calls) == [("k10", 1), ("k2", 1), ("k20", 1), ("k3", 1)]
        assert down.rows == {"k0": 0, "k3": 1, "k20": 1, "k30": 0, "k40": 0}
        assert leaves["k2"] == ("k2", 1, False) and "k3" not in leaves
        # k10 released its row in that run; the run after leaves nothing behind
        assert "k10" not in leaves
        control.state["k10"] = ("k10", 2, False)
        await control.refresh()
        with anyio.fail_after(TIMEOUT):
            await holder["lm"].settle()
        assert leaves["k10"] == ("k10", 2, False)

        unmounted = handle.stats().components_unmounted
        for key in ("k2", "k3", "k10", "k20"):
            del control.state[key]
        await control.refresh()
        with anyio.fail_after(TIMEOUT):
            await holder["lm"].settle()
        assert handle.stats().components_unmounted - unmounted == 4
        assert not {"k2", "k3", "k10", "k20"} & (set(leaves) | {r[0] for r in each.children})
        assert down.rows == {"k0": 0, "k30": 0, "k40": 0}
        assert len(leaves) + len(each.children) == 46


async def test_scan_of_a_big_map_does_not_queue_every_run_at_once() -> None:
    holder: dict[str, Any] = {}
    seen_queue: list[int] = []
    n = 5000

    @coco.fn
    async def produce(lm: LiveMap[int, int]) -> None:
        for i in range(n):
            lm.declare_entry(i, i)

    @coco.fn
    async def consume(value: int) -> None:
        seen_queue.append(len(holder["each"]._component.host.pool.queue))

    @coco.fn
    async def main() -> None:
        lm: LiveMap[int, int] = await LiveMap.create()
        producer = await coco.mount(produce, lm)
        await producer.ready()
        holder["each"] = await coco.mount_each(consume, lm.consumer(concurrency=4))

    await run_app(coco.App("paced", main))
    assert len(seen_queue) == n
    pool = holder["each"]._component.host.pool
    assert max(seen_queue) < pool.high < n


async def test_waiting_runs_spread_over_the_whole_pool() -> None:
    holder: dict[str, Any] = {}
    active = [0]
    peak = [0]

    @coco.fn
    async def produce(lm: LiveMap[int, int]) -> None:
        for i in range(40):
            lm.declare_entry(i, i)

    @coco.fn
    async def consume(value: int) -> None:
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        await anyio.sleep(0.02)
        active[0] -= 1

    @coco.fn
    async def main() -> None:
        lm: LiveMap[int, int] = await LiveMap.create()
        producer = await coco.mount(produce, lm)
        await producer.ready()
        holder["each"] = await coco.mount_each(consume, lm.consumer(concurrency=8))

    await run_app(coco.App("spread", main))
    assert peak[0] == 8


async def test_per_entry_runs_that_mount_or_fail_get_a_component() -> None:
    """A per-entry run that mounts a child, or fails, gets its component in
    the middle of the run; what it mounted is unmounted with its key."""
    control = Control({k: (k, 1) for k in ("plain", "nested", "flaky")})
    holder: dict[str, Any] = {}
    down = Downstream()
    tries: dict[str, int] = {}

    @coco.fn
    async def leaf(key: str, value: int) -> None:
        down.target.declare(key, value)

    @coco.fn
    async def per_entry(pair: tuple[str, int]) -> None:
        key, value = pair
        tries[key] = tries.get(key, 0) + 1
        if key == "nested":
            await coco.use_mount(coco.component_subpath("leaf"), leaf, key, value)
        if key == "flaky" and tries[key] == 1:
            raise RuntimeError("first try fails")

    policy = coco.RetryPolicy(max_attempts=2, initial_backoff=0.001)
    app = each_app("made", control, per_entry, holder, lambda lm: lm.consumer(retry=policy))
    async with app.update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
            await holder["lm"].settle()
        each = holder["each"]._component
        assert down.rows == {"nested": 1}
        assert tries == {"plain": 1, "nested": 1, "flaky": 2}
        # flaky's failure gave it a component; its retry left nothing behind,
        # so it is at rest again; nested's holds a child with a downstream row
        assert set(each.host.leaves) == {"plain", "flaky"}
        assert {rel[0] for rel in each.children} == {"nested"}
        assert holder["lm"].stats().failing == {}
        assert handle.stats().retries == 1

        del control.state["nested"]
        control.state["flaky"] = ("flaky", 2)
        await control.refresh()
        with anyio.fail_after(TIMEOUT):
            await holder["lm"].settle()
        assert down.rows == {}
        assert set(each.host.leaves) == {"plain", "flaky"}
        assert not each.children


async def test_per_entry_run_creating_a_map_keeps_its_component() -> None:
    """A per-entry run that creates a LiveMap (a pipeline per entry) holds it
    in its component; a change re-runs it with a new map, a delete retires
    the map and unmounts what consumed it."""
    control = Control({"a": ("a", 2), "b": ("b", 1)})
    holder: dict[str, Any] = {}
    down = Downstream()

    @coco.fn
    async def explode(pair: tuple[str, int]) -> None:
        key, n = pair
        parts: LiveMap[str, str] = await LiveMap.create()
        for i in range(n):
            parts.declare_entry(f"{key}{i}", f"{key}{i}")
        await coco.mount_each(sink, parts)

    @coco.fn
    async def sink(part: str) -> None:
        down.target.declare(part, part)

    async with each_app("per-entry maps", control, explode, holder).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
        each = holder["each"]._component
        assert set(down.rows) == {"a0", "a1", "b0"}
        assert {rel[0] for rel in each.children} == {"a", "b"}
        assert not each.host.leaves

        control.state["a"] = ("a", 1)
        del control.state["b"]
        await control.refresh()
        with anyio.fail_after(TIMEOUT):
            await holder["lm"].settle()
            await handle.ready()
        assert set(down.rows) == {"a0"}
        assert {rel[0] for rel in each.children} == {"a"}


@pytest.mark.parametrize("first_seen", ["in the scan", "live"])
async def test_new_value_cuts_a_retry_wait_short(first_seen: str) -> None:
    """A key waiting (a long backoff) to retry a failed run takes a newer
    value at once, with a fresh count of attempts."""
    failing = ("k", 0)
    control = Control({"k": failing if first_seen == "in the scan" else ("k", 1)})
    holder: dict[str, Any] = {}
    calls: list[tuple[str, int]] = []

    @coco.fn
    async def consume(value: tuple[str, int]) -> None:
        calls.append(value)
        if value[1] == 0:
            raise RuntimeError("version 0 fails")

    policy = coco.RetryPolicy(max_attempts=5, initial_backoff=600.0, max_backoff=600.0)
    app = each_app(
        "cut short",
        control,
        consume,
        holder,
        lambda lm: lm.consumer(retry=policy),
        producer_first=True,
    )
    async with app.update(live=True) as handle:
        if first_seen == "live":
            with anyio.fail_after(TIMEOUT):
                await handle.ready()
            control.state["k"] = failing
            await control.refresh()
        await wait_for(lambda: failing in calls)
        assert holder["lm"].stats().failing == {}  # still retrying, not given up

        control.state["k"] = ("k", 2)
        await control.refresh()
        with anyio.fail_after(TIMEOUT):  # far less than the 600 s backoff
            await holder["lm"].settle()
            await handle.ready()
        assert calls[-1] == ("k", 2)
        assert calls.count(failing) == 1
        assert holder["lm"].stats().failing == {}
        await handle.stop()


@pytest.mark.parametrize("k_holds_a_row", [True, False], ids=["component", "at rest"])
async def test_delete_cuts_a_retry_wait_short(k_holds_a_row: bool) -> None:
    """Deleting a key whose child waits (a long backoff) to retry unmounts it
    at once: what it held downstream is released, and settle() returns.
    (A child at rest gets its component when its run fails.)"""
    control = Control({"k": ("k", 1), "other": ("other", 1)})
    holder: dict[str, Any] = {}
    down = Downstream()
    calls: list[tuple[str, int]] = []

    @coco.fn
    async def consume(value: tuple[str, int]) -> None:
        calls.append(value)
        if value[1] == 0:
            raise RuntimeError("version 0 fails")
        if k_holds_a_row or value[0] != "k":
            down.target.declare(value[0], value[1])

    policy = coco.RetryPolicy(max_attempts=5, initial_backoff=600.0, max_backoff=600.0)
    app = each_app("delete cuts", control, consume, holder, lambda lm: lm.consumer(retry=policy))
    async with app.update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
        before = {"k": 1, "other": 1} if k_holds_a_row else {"other": 1}
        assert down.rows == before
        assert ("k" in holder["each"]._component.host.leaves) is not k_holds_a_row
        control.state["k"] = ("k", 0)
        await control.refresh()
        await wait_for(lambda: ("k", 0) in calls)
        assert down.rows == before  # a failed run commits nothing

        del control.state["k"]
        await control.refresh()
        with anyio.fail_after(TIMEOUT):  # far less than the 600 s backoff
            await holder["lm"].settle()
            await handle.ready()
        assert down.rows == {"other": 1}
        assert calls.count(("k", 0)) == 1
        assert holder["lm"].stats().failing == {}
        assert not {r[0] for r in holder["each"]._component.children} & {"k"}
        await handle.stop()
