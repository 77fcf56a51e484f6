"""Hostile checks of a commit's bookkeeping of its targets: the targets a
component holds keys of follow what each run declares into (also when a
target is dropped, added back, or its sink failed), and a commit cut short
in a sink (the component re-mounted meanwhile, a ``BaseException`` from the
sink) leaves every target's record and its sink in step.  Keys moving from
one per-entry child to another in one round are one upsert each, never a
delete, in a downstream map and in a target."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, Mirror, wait_for

import livemap as coco
from livemap import KeyedTarget, LiveMap, TargetBatch
from livemap._runtime._component import Component
from livemap._runtime._hosting import current_run_var

pytestmark = pytest.mark.anyio

_names = itertools.count()


def unique(name: str) -> str:
    return f"commit-targets-{name}-{next(_names)}"


def only(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` is ``kind``, or a group of nothing else."""
    if isinstance(exc, kind):
        return True
    inner = getattr(exc, "exceptions", None)
    return bool(inner) and all(only(e, kind) for e in inner)


class Driver:
    """A live component whose ``process()`` declares ``plan`` (target name ->
    value); ``step()`` re-runs it with a new plan and waits for its commit."""

    def __init__(self, targets: dict[str, KeyedTarget[str, Any]], box: list[Driver]) -> None:
        box.append(self)
        self.targets = targets
        self.plan: dict[str, Any] = {}
        self.component: Component | None = None
        self.send, self.recv = anyio.create_memory_object_stream[anyio.Event](1)

    def process(self) -> None:
        run = current_run_var.get()
        assert run is not None
        self.component = run.component  # type: ignore[attr-defined]
        for name, value in self.plan.items():
            self.targets[name].declare("k", value)

    async def process_live(self, operator: coco.LiveComponentOperator) -> None:
        await operator.update_full()
        await operator.mark_ready()
        async for done in self.recv:
            await operator.update_full()
            done.set()

    def close(self) -> None:
        self.send.close()
        self.recv.close()

    async def step(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        done = anyio.Event()
        await self.send.send(done)
        await done.wait()


async def test_a_component_holds_the_targets_its_runs_declared_into() -> None:
    """Dropping a target, adding it back, declaring into none: the
    component's targets are those it holds keys of (none: ``None``), and
    each sink holds what the latest run declared."""
    mirrors = {name: Mirror(unique(name)) for name in "abc"}
    box: list[Driver] = []

    async def main() -> None:
        targets = {name: m.target for name, m in mirrors.items()}
        await coco.mount(coco.component_subpath("d"), Driver, targets, box)

    plans: list[dict[str, Any]] = [
        {"a": 1, "b": 1},
        {"b": 2},  # a dropped
        {"a": 3, "b": 3, "c": 3},  # a back, c new
        {"c": 4, "a": 4},  # b dropped, the order changed
        {},  # none
        {"b": 5},
    ]
    app = coco.App(unique("follow"), main)
    with anyio.fail_after(TIMEOUT):
        async with app.update(live=True) as handle:
            await handle.ready()
            driver = box[0]
            for plan in plans:
                await driver.step(plan)
                for name, mirror in mirrors.items():
                    want = {"k": plan[name]} if name in plan else {}
                    await wait_for(lambda m=mirror, w=want: m.rows == w)  # type: ignore[misc]
                    assert dict(mirror.target.items()) == want
                comp = driver.component
                assert comp is not None
                held = comp.targets
                if plan:
                    assert held is not None
                    assert {t.name for t in held} == {mirrors[n].target.name for n in plan}
                else:
                    assert held is None
            await handle.stop()
    box[0].close()


async def test_a_target_whose_first_batch_failed_is_not_held_and_gets_it_next_time() -> None:
    """A sink that fails the component's first batch into it: the record goes
    back (the component holds nothing there, so the target is not among its
    targets), the failure is reported, and the next run sends it again."""
    good, bad = Mirror(unique("good")), Mirror(unique("bad"))
    bad.fail_batches = 1
    box: list[Driver] = []
    errors: list[BaseException] = []

    async def main() -> None:
        targets = {"good": good.target, "bad": bad.target}
        await coco.mount(coco.component_subpath("d"), Driver, targets, box)

    config = coco.AppConfig(unique("fails"), exception_handler=lambda e, c: errors.append(e))
    app = coco.App(config, main)
    with anyio.fail_after(TIMEOUT):
        async with app.update(live=True) as handle:
            await handle.ready()
            driver = box[0]
            await driver.step({"good": 1, "bad": 1})
            await wait_for(lambda: errors)
            assert isinstance(errors[0], coco.TargetApplyError)
            assert good.rows == {"k": 1} and dict(good.target.items()) == {"k": 1}
            assert bad.rows == {} and dict(bad.target.items()) == {}
            comp = driver.component
            assert comp is not None and comp.targets == (good.target,)
            await driver.step({"good": 1, "bad": 2})
            await wait_for(lambda: bad.rows == {"k": 2})
            assert dict(bad.target.items()) == {"k": 2}
            assert comp.targets is not None and set(comp.targets) == {good.target, bad.target}
            await handle.stop()
    box[0].close()


async def test_a_re_mount_while_the_commit_waits_in_the_sink_leaves_record_and_sink_in_step() -> (
    None
):
    """A child's commit waits in an async sink; a re-mount with another
    value supersedes it there (its cancellation lands in the sink): the
    batch is taken back, and the newer run's commit is what the sink and the
    record hold, also for the downstream map it declared into first."""
    rows: dict[str, Any] = {}
    entered = anyio.Event()
    release = anyio.Event()
    batches: list[TargetBatch[str, Any]] = []

    async def apply(batch: TargetBatch[str, Any]) -> None:
        batches.append(batch)
        if len(batches) == 1:
            entered.set()
            await release.wait()  # (cancelled here by the re-mount)
        for key, value in batch.upserts:
            rows[key] = value
        for key in batch.deletes:
            rows.pop(key, None)

    target: KeyedTarget[str, Any] = KeyedTarget(unique("slow"), apply)
    seen: dict[str, Any] = {}
    down: list[LiveMap[str, Any]] = []

    @coco.fn
    async def child(value: int) -> None:
        down[0].declare_entry("k", value)
        target.declare("k", value)

    @coco.fn
    async def note(value: int) -> None:
        seen["k"] = value

    class Remounter:
        def process(self) -> None:
            pass

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.update("c", child, 1)
            await entered.wait()
            handle = await operator.update("c", child, 2)
            await handle.ready()
            await operator.mark_ready()

    async def main() -> None:
        down.append(await LiveMap.create())
        await coco.mount(coco.component_subpath("r"), Remounter)
        await coco.mount_each(note, down[0])

    app = coco.App(unique("remount"), main)
    with anyio.fail_after(TIMEOUT):
        await app.update()
    assert rows == {"k": 2}
    assert dict(target.items()) == {"k": 2}
    assert seen == {"k": 2}
    assert [b.upserts for b in batches] == [[("k", 1)], [("k", 2)]]


class Abort(BaseException):
    """Not an ``Exception``: it ends the app run."""


async def test_a_base_exception_from_a_per_entry_sink_keeps_record_and_sink_in_step() -> None:
    """A per-entry child's sink raises a ``BaseException`` in the middle of a
    round: the run ends with it, the target's record is what its sink holds,
    and the next run of the app brings both to the map's entries."""
    mirror = Mirror(unique("rows"))
    state = {"abort_at": "k3", "values": {f"k{i}": i for i in range(6)}}
    plain_apply = mirror._apply

    def apply(batch: TargetBatch[str, Any]) -> None:
        if any(k == state["abort_at"] for k, _ in batch.upserts):
            state["abort_at"] = None
            raise Abort("from the sink")
        plain_apply(batch)

    mirror.target._apply = apply  # type: ignore[assignment]

    @coco.fn
    def produce(lm: LiveMap[str, int]) -> None:
        for key, value in state["values"].items():  # type: ignore[attr-defined]
            lm.declare_entry(key, value)

    @coco.fn
    async def child(value: int) -> None:
        mirror.target.declare(f"k{value}", value)

    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        await coco.mount(produce, lm)
        await coco.mount_each(child, lm)

    app = coco.App(unique("abort"), main)
    with pytest.raises(BaseException) as info:
        with anyio.fail_after(TIMEOUT):
            await app.update()
    assert only(info.value, Abort), info.value
    assert dict(mirror.target.items()) == mirror.rows
    assert "k3" not in mirror.rows
    with anyio.fail_after(TIMEOUT):
        await app.update()
    assert mirror.rows == state["values"]
    assert dict(mirror.target.items()) == mirror.rows


async def test_keys_moving_between_per_entry_children_in_one_round_are_upserts() -> None:
    """Each entry's child declares the entry's value as a key downstream (a
    map and a target); a round swaps two entries' values: each key moves to
    the other child, which is one upsert each downstream, never a delete."""
    mirror = Mirror(unique("moves"))
    seen: list[tuple[str, Any]] = []
    down: list[LiveMap[str, str]] = []
    Plan = dict[str, tuple[str, str]]  # entry -> (downstream key, the entry)
    send, recv = anyio.create_memory_object_stream[tuple[Plan, anyio.Event]](1)

    class Sub:
        async def update_all(self) -> None:
            async for key, _ in down[0]:
                seen.append(("update", key))

        async def mark_ready(self) -> None:
            pass

        async def update(self, key: str, value: str) -> coco.ReadyHandle:
            seen.append(("update", key))
            return coco.ReadyHandle()

        async def delete(self, key: str) -> coco.ReadyHandle:
            seen.append(("delete", key))
            return coco.ReadyHandle()

    class Watch:
        def process(self) -> None:
            pass

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.mark_ready()
            await down[0].watch(Sub())

    class Producer:
        def __init__(self, lm: LiveMap[str, tuple[str, str]]) -> None:
            self.lm = lm
            self.state = {"a": ("x", "a"), "b": ("y", "b"), "c": ("z", "c")}

        def process(self) -> None:
            for key, value in self.state.items():
                self.lm.declare_entry(key, value)

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.update_full()
            await operator.mark_ready()
            async for state, done in recv:
                self.state = state
                await operator.update_full()
                done.set()

    @coco.fn
    async def child(value: tuple[str, str]) -> None:
        key, entry = value
        down[0].declare_entry(key, entry)
        mirror.target.declare(key, entry)

    lms: list[LiveMap[str, tuple[str, str]]] = []

    async def main() -> None:
        down.append(await LiveMap.create())
        await coco.mount(Watch)
        lm: LiveMap[str, tuple[str, str]] = await LiveMap.create()
        lms.append(lm)
        await coco.mount(Producer, lm)
        await coco.mount_each(child, lm)

    app = coco.App(unique("moves"), main)
    with send, recv, anyio.fail_after(TIMEOUT):
        async with app.update(live=True) as handle:
            await handle.ready()
            await down[0].settle()
            await wait_for(lambda: len(mirror.rows) == 3)
            seen.clear()
            mirror.batches.clear()
            done = anyio.Event()
            await send.send(({"a": ("y", "a"), "b": ("x", "b"), "c": ("z", "c")}, done))
            await done.wait()
            await lms[0].settle()
            await down[0].settle()
            await wait_for(lambda: sorted(seen) == [("update", "x"), ("update", "y")])
            moved = {"x": "b", "y": "a", "z": "c"}
            await wait_for(lambda: mirror.rows == moved)
            assert all(not b.deletes for b in mirror.batches), mirror.batches
            assert dict(down[0].snapshot()) == moved
            await handle.stop()
    assert ("delete", "x") not in seen and ("delete", "y") not in seen
