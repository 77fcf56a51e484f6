"""What the tests of lean components share: a live producer into a
LiveMap (:class:`Feed`), and the app they run in (:func:`feeding`): its root
makes the map, mounts the producer at ``/p`` and a ``mount_each`` of the
test's processor over the map."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
from helpers import TIMEOUT

import livemap as coco
from livemap import LiveMap
from livemap._runtime._component import Component


class Feed:
    """A live producer of ``state`` into a LiveMap: :meth:`commit` has it
    declare the current state (one commit)."""

    def __init__(self) -> None:
        self.state: dict[str, int] = {}
        self.send, self.recv = anyio.create_memory_object_stream[anyio.Event](10)
        feed = self

        class Producer:
            def __init__(self, lm: LiveMap[str, int]) -> None:
                self.lm = lm

            def process(self) -> None:
                for key, value in feed.state.items():
                    self.lm.declare_entry(key, value)

            async def process_live(self, operator: coco.LiveComponentOperator) -> None:
                await operator.update_full()
                await operator.mark_ready()
                async for done in feed.recv:
                    await operator.update_full()
                    done.set()

        self.producer = Producer

    async def commit(self, **changes: int | None) -> None:
        for key, value in changes.items():
            if value is None:
                self.state.pop(key, None)
            else:
                self.state[key] = value
        done = anyio.Event()
        with anyio.fail_after(TIMEOUT):
            await self.send.send(done)
            await done.wait()

    def close(self) -> None:
        self.send.close()
        self.recv.close()


def children_of(handle: coco.ComponentMountHandle) -> list[Component]:
    """The children of the component behind ``handle``."""
    comp: Component = handle._component  # type: ignore[attr-defined]
    return list((comp.children or {}).values())


class Fed:
    """A running app of :func:`feeding`: its :attr:`feed`, the maps its root
    made and the handles of its ``mount_each`` (one per run of the root)."""

    def __init__(self) -> None:
        self.feed = Feed()
        self.maps: list[LiveMap[str, int]] = []
        self.handles: list[coco.ComponentMountHandle] = []

    @property
    def map(self) -> LiveMap[str, int]:
        """The map the root made first."""
        return self.maps[0]

    @property
    def each(self) -> coco.ComponentMountHandle:
        """The handle of the latest ``mount_each``."""
        return self.handles[-1]

    async def commit(self, **changes: int | None) -> None:
        """The feed commits ``changes``, and the map settles."""
        await self.feed.commit(**changes)
        with anyio.fail_after(TIMEOUT):
            await self.map.settle()


@asynccontextmanager
async def feeding(
    name: str, consume: Any, handler: Callable[..., Any] | None = None
) -> AsyncIterator[Fed]:
    """A live app ``name`` (ready when entered, stopped on the way out,
    within TIMEOUT): its root makes a LiveMap, mounts the feed's producer
    into it at ``/p`` and ``mount_each(consume, map)``, all under the
    exception handler ``handler`` if given."""
    fed = Fed()

    @coco.fn
    async def main() -> None:
        async with AsyncExitStack() as stack:
            if handler is not None:
                await stack.enter_async_context(coco.exception_handler(handler))
            lm: LiveMap[str, int] = await LiveMap.create()
            fed.maps.append(lm)
            await coco.mount(coco.component_subpath("p"), fed.feed.producer, lm)
            fed.handles.append(await coco.mount_each(consume, lm))

    try:
        with anyio.fail_after(TIMEOUT):
            async with coco.App(name, main).update(live=True) as handle:
                await handle.ready()
                yield fed
                await handle.stop()
    finally:
        fed.feed.close()
