"""A key deleted from a map and added again, whose new run is under way as
the delete's held drop would be applied (the consumer's ``settle()``, which
the drop waits for, began before the key came back), is taken over by that
run: one upsert downstream, never a delete then an insert, and no conflict
reported (SPEC section 4, Ownership: a transfer within the ``mount_each``'s
update)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, wait_for

import livemap as coco
from livemap import KeyedTarget, LiveMap, RetryPolicy, TargetBatch

pytestmark = pytest.mark.anyio


class Scenario:
    """A live map with keys ``k``, ``slow`` and ``slow2``, consumed two at a
    time by per-entry components; ``k``'s declares the downstream row
    ``doc``.  A run of a key with a value above 0 waits for the key's gate."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.batches: list[tuple[list[Any], list[Any]]] = []
        self.errors: list[BaseException] = []
        self.target: KeyedTarget[str, Any] = KeyedTarget("out", self._apply)
        self.gates = {"slow": anyio.Event(), "slow2": anyio.Event(), "k": anyio.Event()}
        self.state: dict[str, int] = {"k": 0, "slow": 0, "slow2": 0}
        self.step = anyio.Event()
        self.maps: list[LiveMap[str, tuple[str, int]]] = []

    def _apply(self, batch: TargetBatch[str, Any]) -> None:
        self.batches.append((list(batch.upserts), list(batch.deletes)))

    async def handler(self, exc: BaseException, ctx: coco.ExceptionContext) -> None:
        self.errors.append(exc)

    def app(self, name: str) -> coco.App:
        scenario = self
        target = self.target

        @coco.fn
        async def proc(value: tuple[str, int]) -> None:
            key, n = value
            if n > 0:
                await scenario.gates[key].wait()
            if key == "k":
                target.declare("doc", n)

        class Entry:
            def __init__(self, value: tuple[str, int]) -> None:
                self.value = value

            def process(self) -> None:
                if self.value[0] == "k":
                    target.declare("doc", self.value[1])

            async def process_live(self, op: coco.LiveComponentOperator) -> None:
                if self.value[1] > 0:
                    await scenario.gates[self.value[0]].wait()
                await op.update_full()
                await op.mark_ready()
                await anyio.sleep_forever()

        class Producer:
            def __init__(self, lm: LiveMap[str, tuple[str, int]]) -> None:
                self.lm = lm

            def process(self) -> None:
                for key, n in scenario.state.items():
                    self.lm.declare_entry(key, (key, n))

            async def process_live(self, op: coco.LiveComponentOperator) -> None:
                await op.update_full()
                await op.mark_ready()
                while True:
                    await scenario.step.wait()
                    scenario.step = anyio.Event()
                    await op.update_full()

        @coco.fn
        async def main() -> None:
            async with coco.exception_handler(scenario.handler):
                lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
                scenario.maps.append(lm)
                await coco.mount(Producer, lm)
                retry = RetryPolicy() if scenario.mode == "retry" else None
                each: Any = Entry if scenario.mode == "live" else proc
                await coco.mount_each(each, lm.consumer(concurrency=2, retry=retry))

        return coco.App(name, main)

    async def commit(self, **changes: int | None) -> None:
        """One commit of the producer, then a moment for the consumer."""
        for key, n in changes.items():
            if n is None:
                del self.state[key]
            else:
                self.state[key] = n
        self.step.set()
        await wait_for(lambda: not self.step.is_set())
        await anyio.sleep(0.02)

    @property
    def deletes(self) -> list[Any]:
        return [d for _, ds in self.batches for d in ds]

    @property
    def upserts(self) -> list[Any]:
        return [u for us, _ in self.batches for u in us]


async def run(scenario: Scenario, name: str) -> Any:
    async with scenario.app(name).update(live=True) as h:
        with anyio.fail_after(TIMEOUT):
            await h.ready()
            await scenario.maps[0].settle()
            await wait_for(lambda: scenario.batches)
            assert scenario.batches == [([("doc", 0)], [])]
            scenario.batches.clear()
            await scenario.commit(slow=1)  # a worker waits on slow's gate
            await scenario.commit(k=None)  # the other unmounts k's child: its drop is held
            await scenario.commit(slow2=1)  # which now waits on slow2's gate
            await scenario.commit(k=1)  # k again: queued, both workers are busy
            # the consumer's settle() that the held drop waits for began
            # before k came back: it is over once slow is done, and a
            # worker takes k's new run, which waits on k's gate
            scenario.gates["slow"].set()
            await anyio.sleep(0.05)
            scenario.gates["k"].set()
            scenario.gates["slow2"].set()
            await scenario.maps[0].settle()
            await wait_for(lambda: scenario.batches)
            if scenario.mode == "live":  # (counts as processed once started)
                await wait_for(lambda: dict(scenario.target.items()) == {"doc": 1})
            owner = scenario.target.owner_path("doc")
            rows = dict(scenario.target.items())
    return owner, rows


@pytest.mark.parametrize("mode", ["keyed", "retry"])
async def test_a_key_deleted_and_added_again_is_one_upsert_downstream(mode: str) -> None:
    """``keyed``: the new run starts without a component (the common case);
    ``retry``: under a retry policy, as a run of the key's component."""
    scenario = Scenario(mode)
    owner, rows = await run(scenario, f"readd-{mode}")
    assert scenario.deletes == [], scenario.batches
    assert scenario.upserts == [("doc", 1)]
    assert rows == {"doc": 1}
    assert owner == (coco.Symbol("proc"), "k")
    assert scenario.errors == []


async def test_a_key_of_a_live_processor_deleted_and_added_again_settles() -> None:
    """A per-entry live component holds its key for its whole life: the held
    drop does not wait for it, and the row ends with the new value."""
    scenario = Scenario("live")
    _, rows = await run(scenario, "readd-live")
    assert rows == {"doc": 1}
    assert scenario.upserts[-1] == ("doc", 1)
    assert scenario.errors == []
