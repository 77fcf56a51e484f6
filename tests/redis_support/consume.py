"""What the in-process Redis tests share: a consumer app over a view
(:func:`consuming`), what Redis holds (:func:`snapshot`, :func:`streamed`),
a client whose commit scripts misbehave on demand (:class:`Faulty`) and a
live tree of declaring components (:class:`Tree`)."""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from helpers import Remote, RemoteLive

import livemap as coco
from livemap.redis import RedisLiveMap, RedisLiveMapView, decode_key, encode_key

TIMEOUT = 15.0


def unique(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def entries(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: {"k": k, "v": v} for k, v in state.items()}


@dataclass
class Seen:
    """What a consumer's per-entry components saw: every call, and the rows
    of a KeyedTarget they declare into (so deletes show).  While ``gate`` is
    set, each call waits for it first."""

    calls: list[tuple[Any, Any]] = field(default_factory=list)
    rows: dict[Any, Any] = field(default_factory=dict)
    gate: anyio.Event | None = None


@asynccontextmanager
async def consuming(view: RedisLiveMapView[Any, Any]) -> AsyncIterator[Seen]:
    """A live consumer app over ``view`` (``mount_each`` of values made by
    :func:`entries`), started and settled; stopped on the way out."""
    seen = Seen()

    def apply(batch: coco.TargetBatch[Any, Any]) -> None:
        for key, value in batch.upserts:
            seen.rows[key] = value
        for key in batch.deletes:
            del seen.rows[key]

    target: coco.KeyedTarget[Any, Any] = coco.KeyedTarget("rows", apply)

    async def process(value: Any) -> None:
        if seen.gate is not None:
            await seen.gate.wait()
        seen.calls.append((value["k"], value["v"]))
        target.declare(value["k"], value["v"])

    async def main() -> None:
        await coco.mount_each(process, view)

    async with coco.App(unique("consumer"), main).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            while not view.stats().consumer:
                await anyio.sleep(0.005)
            await view.settle()
        yield seen
        await handle.stop()


async def settle(view: RedisLiveMapView[Any, Any]) -> None:
    with anyio.fail_after(TIMEOUT):
        await view.settle()


async def snapshot(client: Any, name: str, shards: int) -> dict[Any, Any]:
    """The map's entries as Redis holds them (``key -> v``)."""
    out: dict[Any, Any] = {}
    for s in range(shards):
        held = await client.hgetall(f"livemap:{{{name}}}:d:{s}")
        for ek, data in held.items():
            out[decode_key(bytes(ek))] = json.loads(bytes(data))["v"]
    return out


async def streamed(client: Any, name: str, shards: int, key: str) -> list[Any]:
    """The values (``v``; None for a delete) the map's streams carried for
    ``key``, in order: what every view is sent."""
    ek = encode_key(key)
    out: list[Any] = []
    for s in range(shards):
        for entry in await client.xrange(f"livemap:{{{name}}}:x:{s}", "-", "+"):
            fields = entry.field_values
            blob = bytes(fields[b"p"])
            pos = 0
            while pos < len(blob):
                op = blob[pos : pos + 1]
                (n,) = struct.unpack_from(">I", blob, pos + 1)
                k = blob[pos + 5 : pos + 5 + n]
                pos += 5 + n
                value = None
                if op == b"u":
                    (m,) = struct.unpack_from(">I", blob, pos)
                    value = json.loads(blob[pos + 4 : pos + 4 + m])["v"]
                    pos += 4 + m
                if k == ek:
                    out.append(value)
    return out


async def check(
    client: Any, name: str, shards: int, seen: Seen, view: Any, state: dict[str, Any]
) -> None:
    """Redis and the view hold ``state`` (once the view has caught up)."""
    await settle(view)
    assert await snapshot(client, name, shards) == state
    assert seen.rows == state


class Faulty:
    """A client whose commit scripts misbehave on demand.

    ``fail_from``: from this call on (counting every commit script call),
    each raises ``ConnectionError`` before it is sent; ``fail_at``: only
    that call does.  ``lose_reply_at``: that call runs in Redis, then raises
    ``ConnectionError`` (the reply lost).  ``block``: the next call stops,
    ``"before"`` it is sent or ``"after"`` Redis ran it, until cancelled
    (``blocked`` is set then).  ``block_reads``: the next ``smembers`` stops
    before it is sent, likewise.  ``sizes``: the bytes of changes each call
    carried."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls = 0
        self.fail_from: int | None = None
        self.fail_at: int | None = None
        self.lose_reply_at: int | None = None
        self.block: str | None = None
        self.block_reads = False
        self.blocked = anyio.Event()
        self.sizes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def smembers(self, key: Any) -> Any:
        if self.block_reads:
            self.block_reads = False
            self.blocked.set()
            await anyio.sleep_forever()
        return await self._client.smembers(key)

    def register_script(self, source: str) -> Any:
        from livemap._redis._scripts import COMMIT

        script = self._client.register_script(source)
        if source != COMMIT:
            return script

        async def call(**kwargs: Any) -> Any:
            self.calls += 1
            args = kwargs["args"]
            owners = int(args[5])
            self.sizes.append(sum(len(a) for a in args[6 + 2 * owners + 2 :: 3]))
            if (self.fail_from is not None and self.calls >= self.fail_from) or (
                self.calls == self.fail_at
            ):
                raise ConnectionError("lost Redis before the call")
            block, self.block = self.block, None
            if block == "before":
                self.blocked.set()
                await anyio.sleep_forever()
            reply = await script(**kwargs)
            if block == "after":
                self.blocked.set()
                await anyio.sleep_forever()
            if self.calls == self.lose_reply_at:
                raise ConnectionError("lost the reply")
            return reply

        return call


@coco.fn
async def declare(rlm: Any, state: dict[str, Any], round_: int) -> None:
    for key, value in state.items():
        rlm.declare_entry(key, {"k": key, "v": value})


class Tree:
    """A live app: the root makes the map and mounts a live component that
    (re-)mounts children declaring into it, on request (see :class:`Remote`).
    What goes to the handler chain lands in ``errors``."""

    def __init__(self, client: Any, name: str, app: str | None = None, **options: Any) -> None:
        self.remote = Remote()
        self.map: Any = None
        self.errors: list[BaseException] = []
        self.rounds = 0
        tree = self

        async def main() -> None:
            tree.map = await RedisLiveMap.create(client, name, **options)
            await coco.mount(RemoteLive, tree.remote)

        def handler(exc: BaseException, ctx: coco.ExceptionContext) -> None:
            self.errors.append(exc)

        config = coco.AppConfig(app or unique("tree"), exception_handler=handler)
        self.app = coco.App(config, main)

    async def mount(self, child: str, state: dict[str, Any]) -> coco.ComponentMountHandle:
        """(Re-)mount ``child`` declaring ``state`` (returns at once)."""
        self.rounds += 1
        rounds = self.rounds

        async def job(op: coco.LiveComponentOperator) -> coco.ComponentMountHandle:
            return await op.update(child, declare, self.map, dict(state), rounds)

        handle: coco.ComponentMountHandle = await self.remote(job)
        return handle

    async def declare(self, child: str, state: dict[str, Any]) -> None:
        """(Re-)mount ``child`` declaring ``state`` and wait until it is ready."""
        handle = await self.mount(child, state)
        with anyio.fail_after(TIMEOUT):
            await handle.ready()

    async def unmount(self, child: str) -> None:
        """Unmount ``child`` and wait until that is done."""

        async def job(op: coco.LiveComponentOperator) -> coco.ReadyHandle:
            return await op.delete(child)

        handle = await self.remote(job)
        with anyio.fail_after(TIMEOUT):
            await handle.ready()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Tree]:
        with self.remote:
            async with self.app.update(live=True) as handle:
                with anyio.fail_after(TIMEOUT):
                    await handle.ready()
                yield self
                await handle.stop()
