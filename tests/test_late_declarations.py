"""A declaration into a run that has ended raises ``NotInComponentError`` at
the call, naming the map (or target) and the component; it is never
silently dropped."""

from __future__ import annotations

import contextvars
import threading
from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, run_app

import livemap as coco
from livemap import KeyedTarget, LiveMap

pytestmark = pytest.mark.anyio


async def test_a_declaration_from_a_context_copied_in_a_run_raises_after_it() -> None:
    held: dict[str, Any] = {}
    target: KeyedTarget[str, int] = KeyedTarget("rows", lambda batch: None)

    @coco.fn
    async def producer(lm: LiveMap[str, int]) -> None:
        lm.declare_entry("a", 1)
        target.declare("a", 1)
        held["context"] = contextvars.copy_context()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        held["lm"] = lm
        await coco.mount(producer, lm)

    await run_app(coco.App("late", main))
    lm = held["lm"]
    with pytest.raises(coco.NotInComponentError) as caught:
        held["context"].run(lm.declare_entry, "b", 2)
    message = str(caught.value)
    assert lm.name in message and "/producer" in message
    with pytest.raises(coco.NotInComponentError, match="rows") as caught_target:
        held["context"].run(target.declare, "b", 2)
    assert "/producer" in str(caught_target.value)
    assert "b" not in lm and "b" not in target
    assert lm.get("a") == 1


async def test_a_thread_started_by_a_run_cannot_declare_after_the_run() -> None:
    held: dict[str, Any] = {}
    committed = threading.Event()
    errors: list[BaseException] = []
    done = threading.Event()

    def late(lm: LiveMap[str, int]) -> None:
        committed.wait(TIMEOUT)
        try:
            lm.declare_entry("late", 1)
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    @coco.fn
    async def producer(lm: LiveMap[str, int]) -> None:
        lm.declare_entry("a", 1)
        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(late, lm), daemon=True).start()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        held["lm"] = lm
        h = await coco.mount(producer, lm)
        await h.ready()
        committed.set()
        with anyio.fail_after(TIMEOUT):
            while not done.is_set():
                await anyio.sleep(0.001)

    await run_app(coco.App("thread", main))
    assert len(errors) == 1 and isinstance(errors[0], coco.NotInComponentError)
    assert "late" not in held["lm"]


async def test_a_run_that_is_cancelled_ends_too() -> None:
    held: dict[str, Any] = {}
    started = anyio.Event()

    class Producer:
        def __init__(self, lm: LiveMap[str, int]) -> None:
            self.lm = lm

        async def process(self) -> None:
            held["context"] = contextvars.copy_context()
            started.set()
            await anyio.sleep(TIMEOUT)

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.mark_ready()
            await op.update_full()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        held["lm"] = lm
        await coco.mount(Producer, lm)

    async with coco.App("cancelled", main).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await started.wait()
        del handle  # leaving the block stops the run: the producer's run is cancelled
    with pytest.raises(coco.NotInComponentError):
        held["context"].run(held["lm"].declare_entry, "x", 1)


@pytest.mark.parametrize("sync", [False, True])
async def test_a_mount_each_child_run_that_left_nothing_ends_too(sync: bool) -> None:
    """A ``mount_each`` child's run that declares nothing is over when its
    function returns, although its worker goes on with other keys: a
    declaration from a context it copied raises, and never lands in the
    run of another key."""
    held: dict[str, Any] = {}
    target: KeyedTarget[str, int] = KeyedTarget("late-each", lambda batch: None)

    def body(value: int) -> None:
        if value == 1:
            held["context"] = contextvars.copy_context()

    async def process_async(value: int) -> None:
        body(value)

    process: Any = coco.fn(body) if sync else coco.fn(process_async)

    @coco.fn
    async def produce(lm: LiveMap[str, int]) -> None:
        for i in range(1, 6):
            lm.declare_entry(f"k{i}", i)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        held["lm"] = lm
        await coco.mount(produce, lm)
        await (await coco.mount_each(process, lm.consumer(concurrency=1))).ready()

    await run_app(coco.App(f"late-each-{sync}", main))
    with pytest.raises(coco.NotInComponentError, match="late-each") as caught:
        held["context"].run(target.declare, "late", 1)
    assert "'k1'" in str(caught.value)  # the run's own path: the key's
    assert "late" not in target


def _step_in(context: contextvars.Context, make: Any) -> None:
    """Start the coroutine ``make()`` makes in ``context``: its first step,
    up to its first await (where each of these calls checks its run)."""
    coro = context.run(make)
    try:
        context.run(coro.send, None)
    finally:
        coro.close()


def _late_calls(lm: LiveMap[str, int]) -> dict[str, Any]:
    def child() -> None:
        lm.declare_entry("from-late-child", 1)

    return {
        "LiveMap.create()": LiveMap.create,
        "mount()": lambda: coco.mount(coco.fn(child)),
        "use_mount()": lambda: coco.use_mount(coco.fn(child)),
        "mount_each()": lambda: coco.mount_each(coco.fn(lambda v: None), [("k", 1)]),
    }


@pytest.mark.parametrize("what", ["LiveMap.create()", "mount()", "use_mount()", "mount_each()"])
async def test_creating_or_mounting_from_a_context_that_outlived_its_run_raises(
    what: str,
) -> None:
    """Not only declarations: a map created, or a child mounted, from a task
    or thread that outlived its run would belong to a run that has
    committed (a map nobody retires, a child nobody commits)."""
    held: dict[str, Any] = {}
    seen: list[str] = []

    @coco.fn
    async def producer(lm: LiveMap[str, int]) -> None:
        lm.declare_entry("a", 1)
        held["context"] = contextvars.copy_context()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        held["lm"] = lm
        await (await coco.mount(producer, lm)).ready()
        make = _late_calls(lm)[what]
        with pytest.raises(coco.NotInComponentError) as caught:
            _step_in(held["context"], make)
        seen.append(str(caught.value))

    await run_app(coco.App(f"late-{what}", main))
    assert len(seen) == 1 and what in seen[0] and "/producer" in seen[0]
    assert "outlived" in seen[0]
    assert dict(held["lm"].snapshot()) == {"a": 1}  # nothing mounted declared into it


async def test_a_map_created_from_an_ended_per_entry_run_raises_and_gives_the_key_nothing() -> None:
    """A ``mount_each`` child's run that left nothing behind has no
    component: a map created from a context it copied, once it is over,
    must neither succeed nor make one for it."""
    held: dict[str, Any] = {}
    runs: list[int] = []
    errors: list[str] = []

    @coco.fn
    def process(value: int) -> None:
        runs.append(value)
        if value == 1:
            held["context"] = contextvars.copy_context()

    @coco.fn
    async def produce(lm: LiveMap[str, int], version: int) -> None:
        lm.declare_entry("k1", version)
        lm.declare_entry("k2", 10 + version)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        await coco.mount(produce, lm, held.get("version", 0))
        handle = await coco.mount_each(process, lm.consumer(concurrency=1))
        await handle.ready()
        if "context" in held and not errors:
            with pytest.raises(coco.NotInComponentError) as caught:
                _step_in(held["context"], LiveMap.create)
            errors.append(str(caught.value))

    app = coco.App("late-each-create", main)
    held["version"] = 1
    await run_app(app)
    assert errors and "'k1'" in errors[0] and "LiveMap.create()" in errors[0]
    assert sorted(runs) == [1, 11]
    held["version"] = 2  # the key runs again, as a child at rest does
    await run_app(app)
    assert sorted(runs) == [1, 2, 11, 12]
