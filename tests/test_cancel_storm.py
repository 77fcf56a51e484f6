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

import anyio
import anyio.lowlevel
import pytest

import livemap as coco
from livemap import KeyedTarget, LiveMap, TargetBatch

pytestmark = pytest.mark.anyio

_names = itertools.count()
KEYS = [f"k{i}" for i in range(15)]


class Interrupt(KeyboardInterrupt):
    """Raised from a per-entry run now and then."""


class Storm:
    def __init__(self, seed: int, kind: str) -> None:
        self.rng = random.Random(seed)
        self.hostile = True
        self.version = itertools.count(1)
        self.state = {key: next(self.version) for key in KEYS[:8]}
        self.rows: dict[str, int] = {}
        self.target: KeyedTarget[str, int] = KeyedTarget(f"storm-{seed}", self.apply)
        rng, target = self.rng, self.target

        async def jitter() -> None:
            for _ in range(rng.choice([0, 0, 1, 3])):
                await anyio.lowlevel.checkpoint()
            if rng.random() < 0.05:
                await anyio.sleep(rng.random() * 0.002)

        def maybe_interrupt() -> None:
            if self.hostile and rng.random() < 0.02:
                raise Interrupt

        @coco.fn
        def sync_proc(value: tuple[str, int]) -> None:
            maybe_interrupt()
            target.declare(value[0], value[1])

        @coco.fn
        async def async_proc(value: tuple[str, int]) -> None:
            await jitter()
            maybe_interrupt()
            target.declare(value[0], value[1])
            await jitter()

        proc = sync_proc if kind == "sync" else async_proc

        @coco.fn
        async def produce(lm: LiveMap[str, tuple[str, int]]) -> None:
            for key, value in list(self.state.items()):
                lm.declare_entry(key, (key, value))
                if rng.random() < 0.1:
                    await jitter()

        @coco.fn
        async def main() -> None:
            lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
            self.maps.append(lm)
            await coco.mount(produce, lm)
            await coco.mount_each(proc, lm)

        self.maps: list[LiveMap[str, tuple[str, int]]] = []
        self.app = coco.App(f"storm-{kind}-{seed}-{next(_names)}", main)

    async def apply(self, batch: TargetBatch[str, int]) -> None:
        if self.hostile and self.rng.random() < 0.05:
            await anyio.lowlevel.checkpoint()
        for key in batch.deletes:
            self.rows.pop(key, None)
        self.rows.update(batch.upserts)

    def change(self) -> None:
        for _ in range(self.rng.randint(0, 4)):
            key = self.rng.choice(KEYS)
            if key in self.state and self.rng.random() < 0.3:
                del self.state[key]
            else:
                self.state[key] = next(self.version)

    async def run(self) -> None:
        for _ in range(25):
            self.change()
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
