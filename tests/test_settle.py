"""``settle()`` waits for the changes committed before the call and nothing
else: it returns however fast producers go on."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from helpers import TIMEOUT

import livemap as coco
from livemap import LiveMap

pytestmark = pytest.mark.anyio


class Churn:
    """A live producer: ``static`` keys once, and ``hot`` keys re-declared with
    a new value every ``period`` seconds, forever."""

    def __init__(
        self,
        lm: LiveMap[str, int],
        static: int,
        hot: list[str],
        period: float,
        state: dict[str, Any],
    ) -> None:
        self.lm = lm
        self.static = static
        self.hot = hot
        self.period = period
        self.state = state

    def process(self) -> None:
        n = self.state["n"]
        for i in range(self.static):
            self.lm.declare_entry(f"s{i}", 0)
        for key in self.hot:
            self.lm.declare_entry(key, n)

    async def process_live(self, op: coco.LiveComponentOperator) -> None:
        await op.update_full()
        await op.mark_ready()
        go = self.state.get("go")
        if go is not None:
            await go.wait()
        while True:
            await anyio.sleep(self.period)
            self.state["n"] += 1
            await op.update_full()


def churn_app(
    static: int, hot: list[str], period: float, work: float, state: dict[str, Any]
) -> coco.App:
    state.setdefault("n", 0)
    state.setdefault("processed", {})

    @coco.fn
    async def process(value: int) -> None:
        await anyio.sleep(work)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        state["lm"] = lm
        await coco.mount(Churn, lm, static, hot, period, state)
        await coco.mount_each(process, lm)

    return coco.App("churn", main)


async def test_settle_returns_while_a_key_changes_faster_than_it_is_processed() -> None:
    """A key re-declared every 5 ms whose processor takes 20 ms: settle()
    returns once the change it saw has been processed."""
    state: dict[str, Any] = {"go": anyio.Event()}
    async with churn_app(3, ["hot"], 0.005, 0.02, state).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
        state["go"].set()
        await anyio.sleep(0.05)  # the churn is on
        with anyio.fail_after(1.0):
            for _ in range(3):
                await state["lm"].settle()


async def test_settle_during_the_initial_scan_returns_under_churn_on_other_keys() -> None:
    """settle() called during the initial scan waits for the scan's entries,
    not for a moment when the whole subtree happens to be ready."""
    state: dict[str, Any] = {}
    app = churn_app(300, ["h0", "h1", "h2"], 0.001, 0.02, state)
    async with app.update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            while "lm" not in state or not state["lm"].stats().consumer:
                await anyio.sleep(0.001)
        with anyio.fail_after(2.0):
            await state["lm"].settle()
        del handle
