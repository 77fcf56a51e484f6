"""``AppConfig(max_inflight_components=N)``: at most N component runs execute
at once; a parent gives its slot up when it mounts its first child, so a
tree cannot deadlock on its own bound, also under re-mounts and
cancellation."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, current_tasks, wait_for

import livemap as coco
from livemap import LiveMap, RetryPolicy

pytestmark = pytest.mark.anyio


class Tracker:
    """Counts the runs inside a region at once, and the peak."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.total = 0

    async def region(self, seconds: float = 0.01) -> None:
        self.now += 1
        self.total += 1
        self.peak = max(self.peak, self.now)
        try:
            await anyio.sleep(seconds)
        finally:
            self.now -= 1


def flat(tracker: Tracker, count: int) -> Any:
    @coco.fn
    async def leaf(i: int) -> None:
        await tracker.region()

    async def main() -> None:
        for i in range(count):
            await coco.mount(coco.component_subpath(i), leaf, i)

    return main


async def run(app: coco.App, *, live: bool = False) -> Any:
    with anyio.fail_after(TIMEOUT):
        return await app.update(live=live)


@pytest.mark.parametrize("bound", [1, 2])
async def test_at_most_n_runs_at_once(bound: int) -> None:
    tracker = Tracker()
    app = coco.App(coco.AppConfig("bounded", max_inflight_components=bound), flat(tracker, 6))
    await run(app)
    assert tracker.total == 6
    assert tracker.peak == bound


async def test_the_default_bound_is_far_above_a_few_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIVEMAP_MAX_INFLIGHT_COMPONENTS", raising=False)
    tracker = Tracker()
    await run(coco.App("unbounded", flat(tracker, 6)))
    assert tracker.peak == 6


async def test_the_environment_sets_the_bound_unless_the_config_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LIVEMAP_MAX_INFLIGHT_COMPONENTS", "2")
    tracker = Tracker()
    await run(coco.App("from-env", flat(tracker, 6)))
    assert tracker.peak == 2
    tracker = Tracker()
    await run(coco.App(coco.AppConfig("config-wins", max_inflight_components=3), flat(tracker, 6)))
    assert tracker.peak == 3


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "4"])
def test_a_bad_bound_is_a_value_error(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_inflight_components"):
        coco.App(coco.AppConfig("bad", max_inflight_components=bad), flat(Tracker(), 1))


def test_a_bad_bound_in_the_environment_is_a_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMAP_MAX_INFLIGHT_COMPONENTS", "many")
    with pytest.raises(ValueError, match=r"LIVEMAP_MAX_INFLIGHT_COMPONENTS.*'many'"):
        coco.App("bad-env", flat(Tracker(), 1))


# -- no deadlock: parents waiting for children hold no slot ------------------------------


async def test_nested_mounts_complete_with_a_bound_of_one() -> None:
    tracker = Tracker()

    @coco.fn
    async def grandchild() -> None:
        await tracker.region(0.001)

    @coco.fn
    async def child(i: int) -> None:
        await coco.mount(coco.component_subpath("gc"), grandchild)

    @coco.fn
    def sync_leaf() -> None:
        pass

    async def main() -> None:
        for i in range(4):
            await coco.mount(coco.component_subpath(i), child, i)
        await coco.mount(coco.component_subpath("sync"), sync_leaf)

    await run(coco.App(coco.AppConfig("nested", max_inflight_components=1), main))
    assert tracker.total == 4 and tracker.peak == 1


async def test_a_deep_use_mount_chain_with_a_bound_of_one() -> None:
    @coco.fn
    async def level(depth: int) -> int:
        if depth == 0:
            return 0
        # waits for its child while the child runs: holds no slot meanwhile
        return 1 + await coco.use_mount(coco.component_subpath("d"), level, depth - 1)

    async def main() -> int:
        return await coco.use_mount(coco.component_subpath("top"), level, 20)

    assert await run(coco.App(coco.AppConfig("chain", max_inflight_components=1), main)) == 20


async def test_mount_each_children_share_the_bound() -> None:
    tracker = Tracker()

    async def produce(lm: LiveMap[int, int]) -> None:
        for k in range(20):
            lm.declare_entry(k, k)

    @coco.fn
    async def consume(value: int) -> None:
        await tracker.region(0.002)

    async def main() -> None:
        lm: LiveMap[int, int] = await LiveMap.create()
        await coco.mount(coco.component_subpath("p"), produce, lm)
        await coco.mount_each(coco.component_subpath("c"), consume, lm.consumer(concurrency=64))

    await run(coco.App(coco.AppConfig("each", max_inflight_components=2), main))
    assert tracker.total == 20 and tracker.peak == 2


async def test_a_live_components_process_live_holds_no_slot() -> None:
    tracker = Tracker()

    class Idle:
        def process(self) -> None:
            pass

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.mark_ready()
            await anyio.sleep_forever()

    @coco.fn
    async def leaf(i: int) -> None:
        await tracker.region(0.001)

    async def main() -> None:
        await coco.mount(coco.component_subpath("idle"), Idle)
        for i in range(3):
            await coco.mount(coco.component_subpath(i), leaf, i)

    app = coco.App(coco.AppConfig("idle", max_inflight_components=1), main)
    with anyio.fail_after(TIMEOUT):
        async with app.update(live=True) as handle:
            await handle.ready()
    assert tracker.total == 3


async def test_a_retry_wait_holds_no_slot() -> None:
    tracker = Tracker()
    tries: list[int] = []

    async def produce(lm: LiveMap[int, int]) -> None:
        for k in range(4):
            lm.declare_entry(k, k)

    @coco.fn
    async def consume(value: int) -> None:
        if value == 0:
            tries.append(value)
            if len(tries) == 1:
                raise OSError("first try fails")
        await tracker.region(0.001)

    async def main() -> None:
        lm: LiveMap[int, int] = await LiveMap.create()
        await coco.mount(coco.component_subpath("p"), produce, lm)
        retry = RetryPolicy(max_attempts=2, initial_backoff=0.2)
        await coco.mount_each(coco.component_subpath("c"), consume, lm.consumer(retry=retry))

    app = coco.App(coco.AppConfig("retry", max_inflight_components=1), main)
    with anyio.fail_after(TIMEOUT):
        async with app.update() as handle:
            # the others run while key 0 waits out its backoff
            await wait_for(lambda: tracker.total == 3)
            assert tries == [0]
            await handle.result()
    assert tries == [0, 0] and tracker.total == 4


# -- hostile: re-mounts, cancellation, stop ------------------------------------------------


class Remounter:
    """Re-mounts one slow child over and over (each re-mount cancels the run
    holding the slot), then mounts a last child that must still get one."""

    def __init__(self, gate: anyio.Event, finished: list[str]) -> None:
        self.gate = gate
        self.finished = finished

    def process(self) -> None:
        pass

    async def process_live(self, operator: coco.LiveComponentOperator) -> None:
        for i in range(30):
            await operator.update("slow", slow, self.gate, i)
            await anyio.sleep(0.001)
        last = await operator.update("last", record, self.finished)
        await last.ready()
        await operator.mark_ready()


@coco.fn
async def slow(gate: anyio.Event, i: int) -> None:
    await gate.wait()


@coco.fn
def record(finished: list[str]) -> None:
    finished.append("last")


async def test_re_mounts_cancel_slot_holders_without_leaking_slots() -> None:
    gate = anyio.Event()
    finished: list[str] = []

    async def main() -> None:
        await coco.mount(coco.component_subpath("r"), Remounter, gate, finished)

    app = coco.App(coco.AppConfig("remount", max_inflight_components=1), main)
    with anyio.fail_after(TIMEOUT):
        async with app.update(live=True) as handle:
            await wait_for(lambda: handle.stats().components_run >= 32)
            # 'slow' #29 holds the only slot and waits on the gate: 'last' waits for it
            await anyio.sleep(0.02)
            assert finished == []
            gate.set()
            await handle.ready()
    assert finished == ["last"]
    group = handle.stats().by_component
    assert group[slow.__qualname__].num_in_progress == 0


async def test_a_child_unmounted_while_it_waits_for_a_slot() -> None:
    gate = anyio.Event()
    ran: list[str] = []

    @coco.fn
    async def holder() -> None:
        ran.append("holder")
        await gate.wait()

    @coco.fn
    async def waiter(name: str) -> None:
        ran.append(name)

    class Driver:
        def process(self) -> None:
            pass

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.update("h", holder)
            await wait_for(lambda: ran == ["holder"])
            await operator.update("w", waiter, "dropped")
            await anyio.sleep(0.01)
            await (await operator.delete("w")).ready()  # cancelled while it waits
            gate.set()
            handle = await operator.update("w2", waiter, "after")
            await handle.ready()
            await operator.mark_ready()

    async def main() -> None:
        await coco.mount(coco.component_subpath("d"), Driver)

    app = coco.App(coco.AppConfig("unmount-waiting", max_inflight_components=1), main)
    with anyio.fail_after(TIMEOUT):
        await app.update(live=True)
    assert ran == ["holder", "after"]


async def test_stop_while_runs_wait_for_slots() -> None:
    gate = anyio.Event()
    tracker = Tracker()

    @coco.fn
    async def blocked(i: int) -> None:
        tracker.now += 1
        await gate.wait()

    async def main() -> None:
        for i in range(5):
            await coco.mount(coco.component_subpath(i), blocked, i)

    app = coco.App(coco.AppConfig("stop-waiting", max_inflight_components=2), main)
    before = current_tasks()
    with anyio.fail_after(TIMEOUT):
        async with app.update(live=True) as handle:
            await wait_for(lambda: tracker.now == 2)
            await anyio.sleep(0.01)
            assert tracker.now == 2  # three wait for a slot
            await handle.stop()
    assert current_tasks() == before
    # the next update of the same app starts with every slot free
    gate.set()
    tracker.now = 0
    await run(app)
    assert tracker.now == 5


async def test_a_slot_handed_to_a_waiter_cancelled_meanwhile_goes_on() -> None:
    from livemap._runtime._session import Slots

    slots = Slots(1)
    a, b, c = object(), object(), object()
    assert slots.take_now(a)
    got: list[object] = []
    scope_b = anyio.CancelScope()

    async def take(holder: object, scope: anyio.CancelScope) -> None:
        with scope:
            await slots.take(holder)  # a run gives its slot back when it ends
            try:
                got.append(holder)
                await anyio.sleep(0)
            finally:
                slots.give(holder)

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(take, b, scope_b)
            await wait_for(lambda: len(slots.waiting) == 1)
            tg.start_soon(take, c, anyio.CancelScope())
            await wait_for(lambda: len(slots.waiting) == 2)
            slots.give(a)  # handed to b ...
            scope_b.cancel()  # ... which is cancelled as it wakes
    # however the backend orders the wake-up and the cancellation, c got it
    assert got in ([c], [b, c])
    assert slots.free == 1 and not slots.holders and not slots.waiting
