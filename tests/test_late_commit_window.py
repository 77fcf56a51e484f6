"""A declaration, map or child reaching a run from a context it left
behind while the run's commit is still under way (its function has
returned; a sink of the commit is slow) raises ``NotInComponentError`` or
lands in that commit: it is never silently dropped, nor breaks the commit."""

from __future__ import annotations

import contextvars
from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, run_app

import livemap as coco
from livemap import KeyedTarget, LiveMap, TargetBatch

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("into", ["committed", "new"])
async def test_a_declaration_while_the_run_commits_is_not_silently_dropped(into: str) -> None:
    held: dict[str, Any] = {}
    in_sink = anyio.Event()
    release = anyio.Event()
    sent: list[Any] = []

    async def slow(batch: TargetBatch[str, int]) -> None:
        sent.append(batch)
        in_sink.set()
        with anyio.fail_after(TIMEOUT):
            await release.wait()

    target: KeyedTarget[str, int] = KeyedTarget("slow-rows", slow)
    other: KeyedTarget[str, int] = KeyedTarget("other-rows", lambda batch: None)

    @coco.fn
    async def producer(lm: LiveMap[str, int]) -> None:
        lm.declare_entry("a", 1)  # the map's buffer commits first
        target.declare("a", 1)  # then this one, whose sink waits
        held["context"] = contextvars.copy_context()

    outcome: list[str] = []

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        held["lm"] = lm
        handle = await coco.mount(producer, lm)
        with anyio.fail_after(TIMEOUT):
            await in_sink.wait()  # the producer's function returned; its commit waits
        late = lm.declare_entry if into == "committed" else other.declare
        try:
            held["context"].run(late, "late", 2)
        except coco.NotInComponentError:
            outcome.append("raised")
        else:
            outcome.append("accepted")
        release.set()
        with anyio.fail_after(TIMEOUT):
            await handle.ready()

    await run_app(coco.App(f"late-commit-{into}", main))
    lm = held["lm"]
    assert lm.get("a") == 1 and "a" in target
    landed = "late" in (lm if into == "committed" else other)
    # raised at the call, or taken by the commit: never neither
    assert outcome == ["raised"] or landed, (outcome, landed)
