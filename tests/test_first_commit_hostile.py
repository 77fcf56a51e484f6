"""The first run of a ``mount_each`` child over a feed that made its
component to declare (the common case: it commits on a shorter path than a
run of a component that already exists), made hostile.

Each test breaks one thing that path assumes, or must hand on to the
general one: the sink fails (tried again, or recorded and reported), the
sink raises a ``BaseException``, the commit is cancelled while it waits in
the sink (the key deleted, a newer value, the consumer re-mounted and its
feed scanned again), first runs that mount, create a map or raise, and a
report during the commit that a handler escalates.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from _cores import core_fixture  # noqa: F401  (the ``core`` fixture)
from helpers import TIMEOUT, current_tasks, run_app

import livemap as coco
from livemap import LiveMap, TargetBatch

pytestmark = pytest.mark.anyio

Value = tuple[str, int]  # (key, version)


class Stop(BaseException):
    """Not an ``Exception``: nothing may swallow it."""


class Sink:
    """An async sink keeping ``rows``: the first batch upserting a key of
    ``fail`` raises ``OSError`` (once per key), one of ``stop`` raises
    :class:`Stop`, one of ``block`` waits until ``release`` is set (or it
    is cancelled: the key goes to ``cancelled``)."""

    def __init__(self) -> None:
        self.rows: dict[str, Any] = {}
        self.fail: set[str] = set()
        self.stop: set[str] = set()
        self.block: set[str] = set()
        self.blocked = anyio.Event()
        self.release = anyio.Event()
        self.cancelled: list[str] = []
        self.target: coco.KeyedTarget[str, Any] = coco.KeyedTarget("first", self.apply)

    async def apply(self, batch: TargetBatch[str, Any]) -> None:
        await anyio.sleep(0)
        keys = {key for key, _ in batch.upserts}
        if keys & self.fail:
            self.fail -= keys
            raise OSError("sink down")
        if keys & self.stop:
            self.stop -= keys
            raise Stop()
        held = keys & self.block
        if held:
            self.block -= held
            self.blocked.set()
            try:
                await self.release.wait()
            except anyio.get_cancelled_exc_class():
                self.cancelled.extend(sorted(held))
                raise
        for key in batch.deletes:
            self.rows.pop(key, None)
        self.rows.update(batch.upserts)


def by_name(stats: coco.UpdateStats, fn: Any) -> coco.ComponentStats:
    return stats.by_component[str(fn.__qualname__)]


@coco.fn
async def produce_abc(lm: LiveMap[str, int]) -> None:
    """Declares "a", "b", "c" -> 0, 1, 2."""
    for i, key in enumerate("abc"):
        lm.declare_entry(key, i)


def declarer(sink: Sink) -> Any:
    """A per-entry processor declaring its entry of :func:`produce_abc` into ``sink``."""

    @coco.fn
    async def declare(value: int) -> None:
        sink.target.declare("abc"[value], value)

    return declare


def each_of_abc(declare: Any) -> Any:
    """An app's main function: :func:`produce_abc` into a map, then
    ``mount_each(declare, ...)`` over it."""

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        await (await coco.mount(produce_abc, lm)).ready()
        await coco.mount_each(declare, lm)

    return main


async def test_a_sink_failure_of_a_first_commit_is_tried_again(core: Any) -> None:
    """The first commit of "b" fails in the sink: the retry policy tries
    the run again, which commits; it counts one start and one add, and the
    key is not failing."""
    sink = Sink()
    sink.fail = {"b"}
    holder: dict[str, LiveMap[str, int]] = {}

    declare = declarer(sink)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        holder["lm"] = lm
        await (await coco.mount(produce_abc, lm)).ready()
        retry = coco.RetryPolicy(max_attempts=3, initial_backoff=0.0)
        await coco.mount_each(declare, lm.consumer(retry=retry))

    stats = await run_app(coco.App("first-retried", main))
    assert sink.rows == {"a": 0, "b": 1, "c": 2} == dict(sink.target.items())
    assert holder["lm"].stats().failing == {}
    assert stats.retries == 1
    counted = by_name(stats, declare)
    assert counted.num_adds == 3 and counted.num_errors == 0
    assert counted.num_execution_starts == 3 and counted.num_in_progress == 0


async def test_a_sink_failure_of_a_first_commit_is_recorded_and_reported(core: Any) -> None:
    """Without a retry policy the failed first commit of "b" is a failure:
    reported to the handler, recorded as the key's (``failing``), counted
    as an error; the other keys commit, and the update still ends."""
    sink = Sink()
    sink.fail = {"b"}
    holder: dict[str, LiveMap[str, int]] = {}
    reported: list[BaseException] = []

    def on_error(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        reported.append(exc)

    declare = declarer(sink)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        holder["lm"] = lm
        await (await coco.mount(produce_abc, lm)).ready()
        async with coco.exception_handler(on_error):
            await coco.mount_each(declare, lm)

    stats = await run_app(coco.App("first-failed", main))
    assert [type(e) for e in reported] == [coco.TargetApplyError]
    assert set(holder["lm"].stats().failing) == {"b"}
    assert sink.rows == {"a": 0, "c": 2}
    counted = by_name(stats, declare)
    assert counted.num_adds == 2 and counted.num_errors == 1
    assert counted.num_in_progress == 0
    assert stats.components_failed == 1


async def test_a_base_exception_from_the_sink_of_a_first_commit_ends_the_run() -> None:
    """A ``BaseException`` from the sink during a first commit goes out of
    the update (no handler swallows it) and leaves no task behind."""
    sink = Sink()
    sink.stop = {"b"}

    declare = declarer(sink)
    main = each_of_abc(declare)

    before = current_tasks()
    caught: list[BaseException] = []
    with anyio.fail_after(TIMEOUT):
        try:
            await coco.App("first-stopped", main).update()
        except BaseException as exc:  # (what came out is checked below)
            caught.append(exc)
    leaves: list[BaseException] = []
    stack = list(caught)
    while stack:
        exc = stack.pop()
        inner = getattr(exc, "exceptions", None)  # an exception group's
        if inner is not None:
            stack.extend(inner)
        else:
            leaves.append(exc)
    assert any(type(exc) is Stop for exc in leaves), leaves
    assert "b" not in sink.rows
    assert current_tasks() == before
    # the next update of a new app commits every key
    sink2 = Sink()
    sink.target = sink2.target
    sink.rows = sink2.rows
    await run_app(coco.App("first-after-stop", main))
    assert sink2.rows == {"a": 0, "b": 1, "c": 2}


Scenario = Callable[[coco.LiveComponentOperator, LiveMap[str, Value], Sink], Awaitable[None]]


async def run_scene(name: str, sink: Sink, scenario: Scenario) -> coco.UpdateStats:
    """A live app whose live component runs ``scenario``: a producer "p"
    (its ``produce(lm, state)``) and a consumer "consumer" (``consume(lm,
    round)``: a ``mount_each`` declaring each ``(key, version)`` into the
    sink) are mounted by the scenario itself."""
    done = anyio.Event()
    failure: list[BaseException] = []

    class Scene:
        def __init__(self, lm: LiveMap[str, Value]) -> None:
            self.lm = lm

        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.mark_ready()
            try:
                with anyio.fail_after(TIMEOUT):
                    await scenario(op, self.lm, sink)
            except Exception as exc:
                failure.append(exc)
            finally:
                done.set()

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, Value] = await LiveMap.create()
        await coco.mount(Scene, lm)

    async with coco.App(name, main).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
            await done.wait()
        stats = handle.stats()
        await handle.stop()
    if failure:
        raise failure[0]
    return stats


@coco.fn
async def produce(lm: LiveMap[str, Value], state: dict[str, int]) -> None:
    for key, version in state.items():
        lm.declare_entry(key, (key, version))


def consume_into(sink: Sink) -> Any:
    @coco.fn
    async def declare(value: Value, round_: int) -> None:
        sink.target.declare(value[0], value)

    @coco.fn
    async def consume(lm: LiveMap[str, Value], round_: int) -> None:
        await coco.mount_each(declare, lm.consumer(concurrency=4), round_)

    return consume, declare


async def test_a_first_commit_cancelled_by_its_keys_delete_leaves_nothing_behind() -> None:
    """ "b"'s first commit waits in the sink; "b" is deleted meanwhile (the
    delete waits for that commit): once the sink goes on, "b" is nobody's,
    the rest is committed and the feed settles."""
    sink = Sink()
    sink.block = {"b"}
    consume, _ = consume_into(sink)

    async def scenario(op: coco.LiveComponentOperator, lm: LiveMap[str, Value], sink: Sink) -> None:
        await (await op.update("p", produce, lm, {"a": 0, "b": 0, "c": 0})).ready()
        await op.update("consumer", consume, lm, 0)
        await sink.blocked.wait()
        await (await op.update("p", produce, lm, {"a": 0, "c": 0})).ready()
        await anyio.sleep(0.01)  # (the delete waits for the commit under way)
        sink.release.set()
        await lm.settle()
        assert sink.target.owner_path("b") is None
        assert sink.rows == {"a": ("a", 0), "c": ("c", 0)} == dict(sink.target.items())
        assert lm.stats().failing == {}

    stats = await run_scene("first-deleted", sink, scenario)
    assert stats.total.num_in_progress == 0


async def test_a_newer_value_during_a_first_commit_wins() -> None:
    """A newer value of "b" arrives while its first commit waits in the
    sink: the first commit ends (committed or cancelled) and the newer
    value is what the sink and the target hold."""
    sink = Sink()
    sink.block = {"b"}
    consume, _ = consume_into(sink)

    async def scenario(op: coco.LiveComponentOperator, lm: LiveMap[str, Value], sink: Sink) -> None:
        await (await op.update("p", produce, lm, {"a": 0, "b": 0})).ready()
        await op.update("consumer", consume, lm, 0)
        await sink.blocked.wait()
        await (await op.update("p", produce, lm, {"a": 0, "b": 1})).ready()
        await anyio.sleep(0.01)
        sink.release.set()
        await lm.settle()
        assert sink.rows == {"a": ("a", 0), "b": ("b", 1)} == dict(sink.target.items())
        assert sink.target.owner_path("b") is not None
        assert lm.stats().failing == {}

    await run_scene("first-newer", sink, scenario)


@pytest.mark.parametrize("release", ["before", "after"])
async def test_a_rescan_during_a_first_commit_keeps_every_key(release: str) -> None:
    """The consumer is re-mounted (its feed scanned anew) while "b"'s first
    commit waits in the sink; the sink is let go before or after the new
    scan is ready.  Every key ends up committed once, by a component of
    the new scan, and nothing fails."""
    sink = Sink()
    sink.block = {"b"}
    consume, _ = consume_into(sink)

    async def scenario(op: coco.LiveComponentOperator, lm: LiveMap[str, Value], sink: Sink) -> None:
        state = {"a": 0, "b": 0, "c": 0}
        await (await op.update("p", produce, lm, state)).ready()
        await op.update("consumer", consume, lm, 0)
        await sink.blocked.wait()
        handle = await op.update("consumer", consume, lm, 1)  # a new scan
        if release == "before":
            sink.release.set()
        else:
            await anyio.sleep(0.01)
        with anyio.move_on_after(0.05 if release == "after" else TIMEOUT):
            await handle.ready()
        sink.release.set()
        await handle.ready()
        await lm.settle()
        rows = {key: (key, 0) for key in state}
        assert sink.rows == rows == dict(sink.target.items())
        for key in state:
            assert sink.target.owner_path(key) is not None
        assert lm.stats().failing == {}

    await run_scene(f"first-rescan-{release}", sink, scenario)


async def test_first_runs_that_mount_create_or_raise_commit_as_before(core: Any) -> None:
    """First runs that do more than declare (mount a child, create a map,
    raise after declaring) take the general path: the mounted child's
    declarations and the map are there, and the run that raised commits
    nothing and is recorded."""
    sink = Sink()
    holder: dict[str, Any] = {}
    reported: list[BaseException] = []

    def on_error(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        reported.append(exc)

    @coco.fn
    async def leaf(key: str) -> None:
        sink.target.declare(key + "/leaf", 1)

    @coco.fn
    async def per_key(value: str) -> None:
        sink.target.declare(value, 0)
        if value == "mounts":
            await coco.mount(leaf, value)
        elif value == "creates":
            made: LiveMap[str, int] = await LiveMap.create()
            made.declare_entry("x", 1)
            holder["made"] = made
        elif value == "raises":
            raise ValueError("after a declaration")

    @coco.fn
    async def produce_keys(lm: LiveMap[str, str]) -> None:
        for key in ("plain", "mounts", "creates", "raises"):
            lm.declare_entry(key, key)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, str] = await LiveMap.create()
        holder["lm"] = lm
        await (await coco.mount(produce_keys, lm)).ready()
        async with coco.exception_handler(on_error):
            await coco.mount_each(per_key, lm)

    stats = await run_app(coco.App("first-general", main))
    assert sink.rows == {"plain": 0, "mounts": 0, "mounts/leaf": 1, "creates": 0}
    assert dict(holder["made"].items()) == {"x": 1}
    assert [type(e) for e in reported] == [ValueError]
    assert set(holder["lm"].stats().failing) == {"raises"}
    counted = by_name(stats, per_key)
    assert counted.num_adds == 3 and counted.num_errors == 1


async def test_an_app_run_stopped_during_a_first_commit_cancels_it_cleanly() -> None:
    """The live app run is stopped while "b"'s first commit waits in the
    sink: the commit is cancelled there, no task is left behind, and "b"
    is counted neither as in progress nor as an error."""
    sink = Sink()
    sink.block = {"b"}

    declare = declarer(sink)
    main = each_of_abc(declare)

    before = current_tasks()
    async with coco.App("first-stopped-live", main).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await sink.blocked.wait()
            await handle.stop()
        stats = handle.stats()
    assert sink.cancelled == ["b"]
    assert "b" not in sink.rows
    counted = by_name(stats, declare)
    assert counted.num_in_progress == 0 and counted.num_errors == 0
    assert current_tasks() == before


async def test_first_commits_that_conflict_over_a_key_report_it_once(core: Any) -> None:
    """Two keys' first runs declare the same key of a target: one holds it,
    the other's claim is reported as a conflict once the update settles;
    a later run that stops declaring it hands it over to the claimant."""
    sink = Sink()
    conflicts: list[BaseException] = []
    holder: dict[str, LiveMap[str, int]] = {}

    def on_error(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        conflicts.append(exc)

    @coco.fn
    async def produce_ab(lm: LiveMap[str, int], state: dict[str, int]) -> None:
        for key, value in state.items():
            lm.declare_entry(key, value)

    @coco.fn
    async def declare(value: int) -> None:
        sink.target.declare("shared" if value < 10 else f"own{value}", value)

    state = {"a": 1, "b": 2}

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        holder["lm"] = lm
        await (await coco.mount(produce_ab, lm, dict(state))).ready()
        async with coco.exception_handler(on_error):
            await coco.mount_each(declare, lm)

    app = coco.App("first-conflict", main)
    await run_app(app)
    assert [type(e) for e in conflicts] == [coco.KeyConflictError]
    assert list(sink.rows) == ["shared"]
    first = sink.rows["shared"]
    assert first in (1, 2)
    # the holder moves off the key: the claimant's value takes it over
    winner = "a" if first == 1 else "b"
    state[winner] = 11 if winner == "a" else 12
    conflicts.clear()
    await run_app(app)
    assert sink.rows["shared"] == (2 if winner == "a" else 1)
    assert dict(sink.target.items()) == sink.rows


async def test_a_first_commit_whose_report_escalates_still_finishes(
    core: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A first commit claims a key another app holds: the conflict is
    reported during the commit (no common ancestor to wait for), and the
    handler raises, which the child keeps as escalated: a record the new
    component did not have when its commit began, so the commit ends on the
    general path's last steps.  It ends as any other: the sibling's key is
    in, the update ends (the escalated error goes up the handler chain, to
    the log here), and the claim gets the key once its holder lets it go."""
    sink = Sink()
    holds = {"x": -1}

    @coco.fn
    def hold() -> None:
        for key, value in holds.items():
            sink.target.declare(key, value)

    class Escalated(Exception):
        pass

    def on_error(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        if isinstance(exc, coco.KeyConflictError):
            raise Escalated(str(exc)) from exc

    @coco.fn
    async def produce_xy(lm: LiveMap[str, int]) -> None:
        lm.declare_entry("x", 1)
        lm.declare_entry("y", 2)

    @coco.fn
    async def declare(value: int) -> None:
        sink.target.declare("xy"[value - 1], value)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        await (await coco.mount(produce_xy, lm)).ready()
        async with coco.exception_handler(on_error):
            await coco.mount_each(declare, lm)

    owner_app = coco.App("first-holder", hold)
    await run_app(owner_app)
    assert sink.rows == {"x": -1}
    before = current_tasks()
    stats = await run_app(coco.App("first-claimant", main))
    assert current_tasks() == before
    assert sink.rows == {"x": -1, "y": 2}
    escalated = [r for r in caplog.records if "Escalated" in r.getMessage()]
    assert len(escalated) == 1 and "/declare/'x'" in escalated[0].getMessage()
    counted = by_name(stats, declare)
    assert counted.num_adds == 2 and counted.num_in_progress == 0
    holds.clear()
    await run_app(owner_app)  # the holder lets "x" go: the claim gets it
    assert sink.rows == {"x": 1, "y": 2} == dict(sink.target.items())
