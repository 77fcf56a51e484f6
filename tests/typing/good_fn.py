"""``fn`` on methods binds ``self``: forms that must type-check under
``mypy --strict``."""

from __future__ import annotations

from collections.abc import Callable

from typing_extensions import assert_type

import livemap as coco


class Handler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    @coco.fn
    def run(self, x: int) -> int:
        return x * self.factor

    @coco.fn
    async def run_async(self, x: int, *, tag: str = "") -> str:
        return f"{tag}{x * self.factor}"


async def main() -> None:
    h = Handler(2)
    bound: Callable[[int], int] = h.run
    unbound: Callable[[Handler, int], int] = Handler.run
    assert_type(bound(1) + unbound(h, 1), int)
    assert_type(h.run(21), int)
    assert_type(Handler.run(h, 21), int)
    assert_type(await h.run_async(1, tag="x"), str)
    await coco.mount(h.run, 21)
    await coco.mount(coco.component_subpath("a"), h.run_async, 1, tag="t")
    await coco.mount_each(h.run, [("k", 1)])
    await coco.mount_each(h.run_async, [("k", 1)], tag="t")
    assert_type(await coco.use_mount(h.run, 2), int)
    assert_type(await coco.use_mount(h.run_async, 2), str)
