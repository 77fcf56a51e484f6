"""livemap.redis on loopback: latency from a producer's commit to the remote
processor's call, and sustained changes per second through one shard and
through four, with an in-process LiveMap doing the same work as the
reference, in the same run.

Needs ``redis-server`` on PATH (skipped otherwise, failed when
``LIVEMAP_REQUIRE_REDIS=1``).  Each scenario runs once (``pedantic``, one
round) and records what it measured in ``extra_info`` (shown with
``--benchmark-json``) and on stdout (``-s``):

    pytest bench/test_bench_redis.py --benchmark-only -p no:cacheprovider -s

The producer and the consumer run in one process and one event loop, each
with its own connection: every change goes producer -> Redis (one Lua step
per commit) -> the consumer's stream read -> ``mount_each``'s processor.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import livemap as coco

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_support import RedisServer, Worker, start_worker

from livemap.redis import RedisLiveMap, RedisLiveMapView, connect

CHANGES = int(os.environ.get("LIVEMAP_BENCH_FILL", "100000")) * 2
BATCH = 2_000
KEYS = 20_000
LATENCY_ROUNDS = 300
TIMEOUT = 300.0


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory() as directory:
        # hashes of more than 128 fields as hash tables: a shard of a few
        # hundred keys is otherwise a listpack, where a bulk write is O(fields)
        # per field (see docs/redis.md, Performance)
        srv = RedisServer(Path(directory), "--hash-max-listpack-entries", "128")
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Source:
    """A live component that commits ``batches`` one by one, on demand."""

    def __init__(self) -> None:
        self.state: dict[str, int] = {}
        self.target: Any = None
        self.send: Any = None
        self.receive: Any = None


def _app(source: _Source, make_map: Any, name: str) -> coco.App:
    class Declare:
        def process(self) -> None:
            declare = source.target.declare_entry
            for key, value in source.state.items():
                declare(key, value)

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.update_full()
            await operator.mark_ready()
            async for done in source.receive:
                await operator.update_full()
                done.set()

    async def main() -> None:
        source.target = await make_map()
        await coco.mount(coco.component_subpath("declare"), Declare)

    return coco.App(name, main)


async def _commit(source: _Source, state: dict[str, int]) -> None:
    source.state = state
    done = anyio.Event()
    await source.send.send(done)
    await done.wait()


async def _run(make_map: Any, views: Any, measure: Any) -> dict[str, Any]:
    """Start a producer app (its map from ``make_map``) and a consumer app
    (``mount_each`` over each of ``views(map)``), then ``measure``."""
    source = _Source()
    source.send, source.receive = anyio.create_memory_object_stream[anyio.Event](1)
    calls: list[float] = []
    seen: dict[str, int] = {}

    def process(value: int, key: str) -> None:
        calls.append(time.perf_counter())
        seen[key] = value

    with anyio.fail_after(TIMEOUT):
        async with _app(source, make_map, f"bench-producer-{time.monotonic_ns()}").update(
            live=True
        ) as producer:
            await producer.ready()
            consumed = views(source.target)

            async def consumer_main() -> None:
                for i, view in enumerate(consumed):
                    await coco.mount_each(coco.component_subpath(i), _Keyed(process), view)

            async with coco.App(f"bench-consumer-{time.monotonic_ns()}", consumer_main).update(
                live=True
            ) as consumer:
                await consumer.ready()
                result = await measure(source, consumed, calls, seen)
                await consumer.stop()
            source.send.close()
            await producer.stop()
            source.receive.close()
    return result


class _Keyed:
    """The processor: values carry their key (``mount_each`` passes values only)."""

    def __init__(self, process: Any) -> None:
        self.process = process
        self.__name__ = "process"

    def __call__(self, value: list[Any]) -> None:
        self.process(value[1], value[0])


async def _latency(source: _Source, views: Any, calls: list[float], seen: Any) -> dict[str, Any]:
    samples = []
    for i in range(LATENCY_ROUNDS):
        before = len(calls)
        start = time.perf_counter()
        await _commit(source, {"k": ["k", i]})
        while len(calls) == before:
            await anyio.sleep(0)
        samples.append(calls[before] - start)
    return {
        "p50_ms": round(_percentile(samples, 0.5) * 1000, 3),
        "p99_ms": round(_percentile(samples, 0.99) * 1000, 3),
        "rounds": LATENCY_ROUNDS,
    }


def _states(keys: int) -> Iterator[dict[str, Any]]:
    """What the producer declares, commit after commit: ``keys`` keys, of
    which ``BATCH`` change each time (all of them when ``keys == BATCH``)."""
    state: dict[str, Any] = {}
    for r in range(CHANGES // BATCH):
        base = (r * BATCH) % keys
        state = dict(state)
        for i in range(base, base + BATCH):
            state[f"k{i}"] = [f"k{i}", r]
        yield state


def _cpu_us(seconds: float, changes: int) -> float:
    return round(seconds / changes * 1e6, 2)


def _throughput(keys: int, server: RedisServer | None = None) -> Any:
    """The throughput measure over ``keys`` declared keys (see _states).
    Besides the rates, the CPU time per change of this process (producer
    and consumers) and of the server: a shared machine's load changes the
    rates much more than these."""

    async def measure(
        source: _Source, views: Any, calls: list[float], seen: dict[str, int]
    ) -> dict[str, Any]:
        rounds = CHANGES // BATCH
        cpu = time.process_time()
        server_cpu = server.cpu_seconds() if server is not None else 0.0
        start = time.perf_counter()
        state: dict[str, Any] = {}
        for state in _states(keys):
            await _commit(source, state)
        committed = time.perf_counter()
        for view in views:
            await view.settle()
        end = time.perf_counter()
        cpu = time.process_time() - cpu
        final = {k: v[1] for k, v in state.items()}
        assert seen == final, "the consumer did not end with the producer's state"
        result = {
            "changes": rounds * BATCH,
            "declared_per_commit": keys,
            "changes_per_s": round(rounds * BATCH / (end - start)),
            "commit_only_per_s": round(rounds * BATCH / (committed - start)),
            "processor_calls": len(calls),
            "seconds": round(end - start, 3),
            "cpu_us_per_change_process": _cpu_us(cpu, rounds * BATCH),
        }
        if server is not None:
            result["cpu_us_per_change_redis"] = _cpu_us(
                server.cpu_seconds() - server_cpu, rounds * BATCH
            )
        return result

    return measure


def _redis_map(client: Any, name: str, shards: int) -> Any:
    async def make() -> Any:
        return await RedisLiveMap.create(client, name, shards=shards, maxlen=100_000)

    return make


async def _local_map() -> coco.LiveMap[str, Any]:
    return await coco.LiveMap.create()


def _scenario(benchmark: Any, backend: str, fn: Any) -> None:
    result: dict[str, Any] = {}

    def once() -> None:
        result.update(anyio.run(fn, backend=backend))

    benchmark.pedantic(once, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(f"\n{benchmark.name}: {result}")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_latency_commit_to_remote_call(benchmark: Any, server: RedisServer, backend: str) -> None:
    async def fn() -> dict[str, Any]:
        async with connect(server.url) as producer_client, connect(server.url) as consumer_client:
            name = f"lat-{backend}-{time.monotonic_ns()}"
            return await _run(
                _redis_map(producer_client, name, 1),
                lambda _: [RedisLiveMapView(consumer_client, name, block=0.5)],
                _latency,
            )

    _scenario(benchmark, backend, fn)


def test_latency_in_process_reference(benchmark: Any) -> None:
    async def fn() -> dict[str, Any]:
        return await _run(_local_map, lambda lm: [lm], _latency)

    _scenario(benchmark, "asyncio", fn)


@pytest.mark.parametrize("keys", [KEYS, BATCH], ids=["declare-20000", "declare-2000"])
@pytest.mark.parametrize("shards", [1, 4])
def test_throughput_redis(benchmark: Any, server: RedisServer, shards: int, keys: int) -> None:
    async def fn() -> dict[str, Any]:
        name = f"tp-{shards}-{time.monotonic_ns()}"
        async with connect(server.url) as producer_client, connect(server.url) as consumer_client:

            def views(_: Any) -> list[RedisLiveMapView[str, Any]]:
                # one view (one consumer) per shard
                return [
                    RedisLiveMapView(consumer_client, name, shards=[s], batch=10_000)
                    for s in range(shards)
                ]

            return await _run(
                _redis_map(producer_client, name, shards), views, _throughput(keys, server)
            )

    _scenario(benchmark, "asyncio", fn)


@pytest.mark.parametrize("keys", [KEYS, BATCH], ids=["declare-20000", "declare-2000"])
@pytest.mark.parametrize("shards", [1, 4])
def test_throughput_redis_consumer_processes(
    benchmark: Any, server: RedisServer, shards: int, keys: int
) -> None:
    """The same, with the consumers in processes of their own (one per
    shard): the producer and each consumer get a core when there is one."""

    async def fn() -> dict[str, Any]:
        name = f"tpp-{shards}-{time.monotonic_ns()}"
        workers: list[Worker] = []

        async def measure(source: _Source, views: Any, calls: Any, seen: Any) -> dict[str, Any]:
            for s in range(shards):
                worker = await start_worker("count", server.url, name, "asyncio", str(s))
                workers.append(worker)
                assert await worker.read_line(60) == "ready"
            rounds = CHANGES // BATCH
            cpu = time.process_time()
            server_cpu = server.cpu_seconds()
            start = time.perf_counter()
            state: dict[str, Any] = {}
            for state in _states(keys):
                await _commit(source, state)
            committed = time.perf_counter()
            for worker in workers:
                await worker.send("settle")
            replies = [json.loads(await worker.read_line(TIMEOUT)) for worker in workers]
            end = time.perf_counter()
            cpu = time.process_time() - cpu
            assert sum(reply["keys"] for reply in replies) == len(state)
            assert sum(reply["sum"] for reply in replies) == sum(v[1] for v in state.values())
            changes = rounds * BATCH
            calls = sum(reply["calls"] for reply in replies)
            consumers_cpu = sum(reply["cpu"] for reply in replies)
            total_cpu = cpu + (server.cpu_seconds() - server_cpu) + consumers_cpu
            return {
                "changes": changes,
                "declared_per_commit": keys,
                "changes_per_s": round(changes / (end - start)),
                "commit_only_per_s": round(changes / (committed - start)),
                "processor_calls": calls,
                "seconds": round(end - start, 3),
                "cpu_us_per_change_producer": _cpu_us(cpu, changes),
                "cpu_us_per_change_redis": _cpu_us(server.cpu_seconds() - server_cpu, changes),
                "cpu_us_per_change_consumers": _cpu_us(consumers_cpu, changes),
                # the consumers' CPU per processor call (coalescing makes
                # fewer calls than changes when they fall behind)
                "cpu_us_per_call_consumers": _cpu_us(consumers_cpu, max(1, calls)),
                "cpu_us_per_change_total": _cpu_us(total_cpu, changes),
                # the rate all three parts' CPU time allows on two whole cores
                "cpu_bound_per_s_2_cores": round(2 * changes / total_cpu),
            }

        try:
            async with connect(server.url) as producer_client:
                return await _run(_redis_map(producer_client, name, shards), lambda _: [], measure)
        finally:
            for worker in workers:
                await worker.close()

    _scenario(benchmark, "asyncio", fn)


@pytest.mark.parametrize("keys", [KEYS, BATCH], ids=["declare-20000", "declare-2000"])
def test_throughput_in_process_reference(benchmark: Any, keys: int) -> None:
    async def fn() -> dict[str, Any]:
        return await _run(_local_map, lambda lm: [lm], _throughput(keys))

    _scenario(benchmark, "asyncio", fn)
