"""Faults in the commit path: a commit's effects downstream (the consumer of a
LiveMap, the sink of a KeyedTarget) never depend on what happens after them.

* A conflict handler that is interrupted (the component re-mounted, the run
  stopped, the task running the update cancelled) while it runs: the rest of
  the commit has reached the consumer or the sink already.
* A ``BaseException`` from a value's ``__eq__`` in the middle of a commit: the
  commit is all or nothing for the target's record, on both cores.
* A ``KeyedTarget`` used on one event loop after another: nothing bound to the
  first loop is used on the next.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, Mirror, Remote, RemoteLive, run_app, wait_for

import livemap as coco
from livemap import LiveMap

pytestmark = pytest.mark.anyio

# -- 1. an async conflict handler interrupted while it runs --------------------------------


class SlowHandler:
    """An async exception handler that stays busy with the first conflict it
    gets until it is cancelled; it deals with later ones at once."""

    def __init__(self) -> None:
        self.entered = anyio.Event()
        self.conflicts: list[coco.KeyConflictError] = []
        self.cancelled = False

    async def __call__(self, exc: BaseException, ctx: coco.ExceptionContext) -> None:
        if not isinstance(exc, coco.KeyConflictError):
            raise exc
        self.conflicts.append(exc)
        if len(self.conflicts) > 1:
            return
        self.entered.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.cancelled = True
            raise


class Scene:
    """Component A owns ``"x"``; B declares ``"x"`` and ``"y"`` and has a slow
    conflict handler.  ``kind`` is ``"map"`` (a LiveMap with a ``mount_each``
    consumer recording what it processes) or ``"target"`` (a KeyedTarget
    whose sink keeps its rows)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.handler = SlowHandler()
        self.seen: dict[str, str] = {}  # what the map's consumer processed
        self.mirror = Mirror("rows")  # the target and its sink's rows
        self.lm: LiveMap[str, tuple[str, str]] | None = None

    def declarer(self) -> Callable[[str, Any], None]:
        if self.kind == "map":
            assert self.lm is not None
            return self.lm.declare_entry
        return self.mirror.target.declare

    def value(self, key: str, who: str) -> Any:
        # the consumer gets the value only: it carries its key
        return (key, who) if self.kind == "map" else who

    async def begin(self) -> None:
        """In the root's run: create the map, mount A (and the consumer), and
        wait until they are ready."""
        if self.kind == "map":
            self.lm = await LiveMap.create()
        a = await coco.mount(
            coco.component_subpath("a"), owner_a, self.declarer(), self.value("x", "a")
        )
        await a.ready()
        if self.kind == "map":
            assert self.lm is not None
            each = await coco.mount_each(consume, self.lm, self.seen)
            await each.ready()

    async def mount_b(self) -> coco.ComponentMountHandle:
        async with coco.exception_handler(self.handler):
            return await coco.mount(
                coco.component_subpath("b"),
                claimant_b,
                self.declarer(),
                self.value("x", "b"),
                self.value("y", "b"),
            )

    async def settle(self) -> None:
        """Wait until the map's consumer has processed every committed change."""
        if self.lm is not None:
            with anyio.fail_after(TIMEOUT):
                await self.lm.settle()

    def check(self) -> None:
        """``y`` is B's, downstream as in the record; ``x`` stays A's."""
        if self.kind == "map":
            lm = self.lm
            assert lm is not None
            assert dict(lm.items()) == {"x": ("x", "a"), "y": ("y", "b")}
            assert self.seen == {"x": "a", "y": "b"}, "the consumer never heard of 'y'"
        else:
            assert self.mirror.record() == {"x": "a", "y": "b"}
            assert self.mirror.rows == self.mirror.record(), "the sink is behind the record"
        assert [exc.key for exc in self.handler.conflicts[:1]] == ["x"]


@coco.fn
async def owner_a(declare: Callable[[str, Any], None], x: Any) -> None:
    declare("x", x)


@coco.fn
async def claimant_b(declare: Callable[[str, Any], None], x: Any, y: Any) -> None:
    declare("x", x)
    declare("y", y)


@coco.fn
def consume(value: tuple[str, str], seen: dict[str, str]) -> None:
    seen[value[0]] = value[1]


@pytest.mark.parametrize("kind", ["map", "target"])
async def test_remount_during_conflict_handler_loses_nothing(kind: str) -> None:
    """B is re-mounted (declaring the same) while its handler runs: the change
    its first commit made downstream is not lost, and is not suppressed by the
    re-run's equal declaration."""
    scene = Scene(kind)
    with Remote() as remote:

        @coco.fn
        async def main() -> None:
            await scene.begin()
            await coco.mount(RemoteLive, remote)

        async def mount_b(op: coco.LiveComponentOperator) -> coco.ComponentMountHandle:
            async with coco.exception_handler(scene.handler):
                return await op.update(
                    "b",
                    claimant_b,
                    scene.declarer(),
                    scene.value("x", "b"),
                    scene.value("y", "b"),
                )

        async with coco.App("commit-faults", main).update(live=True) as handle:
            with anyio.fail_after(TIMEOUT):
                await handle.ready()
            await remote(mount_b)
            with anyio.fail_after(TIMEOUT):
                await scene.handler.entered.wait()
            h = await remote(mount_b)  # the re-run cancels the first one's handler
            with anyio.fail_after(TIMEOUT):
                await h.ready()
            await scene.settle()
            await wait_for(lambda: scene.handler.cancelled)
            assert len(scene.handler.conflicts) == 2  # each run reported its conflict
            scene.check()


@pytest.mark.parametrize("interruption", ["stop", "cancel"])
@pytest.mark.parametrize("kind", ["map", "target"])
async def test_interrupted_conflict_handler_loses_nothing(kind: str, interruption: str) -> None:
    """The run is stopped (``handle.stop()``), or the task awaiting
    ``app.update()`` is cancelled, while B's handler runs: the consumer has
    heard of ``y`` / the sink has it, and a later run declaring the same
    keeps it there."""
    scene = Scene(kind)

    @coco.fn
    async def main() -> None:
        await scene.begin()
        await scene.mount_b()

    app = coco.App("commit-faults", main)
    handle = app.update()
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(handle.result)
            await scene.handler.entered.wait()
            # (the consumer works while the handler runs; wait for it to be done)
            await scene.settle()
            if interruption == "stop":
                await handle.stop()
            else:
                tg.cancel_scope.cancel()
    assert scene.handler.cancelled
    scene.check()
    if kind == "target":
        # A later run of B declares the same: nothing to send, nothing lost.
        await run_app(app)
        assert len(scene.handler.conflicts) == 2
        scene.check()
