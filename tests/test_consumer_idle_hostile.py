"""A ``mount_each``'s consumer goes idle where its queue does, made hostile:
a change whose try is decided at its commit to run nothing (the delete of a
child at rest) leaves the consumer idle: the ``mount_each`` is ready, and a
catch-up run ends."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from helpers import LiveDriver as Driver
from helpers import LiveProducer as Producer

import livemap as coco
from livemap import LiveMap

pytestmark = pytest.mark.anyio

TIMEOUT = 10.0


class DeletesALeaf:
    """Declares ``a`` and ``b``; once both children ran (``seen``) and are
    at rest, the workers parked, deletes ``a`` (its delete runs nothing: a
    leaf is dropped) and sets ``deleted``; then, with ``linger``, waits to
    be cancelled."""

    def __init__(
        self, lm: LiveMap[str, int], seen: list[int], deleted: anyio.Event, linger: bool
    ) -> None:
        self.lm = lm
        self.entries = {"a": 1, "b": 2}
        self.seen = seen
        self.deleted = deleted
        self.linger = linger

    def process(self) -> None:
        for key, value in self.entries.items():
            self.lm.declare_entry(key, value)

    async def process_live(self, op: coco.LiveComponentOperator) -> None:
        await op.update_full()
        await op.mark_ready()
        with anyio.fail_after(TIMEOUT):
            while sorted(self.seen) != [1, 2]:  # both children ran, now at rest
                await anyio.sleep(0.001)
        await anyio.sleep(0.02)  # past the catch-up, the workers parked
        del self.entries["a"]
        await op.update_full()
        self.deleted.set()
        if self.linger:
            await anyio.sleep_forever()  # (cancelled once the catch-up is over)


async def test_deleting_a_child_at_rest_leaves_the_consumer_idle_and_its_mount_each_ready() -> None:
    seen: list[int] = []
    deleted = anyio.Event()
    holder: dict[str, Any] = {}

    def process(value: int) -> None:
        seen.append(value)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        await coco.mount(DeletesALeaf, lm, seen, deleted, False)
        holder["each"] = await coco.mount_each(process, lm)
        holder["lm"] = lm

    async with coco.App("leaf-deleted", main).update(live=True) as h:
        with anyio.fail_after(TIMEOUT):
            await h.ready()
            await deleted.wait()
            await holder["lm"].settle()
            # nothing runs for the delete: the consumer is idle at once, and
            # holds its mount_each back no more
            await holder["each"].ready()
        await h.stop()
    assert sorted(seen) == [1, 2]
    assert dict(holder["lm"].items()) == {"b": 2}


async def test_a_catch_up_with_a_child_at_rest_deleted_during_it_ends() -> None:
    """The delete of a child at rest while the catch-up still waits for
    another component: once that one is ready, the catch-up ends."""
    seen: list[int] = []
    deleted = anyio.Event()

    def process(value: int) -> None:
        seen.append(value)

    @coco.fn
    async def slow() -> None:
        await deleted.wait()  # the catch-up waits for it meanwhile
        await anyio.sleep(0.02)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        await coco.mount(DeletesALeaf, lm, seen, deleted, True)
        await coco.mount_each(process, lm)
        await coco.mount(slow)

    with anyio.fail_after(TIMEOUT):
        await coco.App("leaf-deleted-in-catch-up", main).update()
    assert deleted.is_set()
    assert sorted(seen) == [1, 2]


async def test_deleting_a_child_that_backs_off_keeps_the_mount_each_unready_until_released() -> (
    None
):
    """A child whose run failed waits out its backoff; its key is deleted:
    the try again is dropped (the queue has nothing left for a moment) and
    the release of what the child held is queued.  The consumer is busy
    until that release is done: the ``mount_each`` is ready only once the
    child's entry is gone downstream."""
    tries: list[tuple[str, int]] = []
    holder: dict[str, Any] = {}
    driver = Driver({"a": 1})

    @coco.fn
    async def process(value: tuple[str, int], out: LiveMap[str, int]) -> None:
        tries.append(value)
        if value[1] == 2:
            raise RuntimeError("fails, then backs off")
        out.declare_entry(value[0], value[1])

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        out: LiveMap[str, int] = await LiveMap.create()
        holder["out"] = out
        producer = await coco.mount(Producer, lm, driver)
        await producer.ready()
        retry = coco.RetryPolicy(max_attempts=5, initial_backoff=60.0, max_backoff=60.0)
        holder["each"] = await coco.mount_each(process, lm.consumer(retry=retry), out)

    try:
        async with coco.App("backoff-deleted", main).update(live=True) as h:
            with anyio.fail_after(TIMEOUT):
                await h.ready()
                assert dict(holder["out"].items()) == {"a": 1}
                await driver.refresh(a=2)
                while ("a", 2) not in tries:  # it failed: its try again backs off
                    await anyio.sleep(0.001)
                await anyio.sleep(0.01)
                await driver.refresh(a=None)  # deleted
                await holder["each"].ready()
                assert dict(holder["out"].items()) == {}
            await h.stop()
    finally:
        driver.close()
    assert tries == [("a", 1), ("a", 2)]
