"""A live run's initial catch-up waits for the first run of every component,
also of each child of a ``mount_each`` over a list; such a child is tracked
by its host, so that it needs no record of its own (``Component.extra``)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from helpers import TIMEOUT

import livemap as coco
from livemap import KeyedTarget, LiveMap, component_subpath
from livemap._runtime import _app

pytestmark = pytest.mark.anyio

KEYS = [f"k{i}" for i in range(20)]


class Churner:
    """A live producer re-declaring every key every millisecond: with the
    slow consumer below, the tree is never quiescent, so only the catch-up's
    count of first runs can make ``ready()`` return."""

    def __init__(self, lm: LiveMap[str, int]) -> None:
        self.lm = lm
        self.round = 0

    def process(self) -> None:
        for key in KEYS[:5]:
            self.lm.declare_entry(key, self.round)

    async def process_live(self, op: coco.LiveComponentOperator) -> None:
        await op.update_full()
        await op.mark_ready()
        while True:
            await anyio.sleep(0.001)
            self.round += 1
            await op.update_full()


def _children(app_name: str, rel: Any) -> dict[Any, Any]:
    root = _app._trees[app_name].root
    assert root is not None and root.children is not None
    each = root.children[rel]
    assert each.children is not None
    return {child.key: child for child in each.children.values()}


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_the_children_of_a_mount_each_over_a_list_get_no_record_in_a_catch_up(
    kind: str,
) -> None:
    """Sync children run inline, async ones on the host's pool; one fails
    and its (slow) report is part of its first run."""
    rows: dict[str, int] = {}
    done: set[str] = set()
    handled: list[str] = []
    sink = KeyedTarget[str, int]("rows", lambda batch: rows.update(batch.upserts))

    def declare(pair: tuple[str, int]) -> None:
        key, value = pair
        if key == "bad":
            raise ValueError(key)
        sink.declare(key, value)
        done.add(key)

    async def declare_later(pair: tuple[str, int]) -> None:
        await anyio.sleep(0.02)
        declare(pair)

    entry = coco.fn(declare if kind == "sync" else declare_later)

    @coco.fn
    async def consume(value: int) -> None:
        await anyio.sleep(0.005)

    async def slow_handler(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        await anyio.sleep(0.3)
        handled.append(str(exc))

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        await coco.mount(component_subpath("producer"), Churner, lm)
        await coco.mount_each(component_subpath("consumer"), consume, lm.consumer(concurrency=1))
        async with coco.exception_handler(slow_handler):
            await coco.mount_each(
                component_subpath("list"),
                entry,
                [(key, (key, i)) for i, key in enumerate([*KEYS, "bad"])],
            )

    name = f"first-runs-{kind}"
    handle = coco.App(name, main).update(live=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(handle.result)
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
        # the catch-up waited for every child's first run, the failed one's
        # report included
        assert done == set(KEYS)
        assert handled == ["bad"]
        assert sorted(rows) == sorted(KEYS)
        children = _children(name, ("list",))
        assert sorted(children) == sorted([*KEYS, "bad"])
        assert [key for key in KEYS if children[key].extra is not None] == []
        assert children["bad"].exception is not None
        with anyio.fail_after(TIMEOUT):
            await handle.stop()


@pytest.mark.parametrize("then", ["plain", "nothing"])
async def test_a_catch_up_ends_when_a_mount_each_over_a_list_goes_mid_first_run(
    then: str,
) -> None:
    """The ``mount_each``'s children are still in their first run when a
    re-run of its parent mounts a plain function at its path (its host
    retires: the children tell from then on) or nothing (it is unmounted:
    they leave the tree); the catch-up ends all the same."""
    gate = anyio.Event()
    started: list[str] = []

    @coco.fn
    async def blocked(value: int) -> None:
        started.append(str(value))
        await gate.wait()

    @coco.fn
    async def plain() -> None:
        pass

    class Parent:
        def __init__(self) -> None:
            self.mode = "each"

        async def process(self) -> None:
            at = component_subpath("here")
            if self.mode == "each":
                await coco.mount_each(at, blocked, [(f"k{i}", i) for i in range(5)])
            elif then == "plain":
                await coco.mount(at, plain)

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(op.update_full)  # waits for the blocked children
                while len(started) < 5:
                    await anyio.sleep(0.001)
                self.mode = "next"
                await op.update_full()  # supersedes the first
                await op.mark_ready()
                gate.set()
            await anyio.sleep_forever()

    @coco.fn
    async def consume(value: int) -> None:
        await anyio.sleep(0.005)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        await coco.mount(component_subpath("producer"), Churner, lm)  # never quiescent
        await coco.mount_each(component_subpath("consumer"), consume, lm.consumer(concurrency=1))
        await coco.mount(Parent)

    async with coco.App(f"first-runs-go-{then}", main).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
    assert len(started) == 5
