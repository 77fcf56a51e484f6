"""Soak: a long stream of changes through a consumer 100x slower than the producer.

A live producer re-declares every key with a new value on each run; a
``mount_each`` consumer (a few keys at once, each taking a few milliseconds)
mirrors the map into a keyed target.  The producer is paced so that it makes
changes 100 times faster than the consumer can take them, so the consumer
falls far behind and has to coalesce.  Throughout, pending work (``pending +
in_flight``) never exceeds the number of distinct keys; the resident set
size stays flat after warm-up; at the end the downstream state is exact.

Sizes: 50,000 changes over 2,000 keys by default; 1,000,000 changes over
10,000 keys with ``LIVEMAP_SOAK=1`` (the ``slow`` test).
"""

from __future__ import annotations

import gc
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from helpers import TIMEOUT

import livemap as coco
import livemap_core
from livemap import LiveMap, TargetBatch

pytestmark = pytest.mark.anyio

SOAK = bool(os.environ.get("LIVEMAP_SOAK"))
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Size:
    changes: int
    keys: int
    concurrency: int = 8
    work: float = 0.005  # seconds each consumer call takes
    slowdown: int = 100  # how much slower the consumer is than the producer
    rss_tolerance: int = 6 << 20  # bytes the RSS may grow from warm-up to the end

    @property
    def runs(self) -> int:
        return self.changes // self.keys

    @property
    def consumer_rate(self) -> float:
        return self.concurrency / self.work

    @property
    def period(self) -> float:
        """Seconds per producer run, for a producer ``slowdown`` times faster."""
        return self.keys / (self.consumer_rate * self.slowdown)


DEFAULT = Size(changes=50_000, keys=2_000)
FULL = Size(changes=1_000_000, keys=10_000, rss_tolerance=32 << 20)


def rss() -> int:
    """The current resident set size, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_rss() -> int:
    """The process's peak resident set size so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Rows:
    """A minimal sink: the rows only (keeping every batch would itself grow)."""

    def __init__(self) -> None:
        self.rows: dict[Any, Any] = {}
        self.target: coco.KeyedTarget[Any, Any] = coco.KeyedTarget("soak-rows", self.apply)

    def apply(self, batch: TargetBatch[Any, Any]) -> None:
        for key in batch.deletes:
            del self.rows[key]
        self.rows.update(batch.upserts)


@dataclass
class Probe:
    size: Size
    done: anyio.Event = field(default_factory=anyio.Event)
    warm_rss: int = 0
    max_rss: int = 0
    peak_outstanding: int = 0
    peak_pending: int = 0
    samples: int = 0
    produce_seconds: float = 0.0
    runs: int = 0

    def sample(self, lm: LiveMap[Any, Any]) -> None:
        stats = lm.stats()
        self.samples += 1
        self.peak_pending = max(self.peak_pending, stats.pending)
        self.peak_outstanding = max(self.peak_outstanding, stats.pending + stats.in_flight)


class Producer:
    """Every run re-declares every key with the run's number: one change per key."""

    def __init__(self, lm: LiveMap[int, tuple[int, int]], probe: Probe) -> None:
        self.lm = lm
        self.probe = probe
        self.version = 0

    def process(self) -> None:
        declare = self.lm.declare_entry
        version = self.version
        for key in range(self.probe.size.keys):
            declare(key, (key, version))

    async def process_live(self, op: coco.LiveComponentOperator) -> None:
        probe, size = self.probe, self.probe.size
        start = time.perf_counter()
        for version in range(size.runs):
            began = time.perf_counter()
            self.version = version
            await op.update_full()
            probe.runs += 1
            probe.sample(self.lm)
            if version == size.runs // 4:
                gc.collect()
                probe.warm_rss = rss()
            await anyio.sleep(max(0.0, size.period - (time.perf_counter() - began)))
        probe.produce_seconds = time.perf_counter() - start
        await op.mark_ready()
        probe.done.set()


async def soak(size: Size) -> None:
    probe = Probe(size)
    sink = Rows()
    holder: dict[str, Any] = {}
    calls = [0]

    @coco.fn
    async def process(value: tuple[int, int]) -> None:
        calls[0] += 1
        await anyio.sleep(size.work)
        sink.target.declare(value[0], value)

    @coco.fn
    async def main() -> None:
        holder["lm"] = lm = await LiveMap.create()
        await coco.mount(Producer, lm, probe)
        holder["each"] = await coco.mount_each(process, lm.consumer(concurrency=size.concurrency))

    async def sampler(lm: LiveMap[Any, Any]) -> None:
        while True:
            probe.sample(lm)
            probe.max_rss = max(probe.max_rss, rss())
            await anyio.sleep(0.002)

    # time for production plus draining every key, with a wide margin
    budget = TIMEOUT + 4 * (size.runs * size.period + size.keys / size.consumer_rate)
    started = time.perf_counter()
    async with coco.App("soak", main).update(live=True):
        with anyio.fail_after(budget):
            while "each" not in holder:
                await anyio.sleep(0.001)
            lm: LiveMap[int, tuple[int, int]] = holder["lm"]
            async with anyio.create_task_group() as tg:
                tg.start_soon(sampler, lm)
                await probe.done.wait()
                await lm.settle()
                await holder["each"].ready()
                tg.cancel_scope.cancel()
        elapsed = time.perf_counter() - started
        gc.collect()
        end_rss = rss()
        stats = lm.stats()
        final = {key: (key, size.runs - 1) for key in range(size.keys)}
        # the downstream state is exact
        assert sink.rows == final
        assert dict(lm.items()) == final
        assert (stats.pending, stats.in_flight, stats.failing) == (0, 0, {})
        assert stats.changes == size.runs * size.keys
    producer_rate = stats.changes / probe.produce_seconds
    consumer_rate = calls[0] / elapsed
    print(
        f"\nsoak [{livemap_core.IMPLEMENTATION} core]: {stats.changes:,} changes over "
        f"{size.keys:,} keys in {size.runs} runs; {calls[0]:,} consumer calls "
        f"({stats.deliveries:,} deliveries); producer {producer_rate:,.0f} changes/s, "
        f"consumer {consumer_rate:,.0f} calls/s ({producer_rate / consumer_rate:,.0f}x slower); "
        f"peak pending+in_flight {probe.peak_outstanding:,} (pending {probe.peak_pending:,}) "
        f"over {probe.samples:,} samples; RSS warm {probe.warm_rss / 2**20:.1f} MiB, "
        f"end {end_rss / 2**20:.1f} MiB, max {probe.max_rss / 2**20:.1f} MiB, "
        f"process peak {peak_rss() / 2**20:.1f} MiB; {elapsed:.1f} s"
    )
    assert probe.runs == size.runs
    # the consumer fell far behind and coalesced: most changes were never delivered
    assert calls[0] < stats.changes / 5
    assert probe.peak_pending >= size.keys // 2
    # the resident set size is flat after warm-up
    assert probe.warm_rss > 0
    assert end_rss - probe.warm_rss <= size.rss_tolerance, (probe.warm_rss, end_rss)
    # pending work is bounded by the number of distinct keys, not of changes
    assert probe.peak_outstanding <= size.keys


# The full size (1M changes over 10k keys) is opt-in: LIVEMAP_SOAK=1 replaces
# the reduced size instead of adding a skipped test to every run.
SIZES = (
    [pytest.param(FULL, id="full", marks=pytest.mark.slow)]
    if SOAK
    else [pytest.param(DEFAULT, id="reduced")]
)


@pytest.mark.parametrize("size", SIZES)
async def test_soak(size: Size) -> None:
    await soak(size)
