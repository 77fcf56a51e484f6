"""An update that ends before it settles (stopped, its task cancelled, or
interrupted by a BaseException from user code) still deletes the keys its
components stopped declaring and nobody took over: deferred drops are
applied as the run ends.  Claims still pending then are not reported."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import pytest
from helpers import wait_for

import livemap as coco
from livemap import KeyedTarget, LiveMap, TargetBatch

pytestmark = pytest.mark.anyio

_names = itertools.count()


class Scene:
    """A main function whose child ``part`` declares ``x`` (first update
    only) and ``y`` into a keyed target and a LiveMap; in the second update
    main blocks (or raises) after ``part`` has committed, before main
    itself commits."""

    def __init__(self, raise_in_main: BaseException | None = None) -> None:
        self.batches: list[tuple[list[tuple[str, Any]], list[str]]] = []
        self.target: KeyedTarget[str, int] = KeyedTarget("rows", self._apply)
        self.maps: list[LiveMap[str, int]] = []
        self.state = {"declare": True, "block": False}
        self.committed = anyio.Event()
        self.errors: list[BaseException] = []
        self.raise_in_main = raise_in_main
        scene = self

        @coco.fn
        async def part(lm: LiveMap[str, int]) -> None:
            if scene.state["declare"]:
                scene.target.declare("x", 1)
                lm.declare_entry("x", 1)
            scene.target.declare("y", 1)
            lm.declare_entry("y", 1)

        @coco.fn
        async def main() -> None:
            async with coco.exception_handler(scene.handler):
                if not scene.maps:
                    scene.maps.append(await LiveMap.create())
                h = await coco.mount(part, scene.maps[0])
                await h.ready()
                if scene.state["block"]:
                    scene.committed.set()
                    if scene.raise_in_main is not None:
                        raise scene.raise_in_main
                    await anyio.sleep_forever()  # ended here, before main commits

        self.app = coco.App(f"stop-{next(_names)}", main)

    def _apply(self, batch: TargetBatch[str, int]) -> None:
        self.batches.append((list(batch.upserts), list(batch.deletes)))

    async def handler(self, exc: BaseException, ctx: coco.ExceptionContext) -> None:
        self.errors.append(exc)

    async def first_update(self) -> None:
        with anyio.fail_after(5):
            await self.app.update()
        assert self.target.get("x") == 1 and dict(self.maps[0].items()) == {"x": 1, "y": 1}
        self.state.update(declare=False, block=True)

    def check_dropped(self) -> None:
        # part's commit without "x" landed and nobody took "x" over: the
        # update is over, so "x" is gone from the target and from the map
        assert "x" not in self.target, (self.target.owner_path("x"), self.batches)
        assert self.batches[-1] == ([], ["x"])
        assert dict(self.maps[0].items()) == {"y": 1}
        assert self.target.get("y") == 1
        assert self.errors == []


async def test_a_dropped_key_is_deleted_when_a_stopped_update_ends() -> None:
    scene = Scene()
    await scene.first_update()
    with anyio.fail_after(5):
        async with scene.app.update(live=True) as h:
            await scene.committed.wait()
            assert "x" in scene.target  # deferred: main's run is in progress
            await h.stop()
    scene.check_dropped()


async def test_a_dropped_key_is_deleted_when_the_updating_task_is_cancelled() -> None:
    scene = Scene()
    await scene.first_update()
    cancelled: list[bool] = []

    async def run(scope: anyio.CancelScope) -> None:
        with scope:
            await scene.app.update()
        cancelled.append(scope.cancelled_caught)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()
            tg.start_soon(run, scope)
            await scene.committed.wait()
            scope.cancel()
    assert cancelled == [True]
    scene.check_dropped()


async def test_a_dropped_key_is_deleted_when_user_code_raises_a_base_exception() -> None:
    scene = Scene(raise_in_main=KeyboardInterrupt())
    await scene.first_update()
    with anyio.fail_after(5), pytest.raises(KeyboardInterrupt):
        await scene.app.update()
    scene.check_dropped()


async def test_a_pending_claim_is_not_reported_when_a_stopped_update_ends() -> None:
    """The claim's update (main's run) never settles: no conflict report
    comes from the stop; the first owner keeps the key."""
    errors: list[BaseException] = []
    target: KeyedTarget[str, str] = KeyedTarget("claims", lambda batch: None)
    committed = anyio.Event()

    async def handler(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        errors.append(exc)

    @coco.fn
    def declarer(value: str) -> None:
        target.declare("k", value)

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(handler):
            first = await coco.mount(coco.component_subpath("first"), declarer, "first")
            await first.ready()
            second = await coco.mount(coco.component_subpath("second"), declarer, "second")
            await second.ready()
            committed.set()
            await anyio.sleep_forever()

    app = coco.App(f"stop-claim-{next(_names)}", main)
    with anyio.fail_after(5):
        async with app.update(live=True) as h:
            await committed.wait()
            await h.stop()
    assert errors == []
    assert target.get("k") == "first" and target.owner_path("k") == ("first",)


async def test_a_deferred_drop_in_a_mount_each_is_applied_when_stopped() -> None:
    """A consumer's entry is deleted while another entry's run never ends:
    the deleted entry's row waits for the consumer's update, which never
    settles; stopping the run deletes it."""
    rows: dict[str, int] = {}

    def apply(batch: TargetBatch[str, int]) -> None:
        for key in batch.deletes:
            del rows[key]
        rows.update(batch.upserts)

    target: KeyedTarget[str, int] = KeyedTarget("each-rows", apply)
    go, deleted, stuck = anyio.Event(), anyio.Event(), anyio.Event()
    state = {"keys": ["a"]}
    maps: list[LiveMap[str, str]] = []

    @coco.fn
    async def proc(value: str) -> None:
        if value == "b":
            stuck.set()
            await anyio.sleep_forever()  # never commits
        target.declare(value, 1)

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
            deleted.set()
            await anyio.sleep_forever()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, str] = await LiveMap.create()
        maps.append(lm)
        await coco.mount(Producer, lm)
        await coco.mount_each(proc, lm)

    app = coco.App(f"stop-each-{next(_names)}", main)
    with anyio.fail_after(5):
        async with app.update(live=True) as h:
            await h.ready()
            await maps[0].settle()  # mount() returns at once: the scan may come first
            assert rows == {"a": 1}
            go.set()
            await deleted.wait()
            await stuck.wait()
            await h.stop()
    assert rows == {}
    assert "a" not in target


@pytest.mark.parametrize("how", ["cancel", "stop"])
async def test_held_drops_interrupted_mid_batch_are_all_applied(how: str) -> None:
    """Three entries deleted in one update: their rows' deletes are held until
    the consumer's update settles, then applied one after another.  The run
    is cancelled (or stopped) while the sink applies the first: that one and
    the two after it still reach the sink, none is left owned by a
    component that is gone."""
    rows: dict[str, str] = {}
    armed = {"on": False}
    entered = anyio.Event()

    async def apply(batch: TargetBatch[str, str]) -> None:
        if batch.deletes and armed["on"]:
            armed["on"] = False
            entered.set()
            await anyio.sleep_forever()  # interrupted here, once
        for key in batch.deletes:
            del rows[key]
        rows.update(batch.upserts)

    target: KeyedTarget[str, str] = KeyedTarget("held-rows", apply)
    state = {"keys": ["a", "b", "c", "d"]}

    @coco.fn
    def produce(lm: LiveMap[str, str]) -> None:
        for key in state["keys"]:
            lm.declare_entry(key, key)

    @coco.fn
    def proc(value: str) -> None:
        target.declare(value, value)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, str] = await LiveMap.create()
        await coco.mount(produce, lm)
        await coco.mount_each(proc, lm)

    app = coco.App(f"held-mid-batch-{how}-{next(_names)}", main)
    with anyio.fail_after(5):
        await app.update()
        assert rows == {"a": "a", "b": "b", "c": "c", "d": "d"}
        state["keys"] = ["a"]
        armed["on"] = True
        if how == "cancel":
            async with anyio.create_task_group() as tg:

                async def update() -> None:
                    await app.update()

                tg.start_soon(update)
                await entered.wait()
                tg.cancel_scope.cancel()
        else:
            handle = app.update()
            async with anyio.create_task_group() as tg:
                tg.start_soon(handle.result)
                await entered.wait()
                await handle.stop()
    assert rows == {"a": "a"}
    assert sorted(k for k, _ in target.items()) == ["a"]


@pytest.mark.parametrize("then", ["stop", "next-run"])
async def test_a_release_still_queued_when_the_run_stops_is_done_all_the_same(then: str) -> None:
    """An entry is deleted while the consumer's only worker is busy with
    another entry's run (from the scan) that never ends: the deleted
    entry's component leaves the tree at once and the release of its row
    waits for the worker.  Stopping the run releases it all the same (the
    row is deleted), and the next run finds nothing owned by a component
    that is gone."""
    rows: dict[str, str] = {}

    def apply(batch: TargetBatch[str, str]) -> None:
        for key in batch.deletes:
            del rows[key]
        rows.update(batch.upserts)

    target: KeyedTarget[str, str] = KeyedTarget("queued-release", apply)
    go, deleted, stuck = anyio.Event(), anyio.Event(), anyio.Event()
    state = {"keys": ["a", "b"]}
    maps: list[LiveMap[str, str]] = []

    @coco.fn
    async def proc(value: str) -> None:
        target.declare(value, value)
        if value == "b":
            stuck.set()
            await anyio.sleep_forever()  # holds the only worker, never commits

    class Producer:
        def __init__(self, lm: LiveMap[str, str]) -> None:
            self.lm = lm

        def process(self) -> None:
            for key in state["keys"]:
                self.lm.declare_entry(key, key)

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.update_full()
            await operator.mark_ready()
            if not deleted.is_set():
                await go.wait()
                state["keys"] = ["b"]  # "a" deleted while "b" holds the worker
                await operator.update_full()
                deleted.set()
            await anyio.sleep_forever()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, str] = await LiveMap.create()
        maps.append(lm)
        # both entries are in the map when the consumer scans it: their runs
        # are the scan's, not deliveries (which the concurrency would hold)
        await (await coco.mount(Producer, lm)).ready()
        await coco.mount_each(proc, lm.consumer(concurrency=1))

    app = coco.App(f"queued-release-{then}-{next(_names)}", main)
    with anyio.fail_after(5):
        handle = app.update(live=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(handle.result)
            await stuck.wait()
            await wait_for(lambda: rows == {"a": "a"})
            delivered = maps[0].stats().deliveries
            go.set()
            await deleted.wait()
            # the consumer has taken the delete: "a"'s component left the tree
            await wait_for(lambda: maps[0].stats().deliveries > delivered)
            await handle.stop()
        assert rows == {}
        assert "a" not in target
        if then == "next-run":
            state["keys"] = ["a"]
            async with app.update(live=True) as h:
                await h.ready()
                await maps[-1].settle()
                await h.stop()
            assert rows == {"a": "a"}
            assert target.owner_path("a") == (coco.Symbol("proc"), "a")
