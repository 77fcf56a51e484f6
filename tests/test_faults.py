"""Fault injection: failing processors, sinks, ``__eq__``, handlers and live
components, cancellation in the middle of a commit, and ``stop()`` under churn.

Each test injects one fault and checks that the runtime reports it where the
contract says, loses nothing, and leaves every map and target consistent.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import anyio
import pytest
from helpers import (
    TIMEOUT,
    Mirror,
    Recorder,
    Remote,
    RemoteLive,
    current_tasks,
    run_app,
    wait_for,
)

import livemap as coco
from livemap import LiveMap, Symbol, TargetBatch

pytestmark = pytest.mark.anyio

REMOTE = (Symbol("RemoteLive"),)


async def settle(lm: LiveMap[Any, Any], *handles: coco.ComponentMountHandle) -> None:
    with anyio.fail_after(TIMEOUT):
        await lm.settle()
        for handle in handles:
            await handle.ready()


@coco.fn
async def produce(lm: LiveMap[Any, Any], entries: dict[Any, Any]) -> None:
    for key, value in entries.items():
        lm.declare_entry(key, value)


async def publish(remote: Remote, lm: LiveMap[Any, Any], entries: dict[Any, Any]) -> None:
    """(Re-)run the producer at ``REMOTE/'producer'`` with ``entries``; wait for it."""

    async def job(op: coco.LiveComponentOperator) -> None:
        h = await op.update("producer", produce, lm, dict(entries))
        await h.ready()

    await remote(job)


# -- a processor that raises ----------------------------------------------------------


async def test_processor_that_raises_is_retried_and_failing_keys_are_visible() -> None:
    mirror = Mirror()
    rec = Recorder()
    attempts: Counter[tuple[str, int]] = Counter()
    holder: dict[str, Any] = {}
    policy = coco.RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.005)

    @coco.fn
    async def process(value: tuple[str, int]) -> None:
        key, n = value
        attempts[value] += 1
        if key == "bad" and n < 3:
            raise ValueError(f"cannot process {key}={n}")
        if key == "flaky" and attempts[value] < 3:
            raise ValueError(f"flaky {key}={n}")
        mirror.target.declare(key, n)

    with Remote() as remote:

        @coco.fn
        async def main() -> None:
            holder["lm"] = lm = await LiveMap.create()
            await coco.mount(RemoteLive, remote)
            async with coco.exception_handler(rec):
                holder["each"] = await coco.mount_each(process, lm.consumer(retry=policy))

        async with coco.App("faults", main).update(live=True) as handle:
            with anyio.fail_after(TIMEOUT):
                await handle.ready()
            lm: LiveMap[str, tuple[str, int]] = holder["lm"]
            each = holder["each"]

            def state(**values: int) -> dict[str, tuple[str, int]]:
                return {key: (key, n) for key, n in values.items()}

            await publish(remote, lm, state(ok=1, flaky=1, bad=1))
            await settle(lm, each)
            assert attempts == {("ok", 1): 1, ("flaky", 1): 3, ("bad", 1): 4}
            stats = lm.stats()
            assert list(stats.failing) == ["bad"]
            assert "cannot process bad=1" in str(stats.failing["bad"])
            assert (stats.pending, stats.in_flight) == (0, 0)
            # only the last failure of the key goes to the handler chain
            [(exc, ctx)] = rec.calls
            assert "cannot process bad=1" in str(exc)
            assert ctx.mount_kind == "mount_each"
            assert ctx.stable_path[-1] == "bad"
            assert mirror.rows == {"ok": 1, "flaky": 1}
            assert handle.stats().retries == 2 + 3
            assert handle.stats().components_failed == 1

            # a change starts over; the key stays failing with the latest error
            await publish(remote, lm, state(ok=1, flaky=1, bad=2))
            await settle(lm, each)
            assert attempts[("bad", 2)] == 4
            assert "cannot process bad=2" in str(lm.stats().failing["bad"])
            assert len(rec.calls) == 2

            # a change that succeeds clears it
            await publish(remote, lm, state(ok=1, flaky=1, bad=3))
            await settle(lm, each)
            assert attempts[("bad", 3)] == 1
            assert lm.stats().failing == {}
            assert mirror.rows == {"ok": 1, "flaky": 1, "bad": 3}

            # a processed value that later fails keeps its committed result
            await publish(remote, lm, state(ok=1, flaky=1, bad=0))
            await settle(lm, each)
            assert list(lm.stats().failing) == ["bad"]
            assert mirror.rows == {"ok": 1, "flaky": 1, "bad": 3}

            # a failing key that is deleted is no longer failing
            await publish(remote, lm, state(ok=1, flaky=1))
            await settle(lm, each)
            assert lm.stats().failing == {}
            assert mirror.rows == {"ok": 1, "flaky": 1}
            assert mirror.rows == mirror.record()


# -- a sink that raises mid-batch -------------------------------------------------------


async def test_sink_raising_mid_batch_loses_nothing_and_is_resent() -> None:
    mirror = Mirror("rows")
    rec = Recorder()
    declared: dict[str, int] = {}

    @coco.fn
    async def producer() -> None:
        for key, value in declared.items():
            mirror.target.declare(key, value)

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(rec):
            await coco.mount(producer)

    app = coco.App("faults", main)

    # 1. the first batch fails after one of its three changes was applied
    declared.update(a=1, b=2, c=3)
    mirror.fail_batches, mirror.fail_after_items = 1, 1
    await run_app(app)
    [(exc, ctx)] = rec.calls
    assert isinstance(exc, coco.TargetApplyError)
    assert isinstance(exc.__cause__, OSError)
    assert "rows" in str(exc) and "/producer" in str(exc)
    assert ctx.stable_path == (Symbol("producer"),)
    assert mirror.record() == {}  # the batch counts as not applied
    assert mirror.target.table_stats().changes == 0

    # 2. the next commit sends the whole batch again
    await run_app(app)
    assert sorted(mirror.batches[-1].upserts) == [("a", 1), ("b", 2), ("c", 3)]
    assert mirror.rows == mirror.record() == {"a": 1, "b": 2, "c": 3}

    # 3. a batch with deletes and updates fails mid-way: the record stays
    declared.clear()
    declared.update(a=1, b=20, d=4)
    mirror.fail_batches, mirror.fail_after_items = 1, 2
    await run_app(app)
    assert len(rec.calls) == 2
    assert mirror.record() == {"a": 1, "b": 2, "c": 3}
    failed = mirror.batches[-1]
    assert sorted(failed.upserts) == [("b", 20), ("d", 4)] and failed.deletes == ["c"]

    # 4. the owner's next commit (with a further change) sends everything that
    # differs from the last applied state: nothing of the failed batch is lost
    declared["b"] = 21
    await run_app(app)
    resent = mirror.batches[-1]
    assert sorted(resent.upserts) == [("b", 21), ("d", 4)] and resent.deletes == ["c"]
    assert mirror.rows == mirror.record() == {"a": 1, "b": 21, "d": 4}
    assert len(rec.calls) == 2


# -- a raising __eq__ ---------------------------------------------------------------------


class RaisingEq:
    """A value whose ``==`` raises (unhashable, like most such values)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __eq__(self, other: object) -> bool:
        raise RuntimeError(f"cannot compare RaisingEq({self.n})")

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RaisingEq({self.n})"


async def test_raising_eq_is_reported_and_the_held_value_stays() -> None:
    rec = Recorder()
    calls: list[tuple[str, Any]] = []
    holder: dict[str, Any] = {}
    mirror = Mirror()

    @coco.fn
    async def process(value: tuple[str, Any]) -> None:
        calls.append(value)
        mirror.target.declare(value[0], value[1])

    with Remote() as remote:

        @coco.fn
        async def main() -> None:
            holder["lm"] = lm = await LiveMap.create()
            async with coco.exception_handler(rec):
                await coco.mount(RemoteLive, remote)
            holder["each"] = await coco.mount_each(process, lm)

        async with coco.App("faults", main).update(live=True) as handle:
            with anyio.fail_after(TIMEOUT):
                await handle.ready()
            lm: LiveMap[str, Any] = holder["lm"]
            first = RaisingEq(1)
            await publish(remote, lm, {"k": ("k", first), "other": ("other", 1)})
            await settle(lm, holder["each"])
            assert len(calls) == 2 and rec.calls == []
            held = lm.get("k")

            # "k" gets a value whose comparison raises; "other" changes normally
            await publish(remote, lm, {"k": ("k", RaisingEq(2)), "other": ("other", 2)})
            await settle(lm, holder["each"])
            [(exc, ctx)] = rec.calls
            assert "'k'" in str(exc)
            assert "cannot compare" in repr(exc.__cause__)
            assert ctx.stable_path == (*REMOTE, "producer")
            assert lm.get("k") is held
            assert lm.get("other") == ("other", 2)
            assert lm.owner_path("k") == (*REMOTE, "producer")
            stats = lm.stats()
            assert stats.eq_errors == 1
            assert sorted(v[0] for v in calls) == ["k", "other", "other"]
            assert mirror.rows["k"] is first and mirror.rows["other"] == 2

            # the owner dropping the key deletes it as usual
            await publish(remote, lm, {"other": ("other", 2)})
            await settle(lm, holder["each"])
            assert dict(lm.items()) == {"other": ("other", 2)}
            assert mirror.rows == {"other": 2}


# -- a producer cancelled in the middle of its commit ----------------------------------------


async def _unmount_during_async_sink(yields: int) -> None:
    """The producer is unmounted while its second commit waits in an async sink."""
    rows: dict[str, int] = {}
    entered = anyio.Event()
    block = {"on": False}

    async def apply(batch: TargetBatch[str, int]) -> None:
        if block["on"]:
            entered.set()
            await anyio.sleep_forever()
        for key in batch.deletes:
            del rows[key]
        rows.update(batch.upserts)

    target: coco.KeyedTarget[str, int] = coco.KeyedTarget("async-rows", apply)

    @coco.fn
    async def producer(entries: dict[str, int]) -> None:
        for key, value in entries.items():
            target.declare(key, value)

    async def scenario(op: coco.LiveComponentOperator) -> None:
        h = await op.update("producer", producer, {"a": 1, "b": 1})
        await h.ready()
        assert rows == {"a": 1, "b": 1}
        block["on"] = True
        await op.update("producer", producer, {"a": 2, "c": 1})
        await entered.wait()
        block["on"] = False
        await op.delete("producer")

    await _run_remote(scenario)
    # none of the cancelled commit was applied; the unmount released the rest
    assert dict(target.items()) == {}
    assert rows == {}


async def _unmount_during_conflict_report(yields: int) -> None:
    """The producer's first commit is applied to the map, then reports a
    conflict through a slow handler; the producer is unmounted meanwhile."""
    in_handler = anyio.Event()
    holder: dict[str, LiveMap[str, int]] = {}

    async def slow_handler(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        in_handler.set()
        await anyio.sleep(TIMEOUT)

    @coco.fn
    async def owner(lm: LiveMap[str, int]) -> None:
        lm.declare_entry("taken", 0)

    @coco.fn
    async def producer(lm: LiveMap[str, int]) -> None:
        lm.declare_entry("new", 1)
        lm.declare_entry("taken", 2)

    async def scenario(op: coco.LiveComponentOperator) -> None:
        lm = holder["lm"]
        h = await op.update("owner", owner, lm)
        await h.ready()
        async with coco.exception_handler(slow_handler):
            await op.update("producer", producer, lm)
        await in_handler.wait()
        await op.delete("producer")

    await _run_remote(scenario, holder)
    lm = holder["lm"]
    # whether or not the commit landed, nothing may stay owned by the unmounted producer
    assert dict(lm.items()) == {"taken": 0}
    assert lm.owner_path("new") is None
    assert lm.stats().entries == 1


async def _rerun_during_conflict_report(yields: int) -> None:
    """As above, but the producer is re-run (superseding the reporting run)
    with no declarations at all: its latest commit owns nothing."""
    in_handler = anyio.Event()
    holder: dict[str, LiveMap[str, int]] = {}

    async def slow_handler(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        in_handler.set()
        await anyio.sleep(TIMEOUT)

    @coco.fn
    async def owner(lm: LiveMap[str, int]) -> None:
        lm.declare_entry("taken", 0)

    @coco.fn
    async def producer(lm: LiveMap[str, int], keys: list[str]) -> None:
        for key in keys:
            lm.declare_entry(key, 1)

    async def scenario(op: coco.LiveComponentOperator) -> None:
        lm = holder["lm"]
        h = await op.update("owner", owner, lm)
        await h.ready()
        async with coco.exception_handler(slow_handler):
            await op.update("producer", producer, lm, ["new", "taken"])
        await in_handler.wait()
        h = await op.update("producer", producer, lm, [])
        await h.ready()

    await _run_remote(scenario, holder)
    lm = holder["lm"]
    assert dict(lm.items()) == {"taken": 0}
    assert lm.owner_path("new") is None


async def _unmount_while_commit_takes_the_lock(yields: int) -> None:
    """The producer's first commit is taking the target's lock when it is unmounted."""
    rows: dict[str, int] = {}

    def apply(batch: TargetBatch[str, int]) -> None:
        for key in batch.deletes:
            del rows[key]
        rows.update(batch.upserts)

    target: coco.KeyedTarget[str, int] = coco.KeyedTarget("locked-rows", apply)

    @coco.fn
    async def producer() -> None:
        target.declare("k", 1)

    async def scenario(op: coco.LiveComponentOperator) -> None:
        await op.update("producer", producer)
        for _ in range(yields):
            await anyio.sleep(0)
        await op.delete("producer")
        await anyio.sleep(0.01)

    await _run_remote(scenario)
    assert dict(target.items()) == {}, f"entry left behind after {yields} yields"
    assert rows == {}
    assert target.owner_path("k") is None


async def _run_remote(scenario: Any, holder: dict[str, Any] | None = None) -> None:
    box = holder if holder is not None else {}
    with Remote() as remote:

        @coco.fn
        async def main() -> None:
            box["lm"] = await LiveMap.create()
            await coco.mount(RemoteLive, remote)

        async with coco.App("faults", main).update(live=True) as handle:
            with anyio.fail_after(TIMEOUT):
                await handle.ready()
            await remote(scenario)


@pytest.mark.parametrize(
    "scenario",
    [
        _unmount_during_async_sink,
        _unmount_during_conflict_report,
        _rerun_during_conflict_report,
        _unmount_while_commit_takes_the_lock,
    ],
    ids=["async-sink", "conflict-report", "rerun-conflict-report", "lock"],
)
async def test_producer_cancelled_mid_commit_leaves_all_or_nothing(scenario: Any) -> None:
    """A producer whose commit is interrupted by its unmount: the map or target
    holds either the whole commit or none of it, and after the unmount nothing
    the producer declared is left.  Each scenario runs five times (the lock
    scenario unmounts after 0 to 4 yields, to land in each step of the commit)."""
    for yields in range(5):
        await scenario(yields)


# -- stop() during heavy churn --------------------------------------------------------------

CHURN_KEYS = [f"k{i}" for i in range(60)]


class ChurnFailure(RuntimeError):
    """What the churn consumer raises for some values (then retries)."""


class ChurnLog:
    """Per producer slot: its latest committed declarations and which of them
    that commit rejected (another producer owned the key)."""

    def __init__(self) -> None:
        self.declared: dict[int, dict[str, tuple[int, int, str]]] = {}
        self.rejected: dict[int, set[str]] = {}
        self.conflicts = 0
        self.failures = 0
        self.runs = 0

    def handler(self, exc: BaseException, ctx: coco.ExceptionContext) -> None:
        if isinstance(exc, ChurnFailure):
            self.failures += 1
            return
        if not isinstance(exc, coco.KeyConflictError) or ctx.stable_path[0] != "churn":
            raise exc
        self.rejected[ctx.stable_path[1]].add(exc.key)
        self.conflicts += 1


class Churn:
    """A live producer re-running as fast as it can with random declarations
    (overlapping other producers' keys, so conflicts are reported too)."""

    def __init__(self, lm: LiveMap[str, tuple[int, int, str]], slot: int, seed: int, log: ChurnLog):
        self.lm = lm
        self.slot = slot
        self.rng = random.Random(seed)
        self.log = log

    async def process(self) -> None:
        keys = self.rng.sample(CHURN_KEYS, self.rng.randint(0, 25))
        declared: dict[str, tuple[int, int, str]] = {}
        for i, key in enumerate(keys):
            declared[key] = (self.slot, self.rng.randint(0, 3), key)
            self.lm.declare_entry(key, declared[key])
            if i % 8 == 7:
                await anyio.sleep(0)  # a run can be cancelled half-way
        # From here to the end of the commit (applying the declarations to the
        # map, then reporting its conflicts to the synchronous handler) nothing
        # waits: either all of it happens before stop() cancels the run, or none.
        self.log.declared[self.slot] = declared
        self.log.rejected[self.slot] = set()
        self.log.runs += 1

    async def process_live(self, op: coco.LiveComponentOperator) -> None:
        await op.update_full()
        await op.mark_ready()
        while True:
            await op.update_full()
            await anyio.sleep(0)


async def churn_then_stop(seed: int, churn_for: float) -> tuple[int, int, int, int]:
    """Three churning producers and a consumer (retrying the values it fails
    on); stop the run after ``churn_for`` seconds of churn, then check what is
    left.  Returns (producer runs, conflicts, failed tries, consumer calls).
    (Under churn this fast a failing key's retry is mostly cut short by a
    newer value, so few keys fail for good: the failed tries are counted.)"""
    log = ChurnLog()
    holder: dict[str, Any] = {}
    mirror = Mirror()
    processed = [0]
    failed_tries = [0]

    @coco.fn
    async def process(value: tuple[int, int, str]) -> None:
        processed[0] += 1
        if value[1] % 2:
            await anyio.sleep(0)
        if value[1] == 3:
            failed_tries[0] += 1
            raise ChurnFailure(f"cannot process {value!r}")
        mirror.target.declare(value[2], value)

    @coco.fn
    async def main() -> None:
        holder["lm"] = lm = await LiveMap.create()
        for slot in range(3):
            path = coco.component_subpath("churn", slot)
            await coco.mount(path, Churn, lm, slot, seed + slot, log)
        retry = coco.RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.002)
        await coco.mount_each(process, lm.consumer(concurrency=4, retry=retry))

    tasks_before = len(current_tasks())
    app = coco.App(coco.AppConfig("churn", exception_handler=log.handler), main)
    async with app.update(live=True):
        # (never quiescent while churning: wait for the work itself, not ready());
        # heavy churn first, then stop at a random moment of it
        await wait_for(
            lambda: (
                processed[0] > 30 and log.runs > 30 and log.conflicts > 0 and len(log.declared) == 3
            )
        )
        await anyio.sleep(churn_for)
    # the block's exit has stopped the run: nothing of it may still be running
    assert len(current_tasks()) == tasks_before
    lm: LiveMap[str, tuple[int, int, str]] = holder["lm"]
    assert not lm.stats().consumer
    # the map is exactly what its owners committed last: each entry is its
    # owner's latest declaration, and every key a producer declared last is
    # there, its own or held by another producer that declares it too (the
    # claim waits; a key whose owner let it go passed to its claimant)
    owned: dict[int, dict[str, tuple[int, int, str]]] = {slot: {} for slot in range(3)}
    for key, value in lm.items():
        owner = lm.owner_path(key)
        assert owner is not None and owner[:1] == ("churn",), (key, owner)
        owned[owner[1]][key] = value
        assert log.declared[owner[1]].get(key) == value, (key, owner)
    for slot in range(3):
        for key in log.declared[slot]:
            holder = lm.owner_path(key)
            assert holder is not None, (slot, key)
            assert key in log.declared[holder[1]], (slot, key, holder)
    assert lm.stats().entries == sum(len(v) for v in owned.values())
    # the consumer's target is consistent with what its sink applied
    assert mirror.rows == mirror.record()
    return log.runs, log.conflicts, failed_tries[0], processed[0]


async def test_stop_during_heavy_churn_leaves_no_task_and_a_consistent_map() -> None:
    rng = random.Random(1234)
    churned = [await churn_then_stop(100 * n, rng.uniform(0.01, 0.08)) for n in range(6)]
    print(f"churn rounds (producer runs, conflicts, failed tries, consumer calls): {churned}")
    # the churn was heavy: many runs, conflicts, failed tries and consumer
    # calls in every round
    for runs, conflicts, failed, calls in churned:
        assert runs > 30 and conflicts > 0 and failed > 0 and calls > 30, churned


# -- a process_live that raises --------------------------------------------------------------


@pytest.mark.parametrize("when", ["before_ready", "after_ready"])
async def test_process_live_that_raises_is_reported_and_the_rest_goes_on(when: str) -> None:
    rec = Recorder()
    holder: dict[str, Any] = {}
    seen: list[Any] = []

    class Failing:
        def __init__(self, lm: LiveMap[str, int]) -> None:
            self.lm = lm

        async def process(self) -> None:
            self.lm.declare_entry("from_process", 1)

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.update_full()
            if when == "after_ready":
                await op.mark_ready()
            await anyio.sleep(0)
            raise RuntimeError("process_live broke")

    @coco.fn
    async def process(value: int) -> None:
        seen.append(value)

    with Remote() as remote:

        @coco.fn
        async def main() -> None:
            holder["lm"] = lm = await LiveMap.create()
            async with coco.exception_handler(rec):
                holder["failing"] = await coco.mount(Failing, lm)
            await coco.mount(RemoteLive, remote)
            holder["each"] = await coco.mount_each(process, lm)

        async with coco.App("faults", main).update(live=True) as handle:
            with anyio.fail_after(TIMEOUT):
                await handle.ready()  # not held up by the failed component
                await holder["failing"].ready()
            lm: LiveMap[str, int] = holder["lm"]
            [(exc, ctx)] = rec.calls
            assert str(exc) == "process_live broke"
            assert ctx.mount_kind == "process_live"
            assert ctx.stable_path == (Symbol("Failing"),)
            assert "Failing" in ctx.processor_name
            assert holder["failing"].exception is exc
            assert handle.stats().components_failed == 1
            # what it committed stays; the app goes on
            await publish(remote, lm, {"later": 2})
            await settle(lm, holder["each"])
            assert dict(lm.items()) == {"from_process": 1, "later": 2}
            assert sorted(seen) == [1, 2]

    # the same in catch-up mode: the run ends (the failed component counts as ready)
    rec.calls.clear()
    seen.clear()

    @coco.fn
    async def main_once() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        async with coco.exception_handler(rec):
            await coco.mount(Failing, lm)
        await coco.mount_each(process, lm)

    stats = await run_app(coco.App("faults-once", main_once))
    assert [str(e) for e, _ in rec.calls] == ["process_live broke"]
    assert stats.components_failed == 1
    assert seen == [1]


async def test_process_failing_inside_update_full_is_reported_not_raised() -> None:
    rec = Recorder()
    holder: dict[str, Any] = {}
    outcome: list[str] = []

    class Flaky:
        def __init__(self, lm: LiveMap[str, int]) -> None:
            self.lm = lm
            self.runs = 0

        def process(self) -> None:
            self.runs += 1
            self.lm.declare_entry("n", self.runs)
            if self.runs == 2:
                raise ValueError("second run failed")

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.update_full()
            await op.update_full()  # fails: reported, the first run's entry stays
            outcome.append(repr(dict(self.lm.items())))
            await op.update_full()
            outcome.append(repr(dict(self.lm.items())))
            await op.mark_ready()

    @coco.fn
    async def main() -> None:
        holder["lm"] = lm = await LiveMap.create()
        async with coco.exception_handler(rec):
            await coco.mount(Flaky, lm)

    await run_app(coco.App("faults", main))
    assert outcome == ["{'n': 1}", "{'n': 3}"]
    [(exc, ctx)] = rec.calls
    assert str(exc) == "second run failed"
    assert ctx.stable_path == (Symbol("Flaky"),)


# -- an exception handler that raises --------------------------------------------------------


async def test_exception_handler_that_raises_passes_on_and_nothing_breaks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outer = Recorder()
    results: list[Any] = []
    holder: dict[str, Any] = {}
    mirror = Mirror()

    def broken_handler(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        raise LookupError(f"handler broke on {ctx.path}")

    async def broken_async_handler(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        await anyio.sleep(0)
        raise KeyError(f"async handler broke on {ctx.path}")

    @coco.fn
    async def bad() -> None:
        raise ValueError("component failed")

    @coco.fn
    async def good() -> None:
        mirror.target.declare("good", 1)

    @coco.fn
    async def process(value: tuple[str, int]) -> None:
        if value[0] == "poison":
            raise ValueError("poisoned entry")
        mirror.target.declare(value[0], value[1])

    with Remote() as remote:

        @coco.fn
        async def main() -> None:
            holder["lm"] = lm = await LiveMap.create()
            async with coco.exception_handler(outer):
                async with coco.exception_handler(broken_handler):
                    h = await coco.mount(bad)
                    holder["each"] = await coco.mount_each(process, lm)
                async with coco.exception_handler(broken_async_handler):
                    h2 = await coco.mount(coco.component_subpath("bad2"), bad)
            await coco.mount(good)
            await coco.mount(RemoteLive, remote)
            for handle in (h, h2):
                try:
                    with anyio.fail_after(TIMEOUT):
                        await handle.ready()
                except Exception as exc:
                    results.append(exc)

        async with coco.App("faults", main).update(live=True) as handle:
            with anyio.fail_after(TIMEOUT):
                await handle.ready()
            lm: LiveMap[str, tuple[str, int]] = holder["lm"]
            # what the raising handlers raised went to the next handler out ...
            assert sorted((type(e).__name__, c.path) for e, c in outer.calls) == [
                ("KeyError", "/'bad2'"),
                ("LookupError", "/bad"),
            ]
            assert "handler broke on /bad" in str(outer.of_type(LookupError)[0][0])
            # ... and is what ready() of the failing component raises
            assert sorted(type(e).__name__ for e in results) == ["KeyError", "LookupError"]
            assert mirror.rows == {"good": 1}

            # in a consumer: the key whose handler raised counts as failing, the
            # other keys and later changes go on
            await publish(remote, lm, {"poison": ("poison", 1), "fine": ("fine", 1)})
            with anyio.fail_after(TIMEOUT):
                await lm.settle()
            assert list(lm.stats().failing) == ["poison"]
            await publish(remote, lm, {"poison": ("poison", 1), "fine": ("fine", 2)})
            with anyio.fail_after(TIMEOUT):
                await lm.settle()
            assert mirror.rows == {"good": 1, "fine": 2}
            assert any("/'poison'" in c.path for _, c in outer.calls)

    # the outermost (app-wide) handler raising: logged at ERROR, the run still ends
    def raising_app_handler(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        raise RuntimeError("app handler broke")

    @coco.fn
    async def main_once() -> None:
        await coco.mount(bad)
        await coco.mount(good)

    with caplog.at_level("ERROR", logger="livemap"):
        await run_app(coco.App(coco.AppConfig("faults", raising_app_handler), main_once))
    assert any(
        "/bad" in r.getMessage() and "app handler broke" in r.getMessage() for r in caplog.records
    )
