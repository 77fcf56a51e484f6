"""A path re-mounted from a ``mount_each`` to a plain function (or the other
kind of ``mount_each``) leaves the old ``mount_each``'s host behind: the
children of what now runs there are ordinary children, run in their own
tasks, and the old host's workers end."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, wait_for

import livemap as coco
from livemap import LiveMap, Symbol
from livemap._feed._each import EachHost
from livemap._runtime import _app

pytestmark = pytest.mark.anyio

N = 3


class Barrier:
    """``N`` children that each wait until all ``N`` run at once."""

    def __init__(self) -> None:
        self.inside = 0
        self.all_in = anyio.Event()

    async def meet(self) -> None:
        self.inside += 1
        if self.inside == N:
            self.all_in.set()
        await self.all_in.wait()


def remounting_app(kind: str, state: dict[str, Any]) -> coco.App:
    """An app whose main mounts, at one path, a ``mount_each`` of ``kind``
    (``"feed"``: over a map with one key at a time; ``"static"``: over a
    list) on its first update, and a plain function on the next ones."""

    @coco.fn
    async def entry(value: int) -> None:
        await anyio.sleep(0)

    @coco.fn
    async def produce(lm: LiveMap[str, int]) -> None:
        for i in range(4):
            lm.declare_entry(f"k{i}", i)

    @coco.fn
    async def child(i: int) -> None:
        state["runs"].append(i)
        await state["barrier"].meet()

    @coco.fn
    async def plain() -> None:
        for i in range(N):
            await coco.mount(coco.component_subpath("c", i), child, i)

    @coco.fn
    async def main() -> None:
        at = coco.component_subpath("here")
        if state["mode"] == "each":
            if kind == "feed":
                lm: LiveMap[str, int] = await LiveMap.create()
                await coco.mount(produce, lm)
                await coco.mount_each(at, entry, lm.consumer(concurrency=1))
            else:
                await coco.mount_each(at, entry, [(f"k{i}", i) for i in range(4)])
        else:
            await coco.mount(at, plain)

    return coco.App(f"remount-{kind}", main)


@pytest.mark.parametrize("kind", ["feed", "static"])
async def test_a_plain_function_remounted_over_a_mount_each_runs_its_children_freely(
    kind: str,
) -> None:
    """The plain function's async children all run at once: none waits for
    a worker of the old ``mount_each``'s pool (one at a time over the feed),
    and each stays in the tree (none is put at rest as an entry)."""
    state: dict[str, Any] = {"mode": "each", "runs": [], "barrier": Barrier()}
    app = remounting_app(kind, state)
    with anyio.fail_after(TIMEOUT):
        await app.update()
    state["mode"] = "plain"
    unmounted = []
    for _ in range(2):
        state["barrier"] = Barrier()
        with anyio.fail_after(TIMEOUT):
            stats = await _stats(app)
        assert state["barrier"].all_in.is_set()
        unmounted.append(stats.components_unmounted)
    assert sorted(state["runs"]) == sorted(list(range(N)) * 2)
    # the first plain update unmounts the four entries (over the feed: kept
    # at rest by the host, and the producer); the children of the plain
    # function stay mounted between the two updates
    assert unmounted == [5 if kind == "feed" else 4, 0]


async def _stats(app: coco.App) -> coco.UpdateStats:
    handle = app.update()
    await handle
    return handle.stats()


@pytest.mark.parametrize("kind", ["feed", "static"])
async def test_a_mount_each_remounted_as_a_plain_function_in_one_live_run_leaves_no_worker(
    kind: str,
) -> None:
    """Within one live run: once the plain function's run has committed, the
    old pool's workers have ended, and its children ran all at once."""
    state: dict[str, Any] = {"mode": "each", "runs": [], "barrier": Barrier()}
    remount = anyio.Event()
    remounted = anyio.Event()

    @coco.fn
    async def entry(value: int) -> None:
        await anyio.sleep(0)

    @coco.fn
    async def child(i: int) -> None:
        state["runs"].append(i)
        await state["barrier"].meet()

    @coco.fn
    async def plain() -> None:
        for i in range(N):
            await coco.mount(coco.component_subpath("c", i), child, i)

    @coco.fn
    async def produce(lm: LiveMap[str, int]) -> None:
        for i in range(4):
            lm.declare_entry(f"k{i}", i)

    class Parent:
        def __init__(self) -> None:
            self.mode = "each"

        async def process(self) -> None:
            at = coco.component_subpath("here")
            if self.mode == "each":
                if kind == "feed":
                    lm: LiveMap[str, int] = await LiveMap.create()
                    await coco.mount(produce, lm)
                    await coco.mount_each(at, entry, lm.consumer(concurrency=1))
                else:
                    await coco.mount_each(at, entry, [(f"k{i}", i) for i in range(4)])
            else:
                await coco.mount(at, plain)

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.update_full()
            await op.mark_ready()
            await remount.wait()
            self.mode = "plain"
            await op.update_full()
            remounted.set()
            await anyio.sleep_forever()

    @coco.fn
    async def main() -> None:
        await coco.mount(Parent)

    name = f"remount-live-{kind}"
    async with coco.App(name, main).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
            here = _component(name, Symbol("Parent"), "here")
            old = here.host
            assert isinstance(old, EachHost) and old.pool.workers > 0
            remount.set()
            await remounted.wait()
            assert state["barrier"].all_in.is_set()
            assert here.host is None
            # the old pool's workers end (they were parked, waiting for work)
            await wait_for(lambda: old.pool.workers == 0, timeout=2)
    assert sorted(state["runs"]) == list(range(N))


def _component(app_name: str, *path: Any) -> Any:
    """The component of app ``app_name`` at ``path`` (one part per level)."""
    node = _app._trees[app_name].root
    for part in path:
        assert node is not None and node.children is not None
        node = node.children[(part,)]
    return node
