"""Catch-up updates cut short at random moments while the entries change
between them: once one update runs to its end, the sink, the target's record
and the map agree with what the producer declares.  Nothing a cancelled or
interrupted update let go is left owned by a component that is gone.

Each case is a seeded storm: 25 updates, each cancelled after a random
delay (most before they end), some interrupted by a ``KeyboardInterrupt``
from a per-entry run, with checkpoints at random places in the producer,
the per-entry runs and the sink."""

from __future__ import annotations

import itertools
import random
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import wait_for

import livemap as coco
from livemap import KeyedTarget, LiveMap, TargetBatch

pytestmark = pytest.mark.anyio

_names = itertools.count()
KEYS = [f"k{i}" for i in range(15)]


class Interrupt(KeyboardInterrupt):
    """Raised from a per-entry run now and then."""


async def jitter(rng: random.Random) -> None:
    """A few checkpoints, now and then a short sleep."""
    for _ in range(rng.choice([0, 0, 1, 3])):
        await anyio.lowlevel.checkpoint()
    if rng.random() < 0.05:
        await anyio.sleep(rng.random() * 0.002)


class _Churn:
    """The producer's state (key -> version), the sink's rows, and the
    random source both storms draw from."""

    sink_checkpoints = 0.05  # how often the sink checkpoints

    def __init__(self, seed: int, first: int) -> None:
        self.rng = random.Random(seed)
        self.hostile = True
        self.version = itertools.count(1)
        self.state = {key: next(self.version) for key in KEYS[:first]}
        self.rows: dict[str, int] = {}

    async def apply(self, batch: TargetBatch[str, int]) -> None:
        if self.hostile and self.rng.random() < self.sink_checkpoints:
            await anyio.lowlevel.checkpoint()
        for key in batch.deletes:
            self.rows.pop(key, None)
        self.rows.update(batch.upserts)

    def change(self, least: int, most: int, keys: list[str]) -> None:
        for _ in range(self.rng.randint(least, most)):
            key = self.rng.choice(keys)
            if key in self.state and self.rng.random() < 0.3:
                del self.state[key]
            else:
                self.state[key] = next(self.version)


class Storm(_Churn):
    def __init__(self, seed: int, kind: str) -> None:
        super().__init__(seed, 8)
        self.target: KeyedTarget[str, int] = KeyedTarget(f"storm-{seed}", self.apply)
        rng, target = self.rng, self.target

        def maybe_interrupt() -> None:
            if self.hostile and rng.random() < 0.02:
                raise Interrupt

        @coco.fn
        def sync_proc(value: tuple[str, int]) -> None:
            maybe_interrupt()
            target.declare(value[0], value[1])

        @coco.fn
        async def async_proc(value: tuple[str, int]) -> None:
            await jitter(rng)
            maybe_interrupt()
            target.declare(value[0], value[1])
            await jitter(rng)

        proc = sync_proc if kind == "sync" else async_proc

        @coco.fn
        async def produce(lm: LiveMap[str, tuple[str, int]]) -> None:
            for key, value in list(self.state.items()):
                lm.declare_entry(key, (key, value))
                if rng.random() < 0.1:
                    await jitter(rng)

        @coco.fn
        async def main() -> None:
            lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
            self.maps.append(lm)
            await coco.mount(produce, lm)
            await coco.mount_each(proc, lm)

        self.maps: list[LiveMap[str, tuple[str, int]]] = []
        self.app = coco.App(f"storm-{kind}-{seed}-{next(_names)}", main)

    async def run(self) -> None:
        for _ in range(25):
            self.change(0, 4, KEYS)
            try:
                with anyio.fail_after(10):
                    with anyio.move_on_after(self.rng.random() * 0.01):
                        await self.app.update()
            except Interrupt:
                pass
        self.hostile = False
        with anyio.fail_after(10):
            await self.app.update()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_cut_short_updates_converge_once_one_runs_to_its_end(kind: str, seed: int) -> None:
    storm = Storm(seed, kind)
    await storm.run()
    assert storm.rows == storm.state
    assert dict(storm.target.items()) == storm.rows
    assert {key: value for key, (_, value) in storm.maps[-1].items()} == storm.state


class LiveStorm(_Churn):
    """Live runs, each stopped or cancelled after a random delay (or once
    ready), while a live producer changes entries every millisecond or so;
    then one live run that is left to catch up."""

    sink_checkpoints = 0.1

    def __init__(self, seed: int, kind: str) -> None:
        super().__init__(seed, 6)
        self.target: KeyedTarget[str, int] = KeyedTarget(f"live-storm-{seed}", self.apply)
        rng, target, storm = self.rng, self.target, self

        @coco.fn
        def sync_proc(value: tuple[str, int]) -> None:
            target.declare(value[0], value[1])

        @coco.fn
        async def async_proc(value: tuple[str, int]) -> None:
            await jitter(rng)
            target.declare(value[0], value[1])
            await jitter(rng)

        class LiveProc:
            def __init__(self, value: tuple[str, int]) -> None:
                self.value = value

            def process(self) -> None:
                target.declare(self.value[0], self.value[1])

            async def process_live(self, op: coco.LiveComponentOperator) -> None:
                await jitter(rng)
                await op.update_full()
                await op.mark_ready()
                await anyio.sleep_forever()

        proc: Any = {"sync": sync_proc, "async": async_proc, "live": LiveProc}[kind]

        class Producer:
            def __init__(self, lm: LiveMap[str, tuple[str, int]]) -> None:
                self.lm = lm

            def process(self) -> None:
                for key, value in storm.state.items():
                    self.lm.declare_entry(key, (key, value))

            async def process_live(self, op: coco.LiveComponentOperator) -> None:
                await op.update_full()
                await op.mark_ready()
                while True:
                    await anyio.sleep(rng.random() * 0.002)
                    if storm.hostile:
                        storm.change(1, 3, KEYS[:12])
                    await op.update_full()

        @coco.fn
        async def main() -> None:
            lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
            self.maps.append(lm)
            await coco.mount(Producer, lm)
            await coco.mount_each(proc, lm.consumer(concurrency=rng.choice([1, 4])))

        self.maps: list[LiveMap[str, tuple[str, int]]] = []
        self.app = coco.App(f"live-storm-{kind}-{seed}-{next(_names)}", main)

    async def run(self) -> None:
        rng = self.rng
        for _ in range(12):
            how = rng.choice(["stop", "cancel", "stop-once-ready"])
            with anyio.fail_after(10):
                if how == "cancel":
                    with anyio.move_on_after(rng.random() * 0.02):
                        await self.app.update(live=True)
                    continue
                handle = self.app.update(live=True)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(handle.result)
                    if how == "stop-once-ready":
                        await handle.ready()
                    await anyio.sleep(rng.random() * 0.01)
                    await handle.stop()
        self.hostile = False
        with anyio.fail_after(10):
            handle = self.app.update(live=True)
            async with anyio.create_task_group() as tg:
                tg.start_soon(handle.result)
                await handle.ready()
                await self.maps[-1].settle()
                # a live per-entry component counts as processed once started
                await wait_for(lambda: self.rows == self.state)
                await handle.stop()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["sync", "async", "live"])
async def test_stopped_and_cancelled_live_runs_converge_in_the_next_one(
    kind: str, seed: int
) -> None:
    storm = LiveStorm(seed, kind)
    await storm.run()
    assert storm.rows == storm.state
    assert dict(storm.target.items()) == storm.rows
