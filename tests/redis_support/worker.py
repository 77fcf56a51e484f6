"""A producer or a consumer of a shared map, as its own process (for the
Redis tests).

``worker.py produce URL NAME APP BACKEND [SHARDS]``: reads one JSON object per
line on stdin, the entries the app's live component declares (``{key:
value}``; see redis_support.Producer), commits them and answers one line:
``{"ok": true, "errors": [messages reported to the handler]}``.

``worker.py consume URL NAME BACKEND LOG [SHARDS]``: follows the map with
``mount_each``; each per-entry run appends ``["call", key, value]`` to LOG and
declares its entry into a KeyedTarget whose sink appends ``["u", key, value]``
or ``["d", key]``.  Prints ``ready`` once the first snapshot is processed; on
a ``settle`` line it settles the view and answers ``settled``.

``worker.py parts URL NAME APP BACKEND MODE LEASE_TTL``: a producer app
(MODE ``live`` or ``catchup``) whose root makes the map and mounts one
component per part, each declaring its entries.  Reads one JSON object per
line, ``{part: {key: value}}`` (a part given as ``"block"`` never finishes
its run, one given as ``"fail"`` raises, one given as ``"idle"`` is a live
component, ready without running); in ``catchup`` mode each line is
one ``app.update()``, in ``live`` mode the first line starts a live update
and each next one re-runs the parts.  Answers one line per line: ``{"ok":
true, "errors": [...], "sweeps": n, "swept": n}`` (after the first line,
once the map's first sweep is done), or ``{"ok": false, "error": "Type:
message"}`` when the update failed.

``worker.py count URL NAME BACKEND [SHARDS]``: the benchmark's consumer
(see :func:`count`).  Values are
``{"k": key, "v": ...}`` (the processor sees only the value).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import anyio

import livemap as coco
from livemap.redis import RedisLiveMap, RedisLiveMapView, connect

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from redis_support import Producer


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def produce(url: str, name: str, app_name: str, shards: int) -> None:
    async with (
        connect(url) as client,
        Producer(client, name, app=app_name, shards=shards, maxlen=50) as producer,
    ):
        stdin = anyio.wrap_file(sys.stdin)
        async for line in stdin:
            producer.errors.clear()
            await producer.commit(json.loads(line))
            errors = [f"{type(e).__name__}: {e}" for e in producer.errors]
            out(json.dumps({"ok": True, "errors": errors}))


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


async def parts(url: str, name: str, app_name: str, mode: str, lease_ttl: float) -> None:
    plan: dict[str, Any] = {}
    errors: list[BaseException] = []
    maps: list[RedisLiveMap[str, Any]] = []

    async def part(lm: RedisLiveMap[str, Any], entries: Any) -> None:
        if entries == "block":
            await anyio.sleep_forever()
        if entries == "fail":
            raise RuntimeError("this part fails")
        for key, value in entries.items():
            lm.declare_entry(key, value)

    class Idle:
        """A live component that is ready without ever running."""

        def process(self) -> None:
            pass

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.mark_ready()
            await anyio.sleep_forever()

    async def mount_parts(lm: RedisLiveMap[str, Any]) -> None:
        for part_name, entries in plan.items():
            if entries == "idle":
                await coco.mount(coco.component_subpath(part_name), Idle)
            else:
                await coco.mount(coco.component_subpath(part_name), part, lm, entries)

    def handler(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        errors.append(exc)

    async def reply(first: bool) -> None:
        lm = maps[-1]
        if first:
            with anyio.fail_after(10):
                while lm.stats().sweeps < 1:
                    await anyio.sleep(0.01)
        stats = lm.stats()
        line = {"ok": True, "errors": [describe(e) for e in errors]}
        out(json.dumps({**line, "sweeps": stats.sweeps, "swept": stats.swept}))
        errors.clear()

    async with connect(url) as client:

        async def make() -> RedisLiveMap[str, Any]:
            lm: RedisLiveMap[str, Any] = await RedisLiveMap.create(
                client, name, lease_ttl=lease_ttl, maxlen=50
            )
            maps.append(lm)
            return lm

        stdin = anyio.wrap_file(sys.stdin)
        if mode == "catchup":

            async def catch_up_main() -> None:
                await mount_parts(await make())

            app = coco.App(coco.AppConfig(app_name, exception_handler=handler), catch_up_main)
            first = True
            async for line in stdin:
                plan.clear()
                plan.update(json.loads(line))
                try:
                    await app.update()
                except Exception as exc:
                    out(json.dumps({"ok": False, "error": describe(exc)}))
                    return
                await reply(first)
                first = False
            return

        send, receive = anyio.create_memory_object_stream[anyio.Event](10)

        class Parts:
            def __init__(self, lm: RedisLiveMap[str, Any]) -> None:
                self.lm = lm

            async def process(self) -> None:
                await mount_parts(self.lm)

            async def process_live(self, operator: coco.LiveComponentOperator) -> None:
                await operator.update_full()
                await operator.mark_ready()
                async for done in receive:
                    await operator.update_full()
                    done.set()

        async def live_main() -> None:
            await coco.mount(coco.component_subpath("parts"), Parts, await make())

        app = coco.App(coco.AppConfig(app_name, exception_handler=handler), live_main)
        plan.update(json.loads(await stdin.readline()))
        async with app.update(live=True) as handle:
            try:
                with anyio.fail_after(30):
                    await handle.ready()
            except Exception as exc:
                out(json.dumps({"ok": False, "error": describe(exc)}))
                return
            await reply(True)
            async for line in stdin:
                plan.clear()
                plan.update(json.loads(line))
                done = anyio.Event()
                await send.send(done)
                with anyio.fail_after(30):
                    await done.wait()
                await reply(False)
            send.close()
            await handle.stop()


async def consume(url: str, name: str, log_path: str, shards: list[int] | None) -> None:
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def write(entry: list[Any]) -> None:
        log.write(json.dumps(entry) + "\n")

    def apply(batch: coco.TargetBatch[str, Any]) -> None:
        for key, value in batch.upserts:
            write(["u", key, value])
        for key in batch.deletes:
            write(["d", key])

    target: coco.KeyedTarget[str, Any] = coco.KeyedTarget("seen", apply)

    def process(value: dict[str, Any]) -> None:
        write(["call", value["k"], value])
        target.declare(value["k"], value)

    async with connect(url) as client:
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(
            client, name, shards=shards, lease_ttl=1.0, lease_wait=10.0, block=0.2
        )

        async def main() -> None:
            await coco.mount_each(process, view)

        app = coco.App("consumer", main)
        async with app.update(live=True) as handle:
            with anyio.fail_after(30):
                while not view.stats().consumer:
                    await anyio.sleep(0.01)
                await view.settle()
            out("ready")
            stdin = anyio.wrap_file(sys.stdin)
            async for line in stdin:
                if line.strip() == "settle":
                    with anyio.fail_after(30):
                        await view.settle()
                    out("settled " + json.dumps(view.stats().resyncs))
            await handle.stop()


async def count(url: str, name: str, shards: list[int] | None) -> None:
    """Follow the map, keeping each key's latest value; on a ``settle`` line,
    settle and answer ``{"calls": ..., "keys": ..., "sum": ..., "cpu": ...}``
    (the sum of the values' second items: ``[key, n]`` values, as the
    benchmark declares; the process's CPU seconds since ``ready``)."""
    held: dict[str, Any] = {}
    calls = 0

    def process(value: list[Any]) -> None:
        nonlocal calls
        calls += 1
        held[value[0]] = value[1]

    async with connect(url) as client:
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(
            client, name, shards=shards, lease_ttl=5.0, lease_wait=10.0, block=0.2, batch=10_000
        )

        async def main() -> None:
            await coco.mount_each(process, view)

        async with coco.App("counter", main).update(live=True) as handle:
            with anyio.fail_after(30):
                while not view.stats().consumer:
                    await anyio.sleep(0.01)
                await view.settle()
            cpu = time.process_time()
            out("ready")
            stdin = anyio.wrap_file(sys.stdin)
            async for line in stdin:
                if line.strip() == "settle":
                    await view.settle()
                    reply = {
                        "calls": calls,
                        "keys": len(held),
                        "sum": sum(held.values()),
                        "cpu": time.process_time() - cpu,
                    }
                    out(json.dumps(reply))
            await handle.stop()


def main() -> None:
    mode = sys.argv[1]
    if mode == "count":
        url, name, backend = sys.argv[2:5]
        wanted = [int(s) for s in sys.argv[5].split(",")] if len(sys.argv) > 5 else None
        anyio.run(count, url, name, wanted, backend=backend)
        return
    if mode == "parts":
        url, name, app_name, backend, how, ttl = sys.argv[2:8]
        anyio.run(parts, url, name, app_name, how, float(ttl), backend=backend)
        return
    if mode == "produce":
        url, name, app_name, backend = sys.argv[2:6]
        shards = int(sys.argv[6]) if len(sys.argv) > 6 else 1
        anyio.run(produce, url, name, app_name, shards, backend=backend)
    else:
        url, name, backend, log_path = sys.argv[2:6]
        wanted = [int(s) for s in sys.argv[6].split(",")] if len(sys.argv) > 6 else None
        anyio.run(consume, url, name, log_path, wanted, backend=backend)


if __name__ == "__main__":
    main()
