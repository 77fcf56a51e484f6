"""The pipeline: producer components declaring entities into a LiveMap, a
consumer component per entity declaring its row into the SQLite target, and
:class:`Pipeline`, which runs them (catch-up or live) and reports on it."""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

import anyio
import anyio.to_thread

import livemap as coco
from livemap import KeyedTarget, LiveComponentOperator, LiveMap

from .database import EntityDB, EntityRow
from .events import Entity, EventFile, shard_of
from .status import StatusLine

__all__ = [
    "DEFAULT_DB",
    "DEFAULT_INTERVAL",
    "DEFAULT_RETRY",
    "DEFAULT_SHARDS",
    "EventLog",
    "Pipeline",
    "Summary",
    "app_main",
    "declare_shard",
    "index_entity",
]

log = logging.getLogger("livemap.examples.entities")

DEFAULT_DB = "entities.sqlite"
DEFAULT_SHARDS = 16
DEFAULT_INTERVAL = 0.5
DEFAULT_RETRY = coco.RetryPolicy(max_attempts=5, initial_backoff=0.1, max_backoff=2.0)
"""How often a row whose write failed is tried again: five tries over about 1.5 s."""


# -- the producing half -------------------------------------------------------------


@coco.fn
def declare_shard(entities: tuple[Entity, ...], lm: LiveMap[str, Entity]) -> None:
    """Declare one shard's entities.  Whatever this component declared last
    time and not this time (a deleted entity) leaves the map when it commits."""
    for entity in entities:
        lm.declare_entry(entity.id, entity)


def _shard_path(shard: int) -> coco.ComponentSubpath:
    return coco.component_subpath("shard", shard)


class EventLog:
    """A live component following one :class:`EventFile`.

    ``process()`` (a full pass) reads what is new and mounts one
    :func:`declare_shard` per non-empty shard; a shard not mounted again is
    unmounted, and its entities leave the map.  ``process_live()`` runs it
    once, marks the component ready (the initial catch-up), then polls the
    file every ``interval`` seconds.  A poll that read lines changing some
    entities re-mounts only their shards (``operator.update``), or unmounts
    a shard left empty (``operator.delete``); the other shards do not run,
    so their entities are not declared again.  A poll that read nothing new
    (a partial or malformed line) runs nothing.  In catch-up mode the
    runtime cancels the polling once everything is quiescent.
    """

    def __init__(
        self, source: EventFile, lm: LiveMap[str, Entity], *, shards: int, interval: float
    ) -> None:
        self.source = source
        self.lm = lm
        self.shards = shards
        self.interval = interval
        self.groups: dict[int, dict[str, Entity]] = {}  # shard -> its entities

    async def process(self) -> None:
        await anyio.to_thread.run_sync(self.source.read_new)  # file I/O off the event loop
        self.source.take_changed()
        self.groups = {}
        for entity in self.source.entities.values():
            self.groups.setdefault(shard_of(entity.id, self.shards), {})[entity.id] = entity
        for shard in sorted(self.groups):
            entities = tuple(self.groups[shard].values())
            await coco.mount(_shard_path(shard), declare_shard, entities, self.lm)

    async def process_live(self, operator: LiveComponentOperator) -> None:
        await operator.update_full()
        await operator.mark_ready()
        while True:
            await anyio.sleep(self.interval)
            if self.source.has_news():
                await self.poll(operator)

    async def poll(self, operator: LiveComponentOperator) -> None:
        """Read what was appended and declare again the shards it changed."""
        await anyio.to_thread.run_sync(self.source.read_new)
        changed = self.source.take_changed()
        if changed is None:  # replayed from the start: a full pass
            await operator.update_full()
            return
        dirty = set()
        for entity_id in changed:
            shard = shard_of(entity_id, self.shards)
            group = self.groups.setdefault(shard, {})
            entity = self.source.entities.get(entity_id)
            if entity is None:
                group.pop(entity_id, None)
            else:
                group[entity_id] = entity
            dirty.add(shard)
        for shard in sorted(dirty):
            group = self.groups[shard]
            if group:
                entities = tuple(group.values())
                await operator.update(_shard_path(shard), declare_shard, entities, self.lm)
            else:
                del self.groups[shard]
                await operator.delete(_shard_path(shard))


# -- the consuming half -------------------------------------------------------------


@coco.fn
def index_entity(entity: Entity, table: KeyedTarget[str, EntityRow]) -> None:
    """One entity's component: declare its row.  When the entity changes it
    runs again; when the entity disappears it is unmounted and its row is
    deleted.

    If the sink fails for the row, the target counts the batch as not
    applied and this run as failed; the consumer's retry policy runs it
    again, which sends the row again.  A row that still fails stays listed
    in the LiveMap's ``stats().failing`` and is sent again the next time the
    entity changes.
    """
    table.declare(entity.id, EntityRow.of(entity))


# -- the app ---------------------------------------------------------------------------------


@coco.fn
async def app_main(pipeline: Pipeline) -> None:
    """The root component: one LiveMap between the producers and the consumer."""
    lm: LiveMap[str, Entity] = await LiveMap.create()
    pipeline.live_map = lm
    for source in pipeline.sources:
        await coco.mount(
            coco.component_subpath("source", str(source.path)),
            EventLog,
            source,
            lm,
            shards=pipeline.shards,
            interval=pipeline.interval,
        )
    await coco.mount_each(index_entity, lm.consumer(retry=pipeline.retry), pipeline.table)


@dataclass(frozen=True)
class Summary:
    """What a run did (see :meth:`Pipeline.summary`)."""

    mode: Literal["catch-up", "live"]
    interrupted: bool
    events: int
    malformed: int
    ignored: int
    entities: int
    changes: int
    suppressed: int
    conflicts: int
    rows: int
    stale: int
    db: str
    components_run: int
    components_failed: int
    elapsed: float
    written: int = 0
    deleted: int = 0
    retries: int = 0
    failing: int = 0
    stale_checked: bool = False
    problems: tuple[str, ...] = ()
    """What went wrong, one line each (rows not written, inputs not read);
    the command line prints them and exits with status 1."""

    def format(self) -> str:
        if self.mode == "live":
            head = f"live run stopped after {self.elapsed:.2f} s"
        elif self.interrupted:
            head = f"catch-up interrupted after {self.elapsed:.2f} s"
        else:
            head = f"catch-up done in {self.elapsed:.2f} s"
        stale = "stale rows not checked"
        if self.stale_checked:
            stale = f"{self.stale} stale rows removed"
        return "\n".join(
            [
                head,
                f"  events      {self.events} read, {self.malformed} malformed, "
                f"{self.ignored} about missing entities",
                f"  entities    {self.entities} in the LiveMap",
                f"  changes     {self.changes} committed, {self.suppressed} suppressed by ==, "
                f"{self.conflicts} conflicts",
                f"  sqlite      {self.rows} rows in {self.db}, {stale}",
                f"  writes      {self.written} rows written, {self.deleted} deleted, "
                f"{self.retries} retries, {self.failing} failing",
                f"  components  {self.components_run} run, {self.components_failed} failed",
                f"  elapsed     {self.elapsed:.2f} s",
                "",
            ]
        )


class Pipeline:
    """The example's app and everything it works on: the input files, the
    database and its target, and (once ``app_main`` runs) the LiveMap.

    :meth:`run` may be called again: the app re-runs against the component
    tree of the previous run, and the files are read on from where it stopped.
    """

    def __init__(
        self,
        inputs: Sequence[str | os.PathLike[str]],
        db: str | os.PathLike[str] = DEFAULT_DB,
        *,
        shards: int = DEFAULT_SHARDS,
        interval: float = DEFAULT_INTERVAL,
        retry: coco.RetryPolicy | None = DEFAULT_RETRY,
    ) -> None:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        unique = dict.fromkeys(Path(p).resolve() for p in inputs)
        self.sources = [EventFile(path) for path in unique]
        self.db = EntityDB(db)
        self.table: KeyedTarget[str, EntityRow] = KeyedTarget("sqlite:entities", self.db.apply)
        self.shards = shards
        self.interval = interval
        self.retry = retry
        self.live_map: LiveMap[str, Entity] | None = None
        config = coco.AppConfig("entities", exception_handler=self._on_failure)
        self.app = coco.App(config, app_main, self)
        self.stale = 0
        self.stale_checked = False  # whether the last run looked for stale rows
        self._input_failures = 0  # failed runs of the producing half, this run
        self._sweep_error: str | None = None
        self._reported: set[str] = set()  # kinds of write errors logged this run
        self.last_summary: Summary | None = None  # of the last run that ended
        self._handle: coco.UpdateHandle | None = None
        self._started = time.perf_counter()

    async def run(
        self,
        *,
        live: bool = False,
        stop: anyio.Event | None = None,
        out: TextIO | None = None,
        quiet: bool = False,
    ) -> Summary:
        """Run the app: catch-up to quiescence, or live until ``stop`` is set.

        Setting ``stop`` ends a live run (and cuts a catch-up short).  Unless
        ``quiet``, progress (:meth:`progress`, every ``interval`` seconds)
        and the final summary go to ``out`` (default stdout): the progress
        is one line rewritten in place on a terminal, plain lines otherwise.
        A live run shows it from the start; a catch-up from its first
        ``interval`` on, so a short one prints only its summary.  On a
        terminal, a log record first clears the progress line.
        """
        out = sys.stdout if out is None else out
        stop = anyio.Event() if stop is None else stop
        for source in self.sources:
            source.follow = live
        status = StatusLine(out, enabled=not quiet)
        if live and not quiet:
            names = ", ".join(str(s.path) for s in self.sources)
            out.write(f"following {names} -> {self.db.path} (Ctrl+C to stop)\n")
            out.flush()
        self._started = time.perf_counter()
        self._input_failures = 0
        self._sweep_error = None
        self._reported.clear()
        self.stale_checked = False
        with status.keep_logs_apart():
            async with self.app.update(live=live) as handle, anyio.create_task_group() as tg:
                self._handle = handle
                tg.start_soon(_stop_when_set, stop, handle)
                tg.start_soon(self._show_progress, status, 0 if live else self.interval)
                if live:
                    await handle.ready()  # the initial catch-up
                    self._remove_stale(stop)
                await handle.result()  # catch-up: quiescence; live: stopped
                if not live:
                    self._remove_stale(stop)
                tg.cancel_scope.cancel()
            if status.last:  # shown at least once: show the final numbers
                status.show(self.progress())
            status.finish()
        summary = self.last_summary = self.summary(live=live, interrupted=stop.is_set())
        if not quiet:
            out.write(summary.format())
            out.flush()
        return summary

    def _remove_stale(self, stop: anyio.Event) -> None:
        """Delete the rows of entities that no input declares any more.

        Only after a complete catch-up, and only if every input was read:
        then the LiveMap holds every live entity, so a row whose id it does
        not hold is known to be stale (left by an earlier process).  The keep
        set is what is *declared*, not what the target has written: a row
        whose write failed is still declared, and keeps its old row.
        """
        lm = self.live_map
        if stop.is_set() or self._input_failures or lm is None:
            return
        declared = {key for key, _ in lm.items()}
        try:
            self.stale += self.db.remove_stale(declared)
        except sqlite3.Error as exc:
            self._sweep_error = f"could not remove stale rows from {self.db.path}: {exc}"
            log.warning("%s", self._sweep_error)
            return
        self.stale_checked = True

    def _on_failure(self, exc: BaseException, ctx: coco.ExceptionContext) -> None:
        """The app's exception handler.

        * a key claimed by two input files: a data problem worth one line;
        * a row that could not be written, after the retries (the runtime
          reports only the last failure): one line per kind of error, so a
          database that fails every write does not flood the log; the
          summary counts them all;
        * a producer that failed (an input that could not be read): one line
          for an ``OSError``, a traceback for anything else (a bug).
        """
        if isinstance(exc, coco.KeyConflictError):
            log.warning("%s", exc)
            return
        if isinstance(exc, coco.TargetApplyError):  # the app's one target: the table
            cause = exc.__cause__ or exc
            what = f"{type(cause).__name__}: {cause}"
            level = logging.DEBUG if what in self._reported else logging.WARNING
            self._reported.add(what)
            log.log(
                level,
                "could not write the row of %s to %s: %s (its old row, if any, stays)",
                ctx.stable_path[-1],
                self.db.path,
                cause,
            )
            return
        if ctx.stable_path[:1] == ("source",):
            self._input_failures += 1
        traceback = not isinstance(exc, OSError) or log.isEnabledFor(logging.DEBUG)
        log.error("component %s failed: %s", ctx.path, exc, exc_info=exc if traceback else None)

    async def _show_progress(self, status: StatusLine, delay: float) -> None:
        await anyio.sleep(delay)
        while True:
            status.show(self.progress())
            await anyio.sleep(self.interval)

    def progress(self) -> str:
        """A one-line status, from counters that are cheap to read at any time:
        events read (the files are read in a worker thread, which counts as
        it goes), the LiveMap's ``stats()`` (entries, changes, suppressed,
        and ``pending``: changes the consumer has not processed yet), and the
        rows the sink has written.  Failing rows and conflicts are added when
        there are any."""
        events = sum(source.events for source in self.sources)
        lm = self.live_map
        if lm is None:
            return f"events {events} | starting"
        s = lm.stats()
        text = (
            f"events {events} | entities {s.entries} | pending {s.pending + s.in_flight} | "
            f"rows written {self.db.written} | changes {s.changes} | suppressed {s.suppressed}"
        )
        if s.failing:
            text += f" | failing {len(s.failing)}"
        if s.conflicts:
            text += f" | conflicts {s.conflicts}"
        return text

    def summary(self, *, live: bool, interrupted: bool) -> Summary:
        """The run's numbers so far (usable after the event loop is gone)."""
        lm = self.live_map
        stats = lm.stats() if lm is not None else None
        update = self._handle.stats() if self._handle is not None else coco.UpdateStats()
        problems = []
        if stats is not None and stats.failing:
            key, exc = next(iter(stats.failing.items()))
            cause = exc.__cause__ or exc
            problems.append(
                f"{len(stats.failing)} rows could not be written to {self.db.path} "
                f"(first {key}: {cause}); they are written again when their entity changes"
            )
        if self._input_failures:
            problems.append(f"{self._input_failures} runs reading the inputs failed (see above)")
        if self._sweep_error is not None:
            problems.append(self._sweep_error)
        return Summary(
            mode="live" if live else "catch-up",
            interrupted=interrupted,
            events=sum(s.events for s in self.sources),
            malformed=sum(s.malformed for s in self.sources),
            ignored=sum(s.ignored for s in self.sources),
            entities=stats.entries if stats else 0,
            changes=stats.changes if stats else 0,
            suppressed=stats.suppressed if stats else 0,
            conflicts=stats.conflicts if stats else 0,
            rows=self.db.count(),
            stale=self.stale,
            db=self.db.path,
            components_run=update.components_run,
            components_failed=update.components_failed,
            elapsed=time.perf_counter() - self._started,
            written=self.db.written,
            deleted=self.db.deleted,
            retries=update.retries,
            failing=len(stats.failing) if stats else 0,
            stale_checked=self.stale_checked,
            problems=tuple(problems),
        )

    def close(self) -> None:
        self.db.close()


async def _stop_when_set(stop: anyio.Event, handle: coco.UpdateHandle) -> None:
    await stop.wait()
    await handle.stop()
