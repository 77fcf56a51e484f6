"""How an app run ends and what it gives back: the main function's value,
live runs that end by themselves, ``update_blocking`` inside a running event
loop, interrupts raised by user code, and the end of a catch-up run."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, current_tasks, wait_for

import livemap as coco
from livemap import KeyedTarget, LiveMap, TargetBatch

pytestmark = pytest.mark.anyio

BACKENDS = ["asyncio", "trio"]


class Rows:
    """A KeyedTarget whose sink keeps the rows."""

    def __init__(self) -> None:
        self.rows: dict[Any, Any] = {}
        self.target: KeyedTarget[Any, Any] = KeyedTarget("rows", self._apply)

    def _apply(self, batch: TargetBatch[Any, Any]) -> None:
        for key in batch.deletes:
            del self.rows[key]
        self.rows.update(batch.upserts)


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


# -- live runs end when nothing live is left ---------------------------------------


def finite_app(rows: Rows, steps: list[int]) -> coco.App:
    """Plain components, and a live component whose ``process_live`` makes a
    few changes and returns."""

    @coco.fn
    def plain(key: str, value: int) -> None:
        rows.target.declare(key, value)

    class Finite:
        def __init__(self) -> None:
            self.n = 0

        def process(self) -> None:
            rows.target.declare("live", self.n)

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.update_full()
            await op.mark_ready()
            for _ in range(3):
                await anyio.sleep(0.01)
                self.n += 1
                steps.append(self.n)
                await op.update_full()

    @coco.fn
    async def main() -> str:
        await coco.mount(coco.component_subpath("a"), plain, "a", 1)
        await coco.mount(coco.component_subpath("b"), plain, "b", 2)
        await coco.mount(Finite)
        return "finished"

    return coco.App("finite", main)


async def test_a_live_run_ends_once_nothing_live_is_left() -> None:
    rows = Rows()
    steps: list[int] = []
    before = current_tasks()
    with anyio.fail_after(TIMEOUT):
        assert await finite_app(rows, steps).update(live=True) == "finished"
    assert steps == [1, 2, 3]  # process_live ran to its end
    assert rows.rows == {"a": 1, "b": 2, "live": 3}
    assert current_tasks() == before


async def test_a_live_run_of_plain_components_ends_after_its_catch_up() -> None:
    rows = Rows()

    @coco.fn
    def main() -> int:
        rows.target.declare("k", 1)
        return 1

    handle = coco.App("plain", main).update(live=True)
    with anyio.fail_after(TIMEOUT):
        assert await handle == 1
        await handle.ready()
    assert rows.rows == {"k": 1}


def blocking(call: Any) -> Any:
    """``call()`` on a thread of its own, failing the test if it has not
    returned within the timeout (a sync call cannot be cancelled)."""
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(call()), daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    if thread.is_alive():
        pytest.fail(f"still running after {TIMEOUT} s")
    assert outcome, "the call raised (see the thread's traceback)"
    return outcome[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_blocking_live_ends_once_nothing_live_is_left(backend: str) -> None:
    rows = Rows()
    steps: list[int] = []
    app = finite_app(rows, steps)
    assert blocking(lambda: app.update_blocking(live=True, backend=backend)) == "finished"
    assert steps == [1, 2, 3]
    assert rows.rows == {"a": 1, "b": 2, "live": 3}


async def test_a_live_run_with_auto_refresh_lasts_until_stop() -> None:
    ticks: list[int] = []

    @coco.fn
    async def main() -> str:
        await coco.mount(coco.auto_refresh(lambda: ticks.append(1), interval=0.005))
        return "main"

    handle = coco.App("refresh", main).update(live=True)
    ended = anyio.Event()
    got: list[Any] = []
    before = current_tasks()
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            got.append(await handle.result())
            ended.set()

        tg.start_soon(run)
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
            await wait_for(lambda: len(ticks) >= 5)
        assert not ended.is_set()  # the refresh is live: the run goes on
        with anyio.fail_after(TIMEOUT):
            await handle.stop()
    assert got == ["main"]
    assert current_tasks() == before


async def test_a_live_run_with_a_map_consumer_lasts_until_stop() -> None:
    seen: dict[str, int] = {}

    @coco.fn
    def produce(lm: LiveMap[str, int]) -> None:
        lm.declare_entry("a", 1)

    @coco.fn
    async def consume(value: int) -> None:
        seen["a"] = value

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        await coco.mount(produce, lm)
        await coco.mount_each(consume, lm)

    handle = coco.App("consumer", main).update(live=True)
    ended = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            await handle.result()
            ended.set()

        tg.start_soon(run)
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
        assert seen == {"a": 1}
        await anyio.sleep(0.05)
        # the consumer follows the map until it is retired: still live
        assert not ended.is_set()
        with anyio.fail_after(TIMEOUT):
            await handle.stop()
    assert ended.is_set()


async def test_a_live_run_ends_once_its_map_consumer_ends() -> None:
    seen: list[int] = []

    @coco.fn
    def produce(lm: LiveMap[str, int]) -> None:
        lm.declare_entry("a", 1)

    @coco.fn
    async def consume(value: int) -> None:
        seen.append(value)

    @coco.fn
    async def pipeline() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        await coco.mount(produce, lm)
        await coco.mount_each(consume, lm)

    class Once:
        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            handle = await op.update("pipeline", pipeline)
            await handle.ready()
            await op.mark_ready()
            await (await op.delete("pipeline")).ready()  # the consumer ends with it

    @coco.fn
    async def main() -> str:
        await coco.mount(Once)
        return "over"

    before = current_tasks()
    with anyio.fail_after(TIMEOUT):
        assert await coco.App("consumer ends", main).update(live=True) == "over"
    assert seen == [1]
    assert current_tasks() == before


# -- update_blocking inside a running event loop ------------------------------------


@pytest.mark.parametrize("helper_backend", BACKENDS)
async def test_update_blocking_inside_a_running_loop(helper_backend: str) -> None:
    threads: list[int] = []

    @coco.fn
    async def main(x: int) -> int:
        threads.append(threading.get_ident())
        await anyio.sleep(0)
        return x * 2

    app = coco.App("nested", main, 21)
    value = app.update_blocking(backend=helper_backend)
    assert value == 42
    assert threads and threads[0] != threading.get_ident()  # on a helper thread
    assert app.update_blocking(backend=helper_backend) == 42


@pytest.mark.parametrize("helper_backend", BACKENDS)
async def test_update_blocking_inside_a_running_loop_raises_the_failure(
    helper_backend: str,
) -> None:
    @coco.fn
    async def main() -> None:
        raise ValueError("main failed")

    with pytest.raises(ValueError, match="main failed"):
        coco.App("nested", main).update_blocking(backend=helper_backend)


@pytest.mark.parametrize("helper_backend", BACKENDS)
async def test_update_blocking_inside_a_running_loop_raises_an_interrupt_bare(
    helper_backend: str,
) -> None:
    with pytest.raises(SystemExit) as info:
        interrupting_app("async child", SystemExit).update_blocking(backend=helper_backend)
    assert type(info.value) is SystemExit


# -- KeyboardInterrupt and SystemExit come out bare ----------------------------------


def interrupting_app(where: str, exc_type: type[BaseException]) -> coco.App:
    """An app whose user code raises ``exc_type`` in ``where``: the main
    function, an async child (a task of its own), a sync child, a live
    component, an exception handler, a ``mount_each`` child."""

    @coco.fn
    async def async_child() -> None:
        await anyio.sleep(0)
        raise exc_type

    @coco.fn
    def sync_child() -> None:
        raise exc_type

    @coco.fn
    async def failing() -> None:
        raise ValueError("handled by a handler that raises")

    def handler(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        raise exc_type

    class Live:
        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await anyio.sleep(0.01)
            raise exc_type

    @coco.fn
    def produce(lm: LiveMap[str, int]) -> None:
        for key, value in [("a", 1), ("b", 2), ("c", 3)]:
            lm.declare_entry(key, value)

    @coco.fn
    async def per_entry(value: int) -> None:
        if value == 2:
            raise exc_type

    @coco.fn
    async def main() -> None:
        if where == "main":
            raise exc_type
        if where == "async child":
            await coco.mount(async_child)
        elif where == "sync child":
            await coco.mount(sync_child)
        elif where == "live":
            await coco.mount(Live)
        elif where == "handler":
            async with coco.exception_handler(handler):
                await coco.mount(failing)
        elif where == "mount_each":
            lm: LiveMap[str, int] = await LiveMap.create()
            await coco.mount(produce, lm)
            await coco.mount_each(per_entry, lm)

    return coco.App("interrupted", main)


WHERE = ["main", "async child", "sync child", "live", "handler", "mount_each"]


@pytest.mark.parametrize("where", WHERE)
async def test_system_exit_comes_out_of_update_bare(
    where: str, caplog: pytest.LogCaptureFixture
) -> None:
    before = current_tasks()
    with caplog.at_level(logging.WARNING):
        with anyio.fail_after(TIMEOUT), pytest.raises(SystemExit) as info:
            await interrupting_app(where, SystemExit).update()
        assert type(info.value) is SystemExit
        handle = interrupting_app(where, SystemExit).update(live=True)
        with anyio.fail_after(TIMEOUT), pytest.raises(SystemExit):
            await handle.result()
        with pytest.raises(SystemExit):  # awaited again
            await handle.result()
    assert current_tasks() == before
    assert caplog.records == []


async def test_system_exit_ends_an_async_with_block_bare() -> None:
    body_cancelled = False
    with anyio.fail_after(TIMEOUT), pytest.raises(SystemExit):
        async with interrupting_app("live", SystemExit).update(live=True):
            try:
                await anyio.sleep_forever()
            finally:
                body_cancelled = True
    assert body_cancelled


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", WHERE)
def test_system_exit_comes_out_of_update_blocking_bare(
    backend: str, where: str, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as info:
        interrupting_app(where, SystemExit).update_blocking(backend=backend)
    assert type(info.value) is SystemExit
    assert caplog.records == []
    assert capfd.readouterr().err == ""


KEYBOARD_INTERRUPT_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_app_runs import interrupting_app

backend, where = sys.argv[1], sys.argv[2]
try:
    interrupting_app(where, KeyboardInterrupt).update_blocking(backend=backend)
except KeyboardInterrupt as exc:
    print("bare" if type(exc) is KeyboardInterrupt else type(exc).__name__)
except BaseException as exc:
    print("wrapped", type(exc).__name__, repr(exc))
"""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["main", "async child", "live", "mount_each"])
def test_keyboard_interrupt_comes_out_of_update_blocking_bare(backend: str, where: str) -> None:
    import pathlib

    script = KEYBOARD_INTERRUPT_SCRIPT.format(tests=str(pathlib.Path(__file__).parent))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), backend, where],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "bare", done.stdout + done.stderr
    assert done.stderr == ""


# -- the end of a catch-up run --------------------------------------------------------


def ticking_app(seen: dict[str, int], holder: dict[str, Any]) -> coco.App:
    """A producer on a short timer (three keys, a new value each time) and a
    ``mount_each`` of an async function recording what it is given."""
    counter = [0]

    def tick() -> None:
        counter[0] += 1
        for key in ("a", "b", "c"):
            holder["lm"].declare_entry(key, (key, counter[0]))

    @coco.fn
    async def consume(value: tuple[str, int]) -> None:
        key, n = value
        seen[key] = n

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
        holder["lm"] = lm
        await coco.mount(coco.auto_refresh(tick, interval=0.0002))
        await coco.mount_each(consume, lm)

    return coco.App("catch-up end", main)


async def test_a_catch_up_run_delivers_what_a_live_producer_commits_as_it_ends() -> None:
    """The producer's timer may fire just as the run reaches quiescence:
    whatever it commits then is still delivered, so the consumer's view
    matches the map's final state after every run."""
    mismatches: list[tuple[int, Any, Any]] = []
    before = current_tasks()
    for attempt in range(100):
        seen: dict[str, int] = {}
        holder: dict[str, Any] = {}
        with anyio.fail_after(TIMEOUT):
            await ticking_app(seen, holder).update()
        final = {key: n for key, (_, n) in holder["lm"].snapshot()}
        if seen != final:
            mismatches.append((attempt, seen, final))
    assert mismatches == []
    assert current_tasks() == before
