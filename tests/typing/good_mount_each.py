"""``mount_each``: forms that must type-check under ``mypy --strict``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import livemap as coco
from livemap import LiveMap


def process_str(value: str) -> None: ...


async def process_str_async(value: str, prefix: str, *, upper: bool = False) -> None: ...


def process_object(value: object) -> None: ...


@coco.fn
async def process_int(value: int, scale: float = 1.0) -> float:
    return value * scale


async def pairs() -> AsyncIterator[tuple[str, int]]:
    yield "a", 1


class Feed:
    """A feed of its own: anything with ``watch``."""

    async def watch(self, subscriber: coco.LiveMapSubscriber[str, int]) -> None:
        await subscriber.update_all()
        await subscriber.mark_ready()


async def main() -> None:
    lm: LiveMap[str, str] = await LiveMap.create()
    lm.declare_entry("k", "v")
    lm.declare_entry(key="k2", value="v2")
    numbers: LiveMap[int, int] = await LiveMap.create()

    await coco.mount_each(process_str, lm)
    await coco.mount_each(process_object, lm)
    await coco.mount_each(process_str_async, lm, "p")
    await coco.mount_each(process_str_async, lm, "p", upper=True)
    await coco.mount_each(process_str_async, lm.consumer(concurrency=4), prefix="p")
    await coco.mount_each(process_int, numbers)
    await coco.mount_each(process_int, numbers.consumer(retry=coco.RetryPolicy()), 2.0)
    await coco.mount_each(coco.component_subpath("each"), process_str, lm)
    await coco.mount_each(coco.component_subpath("each"), process_int, numbers, scale=3.0)

    # plain and async iterables of (key, value) pairs
    await coco.mount_each(process_str, [("a", "x"), ("b", "y")])
    await coco.mount_each(process_int, {1: 2}.items())
    await coco.mount_each(process_int, pairs())
    await coco.mount_each(process_int, ((str(i), i) for i in range(3)), 0.5)

    # a view seen through the protocol, and a feed of one's own
    view: coco.LiveMapView[str, str] = lm
    await coco.mount_each(process_str, view)
    await coco.mount_each(process_int, Feed())
    handle: coco.ComponentMountHandle = await coco.mount_each(process_object, Feed())
    await handle.ready()


app = coco.App("each", main)


class PerEntry:
    """A live-component class as ``mount_each``'s processor."""

    def __init__(self, value: str, prefix: str) -> None:
        self.value = value
        self.prefix = prefix

    def process(self) -> None: ...

    async def process_live(self, operator: coco.LiveComponentOperator) -> None:
        await operator.mark_ready()


async def live_per_entry() -> None:
    lm: LiveMap[str, str] = await LiveMap.create()
    await coco.mount_each(PerEntry, lm, "p")
    await coco.mount_each(coco.component_subpath("list"), PerEntry, [("k", "v")], prefix="p")
