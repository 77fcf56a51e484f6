"""A hand-written subscriber's deliveries: on at most ``concurrency`` worker
tasks, one key never twice at once, back to back in one task when they
never wait, and the latest state of a key that changed while in flight."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from helpers import LiveDriver, LiveProducer, wait_for

import livemap as coco
from livemap import LiveMap

pytestmark = pytest.mark.anyio

TIMEOUT = 10.0


class Producer(LiveProducer):
    """Each key's version is its value."""

    def value(self, key: str, version: int) -> Any:
        return version


class Subscriber:
    """Records each delivery: its key, value and task, and how many run at once."""

    def __init__(self, pause: float = 0.0) -> None:
        self.pause = pause
        self.view: dict[str, int] = {}
        self.tasks: list[int] = []
        self.active: set[str] = set()
        self.most = 0
        self.twice: list[str] = []
        self.lm: LiveMap[str, int] | None = None

    async def update_all(self) -> None:
        # the snapshot the watch continues from
        assert self.lm is not None
        async for key, value in self.lm:
            self.view[key] = value

    async def mark_ready(self) -> None:
        pass

    async def update(self, key: str, value: int) -> coco.ReadyHandle:
        if key in self.active:
            self.twice.append(key)
        self.active.add(key)
        self.most = max(self.most, len(self.active))
        self.tasks.append(anyio.get_current_task().id)
        try:
            if self.pause:
                await anyio.sleep(self.pause)
            self.view[key] = value
        finally:
            self.active.discard(key)
        return coco.ReadyHandle()

    async def delete(self, key: str) -> coco.ReadyHandle:
        self.view.pop(key, None)
        return coco.ReadyHandle()


class Watcher:
    def __init__(self, lm: LiveMap[str, int], sub: Subscriber, concurrency: int) -> None:
        self.lm = lm
        self.sub = sub
        self.concurrency = concurrency

    def process(self) -> None:
        pass

    async def process_live(self, op: coco.LiveComponentOperator) -> None:
        await op.mark_ready()
        self.sub.lm = self.lm
        await self.lm.consumer(concurrency=self.concurrency).watch(self.sub)


def app(driver: LiveDriver, sub: Subscriber, holder: dict[str, Any], concurrency: int) -> coco.App:
    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        holder["lm"] = lm
        await coco.mount(Watcher, lm, sub, concurrency)
        await coco.mount(Producer, lm, driver)

    return coco.App("workers", main)


async def test_deliveries_that_wait_spread_over_at_most_concurrency_workers() -> None:
    driver = LiveDriver({f"k{i}": 0 for i in range(12)})
    sub = Subscriber(pause=0.002)
    holder: dict[str, Any] = {}
    try:
        await spread(driver, sub, holder)
    finally:
        driver.close()
    assert sub.most == 3  # spread over the workers, never more
    assert sub.twice == []
    assert len(set(sub.tasks)) <= 3


async def spread(driver: LiveDriver, sub: Subscriber, holder: dict[str, Any]) -> None:
    async with app(driver, sub, holder, concurrency=3).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
        # (the watch starts once its component marked itself ready)
        await wait_for(lambda: sub.view == driver.state)
        # every key changes, then changes again while its delivery may be in flight
        driver.state = dict.fromkeys(driver.state, 1)
        await driver.refresh()
        driver.state = dict.fromkeys(driver.state, 2)
        await driver.refresh()
        with anyio.fail_after(TIMEOUT):
            await holder["lm"].settle()
        await wait_for(lambda: sub.view == driver.state)


async def test_deliveries_that_never_wait_run_back_to_back_in_one_task() -> None:
    driver = LiveDriver({f"k{i}": 0 for i in range(50)})
    sub = Subscriber()
    holder: dict[str, Any] = {}
    try:
        await back_to_back(driver, sub, holder)
    finally:
        driver.close()
    assert len(sub.tasks) == 50
    assert len(set(sub.tasks)) == 1


async def back_to_back(driver: LiveDriver, sub: Subscriber, holder: dict[str, Any]) -> None:
    async with app(driver, sub, holder, concurrency=8).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
        await wait_for(lambda: sub.view == driver.state)
        sub.tasks.clear()
        driver.state = dict.fromkeys(driver.state, 1)
        await driver.refresh()
        with anyio.fail_after(TIMEOUT):
            await holder["lm"].settle()
        assert sub.view == driver.state
