"""One App object, its runs on different event loops: nothing bound to one
loop outlives the run that made it, also when that run was interrupted."""

from __future__ import annotations

import anyio
import pytest

import livemap as coco
from livemap import LiveMap

ORDERS = [("asyncio", "trio"), ("trio", "asyncio"), ("asyncio", "asyncio"), ("trio", "trio")]


@pytest.mark.parametrize(("first", "then"), ORDERS)
@pytest.mark.parametrize("where", ["mount_each", "live"])
def test_an_interrupted_run_leaves_nothing_for_the_next_loop(
    first: str, then: str, where: str
) -> None:
    state = {"interrupt": True}
    processed: list[int] = []

    @coco.fn
    async def per_entry(value: int) -> None:
        await anyio.sleep(0.001 * value)
        if value == 2 and state["interrupt"]:
            raise SystemExit(3)
        processed.append(value)

    class Live:
        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.mark_ready()
            if state["interrupt"]:
                await anyio.sleep(0.005)
                raise SystemExit(3)

    @coco.fn
    async def main() -> int:
        lm: LiveMap[str, int] = await LiveMap.create()
        for key, value in [("a", 1), ("b", 2), ("c", 3), ("d", 4)]:
            lm.declare_entry(key, value)
        if where == "live":
            await coco.mount(Live)
        await coco.mount_each(per_entry, lm.consumer(concurrency=2))
        return 7

    app = coco.App("loop-switch", main)
    with pytest.raises(SystemExit):
        app.update_blocking(backend=first)
    state["interrupt"] = False
    processed.clear()
    assert app.update_blocking(backend=then) == 7
    assert sorted(processed) == [1, 2, 3, 4]
    # and once more, back on the first loop
    processed.clear()
    assert app.update_blocking(backend=first) == 7
