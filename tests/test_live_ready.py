"""``handle.ready()`` in live mode is the initial catch-up, and it returns
under sustained churn.

Live-mode ``ready()`` means: every component of the tree has finished its
first run (a live component: marked itself ready), and every consumer has
processed the entries its map held when its scan began, following chains of
maps (a consumer whose per-entry components declare into a second map that
a second consumer watches).  It must not wait for a moment when nothing is
pending, which never comes while a producer churns faster than the
consumer."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest
from helpers import TIMEOUT

import livemap as coco
from livemap import LiveMap, component_subpath

pytestmark = pytest.mark.anyio

KEYS = [f"k{i}" for i in range(30)]


class Churner:
    """A live producer that re-declares every key with a new value every
    millisecond, from its first step on, until the run stops."""

    def __init__(self, lm: LiveMap[str, tuple[str, int]]) -> None:
        self.lm = lm
        self.round = 0

    def process(self) -> None:
        for key in KEYS:
            self.lm.declare_entry(key, (key, self.round))

    async def process_live(self, op: coco.LiveComponentOperator) -> None:
        await op.update_full()
        await op.mark_ready()
        while True:
            await anyio.sleep(0.001)
            self.round += 1
            await op.update_full()


async def ready_then_stop(app: coco.App, at_ready: Callable[[], None]) -> None:
    handle = app.update(live=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(handle.result)
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
        at_ready()
        with anyio.fail_after(TIMEOUT):
            await handle.stop()


async def test_ready_returns_while_a_producer_churns_faster_than_the_consumer() -> None:
    seen: dict[str, int] = {}
    at_ready: dict[str, int] = {}

    @coco.fn
    async def slow(value: tuple[str, int]) -> None:
        await anyio.sleep(0.005)  # 30 keys at 2 at once: ~75 ms a round
        seen[value[0]] = value[1]

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        await coco.mount(component_subpath("producer"), Churner, lm)
        await coco.mount_each(slow, lm.consumer(concurrency=2))

    await ready_then_stop(coco.App("churn", main), lambda: at_ready.update(seen))
    # every entry that existed when the scan began was processed
    assert sorted(at_ready) == sorted(KEYS)


async def test_ready_follows_a_chain_of_maps_under_churn() -> None:
    """lm1 (churned) -> per-entry components declaring into lm2 -> a second
    consumer: ready() waits until the second consumer has processed what the
    first one's catch-up declared for every key, although the second one's
    scan found lm2 empty."""
    downstream: dict[str, int] = {}
    at_ready: dict[str, int] = {}

    @coco.fn
    async def relay(value: tuple[str, int], lm2: LiveMap[str, tuple[str, int]]) -> None:
        await anyio.sleep(0.002)
        lm2.declare_entry(value[0], value)

    @coco.fn
    async def record(value: tuple[str, int]) -> None:
        await anyio.sleep(0.003)
        downstream[value[0]] = value[1]

    @coco.fn
    async def main() -> None:
        lm1: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        lm2: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        await coco.mount(component_subpath("producer"), Churner, lm1)
        # the downstream consumer first: its scan finds lm2 empty
        await coco.mount_each(component_subpath("second"), record, lm2.consumer(concurrency=4))
        await coco.mount_each(component_subpath("first"), relay, lm1.consumer(concurrency=4), lm2)

    await ready_then_stop(coco.App("chain", main), lambda: at_ready.update(downstream))
    assert sorted(at_ready) == sorted(KEYS)


async def test_ready_waits_for_a_live_component_that_has_not_marked_itself_ready() -> None:
    gate = anyio.Event()

    class Late:
        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await gate.wait()
            await op.mark_ready()
            await anyio.sleep_forever()

    @coco.fn
    async def main() -> None:
        await coco.mount(Late)

    handle = coco.App("late", main).update(live=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(handle.result)
        with anyio.move_on_after(0.2) as waited:
            await handle.ready()
        assert waited.cancelled_caught  # not ready: the live component is not
        gate.set()
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
            await handle.stop()


async def test_ready_without_churn_still_means_every_change_delivered() -> None:
    processed: list[str] = []

    @coco.fn
    async def slow(value: str) -> None:
        await anyio.sleep(0.001)
        processed.append(value)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, str] = await LiveMap.create()
        for key in KEYS:
            lm.declare_entry(key, key)
        await coco.mount_each(slow, lm.consumer(concurrency=3))

    snapshot: list[str] = []
    await ready_then_stop(coco.App("calm", main), lambda: snapshot.extend(processed))
    assert sorted(snapshot) == sorted(KEYS)


class Follower:
    """A per-entry live component whose own catch-up takes a while: it
    records its value once it has marked itself ready."""

    marked: dict[str, int]
    delay = 0.01

    def __init__(self, value: tuple[str, int]) -> None:
        self.value = value

    def process(self) -> None:
        pass

    async def process_live(self, op: coco.LiveComponentOperator) -> None:
        await anyio.sleep(self.delay)
        await op.update_full()
        await op.mark_ready()
        self.marked[self.value[0]] = self.value[1]
        await anyio.sleep_forever()


@pytest.mark.parametrize("producer", ["in-main", "live"])
async def test_ready_waits_for_the_per_entry_live_components_of_the_scan(producer: str) -> None:
    """A live-component class as ``mount_each``'s processor: ``ready()`` comes
    after the live component of every entry the catch-up delivered has
    marked itself ready, whether the entries were there at the scan or a
    live producer committed them during the catch-up (``mount()`` returns
    at once, so its first commit may follow the scan)."""
    marked: dict[str, int] = {}
    at_ready: dict[str, int] = {}

    class Proc(Follower):
        pass

    Proc.marked = marked

    class Once:
        def __init__(self, lm: LiveMap[str, tuple[str, int]]) -> None:
            self.lm = lm

        def process(self) -> None:
            for key in KEYS[:5]:
                self.lm.declare_entry(key, (key, 0))

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.update_full()
            await op.mark_ready()
            await anyio.sleep_forever()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        if producer == "live":
            await coco.mount(component_subpath("producer"), Once, lm)
        else:
            for key in KEYS[:5]:
                lm.declare_entry(key, (key, 0))
        await coco.mount_each(Proc, lm)

    await ready_then_stop(coco.App(f"live-each-{producer}", main), lambda: at_ready.update(marked))
    assert at_ready == dict.fromkeys(KEYS[:5], 0)


async def test_ready_with_per_entry_live_components_returns_under_churn() -> None:
    """Each key's value changes every millisecond while its live component
    needs 10 ms to mark itself ready: every component is superseded before
    it gets there.  ``ready()`` still returns: a superseded component counts
    as processed (its successor is a change after the catch-up's)."""
    marked: dict[str, int] = {}

    class Proc(Follower):
        pass

    Proc.marked = marked

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        await coco.mount(component_subpath("producer"), Churner, lm)
        await coco.mount_each(Proc, lm)

    await ready_then_stop(coco.App("live-each-churn", main), lambda: None)


async def test_ready_with_per_entry_live_components_deleted_during_the_catch_up() -> None:
    """An entry deleted while its live component catches up: its component
    leaves the tree, and ``ready()`` does not wait for it."""
    marked: dict[str, int] = {}
    gate = anyio.Event()

    class Never(Follower):
        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            if self.value[0] == "gone":
                gate.set()
                await anyio.sleep_forever()  # never marks itself ready
            await super().process_live(op)

    Never.marked = marked
    keys = {"kept": 0, "gone": 0}

    class Producer:
        def __init__(self, lm: LiveMap[str, tuple[str, int]]) -> None:
            self.lm = lm

        def process(self) -> None:
            for key, value in keys.items():
                self.lm.declare_entry(key, (key, value))

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.update_full()
            await op.mark_ready()
            await gate.wait()
            del keys["gone"]
            await op.update_full()
            await anyio.sleep_forever()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        await coco.mount(component_subpath("producer"), Producer, lm)
        await coco.mount_each(Never, lm)

    at_ready: dict[str, int] = {}
    await ready_then_stop(coco.App("live-each-gone", main), lambda: at_ready.update(marked))
    assert at_ready == {"kept": 0}
