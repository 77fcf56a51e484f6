"""The commit path cut short: what a commit (or a release) had to apply at
once, because the update it belonged to had ended meanwhile, still reaches
the target and the sink when the task doing it is cancelled on the way."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import pytest
from helpers import wait_for

import livemap as coco
from livemap import KeyedTarget, TargetBatch
from livemap._runtime._component import Component, current_run

pytestmark = pytest.mark.anyio

_names = itertools.count()


@pytest.mark.parametrize("where", ["gate", "sink"])
async def test_drops_applied_at_once_reach_the_sink_when_cancelled(where: str) -> None:
    """``part`` stops declaring ``x`` (and changes ``y``) while ``main``'s run
    is in progress: ``x``'s delete is held for main's update.  Main returns
    while the sink takes part's batch, so once the sink is done nobody will
    apply the held delete: part applies it itself, after the gate.  The
    gate has passed to ``other``, whose sink is slow; the update is
    cancelled while part waits for it (``gate``), or while the sink takes
    part's delete (``sink``).  ``x`` is deleted all the same."""
    rows: dict[str, int] = {}
    state = {"second": False}
    mains: list[Component] = []
    part_in_sink, other_returns, cut_here = anyio.Event(), anyio.Event(), anyio.Event()
    batches: list[tuple[tuple[Any, ...], list[tuple[str, int]], list[str]]] = []
    armed = {"on": True}

    async def apply(batch: TargetBatch[str, int]) -> None:
        if state["second"] and batch.owner == ("part",) and batch.upserts:
            part_in_sink.set()
            await other_returns.wait()  # other's commit is queued at the gate
            await wait_for(lambda: not mains[-1].running)  # main's update ended
        if state["second"] and batch.owner == ("other",) and where == "gate":
            cut_here.set()
            await anyio.sleep_forever()  # holds the gate until cancelled
        if state["second"] and batch.deletes and where == "sink" and armed["on"]:
            armed["on"] = False
            cut_here.set()
            await anyio.sleep_forever()  # cancelled here, once
        batches.append((batch.owner, list(batch.upserts), list(batch.deletes)))
        for key in batch.deletes:
            del rows[key]
        rows.update(batch.upserts)

    target: KeyedTarget[str, int] = KeyedTarget("cut-rows", apply)

    @coco.fn
    async def part() -> None:
        if not state["second"]:
            target.declare("x", 1)
        target.declare("y", 2 if state["second"] else 1)

    @coco.fn
    async def other() -> None:
        if state["second"]:
            await part_in_sink.wait()  # (commits after part, on every backend)
            target.declare("z", 1)
            other_returns.set()

    @coco.fn
    async def main() -> None:
        mains.append(current_run("main").component)
        await coco.mount(coco.component_subpath("part"), part)
        await coco.mount(coco.component_subpath("other"), other)
        if state["second"]:
            await part_in_sink.wait()  # part's commit began within main's run
        # (no declarations: main's run ends without waiting for its children)

    app = coco.App(f"cut-gate-{next(_names)}", main)
    with anyio.fail_after(5):
        await app.update()
    assert rows == {"x": 1, "y": 1}
    state["second"] = True
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def update() -> None:
                await app.update()

            tg.start_soon(update)
            await cut_here.wait()
            tg.cancel_scope.cancel()
    assert "x" not in target, target.owner_path("x")
    assert batches[-1] == (("part",), [], ["x"])  # held, then applied on its own
    assert rows == ({"y": 2} if where == "gate" else {"y": 2, "z": 1})
    assert dict(target.items()) == rows
