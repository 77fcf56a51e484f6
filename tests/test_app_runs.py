"""What an app run gives back: the main function's value."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from helpers import TIMEOUT

import livemap as coco

pytestmark = pytest.mark.anyio

BACKENDS = ["asyncio", "trio"]


# -- the main function's value -----------------------------------------------------


async def test_update_returns_the_main_functions_value() -> None:
    @coco.fn
    async def main(x: int) -> dict[str, int]:
        return {"x": x}

    app = coco.App("values", main, 7)
    with anyio.fail_after(TIMEOUT):
        assert await app.update() == {"x": 7}
        handle = app.update()
        assert await handle.result() == {"x": 7}
        assert await handle.result() == {"x": 7}  # awaited again: the same run's value
    assert handle.stats().components_run == 1  # the stats stay on the handle


async def test_a_sync_main_functions_value() -> None:
    @coco.fn
    def main() -> str:
        return "sync"

    with anyio.fail_after(TIMEOUT):
        assert await coco.App("values", main).update() == "sync"


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_blocking_returns_the_main_functions_value(backend: str) -> None:
    @coco.fn
    async def main() -> list[int]:
        return [1, 2]

    assert coco.App("values", main).update_blocking(backend=backend) == [1, 2]


async def test_result_after_stop_is_the_value_if_main_had_returned() -> None:
    @coco.fn
    async def main() -> str:
        await coco.mount(coco.auto_refresh(lambda: None, interval=0.01))
        return "done"

    handle = coco.App("values", main).update(live=True)
    got: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            got.append(await handle.result())

        tg.start_soon(run)
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
            await handle.stop()
    assert got == ["done"]


async def test_result_after_stop_is_none_if_main_had_not_returned() -> None:
    started = anyio.Event()

    @coco.fn
    async def main() -> str:
        started.set()
        await anyio.sleep_forever()
        return "never"

    handle = coco.App("values", main).update(live=True)
    got: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            got.append(await handle.result())

        tg.start_soon(run)
        with anyio.fail_after(TIMEOUT):
            await started.wait()
            await handle.stop()
    assert got == [None]


async def test_async_with_gives_the_value_through_result() -> None:
    @coco.fn
    async def main() -> int:
        await coco.mount(coco.auto_refresh(lambda: None, interval=0.01))
        return 5

    async with coco.App("values", main).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
    with anyio.fail_after(TIMEOUT):
        assert await handle.result() == 5
