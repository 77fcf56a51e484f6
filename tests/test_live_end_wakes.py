"""A live run past its catch-up ends by itself once nothing in it can change
any more, whatever order its last live task, its tree and its consumers
get there in (the main task is not woken while a live task runs, so the
wakes that do come must be enough)."""

from __future__ import annotations

import anyio
import pytest

import livemap as coco

pytestmark = pytest.mark.anyio

TIMEOUT = 10


async def test_the_tree_turning_ready_after_the_last_live_task_ended_ends_the_run() -> None:
    done: list[str] = []
    release = anyio.Event()

    @coco.fn
    async def slow(name: str) -> None:
        await release.wait()
        done.append(name)

    class Starter:
        def process(self) -> None:
            pass

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.mark_ready()
            await anyio.sleep(0.02)  # past the catch-up
            # a child that is still running when this live task ends
            await operator.update(coco.component_subpath("slow"), slow, "child")

    @coco.fn
    async def main() -> None:
        await coco.mount(Starter)

    async def let_go() -> None:
        await anyio.sleep(0.1)
        release.set()

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(let_go)
            await coco.App("live_end_tree", main).update(live=True)
    assert done == ["child"]


async def test_the_last_live_task_ending_after_the_tree_turned_ready_ends_the_run() -> None:
    done: list[str] = []
    release = anyio.Event()
    ended: list[bool] = []

    @coco.fn
    async def slow(name: str) -> None:
        await release.wait()
        done.append(name)

    class Starter:
        def process(self) -> None:
            pass

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.mark_ready()
            await anyio.sleep(0.02)  # past the catch-up
            await operator.update(coco.component_subpath("slow"), slow, "child")
            release.set()
            # the child commits and the tree turns ready while this task runs
            with anyio.fail_after(TIMEOUT):
                while not done:
                    await anyio.sleep(0.01)
            await anyio.sleep(0.05)
            ended.append(True)

    @coco.fn
    async def main() -> None:
        await coco.mount(Starter)

    with anyio.fail_after(TIMEOUT):
        await coco.App("live_end_task", main).update(live=True)
    assert done == ["child"] and ended == [True]
