"""``UpdateStats``: livemap's counters and CocoIndex's ``by_component`` /
``total`` views (``ComponentStats``) of the same runs."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, wait_for

import livemap as coco
from livemap import ComponentStats, LiveMap, UpdateStats

pytestmark = pytest.mark.anyio


@coco.fn
async def child(x: int) -> None:
    await anyio.sleep(0)


@coco.fn
def failing(x: int) -> None:
    raise RuntimeError(f"failing {x}")


def name(fn: Any) -> str:
    return str(fn.__qualname__)


async def run(app: coco.App, *, live: bool = False) -> UpdateStats:
    handle = app.update(live=live)
    with anyio.fail_after(TIMEOUT):
        await handle
    return handle.stats()


async def test_by_component_counts_adds_then_reprocesses_and_deletes() -> None:
    keys = [1, 2, 3]

    async def main() -> None:
        for k in keys:
            await coco.mount(coco.component_subpath(k), child, k)

    app = coco.App("by-component", main)
    first = await run(app)
    assert first.by_component[name(child)] == ComponentStats(num_execution_starts=3, num_adds=3)
    assert first.by_component[name(main)] == ComponentStats(1, 0, 1, 0, 0, 0)
    assert first.total == ComponentStats(4, 0, 4, 0, 0, 0)
    assert first.total.num_in_progress == 0

    keys[:] = [2, 3]
    second = await run(app)
    group = second.by_component[name(child)]
    assert group.num_reprocesses == 2 and group.num_adds == 0
    assert group.num_deletes == 1  # key 1: unmounted (it counts a start, as in CocoIndex)
    assert group.num_execution_starts == 3
    assert group.num_finished == 3 and group.num_in_progress == 0
    assert second.components_unmounted == 1
    assert second.by_component[name(main)].num_reprocesses == 1
    assert second.components_run == 3  # livemap's own counter: runs only


async def test_failures_count_as_errors() -> None:
    async def main() -> None:
        await coco.mount(coco.component_subpath("ok"), child, 0)
        for k in range(2):
            await coco.mount(coco.component_subpath("bad", k), failing, k)

    app = coco.App(coco.AppConfig("errors", exception_handler=lambda e, c: None), main)
    stats = await run(app)
    assert stats.by_component[name(failing)] == ComponentStats(2, 0, 0, 0, 0, 2)
    assert stats.components_failed == 2
    assert stats.total.num_errors == 2
    assert stats.total.num_processed == 2  # main and the good child


async def test_a_superseded_run_is_taken_back() -> None:
    gate = anyio.Event()
    calls: list[int] = []

    @coco.fn
    async def slow(x: int) -> None:
        calls.append(x)
        if x == 0:
            await gate.wait()  # superseded while it waits here

    class Remounter:
        def process(self) -> None:
            pass

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.update("s", slow, 0)
            await anyio.sleep(0.01)
            handle = await operator.update("s", slow, 1)  # re-mount mid-flight
            await handle.ready()
            await operator.mark_ready()

    async def main() -> None:
        await coco.mount(coco.component_subpath("r"), Remounter)

    app = coco.App(coco.AppConfig("superseded", exception_handler=lambda e, c: None), main)
    stats = await run(app)
    assert calls == [0, 1]
    group = stats.by_component[name(slow)]
    assert group.num_execution_starts == 1  # the run that finished
    assert group.num_adds == 0 and group.num_reprocesses == 1  # its second generation
    assert group.num_in_progress == 0
    assert stats.components_run == 4  # livemap counts both runs started (main, Remounter)


async def test_a_stopped_live_run_leaves_nothing_in_progress() -> None:
    started = anyio.Event()

    @coco.fn
    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    async def main() -> None:
        await coco.mount(coco.component_subpath("f"), forever)

    app = coco.App("stopped", main)
    with anyio.fail_after(TIMEOUT):
        async with app.update(live=True) as handle:
            await started.wait()
            assert handle.stats().by_component[name(forever)].num_in_progress == 1
    assert handle.stats().total.num_in_progress == 0


async def test_mount_each_children_without_a_component_are_counted() -> None:
    async def produce(lm: LiveMap[int, int]) -> None:
        for k in range(5):
            lm.declare_entry(k, k)

    @coco.fn
    def consume(value: int) -> None:
        pass

    async def main() -> None:
        lm: LiveMap[int, int] = await LiveMap.create()
        await coco.mount(coco.component_subpath("p"), produce, lm)
        await coco.mount_each(coco.component_subpath("c"), consume, lm)

    app = coco.App("each-stats", main)
    stats = await run(app)
    group = stats.by_component[name(consume)]
    assert group.num_execution_starts == 5 and group.num_adds == 5
    assert group.num_in_progress == 0


async def test_live_component_process_runs_are_counted_by_their_class() -> None:
    class Refresh:
        def process(self) -> None:
            pass

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            for _ in range(3):
                await operator.update_full()
            await operator.mark_ready()

    async def main() -> None:
        await coco.mount(coco.component_subpath("r"), Refresh)

    app = coco.App("live-stats", main)
    stats = await run(app, live=True)
    group = stats.by_component[name(Refresh)]
    assert group.num_execution_starts == 3
    assert group.num_adds + group.num_reprocesses == 3


async def test_stats_change_while_the_run_goes_on() -> None:
    gate = anyio.Event()

    async def main() -> None:
        await coco.mount(coco.component_subpath("a"), child, 1)
        await gate.wait()
        await coco.mount(coco.component_subpath("b"), child, 2)

    app = coco.App("live-object", main)
    with anyio.fail_after(TIMEOUT):
        async with app.update() as handle:
            await wait_for(lambda: handle.stats().by_component.get(name(child)) is not None)
            before = handle.stats().copy()
            gate.set()
            await handle.result()
    assert before.by_component[name(child)].num_execution_starts == 1
    assert handle.stats().by_component[name(child)].num_execution_starts == 2
    assert before != handle.stats()


def test_update_stats_built_by_hand() -> None:
    group = ComponentStats(num_execution_starts=3, num_adds=1, num_errors=1)
    stats = UpdateStats(by_component={"f": group})
    assert stats.by_component == {"f": group}
    assert stats.total == group
    assert group.num_processed == 1 and group.num_finished == 2 and group.num_in_progress == 1
    assert UpdateStats().by_component == {} and UpdateStats().total == ComponentStats()
    copy = stats.copy()
    assert copy == stats and copy is not stats
    stats.run_started("f")
    assert copy.by_component["f"].num_execution_starts == 3  # a copy is detached
    assert "by_component" in repr(stats)
