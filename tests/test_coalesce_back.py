"""A key that changes and changes back while its delivery waits for a
worker is not processed again: coalescing compares the latest value with
what the processor last ran with, not with what was last delivered."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest
from helpers import TIMEOUT, wait_for

import livemap as coco
from livemap import LiveMap

pytestmark = pytest.mark.anyio

Value = tuple[str, int]
Declare = Callable[..., Awaitable[None]]


@coco.fn
async def produce(lm: LiveMap[str, Value], values: dict[str, int]) -> None:
    for key, n in values.items():
        lm.declare_entry(key, (key, n))


async def run_scenario(
    shape: str,
    concurrency: int,
    hold: Callable[[Value, int], bool],
    script: Callable[[Declare, list[Value], anyio.Event], Awaitable[None]],
) -> list[Value]:
    """A live app: a ``mount_each`` over a map, whose processor waits at a
    gate for the calls ``hold(value, call_number)`` picks; ``script`` drives
    a producer with ``declare(**values)``.  Returns the processor's calls."""
    calls: list[Value] = []
    gate = anyio.Event()
    sink = coco.KeyedTarget[str, int]("rows", lambda batch: None)
    done = anyio.Event()

    @coco.fn
    async def process(value: Value) -> None:
        calls.append(value)
        if hold(value, len(calls)):
            await gate.wait()
        if shape == "declares":
            sink.declare(value[0], value[1])

    class Driver:
        def __init__(self, lm: LiveMap[str, Value]) -> None:
            self.lm = lm

        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.mark_ready()

            async def declare(**values: int) -> None:
                h = await op.update("p", produce, self.lm, values)
                with anyio.fail_after(TIMEOUT):
                    await h.ready()

            await script(declare, calls, gate)
            with anyio.fail_after(TIMEOUT):
                await self.lm.settle()
            done.set()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, Value] = await LiveMap.create()
        await coco.mount_each(process, lm.consumer(concurrency=concurrency))
        await coco.mount(Driver, lm)

    handle = coco.App("undo", main).update(live=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(handle.result)
        with anyio.fail_after(TIMEOUT):
            await done.wait()
            await handle.stop()
    return calls


@pytest.mark.parametrize("shape", ["trivial", "declares"])
async def test_a_change_and_its_undo_queued_behind_a_busy_worker_run_nothing(shape: str) -> None:
    async def script(declare: Declare, calls: list[Value], gate: anyio.Event) -> None:
        await declare(slow=0, k=0)
        await wait_for(lambda: ("k", 0) in calls and ("slow", 0) in calls)
        await declare(slow=1, k=0)  # the one worker is now held by "slow"
        await wait_for(lambda: ("slow", 1) in calls)
        await declare(slow=1, k=1)  # k changes: its delivery waits for a worker
        await declare(slow=1, k=0)  # and changes back before it got one
        gate.set()

    calls = await run_scenario(shape, 1, lambda value, _: value == ("slow", 1), script)
    # k was processed with 0 once; its change to 1 and back never reached it
    assert [c for c in calls if c[0] == "k"] == [("k", 0)], calls


@pytest.mark.parametrize("shape", ["trivial", "declares"])
async def test_a_change_and_its_undo_while_the_key_runs_run_nothing_more(shape: str) -> None:
    async def script(declare: Declare, calls: list[Value], gate: anyio.Event) -> None:
        await declare(k=0)
        await wait_for(lambda: calls == [("k", 0)])  # k runs, held at the gate
        await declare(k=1)
        await declare(k=0)  # back to the value it runs with
        gate.set()

    calls = await run_scenario(shape, 4, lambda _, n: n == 1, script)
    assert calls == [("k", 0)], calls
