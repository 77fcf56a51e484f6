"""A component keeps the fields most components never set in a record made
the first time one is set (``Component.extra``), and shares what siblings
of one ``mount_each`` share (``Component.spec``).  A per-entry child that
only declares stays lean; a child made lean that later needs one of those
fields (it fails, hosts children, turns live, waits) behaves as any other."""

from __future__ import annotations

import anyio
import pytest
from helpers import Mirror, Recorder, run_app, wait_for
from lean_support import children_of, feeding

import livemap as coco
from livemap import LiveMap
from livemap._runtime._readiness import Readiness

pytestmark = pytest.mark.anyio


async def test_per_entry_children_that_declare_are_lean_and_share_one_spec() -> None:
    mirror = Mirror()
    handles: list[coco.ComponentMountHandle] = []
    down: list[LiveMap[int, int]] = []

    @coco.fn
    def produce(lm: LiveMap[int, int]) -> None:
        for i in range(50):
            lm.declare_entry(i, i * 10)

    @coco.fn
    def consume(value: int) -> None:
        mirror.target.declare(value, value + 1)
        down[0].declare_entry(value, value)

    @coco.fn
    async def main() -> None:
        down.append(await LiveMap.create())
        lm: LiveMap[int, int] = await LiveMap.create()
        await coco.mount(produce, lm)
        handles.append(await coco.mount_each(consume, lm))

    await run_app(coco.App("lean-declare", main))
    assert mirror.rows == {i * 10: i * 10 + 1 for i in range(50)}
    assert dict(down[0].items()) == {i * 10: i * 10 for i in range(50)}
    children = children_of(handles[-1])
    assert len(children) == 50
    assert all(c.extra is None for c in children)
    specs = {id(c.spec) for c in children}
    assert len(specs) == 1
    child = children[0]
    assert child.processor is consume
    assert child.mount_kind == "mount_each"
    assert child.kwargs == {}
    assert child.session is handles[-1]._component.session  # type: ignore[attr-defined]
    # what lives in the record reads as its default
    assert child.host is None and child.exception is None and child.escalated is None
    assert child.settle is None and child.created is None and child.live_body is None
    assert not child.closed and child.waiters is None and child.tracked is None
    assert child.readiness is child and child.unready == 0 and child.self_ready
    # its value alone is kept, not a tuple of its own
    assert child.spec.fargs == ()
    assert child.args == (child.given,) and child.given == child.key


async def test_a_lean_child_that_fails_then_recovers() -> None:
    """A lean per-entry child's run fails: its failure is recorded and
    reported; the next value runs clean and clears it."""
    mirror = Mirror()
    rec = Recorder()

    @coco.fn
    def consume(value: int) -> None:
        if value < 0:
            raise ValueError(f"bad {value}")
        mirror.target.declare(f"row{value % 100}", value)

    async with feeding("lean-fails", consume, rec) as fed:
        await fed.commit(a=1)
        await wait_for(lambda: mirror.rows == {"row1": 1})
        [child] = children_of(fed.each)
        assert child.extra is None
        await fed.feed.commit(a=-1)
        await wait_for(lambda: len(rec.calls) == 1)
        assert isinstance(child.exception, ValueError)
        assert child.extra is not None
        await fed.commit(a=101)
        await wait_for(lambda: mirror.rows == {"row1": 101})
        assert children_of(fed.each) == [child]
        assert child.exception is None and child.escalated is None
    assert [type(e) for e, _ in rec.calls] == [ValueError]


async def test_a_lean_child_becomes_a_host_and_leaves_it_again() -> None:
    """A per-entry child made lean mounts a ``mount_each`` of its own on a
    later value (its component then hosts children), and lets it go on the
    next: the rows its grandchildren declared are deleted."""
    mirror = Mirror()

    @coco.fn
    def leaf(value: int, prefix: str) -> None:
        mirror.target.declare(f"{prefix}-{value}", value)

    @coco.fn
    async def consume(value: int) -> None:
        mirror.target.declare("own", value)
        if value >= 10:
            await coco.mount_each(leaf, [(i, i) for i in range(value - 10, value - 7)], "sub")

    async with feeding("lean-host", consume) as fed:
        await fed.commit(k=1)
        await wait_for(lambda: mirror.rows == {"own": 1})
        [child] = children_of(fed.each)
        assert child.extra is None and child.children is None
        await fed.commit(k=12)
        await wait_for(lambda: mirror.rows == {"own": 12, "sub-2": 2, "sub-3": 3, "sub-4": 4})
        assert children_of(fed.each) == [child]
        [inner] = list((child.children or {}).values())
        assert inner.host is not None and len(inner.children or {}) == 3
        await fed.commit(k=2)
        await wait_for(lambda: mirror.rows == {"own": 2})
        assert children_of(fed.each) == [child]
        assert not child.children
        assert not inner.alive and inner.closed


async def test_a_child_turns_live_on_a_re_mount_and_back() -> None:
    """A child mounted with a function, then a live-component class, then a
    function again at the same path: each mount runs what it mounts."""
    ran: list[str] = []
    mode = ["fn"]

    @coco.fn
    def plain() -> None:
        ran.append("fn")

    class Live:
        def process(self) -> None:
            ran.append("process")

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.update_full()
            ran.append("live")
            await op.mark_ready()

    handles: list[coco.ComponentMountHandle] = []
    rec = Recorder()

    @coco.fn
    async def main() -> None:
        if mode[0] == "fn":
            handles.append(await coco.mount(coco.component_subpath("x"), plain))
        else:
            handles.append(await coco.mount(coco.component_subpath("x"), Live))

    app = coco.App(coco.AppConfig("lean-live-flip", exception_handler=rec), main)
    await run_app(app)
    [child] = [h._component for h in handles]  # type: ignore[attr-defined]
    assert child.live_body is None
    mode[0] = "live"
    await run_app(app)
    assert child.live_body is not None
    mode[0] = "fn"
    await run_app(app)
    assert {h._component for h in handles} == {child}  # type: ignore[attr-defined]
    assert child.live_body is None
    assert ran == ["fn", "process", "live", "fn"]
    assert rec.calls == []


async def test_a_lean_childs_waiters_are_called_on_ready_and_on_close() -> None:
    """A waiter on a lean child's readiness (its record made by the wait)
    is called when the child is ready; one added after it left the tree is
    called at once."""
    gate = anyio.Event()
    mirror = Mirror()

    @coco.fn
    async def consume(value: int) -> None:
        mirror.target.declare("v", value)
        if value == 2:
            await gate.wait()

    async with feeding("lean-waiters", consume) as fed:
        await fed.commit(k=1)
        await wait_for(lambda: mirror.rows == {"v": 1})
        [child] = children_of(fed.each)
        await wait_for(lambda: child.unready == 0)
        assert child.extra is None
        await fed.feed.commit(k=2)
        await wait_for(lambda: child.unready > 0)
        called: list[str] = []
        child.on_ready(lambda: called.append("ready"))
        assert called == [] and child.waiters is not None
        gate.set()
        await wait_for(lambda: called == ["ready"])
        assert child.waiters is None and mirror.rows == {"v": 2}
        await fed.feed.commit(k=None)
        await wait_for(lambda: not child.alive)
        assert child.closed
        child.on_ready(lambda: called.append("closed"))
        assert called == ["ready", "closed"]
        await wait_for(lambda: mirror.rows == {})


async def test_re_mounting_a_mount_each_with_other_kwargs_gives_its_children_a_new_spec() -> None:
    mirror = Mirror()
    factor = [2]
    handles: list[coco.ComponentMountHandle] = []

    @coco.fn
    def produce(lm: LiveMap[int, int]) -> None:
        for i in range(5):
            lm.declare_entry(i, i)

    @coco.fn
    def consume(value: int, *, times: int) -> None:
        mirror.target.declare(value, value * times)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[int, int] = await LiveMap.create()
        await coco.mount(produce, lm)
        handles.append(await coco.mount_each(consume, lm, times=factor[0]))

    app = coco.App("lean-respec", main)
    await run_app(app)
    assert mirror.rows == {i: i * 2 for i in range(5)}
    before = {id(c.spec) for c in children_of(handles[-1])}
    factor[0] = 3
    await run_app(app)
    assert mirror.rows == {i: i * 3 for i in range(5)}
    children = children_of(handles[-1])
    after = {id(c.spec) for c in children}
    assert len(after) == 1 and after.isdisjoint(before)
    assert children[0].kwargs == {"times": 3}


def test_a_closed_readiness_counts_into_nothing() -> None:
    """``closed`` is ``not alive``: a closed child's crossings do not reach
    its parent (which keeps it as its ``parent``), and a closed root's do
    not wake the app run; closing makes no record of the rare fields."""
    woken: list[int] = []
    root = Readiness(None, lambda: woken.append(1))
    child = Readiness(root, None)
    root.count_child(child)
    assert not root.closed and not child.closed
    assert root.extra is not None and child.extra is None
    child.set_self_ready(True)
    assert root.unready == 1 and not woken
    root.set_self_ready(True)
    assert woken == [1]
    child.close()
    assert child.closed and not child.alive and child.parent is root
    assert child.extra is None
    child.set_self_ready(False)  # (a crossing of a closed child)
    assert child.unready == 1 and root.unready == 0
    child.set_self_ready(True)
    assert root.unready == 0 and woken == [1]
    root.set_self_ready(False)
    root.close()
    root.set_self_ready(True)
    assert root.closed and woken == [1]  # a closed root wakes nobody


def test_readiness_records_what_only_some_set() -> None:
    parent = Readiness(None, None)
    child = Readiness(parent, None)
    parent.tracked = set()
    parent.count_child(child)
    assert parent.tracked == {child}
    child.set_self_ready(True)
    assert parent.tracked == set() and parent.unready == 1
    fired: list[str] = []
    child.on_first = lambda: fired.append("first")
    child.restart()
    assert parent.tracked == {child}
    child.hold(1)  # (a live component's: work in progress)
    child.mark_live_ready()
    assert fired == ["first"] and child.live_marked and child.live_busy == 1
    assert not child.self_ready
    child.hold(-1)
    assert child.self_ready and child.unready == 0 and parent.tracked == set()
    child.restart()
    assert not child.live_marked and child.live_busy == 0 and not child.self_ready
