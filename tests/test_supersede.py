"""A run superseded before it began never calls the user's code.

``operator.update()`` twice in a row at one path (or a re-mount followed by
an unmount) must run the component once, with the newest arguments: a
function that does not await would otherwise run to its end under the
superseded generation, its side effects (and its duplicate-key errors)
doubled, before the cancellation could land."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from helpers import TIMEOUT

import livemap as coco
from livemap import LiveMap

pytestmark = pytest.mark.anyio


class Calls:
    def __init__(self) -> None:
        self.calls: list[Any] = []


async def run_live_app(process_live: Any, calls: Calls) -> LiveMap[str, int]:
    holder: dict[str, LiveMap[str, int]] = {}

    class Controller:
        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.mark_ready()
            await process_live(op, holder["lm"])

    @coco.fn
    async def main() -> None:
        holder["lm"] = await LiveMap.create()
        await coco.mount(Controller)

    with anyio.fail_after(TIMEOUT):
        await coco.App("supersede", main).update()
    return holder["lm"]


async def test_two_updates_in_a_row_run_the_newest_once() -> None:
    calls = Calls()

    @coco.fn
    async def produce(lm: LiveMap[str, int], tag: str) -> None:
        calls.calls.append(tag)  # no await: runs to its end once called
        lm.declare_entry("a", len(tag))

    async def drive(op: coco.LiveComponentOperator, lm: LiveMap[str, int]) -> None:
        await op.update("p", produce, lm, "first")
        h = await op.update("p", produce, lm, "second!")
        with anyio.fail_after(TIMEOUT):
            await h.ready()
        assert dict(lm.items()) == {"a": 7}

    await run_live_app(drive, calls)
    assert calls.calls == ["second!"]


async def test_an_update_then_a_delete_runs_nothing() -> None:
    calls = Calls()

    @coco.fn
    async def produce(lm: LiveMap[str, int]) -> None:
        calls.calls.append("run")
        lm.declare_entry("a", 1)

    async def drive(op: coco.LiveComponentOperator, lm: LiveMap[str, int]) -> None:
        await op.update("p", produce, lm)
        with anyio.fail_after(TIMEOUT):
            await (await op.delete("p")).ready()
        assert dict(lm.items()) == {}

    await run_live_app(drive, calls)
    assert calls.calls == []


async def test_duplicate_keys_are_raised_once_per_update() -> None:
    duplicates: list[coco.DuplicateDeclarationError] = []

    @coco.fn
    async def produce(lm: LiveMap[str, int]) -> None:
        for _ in range(2):
            try:
                lm.declare_entry("a", 1)
            except coco.DuplicateDeclarationError as exc:
                duplicates.append(exc)

    async def drive(op: coco.LiveComponentOperator, lm: LiveMap[str, int]) -> None:
        for _ in range(3):
            h = await op.update("p", produce, lm)
        with anyio.fail_after(TIMEOUT):
            await h.ready()

    await run_live_app(drive, Calls())
    assert len(duplicates) == 1


async def test_a_live_component_superseded_before_it_began_never_starts() -> None:
    calls = Calls()

    class Child:
        def __init__(self, tag: str) -> None:
            self.tag = tag

        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            calls.calls.append(self.tag)
            await op.mark_ready()

    async def drive(op: coco.LiveComponentOperator, lm: LiveMap[str, int]) -> None:
        await op.update("c", Child, "first")
        h = await op.update("c", Child, "second")
        with anyio.fail_after(TIMEOUT):
            await h.ready()

    await run_live_app(drive, calls)
    assert calls.calls == ["second"]
