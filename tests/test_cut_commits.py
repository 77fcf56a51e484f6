"""The commit path cut short: what a commit (or a release) had to apply at
once, because the update it belonged to had ended meanwhile, still reaches
the target and the sink when the task doing it is cancelled on the way."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import pytest
from helpers import wait_for

import livemap as coco
from livemap import KeyedTarget, TargetBatch
from livemap._runtime._component import Component, current_run

pytestmark = pytest.mark.anyio

_names = itertools.count()


@pytest.mark.parametrize("via", ["commit", "release"])
@pytest.mark.parametrize("where", ["gate", "sink"])
async def test_drops_applied_at_once_reach_the_sink_when_cancelled(where: str, via: str) -> None:
    """``part`` stops declaring ``x`` while ``main``'s run is in progress, in a
    commit that changes ``y`` (``commit``) or in the release of everything
    it held, ``y`` passing to ``claimer`` (``release``): ``x``'s delete is
    held for main's update.  Main returns while the sink takes part's batch,
    so once the sink is done nobody will apply the held delete: part applies
    it itself, after the gate.  The gate has passed to ``other``, whose sink
    is slow; the update is cancelled while part waits for it (``gate``), or
    while the sink takes part's delete (``sink``).  ``x`` is deleted all
    the same."""
    rows: dict[str, int] = {}
    state = {"second": False}
    mains: list[Component] = []
    part_in_sink, other_returns, cut_here = anyio.Event(), anyio.Event(), anyio.Event()
    batches: list[tuple[tuple[Any, ...], list[tuple[str, int]], list[str]]] = []
    armed = {"on": True}

    async def apply(batch: TargetBatch[str, int]) -> None:
        if state["second"] and batch.owner == ("part",) and batch.upserts:
            part_in_sink.set()
            await other_returns.wait()  # other's commit is queued at the gate
            await wait_for(lambda: not mains[-1].running)  # main's update ended
        if state["second"] and batch.owner == ("other",) and where == "gate":
            cut_here.set()
            await anyio.sleep_forever()  # holds the gate until cancelled
        if state["second"] and batch.deletes and where == "sink" and armed["on"]:
            armed["on"] = False
            cut_here.set()
            await anyio.sleep_forever()  # cancelled here, once
        batches.append((batch.owner, list(batch.upserts), list(batch.deletes)))
        for key in batch.deletes:
            del rows[key]
        rows.update(batch.upserts)

    target: KeyedTarget[str, int] = KeyedTarget("cut-rows", apply)
    errors: list[BaseException] = []

    def conflicts(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        errors.append(exc)

    @coco.fn
    async def part() -> None:
        if not state["second"]:
            target.declare("x", 1)
            target.declare("y", 1)
        elif via == "commit":
            target.declare("y", 2)

    @coco.fn
    async def claimer() -> None:
        target.declare("y", 3)  # a claim: part holds y

    @coco.fn
    async def other() -> None:
        if state["second"]:
            await part_in_sink.wait()  # (commits after part, on every backend)
            target.declare("z", 1)
            other_returns.set()

    @coco.fn
    async def main() -> None:
        mains.append(current_run("main").component)
        async with coco.exception_handler(conflicts):
            h = await coco.mount(coco.component_subpath("part"), part)
            if via == "release":
                if not state["second"]:
                    await h.ready()  # part holds y first
                await coco.mount(coco.component_subpath("claimer"), claimer)
            await coco.mount(coco.component_subpath("other"), other)
        if state["second"]:
            await part_in_sink.wait()  # part's commit began within main's run
        # (no declarations: main's run ends without waiting for its children)

    app = coco.App(f"cut-gate-{next(_names)}", main)
    with anyio.fail_after(5):
        await app.update()
    assert rows == {"x": 1, "y": 1}
    assert [type(e) for e in errors] == ([coco.KeyConflictError] if via == "release" else [])
    state["second"] = True
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def update() -> None:
                await app.update()

            tg.start_soon(update)
            await cut_here.wait()
            tg.cancel_scope.cancel()
    assert "x" not in target, target.owner_path("x")
    assert batches[-1] == (("part",), [], ["x"])  # held, then applied on its own
    assert rows == {"y": 2 if via == "commit" else 3, **({"z": 1} if where == "sink" else {})}
    assert dict(target.items()) == rows
    assert target.owner_path("y") == (("part",) if via == "commit" else ("claimer",))
    assert len(errors) == (1 if via == "release" else 0)


@pytest.mark.parametrize("times", [1, 2])
async def test_a_base_exception_from_the_sink_applying_held_drops(times: int) -> None:
    """Three entries deleted in one update: their rows' deletes are held until
    the consumer's update settles, then sent as one batch per target.  The
    first target's sink raises ``KeyboardInterrupt`` for it, and
    (``times=2``) again when the batch is sent again as the run ends.  The
    update raises the first interruption, once; the second target gets its
    deletes all the same; the first target's record keeps what its sink did
    not take, and its next batch deletes the rest: each record agrees with
    its sink, with nothing owned by a component that is gone."""
    rows: dict[str, str] = {}
    raised: list[str] = []
    left = {"n": 0}

    def apply(batch: TargetBatch[str, str]) -> None:
        if batch.deletes and left["n"]:
            left["n"] -= 1
            raised.append(f"interrupt {len(raised) + 1}")
            raise KeyboardInterrupt(raised[-1])
        for key in batch.deletes:
            del rows[key]
        rows.update(batch.upserts)

    target: KeyedTarget[str, str] = KeyedTarget(f"ki-rows-{times}", apply)
    side_rows: dict[str, str] = {}

    def apply_side(batch: TargetBatch[str, str]) -> None:
        for key in batch.deletes:
            del side_rows[key]
        side_rows.update(batch.upserts)

    side: KeyedTarget[str, str] = KeyedTarget(f"ki-side-{times}", apply_side)
    state = {"keys": ["a", "b", "c", "d"]}

    @coco.fn
    def produce(lm: coco.LiveMap[str, str]) -> None:
        for key in state["keys"]:
            lm.declare_entry(key, key)

    @coco.fn
    def proc(value: str) -> None:
        target.declare(value, value)
        side.declare(value, value)

    @coco.fn
    async def main() -> None:
        lm: coco.LiveMap[str, str] = await coco.LiveMap.create()
        await coco.mount(produce, lm)
        await coco.mount_each(proc, lm)

    app = coco.App(f"ki-held-{times}-{next(_names)}", main)
    with anyio.fail_after(5):
        await app.update()
    assert rows == {"a": "a", "b": "b", "c": "c", "d": "d"}
    state["keys"] = ["a"]
    left["n"] = times
    with anyio.fail_after(5), pytest.raises(KeyboardInterrupt) as info:
        await app.update()
    assert str(info.value) == "interrupt 1"  # the first, not one from the retry
    assert raised == [f"interrupt {n}" for n in range(1, times + 1)]
    assert dict(target.items()) == rows
    assert side_rows == {"a": "a"} and dict(side.items()) == side_rows
    assert rows == ({"a": "a"} if times == 1 else {"a": "a", "b": "b", "c": "c", "d": "d"})
    state["keys"] = ["a", "e"]
    with anyio.fail_after(5):
        await app.update()
    assert rows == {"a": "a", "e": "e"} and side_rows == rows
    assert dict(target.items()) == rows and dict(side.items()) == rows
    assert target.owner_path("e") == (coco.Symbol("proc"), "e")


@pytest.mark.parametrize("sink", ["sync", "async"])
async def test_a_superseded_run_does_not_settle_its_successor_update(sink: str) -> None:
    """``c``'s second run no longer mounts ``old``: its commit unmounts it,
    and ``old``'s release waits for the slow sink (``z`` holds its lock).
    Meanwhile ``c`` runs a third time: its child ``d`` stops declaring ``k``
    (held until that run's update settles) and ``e`` declares it, once the
    second run has ended.  The second run, superseded, must not settle the
    third's update (apply ``d``'s held delete before ``e`` could take ``k``
    over): ``k`` passes to ``e`` as one upsert, never deleted."""
    state = {"phase": 1}
    c_runs: list[Any] = []
    batches: list[tuple[int, tuple[Any, ...], list[tuple[str, str]], list[str]]] = []
    z_in_sink, go, done = anyio.Event(), anyio.Event(), anyio.Event()

    async def apply(batch: TargetBatch[str, str]) -> None:
        if sink == "async":
            await anyio.lowlevel.checkpoint()
        batches.append((state["phase"], batch.owner, list(batch.upserts), list(batch.deletes)))

    async def apply_slow(batch: TargetBatch[str, int]) -> None:
        if batch.upserts and batch.upserts[0][0] == "z":
            z_in_sink.set()
            await go.wait()  # holds the slow target's lock

    target: KeyedTarget[str, str] = KeyedTarget(f"succ-rows-{sink}", apply)
    slow: KeyedTarget[str, int] = KeyedTarget(f"succ-slow-{sink}", apply_slow)

    @coco.fn
    def old() -> None:
        slow.declare("o", 1)

    @coco.fn
    async def z() -> None:
        slow.declare("z", 1)

    @coco.fn
    def d() -> None:
        if state["phase"] < 3:
            target.declare("k", "d")

    @coco.fn
    async def e() -> None:
        go.set()  # old's release goes on: the second run of c ends
        await wait_for(lambda: not isinstance(c_runs[1].buffers, (dict, type(None))))
        target.declare("k", "e")

    @coco.fn
    async def c() -> None:
        c_runs.append(current_run("c"))
        if state["phase"] == 1:
            await coco.mount(coco.component_subpath("old"), old)
        hd = await coco.mount(coco.component_subpath("d"), d)
        if state["phase"] == 3:
            he = await coco.mount(coco.component_subpath("e"), e)
            await hd.ready()
            await he.ready()

    class Live:
        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await (await op.update("c", c)).ready()
            state["phase"] = 2
            await op.update("z", z)
            await z_in_sink.wait()
            await op.update("c", c)  # its commit unmounts old: old's release waits
            await wait_for(lambda: bool(slow._get_lock().waiters))
            state["phase"] = 3
            await (await op.update("c", c)).ready()
            await op.mark_ready()
            done.set()
            await anyio.sleep_forever()

    @coco.fn
    async def main() -> None:
        await coco.mount(coco.component_subpath("live"), Live)

    app = coco.App(f"succ-{sink}-{next(_names)}", main)
    with anyio.fail_after(5):
        async with app.update(live=True) as h:
            await done.wait()
            await h.stop()
    assert len(c_runs) == 3
    third = [(owner[-1], ups, dels) for phase, owner, ups, dels in batches if phase == 3]
    assert third == [("e", [("k", "e")], [])], batches
    assert target.get("k") == "e" and target.owner_path("k") == ("live", "c", "e")
    assert "o" not in slow and slow.get("z") == 1


async def test_a_release_cut_short_by_a_retry_of_failed_deletes_is_done_again() -> None:
    """``d``'s delete failed (an ``OSError``): it is retried with the target's
    next batch.  Then ``b`` and ``c`` are deleted: the retry of ``d``'s
    delete before ``b``'s release raises ``KeyboardInterrupt`` (and again
    after it).  The update raises the first; ``b``, unmounted, still owns
    its key: its release is done again as the run ends (it is not left
    owning it for good), and the record agrees with the sink.  The next
    update deletes what is left."""
    rows: dict[str, str] = {}
    fail: list[BaseException] = []
    errors: list[BaseException] = []

    def apply(batch: TargetBatch[str, str]) -> None:
        if batch.deletes and fail:
            raise fail.pop(0)
        for key in batch.deletes:
            del rows[key]
        rows.update(batch.upserts)

    target: KeyedTarget[str, str] = KeyedTarget("orphan-first", apply)
    state = {"keys": ["a", "b", "c", "d"]}

    def handler(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        errors.append(exc)

    @coco.fn
    def produce(lm: coco.LiveMap[str, str]) -> None:
        for key in state["keys"]:
            lm.declare_entry(key, key)

    @coco.fn
    def proc(value: str) -> None:
        target.declare(value, value)

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(handler):
            lm: coco.LiveMap[str, str] = await coco.LiveMap.create()
            await coco.mount(produce, lm)
            await coco.mount_each(proc, lm)

    app = coco.App(f"orphan-first-{next(_names)}", main)
    with anyio.fail_after(5):
        await app.update()
        state["keys"] = ["a", "b", "c"]
        fail.append(OSError("sink down"))
        await app.update()
    assert [type(e) for e in errors] == [coco.TargetApplyError]
    assert "d" in rows and "d" in target  # kept, to be retried
    state["keys"] = ["a"]
    fail.extend([KeyboardInterrupt("first"), KeyboardInterrupt("second")])
    with anyio.fail_after(5), pytest.raises(KeyboardInterrupt, match="first"):
        await app.update()
    assert fail == []
    assert "b" not in rows and "d" not in rows
    assert dict(target.items()) == rows
    state["keys"] = ["a", "e"]
    with anyio.fail_after(5):
        await app.update()
    assert rows == {"a": "a", "e": "e"}
    assert dict(target.items()) == rows
