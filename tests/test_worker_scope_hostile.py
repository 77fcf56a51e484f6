"""A pool worker's one cancel scope over its runs and parks, made hostile:
nothing that outlives a key's run on a worker may reach the worker's scope,
which runs other keys afterwards."""

from __future__ import annotations

import contextvars
from typing import Any

import anyio
import pytest
from helpers import wait_for
from test_change_path import Driver, Producer

import livemap as coco
from livemap import LiveMap
from livemap.errors import NotInComponentError

pytestmark = pytest.mark.anyio

TIMEOUT = 10.0


async def test_a_context_left_behind_by_a_keyed_run_cannot_cancel_the_workers_later_runs() -> None:
    """A per-entry run that left nothing behind ran on a worker; a task it
    started keeps its context and creates a map from there once the run is
    over.  Whatever that makes holds no reference to the worker's scope: a
    later change of that key does not cancel the run of another key the
    worker runs meanwhile."""
    contexts: dict[str, contextvars.Context] = {}
    gates: dict[tuple[str, int], anyio.Event] = {}
    started: list[tuple[str, int]] = []
    finished: list[tuple[str, int]] = []
    cancelled: list[tuple[str, int]] = []
    holder: dict[str, Any] = {}

    @coco.fn
    async def process(value: tuple[str, int]) -> None:
        started.append(value)
        if value == ("x", 0):
            contexts["x"] = contextvars.copy_context()  # (as a task it started would)
        try:
            gate = gates.get(value)
            if gate is not None:
                await gate.wait()
            finished.append(value)
        except anyio.get_cancelled_exc_class():
            cancelled.append(value)
            raise

    driver = Driver({})

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        holder["lm"] = lm
        producer = await coco.mount(Producer, lm, driver)
        await producer.ready()
        await coco.mount_each(process, lm.consumer(concurrency=2))

    async with coco.App("leaked-context", main).update(live=True) as h:
        with anyio.fail_after(TIMEOUT):
            await h.ready()
        lm = holder["lm"]
        await driver.refresh(x=0)
        await wait_for(lambda: ("x", 0) in finished)
        with anyio.fail_after(TIMEOUT):
            await lm.settle()
        # the run of x is over; its context, left behind, creates a map
        coro = LiveMap.create()
        try:
            contexts["x"].run(coro.send, None)
        except (StopIteration, NotInComponentError):
            pass  # (made or refused: either way it holds no worker's scope)
        coro.close()
        # y runs on the same worker (the only one awake), held by its gate
        gate = gates[("y", 0)] = anyio.Event()
        await driver.refresh(y=0)
        await wait_for(lambda: ("y", 0) in started)
        await anyio.sleep(0.01)
        # a change of x, taken by another worker while y runs
        await driver.refresh(x=1)
        await wait_for(lambda: ("x", 1) in finished or bool(cancelled))
        gate.set()
        with anyio.fail_after(TIMEOUT):
            await lm.settle()
        await h.stop()
    driver.close()
    assert cancelled == []
    assert ("y", 0) in finished and ("x", 1) in finished
