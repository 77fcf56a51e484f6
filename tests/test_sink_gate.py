"""A target's gate: one commit in its sink at a time, in the order they
asked, also when waiters are cancelled (before or as the gate passes to
them); a loop that ends leaves nothing held for the next one."""

from __future__ import annotations

import anyio
import pytest

import livemap as coco
from livemap import KeyedTarget, TargetBatch
from livemap._runtime._targets import SinkGate

pytestmark = pytest.mark.anyio


async def test_waiters_go_in_order_one_at_a_time() -> None:
    gate = SinkGate()
    inside: list[int] = []
    order: list[int] = []

    async def holder(i: int) -> None:
        async with gate:
            inside.append(i)
            assert len(inside) == 1
            order.append(i)
            await anyio.sleep(0.001)
            inside.remove(i)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(holder, i)
                await anyio.sleep(0)  # each asks in turn
    assert order == [0, 1, 2, 3, 4]
    assert not gate.busy and not gate.waiters


async def test_cancelled_waiter_leaves_the_queue() -> None:
    gate = SinkGate()
    got: list[str] = []
    with anyio.fail_after(5):
        await gate.acquire()
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def cancelled() -> None:
                with scope:
                    async with gate:
                        got.append("cancelled")  # never: cancelled while waiting

            async def later() -> None:
                async with gate:
                    got.append("later")

            tg.start_soon(cancelled)
            await anyio.sleep(0.01)
            tg.start_soon(later)
            await anyio.sleep(0.01)
            scope.cancel()
            await anyio.sleep(0.01)
            assert len(gate.waiters) == 1
            gate.release()
    assert got == ["later"]
    assert not gate.busy and not gate.waiters


async def test_waiter_cancelled_as_the_gate_passes_to_it_passes_it_on() -> None:
    gate = SinkGate()
    got: list[str] = []
    with anyio.fail_after(5):
        await gate.acquire()
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def first() -> None:
                with scope:
                    async with gate:
                        got.append("first")

            async def second() -> None:
                async with gate:
                    got.append("second")

            tg.start_soon(first)
            await anyio.sleep(0.01)
            tg.start_soon(second)
            await anyio.sleep(0.01)
            gate.release()  # passes to first ...
            scope.cancel()  # ... which is cancelled before it runs
    assert got in (["second"], ["first", "second"])
    assert not gate.busy and not gate.waiters


def test_a_loop_that_ends_holding_the_gate_leaves_the_next_loop_a_free_one() -> None:
    rows: dict[int, int] = {}

    def apply(batch: TargetBatch[int, int]) -> None:
        for key, value in batch.upserts:
            rows[key] = value

    target: KeyedTarget[int, int] = KeyedTarget("gate_rows", apply)

    async def hold_forever() -> None:
        await target._get_lock().acquire()  # never released on this loop

    anyio.run(hold_forever)

    @coco.fn
    def main(n: int) -> None:
        target.declare(n, n)

    async def update(n: int) -> None:
        with anyio.fail_after(5):  # a gate left held would block this commit
            await coco.App(f"gate_{n}", main, n).update()

    anyio.run(update, 1)
    anyio.run(update, 2, backend="trio")
    assert rows == {1: 1, 2: 2}
