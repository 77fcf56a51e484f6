"""A restarted producer process and the keys its predecessor left behind:
each app name has one producing process per map at a time (its lease), and
once a process that took the app over has caught up, the keys the earlier
process's components held and no component of the new one declares are
deleted.  Producers and consumers are separate processes
(tests/redis_support/worker.py), killed, interrupted and doubled."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis_support import (
    Producer,
    RedisServer,
    Worker,
    read_log,
    redis_server,
    start_consumer,
    start_parts,
)

import livemap as coco
from livemap.redis import ProducerBusyError, RedisLiveMap, connect, decode_key, encode_key

__all__ = ["redis_server"]

pytestmark = pytest.mark.anyio
TIMEOUT = 30.0


def unique() -> str:
    return f"l-{uuid.uuid4().hex[:8]}"


def part(**state: int) -> dict[str, Any]:
    return {k: {"k": k, "v": v} for k, v in state.items()}


def held(log: Path) -> dict[str, int]:
    rows, _, _ = read_log(log)
    return {k: v["v"] for k, v in rows.items()}


def entries_of(log: Path) -> list[list[Any]]:
    """The log's lines: ["call", key, value], ["u", key, value], ["d", key]."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


async def stop(worker: Worker) -> None:
    """A clean stop: end of input, the app stops and gives its lease up."""
    await worker.close()
    assert worker.proc.returncode == 0


async def kill(worker: Worker) -> None:
    worker.kill()
    await worker.close()


async def snapshot(client: Any, name: str) -> dict[bytes, bytes]:
    return {
        bytes(k): bytes(v) for k, v in (await client.hgetall(f"livemap:{{{name}}}:d:0")).items()
    }


@pytest.mark.parametrize("mode", ["live", "catchup"])
@pytest.mark.parametrize("end", ["stopped", "killed"])
async def test_a_restart_without_a_component_deletes_its_keys_once(
    redis_server: RedisServer, anyio_backend: str, tmp_path: Path, mode: str, end: str
) -> None:
    name = unique()
    url = redis_server.url
    log = tmp_path / "consumer.log"
    first = await start_parts(url, name, "p", anyio_backend, mode)
    workers = [first]
    try:
        reply = await first.update({"a": part(a1=1, a2=2), "b": part(b1=1, b2=2), "c": part(c1=1)})
        assert reply["ok"] and reply["errors"] == [] and reply["swept"] == 0
        # another app: keys of its own, and a claim of one of p's keys
        other = await start_parts(url, name, "q", anyio_backend, mode)
        workers.append(other)
        # (at p's paths: owners are told apart by app name and path)
        reply = await other.update({"b": {**part(q1=1), **part(b1=99)}})
        assert [e.split(":")[0] for e in reply["errors"]] == ["KeyConflictError"]
        consumer = await start_consumer(url, name, anyio_backend, log)
        workers.append(consumer)
        assert held(log) == {"a1": 1, "a2": 2, "b1": 1, "b2": 2, "c1": 1, "q1": 1}
        before = len(entries_of(log))

        await (stop(first) if end == "stopped" else kill(first))
        # nothing changes while no process of p runs
        await consumer.settle()
        assert len(entries_of(log)) == before

        # the restart: part b is no longer mounted, a2 changed
        second = await start_parts(url, name, "p", anyio_backend, mode)
        workers.append(second)
        reply = await second.update({"a": part(a1=1, a2=20), "c": part(c1=1)})
        assert reply["ok"] and reply["errors"] == []
        assert (reply["sweeps"], reply["swept"]) == (1, 2)
        await consumer.settle()
        assert held(log) == {"a1": 1, "a2": 20, "b1": 99, "c1": 1, "q1": 1}
        after = entries_of(log)[before:]
        # b2 deleted once, b1 handed to q's pending claim as one update (no
        # delete in between), a2 updated; a1 and c1 not sent again
        assert sorted(e for e in after if e[0] != "u") == [
            ["call", "a2", {"k": "a2", "v": 20}],
            ["call", "b1", {"k": "b1", "v": 99}],
            ["d", "b2"],
        ]
        # the next update of the same process sweeps nothing more
        reply = await second.update({"a": part(a1=1, a2=20), "c": part(c1=1)})
        assert reply["ok"] and reply["swept"] == 2
        await consumer.settle()
        assert len(entries_of(log)) == before + len(after)

        # restarted again with the same components: the keys are taken back,
        # nothing deleted, nothing sent again
        await (stop(second) if end == "stopped" else kill(second))
        third = await start_parts(url, name, "p", anyio_backend, mode)
        workers.append(third)
        reply = await third.update({"a": part(a1=1, a2=20), "c": part(c1=1)})
        assert reply["ok"] and reply["errors"] == [] and reply["swept"] == 0
        await consumer.settle()
        assert held(log) == {"a1": 1, "a2": 20, "b1": 99, "c1": 1, "q1": 1}
        assert len(entries_of(log)) == before + len(after)
        _, _, repeats = read_log(log)
        assert repeats == []
    finally:
        for worker in workers:
            await worker.close()


async def test_a_big_sweep(redis_server: RedisServer, anyio_backend: str, tmp_path: Path) -> None:
    """More keys than one Lua unpack() takes, and than one commit step."""
    name = unique()
    url = redis_server.url
    log = tmp_path / "consumer.log"
    big = {f"k{i}": {"k": f"k{i}", "v": i} for i in range(12_000)}
    first = await start_parts(url, name, "p", anyio_backend)
    workers = [first]
    try:
        assert (await first.update({"big": big, "small": part(s=1)}))["ok"]
        consumer = await start_consumer(url, name, anyio_backend, log)
        workers.append(consumer)
        await kill(first)
        second = await start_parts(url, name, "p", anyio_backend)
        workers.append(second)
        reply = await second.update({"small": part(s=1)})
        assert reply["ok"] and reply["swept"] == len(big)
        await consumer.settle()
        assert held(log) == {"s": 1}
        deletes = [e[1] for e in entries_of(log) if e[0] == "d"]
        assert sorted(deletes) == sorted(big)
        async with connect(url) as client:
            base = f"livemap:{{{name}}}"
            assert await client.hlen(f"{base}:o:0") == 1
            assert await client.smembers(f"{base}:ao:p") == {b"p\x1f/'parts'/'small'"}
            assert await client.exists([f"{base}:k:p\x1f/'parts'/'big'"]) == 0
    finally:
        for worker in workers:
            await worker.close()


@pytest.mark.parametrize("mode", ["live", "catchup"])
@pytest.mark.parametrize("fault", ["killed", "interrupted"])
async def test_a_restart_cut_before_its_first_commit_deletes_nothing(
    redis_server: RedisServer, anyio_backend: str, tmp_path: Path, fault: str, mode: str
) -> None:
    name = unique()
    url = redis_server.url
    log = tmp_path / "consumer.log"
    first = await start_parts(url, name, "p", anyio_backend, mode)
    workers = [first]
    try:
        assert (await first.update({"a": part(a1=1), "b": part(b1=1)}))["ok"]
        consumer = await start_consumer(url, name, anyio_backend, log)
        workers.append(consumer)
        await stop(first)
        async with connect(url) as client:
            before = await snapshot(client, name)
            assert len(before) == 2
            # restarted without b, but a's first run never ends: the catch-up
            # is cut before anything was committed
            second = await start_parts(url, name, "p", anyio_backend, mode)
            workers.append(second)
            await second.send(json.dumps({"a": "block"}))
            with anyio.fail_after(TIMEOUT):
                while await client.get(f"livemap:{{{name}}}:app:p") is None:
                    await anyio.sleep(0.01)  # it holds the app's lease
            await anyio.sleep(0.2)
            if fault == "killed":
                await kill(second)
            else:
                second.proc.send_signal(signal.SIGINT)
                await second.close()
                # an interrupted process gives its lease up
                assert await client.get(f"livemap:{{{name}}}:app:p") is None
            assert await snapshot(client, name) == before
            await consumer.settle()
            assert held(log) == {"a1": 1, "b1": 1}
            assert not [e for e in entries_of(log) if e[0] == "d"]
            # a restart that does catch up sweeps b, once
            third = await start_parts(url, name, "p", anyio_backend, mode)
            workers.append(third)
            reply = await third.update({"a": part(a1=1)})
            assert reply["ok"] and reply["swept"] == 1
            await consumer.settle()
            assert held(log) == {"a1": 1}
            assert [e for e in entries_of(log) if e[0] == "d"] == [["d", "b1"]]
    finally:
        for worker in workers:
            await worker.close()


async def test_a_component_that_fails_after_a_restart_keeps_its_keys(
    redis_server: RedisServer, anyio_backend: str, tmp_path: Path
) -> None:
    name = unique()
    url = redis_server.url
    log = tmp_path / "consumer.log"
    first = await start_parts(url, name, "p", anyio_backend)
    workers = [first]
    try:
        assert (await first.update({"a": part(a1=1), "b": part(b1=1, b2=2)}))["ok"]
        consumer = await start_consumer(url, name, anyio_backend, log)
        workers.append(consumer)
        await stop(first)
        # b is mounted again but its run fails: it keeps what it held (as in
        # one process); a part that declares nothing now loses its keys
        second = await start_parts(url, name, "p", anyio_backend)
        workers.append(second)
        reply = await second.update({"a": {}, "b": "fail"})
        assert reply["ok"] and [e.split(":")[0] for e in reply["errors"]] == ["RuntimeError"]
        assert reply["swept"] == 1
        await consumer.settle()
        assert held(log) == {"b1": 1, "b2": 2}
        # b runs again and declares less: its first commit drops the rest
        reply = await second.update({"a": {}, "b": part(b1=1)})
        assert reply["ok"] and reply["errors"] == []
        await consumer.settle()
        assert held(log) == {"b1": 1}
        deletes = [e for e in entries_of(log) if e[0] == "d"]
        assert deletes == [["d", "a1"], ["d", "b2"]]
        await stop(second)
        # a live component ready before it ever ran keeps its keys too
        third = await start_parts(url, name, "p", anyio_backend)
        workers.append(third)
        reply = await third.update({"b": "idle"})
        assert reply["ok"] and reply["errors"] == [] and reply["swept"] == 0
        await consumer.settle()
        assert held(log) == {"b1": 1}
        assert len([e for e in entries_of(log) if e[0] == "d"]) == 2
    finally:
        for worker in workers:
            await worker.close()


async def test_two_processes_of_one_app_the_second_is_refused(
    redis_server: RedisServer, anyio_backend: str, tmp_path: Path
) -> None:
    name = unique()
    url = redis_server.url
    log = tmp_path / "consumer.log"
    first = await start_parts(url, name, "p", anyio_backend)
    workers = [first]
    try:
        assert (await first.update({"a": part(a1=1), "b": part(b1=1)}))["ok"]
        consumer = await start_consumer(url, name, anyio_backend, log)
        workers.append(consumer)
        # a second process of p, declaring less: refused after lease_wait
        for mode in ("live", "catchup"):
            second = await start_parts(url, name, "p", anyio_backend, mode)
            workers.append(second)
            reply = await second.update({"a": part(a1=2)})
            assert not reply["ok"]
            assert reply["error"].startswith("ProducerBusyError: app 'p' already produces")
            await second.close()
        # the first goes on, nothing of it was deleted or changed
        reply = await first.update({"a": part(a1=1, a2=2), "b": part(b1=1)})
        assert reply["ok"] and reply["errors"] == []
        await consumer.settle()
        assert held(log) == {"a1": 1, "a2": 2, "b1": 1}
        assert not [e for e in entries_of(log) if e[0] == "d"]
        # once it stopped, the next process of p starts at once
        await stop(first)
        with anyio.fail_after(15):  # less than the lease_wait a live lease would need
            third = await start_parts(url, name, "p", anyio_backend, lease_ttl=30.0)
            workers.append(third)
            reply = await third.update({"a": part(a1=1, a2=2)})
        assert reply["ok"] and reply["swept"] == 1
        await consumer.settle()
        assert held(log) == {"a1": 1, "a2": 2}
    finally:
        for worker in workers:
            await worker.close()


async def test_a_process_stopped_past_its_lease_is_taken_over_and_refused(
    redis_server: RedisServer, anyio_backend: str, tmp_path: Path
) -> None:
    """SIGSTOP longer than the lease: another process of the app takes over
    and sweeps; the first one, resumed, changes nothing any more."""
    name = unique()
    url = redis_server.url
    log = tmp_path / "consumer.log"
    first = await start_parts(url, name, "p", anyio_backend, lease_ttl=0.5)
    workers = [first]
    try:
        assert (await first.update({"a": part(a1=1), "b": part(b1=1)}))["ok"]
        consumer = await start_consumer(url, name, anyio_backend, log)
        workers.append(consumer)
        first.proc.send_signal(signal.SIGSTOP)
        await anyio.sleep(0.6)
        second = await start_parts(url, name, "p", anyio_backend, lease_ttl=0.5)
        workers.append(second)
        reply = await second.update({"a": part(a1=2)})
        assert reply["ok"] and reply["swept"] == 1
        await consumer.settle()
        assert held(log) == {"a1": 2}
        first.proc.send_signal(signal.SIGCONT)
        reply = await first.update({"a": part(a1=3), "b": part(b1=3), "c": part(c1=3)})
        assert reply["ok"]
        assert reply["errors"] and all(
            e.startswith("ProducerBusyError: app 'p' already produces") for e in reply["errors"]
        )
        await consumer.settle()
        assert held(log) == {"a1": 2}
        assert (await second.update({"a": part(a1=4)}))["errors"] == []
        await consumer.settle()
        assert held(log) == {"a1": 4}
    finally:
        first.proc.send_signal(signal.SIGCONT)
        for worker in workers:
            await worker.close()


# -- in one process ---------------------------------------------------------------


async def test_a_commit_after_the_lease_was_taken_over_is_refused(
    redis_server: RedisServer,
) -> None:
    """A process whose lease another process took (it was stopped longer
    than the TTL) changes nothing: its commit reports ProducerBusyError."""
    name = unique()
    errors: list[BaseException] = []
    state: dict[str, Any] = {"k": 1}
    step = anyio.Event()

    class Declare:
        def __init__(self, lm: RedisLiveMap[str, Any]) -> None:
            self.lm = lm

        def process(self) -> None:
            for key, value in state.items():
                self.lm.declare_entry(key, value)

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            nonlocal step
            await operator.update_full()
            await operator.mark_ready()
            while True:
                await step.wait()
                step = anyio.Event()
                await operator.update_full()
                done.set()

    async def main() -> None:
        lm: RedisLiveMap[str, Any] = await RedisLiveMap.create(client, name, lease_ttl=60.0)
        await coco.mount(coco.component_subpath("declare"), Declare, lm)

    async def commit(new: dict[str, Any]) -> None:
        nonlocal done
        state.clear()
        state.update(new)
        done = anyio.Event()
        step.set()
        with anyio.fail_after(TIMEOUT):
            await done.wait()

    done = anyio.Event()
    lease = f"livemap:{{{name}}}:app:taken"
    async with connect(redis_server.url) as client:
        app = coco.App(
            coco.AppConfig("taken", exception_handler=lambda e, c: errors.append(e)), main
        )
        async with app.update(live=True) as handle:
            with anyio.fail_after(TIMEOUT):
                await handle.ready()
            await client.set(lease, "elsewhere:1:abc:taken")
            await commit({"k": 2, "j": 1})
            (error,) = errors
            assert isinstance(error, ProducerBusyError)
            assert (error.app, error.map_name, error.holder) == ("taken", name, "elsewhere:1:abc")
            assert "app 'taken'" in str(error) and "elsewhere:1:abc" in str(error)
            data = await client.hgetall(f"livemap:{{{name}}}:d:0")
            assert {bytes(k) for k in data} == {encode_key("k")}  # unchanged
            # the other process went away (its lease expired): the next commit
            # takes the lease and sends what the refused one did not
            await client.delete([lease])
            errors.clear()
            await commit({"k": 2, "j": 1})
            assert errors == []
            data = await client.hgetall(f"livemap:{{{name}}}:d:0")
            assert {bytes(k) for k in data} == {encode_key("k"), encode_key("j")}
            assert bytes(await client.get(lease)).endswith(b":taken")
        # a stopped app gives its lease up
        assert await client.get(lease) is None


async def test_bad_lease_arguments(redis_server: RedisServer) -> None:
    name = unique()
    raised: list[BaseException] = []
    async with connect(redis_server.url) as client:
        for options in ({"lease_ttl": 0}, {"lease_ttl": True}, {"lease_wait": -1.0}):

            async def main(options: dict[str, Any] = options) -> None:
                try:
                    await RedisLiveMap.create(client, name, **options)
                except ValueError as exc:
                    raised.append(exc)

            await coco.App(unique(), main).update()
        assert [str(e).split(" must")[0] for e in raised] == [
            "lease_ttl",
            "lease_ttl",
            "lease_wait",
        ]
        assert await client.exists([f"livemap:{{{name}}}:epoch"]) == 0


async def test_a_claim_of_a_process_that_is_gone_takes_nothing_over(
    redis_server: RedisServer,
) -> None:
    name = unique()
    base = f"livemap:{{{name}}}"
    async with (
        connect(redis_server.url) as client,
        Producer(client, name, app="p") as owner,
        Producer(client, name, app="q") as claimant,
    ):
        await owner.commit(part(shared=1))
        await claimant.commit(part(shared=2))
        assert [type(e) for e in claimant.errors] == [coco.KeyConflictError]
        assert await client.hget(f"{base}:c:0", encode_key("shared")) is not None
        # q's process is gone: another process of q holds its lease now
        await client.set(f"{base}:app:q", "elsewhere:1:abc:q")
        await owner.commit({})  # p drops the key: deleted, not handed to q
        assert owner.errors == []
        assert await client.hgetall(f"{base}:d:0") == {}
        assert await client.hgetall(f"{base}:o:0") == {}
        assert await client.hgetall(f"{base}:c:0") == {}


class FailingSweeps:
    """A client whose sweep scripts fail (``ConnectionError``) while
    ``failing`` is set: Redis away just as a process has caught up."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.failing = True
        self.tries = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def register_script(self, source: str) -> Any:
        from livemap._redis._scripts import SWEEP

        script = self._client.register_script(source)
        if source != SWEEP:
            return script

        async def call(**kwargs: Any) -> Any:
            self.tries += 1
            if self.failing:
                raise ConnectionError("Redis is away")
            return await script(**kwargs)

        return call


async def test_a_sweep_that_failed_is_tried_again(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from livemap._redis import _producer
    from livemap._runtime import _app

    name = unique()
    app_name = unique()
    base = f"livemap:{{{name}}}"
    plan: dict[str, dict[str, int]] = {"a": {"a1": 1}, "b": {"b1": 1, "b2": 2}}
    maps: list[RedisLiveMap[str, int]] = []

    def declare(lm: RedisLiveMap[str, int], entries: dict[str, int]) -> None:
        for key, value in entries.items():
            lm.declare_entry(key, value)

    async with connect(redis_server.url) as real:
        client: Any = real

        class Idle:
            """Keeps a live run going."""

            def process(self) -> None:
                pass

            async def process_live(self, operator: coco.LiveComponentOperator) -> None:
                await operator.mark_ready()
                await anyio.sleep_forever()

        async def main() -> None:
            lm: RedisLiveMap[str, int] = await RedisLiveMap.create(client, name, lease_ttl=0.3)
            maps.append(lm)
            for part_name, entries in plan.items():
                await coco.mount(coco.component_subpath(part_name), declare, lm, entries)
            await coco.mount(coco.component_subpath("idle"), Idle)

        with anyio.fail_after(TIMEOUT):
            await coco.App(app_name, main).update()
        assert await real.hlen(f"{base}:d:0") == 3
        # the process ends (its tree, its token and its leases are forgotten)
        # and another one of the app starts without b, as Redis goes away
        _app._trees.pop(app_name)
        monkeypatch.setattr(_producer, "_process", None)
        monkeypatch.setattr(_producer, "_leases", {})
        client = FailingSweeps(real)
        plan = {"a": {"a1": 1}}
        async with coco.App(app_name, main).update(live=True) as handle:
            with anyio.fail_after(TIMEOUT):
                await handle.ready()
                while client.tries < 2:
                    await anyio.sleep(0.01)
            assert maps[-1].stats().sweeps == 0
            assert await real.hlen(f"{base}:d:0") == 3  # not swept yet
            client.failing = False  # Redis is back: the next try sweeps
            with anyio.fail_after(TIMEOUT):
                while maps[-1].stats().sweeps < 1:
                    await anyio.sleep(0.01)
            assert maps[-1].stats().swept == 2
            data = await real.hgetall(f"{base}:d:0")
            assert {bytes(k) for k in data} == {encode_key("a1")}
            await handle.stop()


@pytest.mark.parametrize("live", [True, False], ids=["live", "catchup"])
async def test_an_update_that_ends_by_itself_after_its_catch_up_sweeps(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, live: bool
) -> None:
    """A live update with nothing live in it ends at quiescence, as a
    catch-up update does: it has caught up, and sweeps before it ends."""
    from livemap._redis import _producer
    from livemap._runtime import _app

    name = unique()
    app_name = unique()
    base = f"livemap:{{{name}}}"
    plan: dict[str, dict[str, int]] = {"a": {"a1": 1}, "b": {"b1": 1}}
    maps: list[RedisLiveMap[str, int]] = []

    def declare(lm: RedisLiveMap[str, int], entries: dict[str, int]) -> None:
        for key, value in entries.items():
            lm.declare_entry(key, value)

    async with connect(redis_server.url) as client:

        async def main() -> None:
            lm: RedisLiveMap[str, int] = await RedisLiveMap.create(client, name)
            maps.append(lm)
            for part_name, entries in plan.items():
                await coco.mount(coco.component_subpath(part_name), declare, lm, entries)

        with anyio.fail_after(TIMEOUT):
            await coco.App(app_name, main).update(live=live)
        # another process of the app (see test_a_sweep_that_failed_is_tried_again)
        _app._trees.pop(app_name)
        monkeypatch.setattr(_producer, "_process", None)
        monkeypatch.setattr(_producer, "_leases", {})
        plan = {"a": {"a1": 2}}
        with anyio.fail_after(TIMEOUT):
            await coco.App(app_name, main).update(live=live)
        stats = maps[-1].stats()
        assert (stats.sweeps, stats.swept) == (1, 1)
        data = await client.hgetall(f"{base}:d:0")
        assert {bytes(k): bytes(v) for k, v in data.items()} == {encode_key("a1"): b"2"}
        assert await client.get(f"{base}:app:{app_name}") is None  # given up


# -- a process that takes its app back, keys moving across a restart ----------------


async def wait_for(consumer: Worker, log: Path, expected: dict[str, int]) -> None:
    """Settle ``consumer`` until its log holds ``expected``."""
    with anyio.fail_after(TIMEOUT):
        while True:
            await consumer.settle()
            if held(log) == expected:
                return
            await anyio.sleep(0.05)


@pytest.mark.parametrize("other", ["stopped", "killed"])
async def test_a_process_stopped_past_its_lease_takes_its_app_back_whole(
    redis_server: RedisServer, anyio_backend: str, tmp_path: Path, other: str
) -> None:
    """SIGSTOP past the lease: another process of the app takes over,
    changes and deletes some of the first one's keys, and goes away.  The
    first one, resumed, takes the app back without committing: what it
    holds is in Redis again, and only what the other one alone declared is
    deleted (no entry the first one declares is deleted on the way)."""
    name = unique()
    url = redis_server.url
    log = tmp_path / "consumer.log"
    first = await start_parts(url, name, "p", anyio_backend, lease_ttl=0.5)
    workers = [first]
    try:
        reply = await first.update({"a": part(a1=1, a2=2), "b": part(b1=1)})
        assert reply["ok"] and reply["errors"] == []
        consumer = await start_consumer(url, name, anyio_backend, log)
        workers.append(consumer)
        first.proc.send_signal(signal.SIGSTOP)
        await anyio.sleep(0.7)
        second = await start_parts(url, name, "p", anyio_backend, lease_ttl=0.5)
        workers.append(second)
        # a1 changed, a2 no longer declared, b not mounted, c and a3 new
        reply = await second.update({"a": part(a1=10, a3=3), "c": part(c1=1)})
        assert reply["ok"] and reply["errors"] == [] and reply["swept"] == 2
        await wait_for(consumer, log, {"a1": 10, "a3": 3, "c1": 1})
        await (stop(second) if other == "stopped" else kill(second))
        before = len(entries_of(log))
        first.proc.send_signal(signal.SIGCONT)
        # no commit: the first process's lease task takes the app back
        await wait_for(consumer, log, {"a1": 1, "a2": 2, "b1": 1})
        after = entries_of(log)[before:]
        assert sorted(e[1] for e in after if e[0] == "d") == ["a3", "c1"]
        assert sorted(e[1] for e in after if e[0] == "call") == ["a1", "a2", "b1"]
        async with connect(url) as client:
            base = f"livemap:{{{name}}}"
            owners = {
                bytes(k): bytes(v).split(b"\x1e")[0]
                for k, v in (await client.hgetall(f"{base}:o:0")).items()
            }
            assert owners == {
                encode_key("a1"): b"p\x1f/'parts'/'a'",
                encode_key("a2"): b"p\x1f/'parts'/'a'",
                encode_key("b1"): b"p\x1f/'parts'/'b'",
            }
        # and it goes on as the app's producer
        reply = await first.update({"a": part(a1=1, a2=5), "b": part(b1=1)})
        assert reply["ok"] and reply["errors"] == []
        await wait_for(consumer, log, {"a1": 1, "a2": 5, "b1": 1})
        _, _, repeats = read_log(log)
        assert repeats == []
    finally:
        first.proc.send_signal(signal.SIGCONT)
        for worker in workers:
            await worker.close()


async def test_a_commit_that_takes_the_app_back_uploads_what_the_process_holds(
    redis_server: RedisServer, anyio_backend: str
) -> None:
    """A live process whose lease lapsed while another process of the app
    changed its keys takes the app back with a commit: its entries are
    uploaded again at once (not a lease period later), then the other
    process's leftovers are swept."""
    name = unique()
    app_name = unique()
    base = f"livemap:{{{name}}}"
    errors: list[BaseException] = []
    state: dict[str, Any] = {"k": 1, "j": 1}
    step = anyio.Event()
    done = anyio.Event()

    class Declare:
        def __init__(self, lm: RedisLiveMap[str, Any]) -> None:
            self.lm = lm

        def process(self) -> None:
            for key, value in state.items():
                self.lm.declare_entry(key, value)

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            nonlocal step
            await operator.update_full()
            await operator.mark_ready()
            while True:
                await step.wait()
                step = anyio.Event()
                await operator.update_full()
                done.set()

    async def main() -> None:
        # a long lease: its task would refresh it only every 20 s
        lm: RedisLiveMap[str, Any] = await RedisLiveMap.create(client, name, lease_ttl=60.0)
        await coco.mount(coco.component_subpath("declare"), Declare, lm)

    async def data() -> dict[Any, Any]:
        held = await client.hgetall(f"{base}:d:0")
        return {decode_key(bytes(k)): json.loads(bytes(v)) for k, v in held.items()}

    async with connect(redis_server.url) as client:
        app = coco.App(
            coco.AppConfig(app_name, exception_handler=lambda e, c: errors.append(e)), main
        )
        async with app.update(live=True) as handle:
            with anyio.fail_after(TIMEOUT):
                await handle.ready()
            assert await data() == {"k": 1, "j": 1}
            # the lease lapses (the process was stopped) and another process
            # of the app runs: it declares k elsewhere, and sweeps j
            await client.delete([f"{base}:app:{app_name}"])
            other = await start_parts(redis_server.url, name, app_name, anyio_backend, "catchup")
            try:
                reply = await other.update({"x": part(k=5)})
                assert reply["ok"] and reply["errors"] == [] and reply["swept"] == 1
            finally:
                await other.close()
            assert await data() == {"k": {"k": "k", "v": 5}}
            # the first process commits a new key (k and j unchanged)
            state["i"] = 1
            done = anyio.Event()
            step.set()
            with anyio.fail_after(TIMEOUT):
                await done.wait()
            with anyio.fail_after(10):  # less than the lease task's period
                while await data() != {"k": 1, "j": 1, "i": 1}:
                    await anyio.sleep(0.02)
            owner = await client.hget(f"{base}:o:0", encode_key("k"))
            assert owner is not None and bytes(owner).startswith(
                f"{app_name}\x1f/'declare'\x1e".encode()
            )
            assert errors == []
            await handle.stop()


@pytest.mark.parametrize("mode", ["live", "catchup"])
@pytest.mark.parametrize("plan", ["moved", "moved-old-remounted"])
async def test_a_key_moving_between_components_across_a_restart_is_a_transfer(
    redis_server: RedisServer, anyio_backend: str, tmp_path: Path, mode: str, plan: str
) -> None:
    """A key the earlier process's component held and the restarted one's
    other component declares passes to it as one update: no
    KeyConflictError naming the app's own earlier component, no delete."""
    name = unique()
    url = redis_server.url
    log = tmp_path / "consumer.log"
    first = await start_parts(url, name, "p", anyio_backend, mode)
    workers = [first]
    try:
        assert (await first.update({"a": part(k=1, j=1)}))["ok"]
        consumer = await start_consumer(url, name, anyio_backend, log)
        workers.append(consumer)
        await stop(first)
        before = len(entries_of(log))
        second = await start_parts(url, name, "p", anyio_backend, mode)
        workers.append(second)
        parts = {"b": part(k=2)}
        if plan == "moved-old-remounted":
            # a is mounted again, declaring j only; in either order of commits
            parts = {"a": part(j=1), "b": part(k=2)}
        reply = await second.update(parts)
        assert reply["ok"] and reply["errors"] == []
        await wait_for(consumer, log, {"k": 2} if plan == "moved" else {"k": 2, "j": 1})
        after = entries_of(log)[before:]
        deletes = [e for e in after if e[0] == "d"]
        assert deletes == ([["d", "j"]] if plan == "moved" else [])
        assert [e for e in after if e[0] == "call"] == [["call", "k", {"k": "k", "v": 2}]]
        async with connect(url) as client:
            owner = await client.hget(f"livemap:{{{name}}}:o:0", encode_key("k"))
            at = "/'parts'/'b'" if mode == "live" else "/'b'"
            assert owner is not None and bytes(owner).startswith(f"p\x1f{at}\x1e".encode())
            assert await client.hgetall(f"livemap:{{{name}}}:c:0") == {}
    finally:
        for worker in workers:
            await worker.close()


@pytest.mark.parametrize("mode", ["live", "catchup"])
async def test_a_key_two_components_of_a_restarted_process_declare_is_a_conflict(
    redis_server: RedisServer, anyio_backend: str, tmp_path: Path, mode: str
) -> None:
    """The earlier process's owner of a key is mounted again and declares it,
    and so does another component: as in one process, the one that commits
    first keeps it and the other gets the KeyConflictError naming it (never
    the app's earlier process); nothing is deleted."""
    name = unique()
    url = redis_server.url
    log = tmp_path / "consumer.log"
    first = await start_parts(url, name, "p", anyio_backend, mode)
    workers = [first]
    try:
        assert (await first.update({"a": part(k=1)}))["ok"]
        consumer = await start_consumer(url, name, anyio_backend, log)
        workers.append(consumer)
        await stop(first)
        second = await start_parts(url, name, "p", anyio_backend, mode)
        workers.append(second)
        reply = await second.update({"b": part(k=2), "a": part(k=3)})
        assert reply["ok"]
        (error,) = reply["errors"]
        assert error.startswith("KeyConflictError")
        named = error.split("owned by component ")[1].split(" of app")[0]
        at = "/'parts'" if mode == "live" else ""
        assert named in (f"{at}/'a'", f"{at}/'b'")
        await consumer.settle()
        async with connect(url) as client:
            owner = await client.hget(f"livemap:{{{name}}}:o:0", encode_key("k"))
            assert owner is not None
            record = bytes(owner).split(b"\x1e")[0].decode()
        assert record == f"p\x1f{named}"  # the one named owns it in Redis
        assert held(log) == {"k": 3 if named.endswith("'a'") else 2}
        assert not [e for e in entries_of(log) if e[0] == "d"]
    finally:
        for worker in workers:
            await worker.close()


class SlowSweeps:
    """A client whose sweep scripts answer ``delay`` seconds after Redis ran
    them (a loaded machine): what ends the run meanwhile cancels the wait."""

    def __init__(self, client: Any, delay: float) -> None:
        self._client = client
        self.delay = delay
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def register_script(self, source: str) -> Any:
        from livemap._redis._scripts import SWEEP

        script = self._client.register_script(source)
        if source != SWEEP:
            return script

        async def call(**kwargs: Any) -> Any:
            self.calls += 1
            reply = await script(**kwargs)
            await anyio.sleep(self.delay)
            return reply

        return call


async def test_a_sweep_cut_by_the_end_of_its_run_is_counted_once(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live update that ends by itself as its lease task sweeps: the sweep
    is not cut off between Redis running it and its answer (else its keys
    are let go uncounted, and the run's end sweeps again, finding none)."""
    from livemap._redis import _producer
    from livemap._runtime import _app

    name = unique()
    app_name = unique()
    plan: dict[str, dict[str, int]] = {"a": {"a1": 1}, "b": {"b1": 1}}
    maps: list[RedisLiveMap[str, int]] = []
    brief = False

    def declare(lm: RedisLiveMap[str, int], entries: dict[str, int]) -> None:
        for key, value in entries.items():
            lm.declare_entry(key, value)

    async with connect(redis_server.url) as real:
        client: Any = real

        class Brief:
            """A live component that ends by itself a little after the
            catch-up, ending the run while the lease task sweeps."""

            def process(self) -> None:
                pass

            async def process_live(self, operator: coco.LiveComponentOperator) -> None:
                await operator.mark_ready()
                await anyio.sleep(0.1)

        async def main() -> None:
            lm: RedisLiveMap[str, int] = await RedisLiveMap.create(client, name)
            maps.append(lm)
            for part_name, entries in plan.items():
                await coco.mount(coco.component_subpath(part_name), declare, lm, entries)
            if brief:
                await coco.mount(coco.component_subpath("brief"), Brief)

        with anyio.fail_after(TIMEOUT):
            await coco.App(app_name, main).update(live=True)
        _app._trees.pop(app_name)
        monkeypatch.setattr(_producer, "_process", None)
        monkeypatch.setattr(_producer, "_leases", {})
        client = SlowSweeps(real, 0.3)
        plan = {"a": {"a1": 2}}
        brief = True
        with anyio.fail_after(TIMEOUT):
            await coco.App(app_name, main).update(live=True)
        assert client.calls >= 1
        stats = maps[-1].stats()
        assert (stats.sweeps, stats.swept) == (1, 1)
        data = await real.hgetall(f"livemap:{{{name}}}:d:0")
        assert {bytes(k) for k in data} == {encode_key("a1")}


async def test_a_turn_moved_behind_the_process_makes_it_upload_before_it_sweeps(
    redis_server: RedisServer,
) -> None:
    """Another process of the app held the lease in between (its turn moved)
    and deleted an entry: this process's lease task uploads it again; and a
    sweep at a turn that is not the app's lets nothing go."""
    from livemap._redis._scripts import SWEEP

    name = unique()
    app_name = unique()
    base = f"livemap:{{{name}}}"
    async with (
        connect(redis_server.url) as client,
        Producer(client, name, app=app_name, lease_ttl=0.3) as producer,
    ):
        await producer.commit(part(k=1, j=1))
        lm = producer.map
        leftover = f"{app_name}\x1f/'gone'\x1eelsewhere:1:abc:{app_name}"
        await client.hset(f"{base}:o:0", {encode_key("old"): leftover})
        await client.hset(f"{base}:d:0", {encode_key("old"): b"1"})
        await client.sadd(f"{base}:k:{app_name}\x1f/'gone'", [b"0|" + encode_key("old")])
        await client.sadd(f"{base}:ao:{app_name}", [f"{app_name}\x1f/'gone'"])
        (epoch, turn) = lm._lease.turn
        # a sweep at another turn than the app's lets nothing go
        reply = await client.register_script(SWEEP)(
            keys=[base],
            args=[epoch, lm._instance, app_name, "300", "50", str(turn + 1)],
        )
        assert reply[0] == b"moved"
        assert await client.hexists(f"{base}:d:0", encode_key("old"))
        # another process's turn, which deleted j
        await client.hincrby(f"{base}:turn", app_name, 1)
        await client.hdel(f"{base}:d:0", [encode_key("j")])
        await client.hdel(f"{base}:o:0", [encode_key("j")])
        lm._lease.pending = True  # (it took the app back)
        with anyio.fail_after(TIMEOUT):
            while not await client.hexists(f"{base}:d:0", encode_key("j")):
                await anyio.sleep(0.02)
            while await client.hexists(f"{base}:d:0", encode_key("old")):
                await anyio.sleep(0.02)  # swept, after the upload
        data = await client.hgetall(f"{base}:d:0")
        assert {bytes(k) for k in data} == {encode_key("k"), encode_key("j")}
        assert lm._lease.synced == (epoch, turn + 1)
        assert producer.errors == []
