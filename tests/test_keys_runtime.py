"""Lists in path parts and mount_each keys become tuples, as in declarations."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import Recorder, run_app

import livemap as coco

pytestmark = pytest.mark.anyio


def typed(key: Any) -> Any:
    if type(key) in (tuple, list):
        return (type(key).__name__, [typed(p) for p in key])
    return (type(key).__name__, key)


async def test_list_parts_become_tuples() -> None:
    """A list subpath part, a list mount_each key and a list operator subpath
    are the equal tuples in the component paths."""
    rec = Recorder()

    @coco.fn
    async def leaf(tag: str) -> None:
        raise RuntimeError(tag)

    class Live:
        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.update(["l", [1]], leaf, "op-list")
            await op.update(("t", [2]), leaf, "op-tuple")
            await op.mark_ready()

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(rec):
            await coco.mount(coco.component_subpath([1, 2]), leaf, "subpath")
            await coco.mount_each(leaf, [([3, [4]], "each")])
            await coco.mount(Live)

    await run_app(coco.App("t", main))
    got = {str(exc): typed(tuple(ctx.stable_path)) for exc, ctx in rec.calls}
    assert got["subpath"] == typed(((1, 2),))
    assert got["each"] == typed((coco.Symbol("leaf"), (3, (4,))))
    assert got["op-list"] == typed((coco.Symbol("Live"), "l", (1,)))
    assert got["op-tuple"] == typed((coco.Symbol("Live"), "t", (2,)))
