"""What waits for a ``mount_each``'s update to settle, at scale: the wait
knows which children are unready without looking at every child, and the
keys many entries' components let go in one update reach each target as one
batch (SPEC section 4, Ownership; section 5, Targets): with a transfer in the
middle of it, a sink that raises on it, an unmount in the middle of it.

The deletes are held until the consumer's update settles; every assertion
is made once the map's ``settle()`` has returned."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import wait_for

import livemap as coco
from livemap import KeyedTarget, LiveMap, TargetBatch

pytestmark = pytest.mark.anyio

_names = itertools.count()


class Sink:
    """A keyed target recording each batch (and its owner), mirroring the
    rows it was sent, and raising on the batches ``fail`` picks."""

    def __init__(self, name: str = "rows") -> None:
        self.batches: list[tuple[list[tuple[str, Any]], list[str], Any]] = []
        self.rows: dict[str, Any] = {}
        self.errors: list[BaseException] = []
        self.fail: Any = None  # batch -> bool: raise on it
        self.target: KeyedTarget[str, Any] = KeyedTarget(name, self._apply)

    def _apply(self, batch: TargetBatch[str, Any]) -> None:
        if self.fail is not None and self.fail(batch):
            raise OSError("sink down")
        self.batches.append((list(batch.upserts), list(batch.deletes), batch.owner))
        for key in batch.deletes:
            del self.rows[key]  # (a delete of a row never sent raises here)
        for key, value in batch.upserts:
            self.rows[key] = value

    @property
    def deletes(self) -> list[str]:
        return [key for _, deletes, _ in self.batches for key in deletes]

    async def handler(self, exc: BaseException, ctx: coco.ExceptionContext) -> None:
        self.errors.append(exc)


class Scene:
    """A live app: a producer whose state the test sets, and a ``mount_each``
    over its map whose per-entry processor declares ``row-<entry's row>`` into
    each sink (``value = (row, payload)``), after ``gate(key)`` if set."""

    def __init__(self, state: dict[str, tuple[str, int]], sinks: list[Sink]) -> None:
        self.state = state
        self.sinks = sinks
        self.maps: list[LiveMap[str, tuple[str, int]]] = []
        self.handles: list[coco.ComponentMountHandle] = []
        self.gates: dict[str, anyio.Event] = {}
        self.changes: Any = None
        self.streams: list[Any] = []
        scene = self

        @coco.fn
        async def per_entry(value: tuple[str, int], key: str) -> None:
            gate = scene.gates.get(key)
            if gate is not None:
                await gate.wait()
            await anyio.lowlevel.checkpoint()
            for sink in scene.sinks:
                sink.target.declare(f"row-{value[0]}", value[1])

        self.per_entry = per_entry

    def app(self) -> coco.App:
        scene = self
        send, recv = anyio.create_memory_object_stream[anyio.Event](10)
        self.changes = send
        self.streams = [send, recv]

        class Producer:
            def __init__(self, lm: LiveMap[str, tuple[str, int]]) -> None:
                self.lm = lm

            def process(self) -> None:
                for key, value in scene.state.items():
                    self.lm.declare_entry(key, value)

            async def process_live(self, operator: coco.LiveComponentOperator) -> None:
                await operator.update_full()
                await operator.mark_ready()
                async for done in recv:
                    await operator.update_full()
                    done.set()

        @coco.fn
        async def main() -> None:
            async with coco.exception_handler(scene.sinks[0].handler):
                lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
                scene.maps.append(lm)
                await coco.mount(Producer, lm)
                scene.handles.append(await coco.mount_each(scene.per_entry, lm, _key))

        return coco.App(f"settle-batch-{next(_names)}", main)

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc: object) -> None:
        for stream in self.streams:
            stream.close()

    async def commit(self) -> None:
        """The producer commits the current state (one commit)."""
        done = anyio.Event()
        await self.changes.send(done)
        await done.wait()

    async def settled(self) -> None:
        await self.maps[0].settle()

    @property
    def each(self) -> Any:
        return self.handles[0]._component


def _key(value: tuple[str, int]) -> str:
    return value[0]


def _rows(state: dict[str, tuple[str, int]]) -> dict[str, int]:
    return {f"row-{row}": n for row, n in state.values()}


async def _started(scene: Scene, h: Any) -> None:
    await h.ready()
    await scene.settled()
    await wait_for(lambda: all(s.rows == _rows(scene.state) for s in scene.sinks))


async def test_the_wait_knows_the_unready_children() -> None:
    """The ``mount_each`` keeps the readiness of each unready child: exactly
    those (a closed one aside) while some are blocked, none once settled."""
    state = {f"e{i}": (f"e{i}", 0) for i in range(40)}
    sink = Sink()
    scene = Scene(state, [sink])
    app = scene.app()

    def check() -> None:
        each = scene.each
        tracked = each.readiness.tracked
        unready = {c.readiness for c in (each.children or {}).values() if c.readiness.unready}
        assert unready <= tracked
        assert all(r.unready or r.closed for r in tracked)

    with scene, anyio.fail_after(10):
        async with app.update(live=True) as h:
            await _started(scene, h)
            check()
            assert scene.each.readiness.tracked == set()
            blocked = [f"e{i}" for i in range(0, 40, 3)]
            for key in blocked:
                scene.gates[key] = anyio.Event()
            for i in range(40):
                state[f"e{i}"] = (f"e{i}", 1)
            for i in range(1, 40, 3):
                del state[f"e{i}"]
            await scene.commit()
            await wait_for(lambda: len(scene.each.readiness.tracked) >= len(blocked))
            check()
            for key in blocked:
                scene.gates.pop(key).set()
                await anyio.lowlevel.checkpoint()
                check()
            await scene.settled()
            check()
            await h.stop()
    assert scene.each.readiness.tracked == set() or not scene.each.alive
    assert sink.rows == _rows(state)
    assert sink.errors == []
