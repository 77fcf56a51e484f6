"""Hostile checks of the leaner component (a shared ``MountSpec``, rare fields
in ``extra``): re-mounts mid-flight with another processor or other
arguments, the counters of each processor, and a per-entry child
unmounted while its run waits."""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, Mirror, run_app, wait_for
from lean_support import feeding

import livemap as coco
from livemap import LiveMap
from livemap._runtime._component import Component

pytestmark = pytest.mark.anyio


def name(fn: Any) -> str:
    return str(fn.__qualname__)


async def test_a_re_mount_with_another_processor_mid_flight_counts_each_its_own() -> None:
    """A run superseded by a re-mount with another processor takes its start
    back under its own processor, not the one mounted since."""
    gate = anyio.Event()
    calls: list[str] = []

    @coco.fn
    async def slow_a(x: int) -> None:
        calls.append("a")
        await gate.wait()

    @coco.fn
    async def fast_b(x: int) -> None:
        calls.append("b")

    class Remounter:
        def process(self) -> None:
            pass

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.update("s", slow_a, 0)
            await anyio.sleep(0.01)
            handle = await operator.update("s", fast_b, 1)
            await handle.ready()
            await operator.mark_ready()

    async def main() -> None:
        await coco.mount(coco.component_subpath("r"), Remounter)

    app = coco.App(coco.AppConfig("lean-hostile-proc", exception_handler=lambda e, c: None), main)
    handle = app.update()
    with anyio.fail_after(TIMEOUT):
        await handle
    stats = handle.stats()
    assert calls == ["a", "b"]
    a = stats.by_component.get(name(slow_a))
    b = stats.by_component[name(fast_b)]
    assert a is None or (a.num_execution_starts == 0 and a.num_in_progress == 0)
    assert b.num_execution_starts == 1 and b.num_in_progress == 0
    assert stats.total.num_in_progress == 0


async def test_a_mount_each_re_run_with_other_fargs_mid_flight() -> None:
    mirror = Mirror()
    gate = anyio.Event()
    handles: list[coco.ComponentMountHandle] = []

    @coco.fn
    async def consume(value: int, tag: str) -> None:
        if tag == "x" and value == 1:
            await gate.wait()
        mirror.target.declare(value, f"{tag}{value}")

    class Outer:
        def __init__(self, lm: LiveMap[int, int]) -> None:
            self.lm = lm

        def process(self) -> None:
            pass

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.update("e", inner, self.lm, "x")
            await anyio.sleep(0.05)  # key 1 waits on the gate
            h = await operator.update("e", inner, self.lm, "y")  # mid-flight: key 1 waits
            await anyio.sleep(0.01)
            gate.set()
            await h.ready()
            await operator.mark_ready()

    async def inner(lm: LiveMap[int, int], tag: str) -> None:
        handles.append(await coco.mount_each(consume, lm, tag))

    async def main() -> None:
        lm: LiveMap[int, int] = await LiveMap.create()
        for i in range(4):
            lm.declare_entry(i, i)
        await coco.mount(coco.component_subpath("o"), Outer, lm)

    app = coco.App("lean-hostile-fargs", main)
    await run_app(app)
    assert mirror.rows == {i: f"y{i}" for i in range(4)}
    comp: Component = handles[-1]._component  # type: ignore[attr-defined]
    for child in (comp.children or {}).values():
        assert child.args == (child.given, "y")


async def test_a_child_deleted_mid_run_leaves_its_parent_ready() -> None:
    """A per-entry child unmounted while its run waits (cancelled there):
    its waiter is called, and the mount_each and the app become ready
    without it."""
    gate = anyio.Event()
    started = anyio.Event()
    mirror = Mirror()

    @coco.fn
    async def consume(value: int) -> None:
        if value == 1:
            started.set()
            await gate.wait()
        mirror.target.declare(value, value)

    async with feeding("lean-hostile-delete", consume) as fed:
        await fed.commit(a=0, b=10)
        await wait_for(lambda: mirror.rows == {0: 0, 10: 10})
        await fed.feed.commit(b=1)  # its component (it holds a row) runs again, and waits
        await started.wait()
        comp: Component = fed.each._component  # type: ignore[attr-defined]
        await wait_for(lambda: ("b",) in (comp.children or {}))
        child = (comp.children or {})[("b",)]
        assert child.unready > 0
        called: list[str] = []
        child.on_ready(lambda: called.append("w"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(fed.feed.commit, b=None))
            await anyio.sleep(0.02)
            gate.set()  # (the delete may wait for the run it supersedes)
        await wait_for(lambda: not child.alive)
        assert called == ["w"] and child.closed
        await fed.each.ready()
        await wait_for(lambda: comp.unready == 0)
        await wait_for(lambda: mirror.rows == {0: 0})
