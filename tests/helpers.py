"""Test helpers: timeouts on every wait, and small recording processors."""

from __future__ import annotations

from typing import Any

import anyio

import livemap as coco

TIMEOUT = 10.0


async def run_app(app: coco.App, *, timeout: float = TIMEOUT) -> coco.UpdateStats:
    """Run one catch-up update of ``app`` with a timeout; return its stats."""
    handle = app.update()
    with anyio.fail_after(timeout):
        await handle
    return handle.stats()


async def wait_for(predicate: Any, *, timeout: float = TIMEOUT, interval: float = 0.001) -> None:
    """Poll ``predicate()`` until it is true, failing after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(interval)


class Recorder:
    """Collects handler calls: ``(exception, ExceptionContext)`` pairs."""

    def __init__(self) -> None:
        self.calls: list[tuple[BaseException, coco.ExceptionContext]] = []

    def __call__(self, exc: BaseException, ctx: coco.ExceptionContext) -> None:
        self.calls.append((exc, ctx))

    def of_type(
        self, cls: type[BaseException]
    ) -> list[tuple[BaseException, coco.ExceptionContext]]:
        return [(e, c) for e, c in self.calls if isinstance(e, cls)]
