"""The work-queue (``WorkQueue``) owns a key's whole consumer-side life:
waiting, in flight, dirty, never twice at once, the latest run only,
cleanups kept, retry backoff and its cancellation by newer work, settle
waiters; and what that gives through the public API (``settle()`` counts a
key waiting out its backoff, or waiting in the queue during the initial
scan; a newer value cuts a backoff short; a re-mount never runs a key
beside a try again of the mount_each it replaced; a try cancelled at any of
its awaits leaves the key consistent)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, wait_for

import livemap as coco
from livemap import KeyedTarget, LiveMap, RetryPolicy
from livemap._feed._queue import DELIVER_WORK, Kind, Work, WorkQueue

pytestmark = pytest.mark.anyio


RUN = Kind("run")
HELD = Kind("another run")
CLEANUP = Kind("cleanup", replaceable=False)


def Run(name: str) -> Work:
    return (RUN, name)


def Held(name: str) -> Work:
    return (HELD, name)


def Cleanup(name: str) -> Work:
    return (CLEANUP, name)


def take_all(queue: WorkQueue[str]) -> list[tuple[str, str]]:
    """Take and finish every work, one at a time, in the queue's order."""
    out = []
    while (taken := queue.take()) is not None:
        key, work = taken
        out.append((key, work[1]))
        queue.done(key)
    return out


def test_a_key_in_flight_is_not_taken_again_and_goes_first_when_done() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("k", Run("k1"))
    assert queue.take() == ("k", queue.in_flight["k"])
    queue.add("k", Run("k2"))  # changed while in flight: waits for it
    assert queue.take() is None
    queue.add("j", Run("j1"))
    taken = queue.take()
    assert taken is not None and taken[0] == "j"
    queue.add("m", Run("m1"))
    queue.done("k")  # its next work comes before newer keys
    assert [k for k, _ in take_all(queue)] == ["k", "m"]
    queue.done("j")
    assert not queue.in_flight and not queue.waiting and not queue.order


def test_a_newer_run_replaces_the_waiting_one_but_not_a_cleanup() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("k", Run("old"))
    queue.add("k", Run("newer"))
    queue.add("k", Cleanup("cleanup"))
    queue.add("k", Run("after"))
    queue.add("k", Run("latest"))
    assert len(queue) == 1 and list(queue.order) == ["k"]
    assert take_all(queue) == [("k", "newer"), ("k", "cleanup"), ("k", "latest")]


def test_discard_drops_the_waiting_run_and_keeps_the_cleanup() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("k", Cleanup("cleanup"))
    queue.add("k", Held("run"))
    queue.add("j", Held("run"))
    assert queue.latest("k") == Held("run")
    queue.discard("k")
    queue.discard("j")
    assert "j" not in queue.waiting and list(queue.order) == ["k"]
    assert take_all(queue) == [("k", "cleanup")]


async def test_a_failed_try_backs_off_then_waits_again_with_its_count() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("k", Run("first"))
    assert queue.take() is not None
    delays: list[int] = []

    def delay(failed: int) -> float:
        delays.append(failed)
        return 0.0

    again = Run("again")
    assert queue.retry("k", again, 3, delay)
    queue.done("k")
    assert queue.backing_off("k") is again and not queue.order
    assert queue.attempts == {"k": 1}
    queue.due(anyio.current_time())
    assert not queue.backoff and queue.attempts == {"k": 1}  # the count goes on
    assert queue.take() == ("k", again)
    third = Run("third")
    assert queue.retry("k", third, 3, delay)
    queue.done("k")
    queue.due(anyio.current_time())
    assert queue.take() == ("k", third)
    assert not queue.retry("k", Run("fourth"), 3, delay)  # 3 tries in all: given up
    queue.done("k")
    assert delays == [1, 2]
    assert not queue.attempts and not queue.backoff and not queue.waiting


async def test_newer_work_cuts_a_backoff_short_with_a_fresh_count() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("k", Run("first"))
    assert queue.take() is not None
    assert queue.retry("k", Run("again"), 5, lambda failed: 600.0)
    queue.done("k")
    assert queue.backing_off("k") is not None
    queue.add("k", Run("newer"))
    assert queue.backing_off("k") is None and not queue.attempts
    assert take_all(queue) == [("k", "newer")]
    queue.due(anyio.current_time() + 1000.0)  # nothing left to come back
    assert queue.take() is None


def test_a_try_that_is_over_leaves_no_count_behind() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.attempts["k"] = 2  # a try again in flight...
    queue.in_flight["k"] = Run("again")
    queue.done("k")  # ...that did not fail again (or was superseded)
    assert not queue.attempts


async def test_a_key_waiting_out_its_backoff_counts_for_settle() -> None:
    """``settle()`` called while a key waits out the backoff before its try
    again returns only once that try is over."""
    tries: list[int] = []
    holder: dict[str, Any] = {}

    @coco.fn
    async def produce(lm: LiveMap[str, int]) -> None:
        lm.declare_entry("k", 1)

    @coco.fn
    async def consume(value: int) -> None:
        tries.append(value)
        if len(tries) == 1:
            raise OSError("the first try fails")
        await anyio.sleep(0)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        holder["lm"] = lm
        await coco.mount(coco.component_subpath("p"), produce, lm)
        retry = RetryPolicy(max_attempts=3, initial_backoff=0.3, max_backoff=0.3)
        holder["each"] = await coco.mount_each(
            coco.component_subpath("c"), consume, lm.consumer(retry=retry)
        )

    async with coco.App("backoff settles", main).update(live=True) as handle:
        await wait_for(lambda: tries == [1])
        queue = holder["each"]._component.host.pool.queue
        await wait_for(lambda: "k" in queue.backoff)
        with anyio.fail_after(TIMEOUT):
            await holder["lm"].settle()
        assert tries == [1, 1]
        assert holder["lm"].stats().failing == {}
        assert not queue.backoff and not queue.attempts
        assert handle.stats().retries == 1
        await handle.stop()


async def test_a_remount_never_runs_a_key_beside_a_try_again_of_the_one_replaced() -> None:
    """The parent re-mounts the consumer at another subpath while a key of
    the first one waits out a short backoff: the replaced mount_each tries
    the key no more, so the key never runs in both at once."""
    active: dict[str, int] = {}
    overlaps: list[str] = []
    first_tries: list[str] = []
    second_runs: list[str] = []
    done = anyio.Event()

    def enter(key: str) -> None:
        active[key] = active.get(key, 0) + 1
        if active[key] > 1:
            overlaps.append(key)

    @coco.fn
    async def first(value: str) -> None:
        first_tries.append(value)
        enter(value)
        try:
            await anyio.sleep(0)
            raise OSError("the first processor always fails")
        finally:
            active[value] -= 1

    @coco.fn
    async def second(value: str) -> None:
        enter(value)
        try:
            await anyio.sleep(0.3)  # several of the old backoffs
            second_runs.append(value)
        finally:
            active[value] -= 1

    @coco.fn
    async def host(lm: LiveMap[str, str], n: int) -> None:
        if n == 0:
            retry = RetryPolicy(max_attempts=100, initial_backoff=0.02, max_backoff=0.02)
            sub = coco.component_subpath("each", 0)
            await coco.mount_each(sub, first, lm.consumer(retry=retry))
        else:
            await coco.mount_each(coco.component_subpath("each", 1), second, lm)

    class Driver:
        def __init__(self, lm: LiveMap[str, str]) -> None:
            self.lm = lm

        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.mark_ready()
            await wait_for(lambda: self.lm.stats().entries == 1)
            await op.update("consumer", host, self.lm, 0)
            await wait_for(lambda: len(first_tries) >= 2)  # retrying
            h = await op.update("consumer", host, self.lm, 1)
            with anyio.fail_after(TIMEOUT):
                await h.ready()
                await self.lm.settle()
            tried = len(first_tries)
            await anyio.sleep(0.1)  # time for several more backoffs to end
            assert len(first_tries) == tried
            done.set()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, str] = await LiveMap.create()
        lm.declare_entry("k", "k")
        await coco.mount(Driver, lm)

    config = coco.AppConfig("backoff remount", exception_handler=lambda e, c: None)
    handle = coco.App(config, main).update(live=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(handle.result)
        with anyio.fail_after(TIMEOUT):
            await done.wait()
            await handle.stop()
    assert second_runs == ["k"]
    assert overlaps == []


async def test_a_key_waiting_out_its_backoff_holds_no_worker() -> None:
    """With one worker, the other keys run while a failed key waits out a
    long backoff: the try again waits in the queue, not in a worker."""
    done: list[int] = []
    tries: list[int] = []
    holder: dict[str, Any] = {}

    @coco.fn
    async def produce(lm: LiveMap[int, int]) -> None:
        for k in range(5):
            lm.declare_entry(k, k)

    @coco.fn
    async def consume(value: int) -> None:
        if value == 0:
            tries.append(value)
            if len(tries) == 1:
                raise OSError("the first try fails")
        await anyio.sleep(0)
        done.append(value)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[int, int] = await LiveMap.create()
        holder["lm"] = lm
        producer = await coco.mount(coco.component_subpath("p"), produce, lm)
        await producer.ready()
        retry = RetryPolicy(max_attempts=2, initial_backoff=600.0, max_backoff=600.0)
        await coco.mount_each(
            coco.component_subpath("c"), consume, lm.consumer(concurrency=1, retry=retry)
        )

    async with coco.App("backoff frees the worker", main).update(live=True) as handle:
        await wait_for(lambda: sorted(done) == [1, 2, 3, 4])  # far less than 600 s
        assert tries == [0]
        assert holder["lm"].stats().failing == {}  # still to be tried again
        await handle.stop()


# -- the one queue: a consumer's changes and a pool's runs in one place --------


def test_a_change_to_a_key_in_flight_waits_behind_its_try_after_newer_keys() -> None:
    """A change (DELIVER) to a key in flight makes it dirty: it waits behind
    the try and, once that is done, is taken after the keys waiting already
    (a key that keeps changing does not starve the others); a cleanup
    waiting behind a try goes first."""
    queue: WorkQueue[str] = WorkQueue()
    queue.changed()
    queue.add("k", DELIVER_WORK)
    assert queue.take() == ("k", DELIVER_WORK)
    queue.changed()
    queue.add("k", DELIVER_WORK)  # dirty: waits behind its try
    queue.add("j", DELIVER_WORK)
    assert list(queue.order) == ["j"] and "k" in queue.waiting
    queue.done("k")
    assert list(queue.order) == ["j", "k"]  # after the newer key
    for key in ("j", "k"):
        assert queue.take() == (key, DELIVER_WORK)
        queue.done(key)
    assert queue.idle()
    queue.add("c", Run("run"))
    assert queue.take() is not None
    queue.add("c", Cleanup("cleanup"))
    queue.add("d", Run("d"))
    queue.done("c")
    assert list(queue.order) == ["c", "d"]  # the rest of its work goes first


async def test_settle_needs_the_try_that_reads_a_change_made_before_it() -> None:
    """What ``settle()`` waits for, per key: a waiting change needs the next
    try; a try in flight with no change behind it covers what it read; a
    try that only waited for the key's turn (``covers=False``) covers
    nothing; a key whose work is dropped needs no try."""
    queue: WorkQueue[str] = WorkQueue()
    queue.changed()
    queue.add("a", DELIVER_WORK)
    queue.add("b", DELIVER_WORK)
    assert queue.take() == ("a", DELIVER_WORK)
    queue.changed()
    queue.add("c", DELIVER_WORK)
    need = queue.outstanding()
    assert need == {"a": 1, "b": 2, "c": 2}
    done = anyio.Event()

    async def settle() -> None:
        await queue.settle(need)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(settle)
        await wait_for(lambda: queue.waiters)
        queue.done("a")  # read at change 1: covers "a"
        assert "a" not in need
        assert queue.take() == ("b", DELIVER_WORK)
        queue.done("b", covers=False)  # waited only: "b" still needed
        assert "b" in need
        queue.add("b", DELIVER_WORK)
        assert queue.take() == ("c", DELIVER_WORK)
        queue.done("c")
        assert queue.take() == ("b", DELIVER_WORK)
        assert not done.is_set()
        queue.done("b")
        with anyio.fail_after(TIMEOUT):
            await done.wait()
    queue.add("x", Run("x"))
    need = queue.outstanding()
    assert need == {"x": -1}  # (a run, not a change: any try of it)

    async def settle_x() -> None:
        await queue.settle(need)

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(settle_x)
            await wait_for(lambda: queue.waiters)
            queue.discard("x")  # dropped: nothing to wait for


async def test_a_newer_value_cuts_a_backoff_short_with_a_fresh_count() -> None:
    """A key waits out a long backoff after a failed try; a new value runs at
    once (not after the backoff), with a fresh count of attempts, and
    ``settle()`` returns once it is processed."""
    tries: list[int] = []
    holder: dict[str, Any] = {}
    values = {"k": 1}

    @coco.fn
    async def consume(value: int) -> None:
        tries.append(value)
        await anyio.sleep(0)
        if value == 1:
            raise OSError("1 always fails")

    class Producer:
        def __init__(self, lm: LiveMap[str, int]) -> None:
            self.lm = lm

        def process(self) -> None:
            self.lm.declare_entry("k", values["k"])

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            holder["op"] = op
            await op.update_full()
            await op.mark_ready()
            await anyio.sleep_forever()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        holder["lm"] = lm
        await coco.mount(coco.component_subpath("p"), Producer, lm)
        retry = RetryPolicy(max_attempts=5, initial_backoff=600.0, max_backoff=600.0)
        holder["each"] = await coco.mount_each(
            coco.component_subpath("c"), consume, lm.consumer(retry=retry)
        )

    config = coco.AppConfig("backoff cut short", exception_handler=lambda e, c: None)
    async with coco.App(config, main).update(live=True) as handle:
        await wait_for(lambda: tries == [1])
        queue = holder["each"]._component.host.pool.queue
        await wait_for(lambda: "k" in queue.backoff)
        assert queue.attempts == {"k": 1}
        values["k"] = 2
        with anyio.fail_after(TIMEOUT):  # far less than the 600 s backoff
            await holder["op"].update_full()
            await holder["lm"].settle()
        assert tries == [1, 2]
        assert not queue.backoff and not queue.attempts
        assert holder["lm"].stats().failing == {}
        await handle.stop()


async def test_settle_during_the_initial_scan_counts_the_keys_waiting_in_the_queue() -> None:
    """``settle()`` called while the initial scan is still queueing (it
    paces itself on the queue) waits for every key of the scan, and for a
    change made during the scan, which is processed after the scan's run of
    its key with the newer value."""
    n = 1500
    done: dict[int, int] = {}
    holder: dict[str, Any] = {}
    values = {"bump": 0}

    @coco.fn
    async def consume(value: tuple[int, int]) -> None:
        await anyio.sleep(0.001)
        done[value[0]] = value[1]

    class Producer:
        def __init__(self, lm: LiveMap[int, tuple[int, int]]) -> None:
            self.lm = lm

        def process(self) -> None:
            for i in range(n):
                self.lm.declare_entry(i, (i, values["bump"] if i == n - 1 else 0))

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            holder["op"] = op
            await op.update_full()
            await op.mark_ready()
            await anyio.sleep_forever()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[int, tuple[int, int]] = await LiveMap.create()
        holder["lm"] = lm
        producer = await coco.mount(coco.component_subpath("p"), Producer, lm)
        await producer.ready()
        await coco.mount_each(coco.component_subpath("c"), consume, lm.consumer(concurrency=4))

    async with coco.App("settle in the scan", main).update(live=True) as handle:
        lm = holder.get
        await wait_for(lambda: lm("lm") is not None and lm("lm").active_consumer() is not None)
        consumer = holder["lm"].active_consumer()
        await wait_for(lambda: len(done) > 0)
        assert not consumer.started  # the scan is still under way
        values["bump"] = 1
        await holder["op"].update_full()  # a change during the scan
        assert not consumer.started
        with anyio.fail_after(TIMEOUT):
            await holder["lm"].settle()
        assert len(done) == n
        assert done[n - 1] == 1
        await handle.stop()


@pytest.mark.parametrize("cut", range(4))
@pytest.mark.parametrize("how", ["remount", "stop"])
async def test_a_try_cancelled_at_any_of_its_awaits_leaves_the_key_consistent(
    cut: int, how: str
) -> None:
    """A key's try is cancelled at each of its awaits in turn (before it
    declares, after, in a shielded ``finally``, after that): by a re-mount of
    the mount_each (the key runs again, never beside the cancelled try, and
    the sink ends with the latest value) or by a stop (nothing is left
    running, the sink matches what the target holds)."""
    rows: dict[str, int] = {}

    def apply(batch: Any) -> None:
        for key in batch.deletes:
            rows.pop(key, None)
        for key, value in batch.upserts:
            rows[key] = value

    sink = KeyedTarget[str, int]("rows", apply)
    active: dict[str, int] = {}
    overlaps: list[str] = []
    reached = anyio.Event()
    holder: dict[str, Any] = {"n": 0, "cut": True}

    async def point(i: int) -> None:
        if i == cut and holder["cut"]:
            holder["cut"] = False
            reached.set()
            await anyio.sleep(0.05)  # the cancellation lands here
        await anyio.sleep(0)

    @coco.fn
    async def consume(value: tuple[str, int]) -> None:
        key, n = value
        active[key] = active.get(key, 0) + 1
        if active[key] > 1:
            overlaps.append(key)
        try:
            await point(0)
            sink.declare(key, n)
            await point(1)
        finally:
            with anyio.CancelScope(shield=True):
                await point(2)
                active[key] -= 1
        await point(3)

    @coco.fn
    async def produce(lm: LiveMap[str, tuple[str, int]], n: int) -> None:
        lm.declare_entry("k", ("k", n))

    class Parent:
        async def process(self) -> None:
            lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
            holder["lm"] = lm
            n = holder["n"]
            await coco.mount(produce, lm, n)
            await coco.mount_each(consume, lm.consumer(concurrency=1 + n))

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            holder["op"] = op
            await op.update_full()
            await op.mark_ready()
            await anyio.sleep_forever()

    @coco.fn
    async def main() -> None:
        await coco.mount(Parent)

    config = coco.AppConfig(f"cut {how} {cut}", exception_handler=lambda e, c: None)
    handle = coco.App(config, main).update(live=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(handle.result)
        with anyio.fail_after(TIMEOUT):
            await reached.wait()
            if how == "remount":
                holder["n"] = 1
                await holder["op"].update_full()
                await holder["lm"].settle()
                assert rows == {"k": 1}
            await handle.stop()
    assert overlaps == []
    assert all(count == 0 for count in active.values())
    if how == "stop":
        assert rows in ({}, {"k": 0})
