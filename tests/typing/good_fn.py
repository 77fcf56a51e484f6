"""``fn``: methods bind ``self``, ``fn.as_async`` makes a function async,
``batching=True`` takes one input; forms that must type-check under
``mypy --strict``."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from typing_extensions import assert_type

import livemap as coco


class Handler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    @coco.fn
    def run(self, x: int) -> int:
        return x * self.factor

    @coco.fn(memo=True, version=2)
    async def run_async(self, x: int, *, tag: str = "") -> str:
        return f"{tag}{x * self.factor}"

    @coco.fn.as_async
    def blocking(self, x: int) -> int:
        return x

    @coco.fn.as_async(batching=True, max_batch_size=8)
    def embed(self, texts: list[str]) -> list[int]:
        return [len(t) for t in texts]

    @coco.fn(batching=True)
    async def embed_async(self, texts: list[str]) -> list[float]:
        return [float(len(t)) for t in texts]


@coco.fn.as_async
def sync_to_async(name: str) -> int:
    return len(name)


@coco.fn.as_async()
async def already_async(name: str) -> int:
    return len(name)


@coco.fn.as_async(batching=True)
def batched(texts: list[str]) -> list[int]:
    return [len(t) for t in texts]


@coco.fn(batching=True, max_batch_size=4)
async def batched_async(texts: list[str]) -> list[bool]:
    return [bool(t) for t in texts]


@coco.fn(logic_tracking="self", deps={"prompt": "p"}, runner=None)
def plain(x: int) -> str:
    return str(x)


@coco.fn()
def bare_call(x: int) -> int:
    return x


async def main() -> None:
    h = Handler(2)
    bound: Callable[[int], int] = h.run
    unbound: Callable[[Handler, int], int] = Handler.run
    assert_type(bound(1) + unbound(h, 1), int)
    assert_type(h.run(21), int)
    assert_type(Handler.run(h, 21), int)
    assert_type(await h.run_async(1, tag="x"), str)
    assert_type(await h.blocking(1), int)
    made_async: Callable[[str], Coroutine[Any, Any, int]] = sync_to_async
    assert_type(await made_async("a"), int)
    assert_type(await sync_to_async("a"), int)
    assert_type(await already_async("a"), int)
    assert_type(plain(1), str)
    assert_type(bare_call(1), int)
    assert_type(await h.embed("a"), int)
    assert_type(await h.embed_async("a"), float)
    assert_type(await batched("a"), int)
    assert_type(await batched_async("a"), bool)
    assert_type(await h.embed.as_async("a"), int)
    assert_type(await coco.use_mount(batched, "a"), int)
    assert_type(await coco.use_mount(h.embed_async, "a"), float)
    await coco.mount_each(batched, [("k", "text")])
    assert_type(await plain.as_async(1), str)
    assert_type(await already_async.as_async("a"), int)
    assert_type(await h.run.as_async(2), int)
    await coco.mount(sync_to_async, "a")
    await coco.mount(h.blocking, 1)
    assert_type(await coco.use_mount(sync_to_async, "a"), int)
    assert_type(await coco.use_mount(already_async, "a"), int)
    await coco.mount(h.run, 21)
    await coco.mount(coco.component_subpath("a"), h.run_async, 1, tag="t")
    await coco.mount_each(h.run, [("k", 1)])
    await coco.mount_each(h.run_async, [("k", 1)], tag="t")
    assert_type(await coco.use_mount(h.run, 2), int)
    assert_type(await coco.use_mount(h.run_async, 2), str)
