"""Test helpers: timeouts on every wait, small recording processors, and a
live producer driven from the test."""

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


# -- reliability helpers (stateful, fault, soak and bad-input tests) --------------------


def current_tasks() -> set[Any]:
    """Every task of the running event loop (asyncio or trio)."""
    import sniffio

    if sniffio.current_async_library() == "trio":
        import trio

        found: set[Any] = set()
        stack = [trio.lowlevel.current_root_task()]
        while stack:
            task = stack.pop()
            found.add(task)
            for nursery in task.child_nurseries:
                stack.extend(nursery.child_tasks)
        return found
    import asyncio

    return set(asyncio.all_tasks())


class Mirror:
    """A ``KeyedTarget`` whose sink keeps ``rows`` (idempotently) and every batch.

    ``fail_batches`` makes the next N batches raise ``OSError`` after applying
    ``fail_after_items`` of their changes (a sink failing mid-batch).
    """

    def __init__(self, name: str = "mirror") -> None:
        self.rows: dict[Any, Any] = {}
        self.batches: list[coco.TargetBatch[Any, Any]] = []
        self.fail_batches = 0
        self.fail_after_items = 0
        self.target: coco.KeyedTarget[Any, Any] = coco.KeyedTarget(name, self._apply)

    def _apply(self, batch: coco.TargetBatch[Any, Any]) -> None:
        self.batches.append(batch)
        failing = self.fail_batches > 0
        if failing:
            self.fail_batches -= 1
        applied = 0
        for key in batch.deletes:
            if failing and applied == self.fail_after_items:
                raise OSError(f"{self.target.name}: sink failed mid-batch")
            self.rows.pop(key, None)
            applied += 1
        for key, value in batch.upserts:
            if failing and applied == self.fail_after_items:
                raise OSError(f"{self.target.name}: sink failed mid-batch")
            self.rows[key] = value
            applied += 1

    def record(self) -> dict[Any, Any]:
        """What the target holds (its record), as a dict."""
        return dict(self.target.items())


class Remote:
    """Runs jobs inside a live component (:class:`RemoteLive`): ``await
    remote(fn)`` calls ``await fn(operator)`` in the component's
    ``process_live`` task and returns its result (or raises its exception).

    Use it as a context manager so that its streams are closed.
    """

    def __init__(self) -> None:
        self.send, self.recv = anyio.create_memory_object_stream[Any](16)

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.send.close()
        self.recv.close()

    async def __call__(self, fn: Any, *, timeout: float = TIMEOUT) -> Any:
        done = anyio.Event()
        box: list[Any] = []
        with anyio.fail_after(timeout):
            await self.send.send((fn, box, done))
            await done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value


class RemoteLive:
    """The live component behind a :class:`Remote` (marks itself ready at once)."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote

    def process(self) -> None:
        pass

    async def process_live(self, op: coco.LiveComponentOperator) -> None:
        await op.mark_ready()
        async with self.remote.recv.clone() as recv:
            async for fn, box, done in recv:
                try:
                    box.append((True, await fn(op)))
                except Exception as exc:
                    box.append((False, exc))
                finally:
                    done.set()


class LiveDriver:
    """Drives a :class:`LiveProducer`: each ``refresh()`` re-runs its
    ``process()`` with ``state`` changed (``None``: the key deleted) and
    returns once it has committed."""

    def __init__(self, state: dict[str, int], *, buffer: int = 100) -> None:
        self.state = dict(state)
        self.send, self.recv = anyio.create_memory_object_stream[anyio.Event](buffer)

    def close(self) -> None:
        self.send.close()
        self.recv.close()

    async def refresh(self, **changes: int | None) -> None:
        for key, version in changes.items():
            if version is None:
                del self.state[key]
            else:
                self.state[key] = version
        done = anyio.Event()
        await self.send.send(done)
        with anyio.fail_after(TIMEOUT):
            await done.wait()


class LiveProducer:
    """A live component declaring its driver's ``state`` into ``lm``, each
    key with :meth:`value` (``(key, version)``), again at each refresh."""

    def __init__(self, lm: coco.LiveMap[str, Any], driver: LiveDriver) -> None:
        self.lm = lm
        self.driver = driver

    def value(self, key: str, version: int) -> Any:
        return (key, version)

    def process(self) -> None:
        value = self.value
        for key, version in self.driver.state.items():
            self.lm.declare_entry(key, value(key, version))

    async def process_live(self, op: coco.LiveComponentOperator) -> None:
        await op.update_full()
        await op.mark_ready()
        async for done in self.driver.recv:
            await op.update_full()
            done.set()
