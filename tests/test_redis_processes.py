"""livemap.redis with producers and consumers as separate processes
(tests/redis_support/worker.py), on the test's event loop backend, with
faults: a consumer killed with SIGKILL and started again, redis-server
restarted and stopped (SIGSTOP) under load, a consumer stopped past the
trim of the stream, two producers claiming one key.  After quiescence every
consumer's view is checked against the producers' declarations."""

from __future__ import annotations

import json
import random
import signal
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis_support import (
    RedisServer,
    Worker,
    own_redis_server,
    read_log,
    redis_server,
    start_consumer,
    start_producer,
)

from livemap.redis import encode_key, shard_of

__all__ = ["own_redis_server", "redis_server"]

pytestmark = pytest.mark.anyio


def unique() -> str:
    return f"p-{uuid.uuid4().hex[:8]}"


def entries(state: dict[str, int]) -> dict[str, dict[str, Any]]:
    return {k: {"k": k, "v": v} for k, v in state.items()}


def churn(rng: random.Random, state: dict[str, int], prefix: str, round_: int) -> None:
    for _ in range(8):
        key = f"{prefix}{rng.randrange(30)}"
        if rng.random() < 0.25:
            state.pop(key, None)
        else:
            state[key] = round_


def held(log: Path) -> dict[str, int]:
    rows, _, _ = read_log(log)
    return {k: v["v"] for k, v in rows.items()}


async def close_all(*workers: Worker) -> None:
    for worker in workers:
        await worker.close()


async def test_model_check_with_sharded_consumers_one_killed_and_restarted(
    redis_server: RedisServer, anyio_backend: str, tmp_path: Path
) -> None:
    name = unique()
    url = redis_server.url
    rng = random.Random(7)
    states: dict[str, dict[str, int]] = {"a": {}, "b": {}}
    producers = {
        app: await start_producer(url, name, app, anyio_backend, shards=2) for app in states
    }
    # the map exists once a producer has committed
    for app, producer in producers.items():
        churn(rng, states[app], app, 0)
        assert await producer.declare(entries(states[app])) == []
    logs = [tmp_path / "shard0.log", tmp_path / "shard1-first.log", tmp_path / "shard1.log"]
    low = await start_consumer(url, name, anyio_backend, logs[0], shards=[0])
    high = await start_consumer(url, name, anyio_backend, logs[1], shards=[1])
    workers = [*producers.values(), low, high]
    try:
        for round_ in range(1, 25):
            for app, producer in producers.items():
                churn(rng, states[app], app, round_)
                assert await producer.declare(entries(states[app])) == []
            if round_ == 8:
                high.kill()  # SIGKILL mid-stream
                await high.close()
            if round_ == 14:
                # started again: it waits for the dead one's lease to expire
                high = await start_consumer(url, name, anyio_backend, logs[2], shards=[1])
                workers.append(high)
        await low.settle()
        await high.settle()
        union = {**states["a"], **states["b"]}
        want = [{k: v for k, v in union.items() if shard_of(encode_key(k), 2) == s} for s in (0, 1)]
        assert held(logs[0]) == want[0]
        assert held(logs[2]) == want[1]
        for log in logs:
            _, calls, repeats = read_log(log)
            assert repeats == [], f"{log.name}: a value delivered twice in a row"
            assert calls
    finally:
        await close_all(*workers)


async def test_two_producer_processes_claim_one_key(
    redis_server: RedisServer, anyio_backend: str, tmp_path: Path
) -> None:
    name = unique()
    url = redis_server.url
    alpha = await start_producer(url, name, "alpha", anyio_backend)
    beta = await start_producer(url, name, "beta", anyio_backend)
    log = tmp_path / "consumer.log"
    workers = [alpha, beta]
    try:
        assert await alpha.declare(entries({"shared": 1, "a": 1})) == []
        errors = await beta.declare(entries({"shared": 2, "b": 2}))
        assert len(errors) == 1
        assert errors[0].startswith("KeyConflictError: key 'shared'")
        assert "of app 'alpha'" in errors[0] and "of app 'beta'" in errors[0]
        consumer = await start_consumer(url, name, anyio_backend, log)
        workers.append(consumer)
        assert held(log) == {"shared": 1, "a": 1, "b": 2}
        # the owner drops it: the claimant's value arrives, nothing is lost
        assert await alpha.declare(entries({"a": 1})) == []
        await consumer.settle()
        assert held(log) == {"shared": 2, "a": 1, "b": 2}
        _, _, repeats = read_log(log)
        assert repeats == []
    finally:
        await close_all(*workers)


async def test_a_consumer_stopped_past_the_trim_catches_up_exactly(
    redis_server: RedisServer, anyio_backend: str, tmp_path: Path
) -> None:
    name = unique()
    url = redis_server.url
    producer = await start_producer(url, name, "p", anyio_backend)
    state = {f"k{i}": 0 for i in range(20)}
    assert await producer.declare(entries(state)) == []
    log = tmp_path / "consumer.log"
    consumer = await start_consumer(url, name, anyio_backend, log)
    try:
        consumer.proc.send_signal(signal.SIGSTOP)  # a consumer that stalls
        for round_ in range(1, 121):  # the stream keeps about 50 entries
            state[f"k{round_ % 20}"] = round_
            if round_ % 9 == 0:
                state.pop(f"k{(round_ + 5) % 20}", None)
            assert await producer.declare(entries(state)) == []
        consumer.proc.send_signal(signal.SIGCONT)
        resyncs = await consumer.settle()
        assert resyncs >= 1
        assert held(log) == state
        _, _, repeats = read_log(log)
        assert repeats == []
    finally:
        consumer.proc.send_signal(signal.SIGCONT)
        await close_all(producer, consumer)


async def test_redis_restarted_and_paused_under_processes(
    own_redis_server: RedisServer, anyio_backend: str, tmp_path: Path
) -> None:
    server = own_redis_server
    name = unique()
    producer = await start_producer(server.url, name, "p", anyio_backend, shards=2)
    state = {f"k{i}": 0 for i in range(30)}
    assert await producer.declare(entries(state)) == []
    log = tmp_path / "consumer.log"
    consumer = await start_consumer(server.url, name, anyio_backend, log)
    try:
        # restarted: it comes back empty; the producer uploads what it holds
        server.restart()
        state["k1"] = 100
        del state["k2"]
        for _ in range(100):
            if await producer.declare(entries(state)) == []:
                break
        else:
            raise AssertionError("the producer's commits kept failing after the restart")
        await consumer.settle()
        assert held(log) == state
        # stopped (SIGSTOP) while the producer commits: nothing lost after SIGCONT
        for round_ in range(1, 6):
            state[f"k{round_}"] = 1000 + round_
            state.pop(f"k{20 + round_}")
            await producer.send(json.dumps(entries(state)))
            if round_ == 2:
                server.pause()
        await anyio.sleep(0.5)
        server.resume()
        for _ in range(5):
            assert json.loads(await producer.read_line())["errors"] == []
        assert await producer.declare(entries(state)) == []
        await consumer.settle()
        assert held(log) == state
        _, _, repeats = read_log(log)
        assert repeats == []
    finally:
        server.resume()
        await close_all(producer, consumer)
