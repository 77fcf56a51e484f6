"""``show_progress(handle)``: an update run with a progress display.

On a terminal, with the ``progress`` extra (``rich``) installed, a block of
lines is redrawn in place: the run's status, one line per processor
(CocoIndex's per-component counters), the components' totals and the maps'
entries and pending keys.  Anywhere else (not a terminal, or without
``rich``) it prints one plain line each time something changed, and a last
one when the run ends.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Protocol, TextIO, runtime_checkable

import anyio

from livemap._runtime._app import UpdateHandle, app_name, current_snapshot, root_of
from livemap._runtime._component import Component
from livemap._runtime._session import ComponentStats, UpdateSnapshot, UpdateStatus

__all__ = ["CountsEntries", "Progress", "show_progress"]

DEFAULT_REFRESH = 1.0
"""Seconds between two refreshes of the display, unless told otherwise."""

_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


class _MapCounts(Protocol):
    @property
    def entries(self) -> int: ...

    @property
    def pending(self) -> int: ...


@runtime_checkable
class CountsEntries(Protocol):
    """Something a run created (see ``RetiredWithRun``) whose ``stats()``
    tells its ``entries`` and ``pending`` keys: a LiveMap."""

    def stats(self) -> _MapCounts: ...


@dataclass(frozen=True)
class Progress:
    """One look at a run: its snapshot, how it ended (``done``, ``error``),
    the seconds since the display began, and its maps' counts."""

    name: str
    live: bool
    snapshot: UpdateSnapshot[Any]
    done: bool
    error: BaseException | None
    elapsed: float
    maps: int
    entries: int
    pending: int

    @property
    def status(self) -> str:
        if self.done:
            return "failed" if self.error is not None else "done"
        if self.snapshot.status is UpdateStatus.READY:
            return "ready, watching for changes" if self.live else "ready"
        return "catching up"

    def key(self) -> tuple[Any, ...]:
        """What a plain line shows: a new line only when it changes."""
        return (
            self.snapshot.stats.version,
            self.snapshot.status,
            self.done,
            self.maps,
            self.entries,
            self.pending,
        )

    def summary(self) -> str:
        stats = self.snapshot.stats
        total = stats.total
        ready = total.num_adds + total.num_reprocesses
        parts = [
            f"{stats.components_run} run",
            f"{ready} ready",
            f"{total.num_in_progress} in flight",
            f"{stats.components_failed} failed",
            f"{stats.components_unmounted} unmounted",
        ]
        if stats.retries:
            parts.append(f"{stats.retries} retries")
        return "components: " + ", ".join(parts)

    def maps_line(self) -> str:
        return f"maps: {self.maps}, {self.entries} entries, {self.pending} pending keys"

    def plain_line(self) -> str:
        return (
            f"[livemap] {self.name}: {self.status} {self.elapsed:.1f}s | "
            f"{self.summary()} | {self.maps_line()}"
        )

    def lines(self, tick: int) -> list[str]:
        """The block a terminal shows (``tick`` turns the spinner)."""
        busy = not self.done and self.snapshot.status is UpdateStatus.RUNNING
        icon = _SPINNER[tick % len(_SPINNER)] if busy else ("✗" if self.error else "✓")
        out = [f"{icon} [livemap] {self.name}: {self.status} {self.elapsed:.1f}s"]
        for name, group in self.snapshot.stats.by_component.items():
            out.append("  " + _component_line(name, group))
        out.append("  " + self.summary())
        out.append("  " + self.maps_line())
        if self.error is not None:
            out.append(f"  error: {self.error!r}")
        return out


def _component_line(name: str, group: ComponentStats) -> str:
    line = f"{name}: {group.num_execution_starts} total"
    if group.num_in_progress:
        line += f", {group.num_in_progress} in flight"
    parts = [
        f"{n} {what}"
        for n, what in (
            (group.num_adds, "added"),
            (group.num_reprocesses, "reprocessed"),
            (group.num_deletes, "deleted"),
            (group.num_errors, "errors"),
        )
        if n
    ]
    return line + (" | " + ", ".join(parts) if parts else "")


def _maps(root: Component | None) -> tuple[int, int, int]:
    """The number of maps in ``root``'s tree, their entries and pending keys."""
    maps = entries = pending = 0
    stack = [] if root is None else [root]
    while stack:
        comp = stack.pop()
        if comp.children:
            stack.extend(comp.children.values())
        for item in comp.created or ():
            if isinstance(item, CountsEntries):
                counts = item.stats()
                maps += 1
                entries += counts.entries
                pending += counts.pending
    return maps, entries, pending


class _Display(Protocol):
    def __enter__(self) -> object: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def show(self, progress: Progress) -> None: ...


class _PlainDisplay:
    """One line each time what it shows changed, and a last one."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._last: tuple[Any, ...] | None = None

    def __enter__(self) -> _PlainDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def show(self, progress: Progress) -> None:
        key = progress.key()
        if key != self._last or progress.done:
            self._last = key
            print(progress.plain_line(), file=self._out, flush=True)


class _RichDisplay:
    """A block redrawn in place on a terminal (``rich.live.Live``, refreshed
    by the display loop only: no thread)."""

    def __init__(self, console: Any, live_class: Callable[..., Any], text: Any) -> None:
        self._text = text
        self._live = live_class(text(""), console=console, auto_refresh=False, transient=False)
        self._tick = 0

    def __enter__(self) -> _RichDisplay:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(*exc)

    def show(self, progress: Progress) -> None:
        self._live.update(self._text("\n".join(progress.lines(self._tick))), refresh=True)
        self._tick += 1


def _display_for(out: TextIO) -> _Display:
    """A terminal display if ``out`` is a terminal and ``rich`` is installed,
    else plain lines."""
    try:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text
    except ImportError:
        return _PlainDisplay(out)
    console = Console(file=out)
    if not console.is_terminal:
        return _PlainDisplay(out)
    return _RichDisplay(console, Live, Text)


def _seconds(refresh_interval: timedelta | float | None) -> float:
    if refresh_interval is None:
        return DEFAULT_REFRESH
    if isinstance(refresh_interval, timedelta):
        seconds = refresh_interval.total_seconds()
    elif isinstance(refresh_interval, (int, float)) and not isinstance(refresh_interval, bool):
        seconds = float(refresh_interval)
    else:
        raise TypeError(
            f"refresh_interval must be seconds or a timedelta, got {refresh_interval!r}"
        )
    if not seconds > 0:  # also NaN
        raise ValueError(f"refresh_interval must be positive, got {refresh_interval!r}")
    return seconds


async def show_progress(
    handle: UpdateHandle,
    *,
    refresh_interval: timedelta | float | None = None,
    file: TextIO | None = None,
) -> Any:
    """Run ``handle``'s update (or follow it, if it runs already) with a
    progress display; return the main function's value (or raise what
    ``handle.result()`` raises).

    On a terminal, with the ``progress`` extra installed
    (``pip install "livemap[progress]"``, which brings ``rich``), the
    display is a block redrawn in place every ``refresh_interval`` (seconds
    or a ``timedelta``; 1 second by default): the status, one line per
    processor (runs, in flight, added, reprocessed, deleted, errors), the
    components' totals (run, ready, in flight, failed, unmounted) and the
    maps' entries and pending keys.  Otherwise (``file`` not a terminal, or
    no ``rich``) it prints one plain line every ``refresh_interval`` in
    which something changed, and a last one when the run ends.  ``file`` is
    ``sys.stdout`` by default.

    A live run goes on until it ends by itself or ``handle.stop()`` is
    called (from another task); cancelling ``show_progress`` ends the run
    it started.
    """
    seconds = _seconds(refresh_interval)
    out = sys.stdout if file is None else file
    finished = anyio.Event()
    start = anyio.current_time()
    name = app_name(handle)

    def look() -> Progress:
        snapshot, done, error = current_snapshot(handle)
        maps, entries, pending = _maps(root_of(handle))
        return Progress(
            name,
            handle.live,
            snapshot,
            done,
            error,
            anyio.current_time() - start,
            maps,
            entries,
            pending,
        )

    async def refresh(display: _Display) -> None:
        while not finished.is_set():
            display.show(look())
            with anyio.move_on_after(seconds):
                await finished.wait()

    display = _display_for(out)
    with display:
        async with anyio.create_task_group() as tg:
            tg.start_soon(refresh, display)
            try:
                await handle.result()  # runs it, or waits for its end
            except Exception:  # raised again below
                pass
            except (KeyboardInterrupt, SystemExit):  # raised again below
                pass
            finally:
                finished.set()
        display.show(look())
    return await handle.result()
