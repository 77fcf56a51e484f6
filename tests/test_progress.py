"""Progress of a run: ``UpdateHandle.watch()`` snapshots, ``show_progress``
(plain lines, and a terminal display with ``rich``), and the snapshot types."""

from __future__ import annotations

import io
import sys
from datetime import timedelta
from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, current_tasks, wait_for

import livemap as coco
from livemap import LiveMap, UpdateSnapshot, UpdateStatus

pytestmark = pytest.mark.anyio


@coco.fn
async def leaf(x: int) -> None:
    await anyio.sleep(0)


@coco.fn
async def three_leaves() -> str:
    for i in range(3):
        await coco.mount(coco.component_subpath(str(i)), leaf, i)
    return "done"


class Tty(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def statuses(snaps: list[UpdateSnapshot[Any]]) -> list[UpdateStatus]:
    return [s.status for s in snaps]


# -- watch() -----------------------------------------------------------------------


async def test_watch_ends_with_a_ready_snapshot_carrying_the_result() -> None:
    app = coco.App("watch-result", three_leaves)
    snaps: list[UpdateSnapshot[Any]] = []
    with anyio.fail_after(TIMEOUT):
        async with app.update() as handle:
            async for snap in handle.watch():
                snaps.append(snap)
    assert snaps, "no snapshot at all"
    last = snaps[-1]
    assert last.status is UpdateStatus.READY
    assert last.result == "done"
    assert all(s.result is None for s in snaps[:-1])
    # RUNNING only before READY, never after
    seen = statuses(snaps)
    first_ready = seen.index(UpdateStatus.READY)
    assert all(s is UpdateStatus.READY for s in seen[first_ready:])
    assert last.stats.components_run == 4
    assert last.stats == handle.stats()


async def test_snapshots_are_copies_that_do_not_change_afterwards() -> None:
    app = coco.App("watch-copies", three_leaves)
    snaps: list[UpdateSnapshot[Any]] = []
    with anyio.fail_after(TIMEOUT):
        async with app.update() as handle:
            async for snap in handle.watch():
                snaps.append(snap)
    runs = [s.stats.components_run for s in snaps]
    assert runs == sorted(runs)
    assert snaps[-1].stats is not handle.stats()
    handle.stats().components_run += 100  # the live object; the snapshot stays
    assert snaps[-1].stats.components_run == 4


async def test_watch_raises_the_main_functions_exception() -> None:
    async def main() -> None:
        await coco.mount(coco.component_subpath("x"), leaf, 1)
        raise ValueError("main failed")

    app = coco.App("watch-raises", main)
    handle = app.update()
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_swallow, handle)
            with pytest.raises(ValueError, match="main failed"):
                async for _ in handle.watch():
                    pass


async def _swallow(handle: coco.UpdateHandle) -> None:
    try:
        await handle.result()
    except Exception:
        pass


async def test_watch_on_a_new_handle_waits_for_the_run_to_start() -> None:
    app = coco.App("watch-waits", three_leaves)
    handle = app.update()
    got: list[UpdateSnapshot[Any]] = []

    async def watcher() -> None:
        async for snap in handle.watch():
            got.append(snap)

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher)
            for _ in range(10):
                await anyio.sleep(0)
            assert got == []  # nothing runs until someone awaits the handle
            assert await handle == "done"
    assert got[-1].result == "done"


async def test_watch_of_a_handle_stopped_before_it_started() -> None:
    app = coco.App("watch-stopped", three_leaves)
    handle = app.update()
    await handle.stop()
    with anyio.fail_after(TIMEOUT):
        snaps = [s async for s in handle.watch()]
    assert len(snaps) == 1
    assert snaps[0].status is UpdateStatus.READY and snaps[0].result is None


async def test_a_slow_watcher_gets_the_latest_state_not_every_step() -> None:
    async def main() -> int:
        for i in range(200):
            await coco.mount(coco.component_subpath(str(i)), leaf, i)
        return 200

    app = coco.App("watch-coalesces", main)
    snaps: list[UpdateSnapshot[Any]] = []
    with anyio.fail_after(TIMEOUT):
        async with app.update() as handle:
            async for snap in handle.watch():
                snaps.append(snap)
                await anyio.sleep(0.01)
    assert len(snaps) < 50  # far fewer snapshots than changes
    assert snaps[-1].stats.components_run == 201
    assert snaps[-1].result == 200


async def test_several_watchers_each_get_the_last_snapshot() -> None:
    app = coco.App("watch-many", three_leaves)
    lasts: list[Any] = []

    async def watcher(handle: coco.UpdateHandle) -> None:
        last = None
        async for snap in handle.watch():
            last = snap
        lasts.append(last)

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            handle = app.update()
            for _ in range(3):
                tg.start_soon(watcher, handle)
            await handle
    assert [s.result for s in lasts] == ["done"] * 3


async def test_cancelling_a_watcher_leaves_the_run_alone() -> None:
    gate = anyio.Event()

    async def main() -> str:
        await gate.wait()
        await coco.mount(coco.component_subpath("a"), leaf, 1)
        return "ran"

    app = coco.App("watch-cancel", main)
    with anyio.fail_after(TIMEOUT):
        async with app.update() as handle:
            with anyio.move_on_after(0.05) as scope:
                async for _ in handle.watch():
                    pass
            assert scope.cancelled_caught
            gate.set()
            assert await handle.result() == "ran"
        assert handle.stats().components_run == 2


async def test_leaving_the_loop_early_leaves_the_run_alone() -> None:
    app = coco.App("watch-break", three_leaves)
    with anyio.fail_after(TIMEOUT):
        async with app.update() as handle:
            async for _ in handle.watch():
                break
            assert await handle.result() == "done"


class Ticker:
    """A live component that mounts one more child every few milliseconds."""

    def __init__(self, count: int) -> None:
        self.count = count

    def process(self) -> None:
        pass

    async def process_live(self, operator: coco.LiveComponentOperator) -> None:
        await operator.mark_ready()
        for i in range(self.count):
            await anyio.sleep(0.005)
            await operator.update(str(i), leaf, i)
        await anyio.sleep_forever()


async def test_a_live_run_goes_on_after_ready_and_stop_ends_the_watch() -> None:
    async def main() -> str:
        await coco.mount(coco.component_subpath("tick"), Ticker, 1000)
        return "main"

    app = coco.App("watch-live", main)
    snaps: list[UpdateSnapshot[Any]] = []
    with anyio.fail_after(TIMEOUT):
        async with app.update(live=True) as handle:
            async for snap in handle.watch():
                snaps.append(snap)
                ready_after = [s for s in snaps if s.status is UpdateStatus.READY]
                if len(ready_after) == 5:
                    await handle.stop()  # mid-watch: the next snapshot is the last
    assert snaps[-1].status is UpdateStatus.READY
    assert snaps[-1].result == "main"
    runs = [s.stats.components_run for s in snaps if s.status is UpdateStatus.READY]
    assert runs[-1] > runs[0]  # snapshots kept coming after READY


async def test_snapshot_types() -> None:
    stats = coco.UpdateStats()
    snap: UpdateSnapshot[int] = UpdateSnapshot(stats, UpdateStatus.RUNNING)
    s, status, result = snap
    assert (s, status, result) == (stats, UpdateStatus.RUNNING, None)
    assert str(UpdateStatus.READY) == "ready" and UpdateStatus.RUNNING == "running"


# -- show_progress ---------------------------------------------------------------------


@coco.fn
async def with_a_map() -> int:
    lm: LiveMap[int, int] = await LiveMap.create()
    for i in range(5):
        lm.declare_entry(i, i * i)
    for i in range(2):
        await coco.mount(coco.component_subpath(str(i)), leaf, i)
    return 7


async def test_show_progress_prints_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    app = coco.App("plain", with_a_map)
    with anyio.fail_after(TIMEOUT):
        value = await coco.show_progress(app.update(), refresh_interval=0.001, file=out)
    assert value == 7
    lines = out.getvalue().splitlines()
    assert lines
    assert all(line.startswith("[livemap] plain: ") for line in lines)
    assert "\x1b[" not in out.getvalue()  # no terminal control codes
    last = lines[-1]
    assert " done " in last
    assert "3 run" in last and "3 ready" in last and "0 failed" in last
    assert "5 entries" in last and "0 pending keys" in last
    assert len(set(lines)) == len(lines)  # a line only when something changed


async def test_show_progress_raises_what_the_run_raises() -> None:
    async def main() -> None:
        raise KeyError("broken")

    out = io.StringIO()
    app = coco.App("plain-fails", main)
    with anyio.fail_after(TIMEOUT), pytest.raises(KeyError, match="broken"):
        await coco.show_progress(app.update(), refresh_interval=0.001, file=out)
    assert " failed " in out.getvalue().splitlines()[-1]


async def test_show_progress_on_a_terminal_with_rich() -> None:
    pytest.importorskip("rich")  # the progress extra; the test extra installs it
    out = Tty()
    app = coco.App("tty", with_a_map)
    with anyio.fail_after(TIMEOUT):
        assert await coco.show_progress(app.update(), refresh_interval=0.001, file=out) == 7
    text = out.getvalue()
    assert "\x1b[" in text  # redrawn in place
    assert "leaf: 2 total | 2 added" in text  # one line per processor
    assert "5 entries" in text
    assert "[livemap] tty: done" in text


async def test_show_progress_without_rich_falls_back_to_plain_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [m for m in sys.modules if m == "rich" or m.startswith("rich.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "rich", None)  # import rich fails
    out = Tty()
    app = coco.App("no-rich", with_a_map)
    with anyio.fail_after(TIMEOUT):
        assert await coco.show_progress(app.update(), refresh_interval=0.001, file=out) == 7
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("[livemap] no-rich: done")
    assert "\x1b[" not in out.getvalue()


async def test_show_progress_follows_a_run_that_is_already_running() -> None:
    async def main() -> str:
        await coco.mount(coco.component_subpath("tick"), Ticker, 5)
        return "live"

    out = io.StringIO()
    app = coco.App("follow", main)
    with anyio.fail_after(TIMEOUT):
        async with app.update(live=True) as handle, anyio.create_task_group() as tg:

            async def stop_later() -> None:
                await wait_for(lambda: handle.stats().components_run >= 7)
                await handle.stop()

            tg.start_soon(stop_later)
            assert await coco.show_progress(handle, refresh_interval=0.001, file=out) == "live"
    assert "ready, watching for changes" in out.getvalue()
    assert out.getvalue().splitlines()[-1].startswith("[livemap] follow: done")


async def test_cancelling_show_progress_ends_the_run_it_started() -> None:
    async def main() -> None:
        await coco.mount(coco.component_subpath("tick"), Ticker, 10**6)

    out = io.StringIO()
    app = coco.App("cancel-progress", main)
    before = current_tasks()
    handle = app.update(live=True)
    with anyio.fail_after(TIMEOUT):
        with anyio.move_on_after(0.1):
            await coco.show_progress(handle, refresh_interval=0.01, file=out)
        await handle.stop()  # already over: returns at once
    assert current_tasks() == before
    assert out.getvalue()  # it showed something meanwhile


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), timedelta(0)])
async def test_show_progress_refuses_a_bad_interval(bad: Any) -> None:
    app = coco.App("bad-interval", three_leaves)
    handle = app.update()
    with pytest.raises(ValueError, match="refresh_interval"):
        await coco.show_progress(handle, refresh_interval=bad)
    with pytest.raises(TypeError, match="refresh_interval"):
        await coco.show_progress(handle, refresh_interval="1s")  # type: ignore[arg-type]
    assert await handle == "done"  # nothing ran yet
