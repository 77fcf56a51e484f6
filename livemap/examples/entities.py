"""Entity index: an event stream in, one SQLite row per live entity out.

Run it::

    python -m livemap.examples.entities                  # bundled sample, catch-up, summary
    python -m livemap.examples.entities --live           # keep following the file; Ctrl+C stops
    python -m livemap.examples.entities --input my.jsonl --db my.sqlite
    python -m livemap.examples.entities --generate 100000 big.jsonl

The input is a JSONL stream of CRM, help-desk and chat events about users,
orgs and tickets, one event per line::

    {"ts": "...", "src": "crm", "op": "upsert", "id": "user:1001", "kind": "user",
     "name": "Ada Lovelace", "attrs": {"org": "org:acme", "role": "admin"}}
    {"ts": "...", "src": "chat", "op": "patch", "id": "user:1001", "attrs": {"status": "away"}}
    {"ts": "...", "src": "crm", "op": "delete", "id": "user:1001"}

``upsert`` sets an entity's whole state, ``patch`` merges attributes into an
existing one (``null`` removes an attribute), ``delete`` removes it.  The
current state of each entity is what replaying the stream gives.

The pipeline has a producing half and a consuming half, joined by a LiveMap::

    events.jsonl
      └─ EventLog                 live component, one per input file: reads new lines,
         │                        replays them into the current entity states
         └─ declare_shard x N     one component per shard of entity ids:
                                  lm.declare_entry(entity.id, entity)
    LiveMap[str, Entity]          owned entries; the consumer hears only of real changes (==)
      └─ index_entity x entity    mount_each: one component per entity:
                                  table.declare(entity.id, EntityRow.of(entity))
    KeyedTarget "sqlite:entities" applies each batch of upserts and deletes to SQLite
                                  in one transaction

Nothing in it deletes anything explicitly.  An entity deleted from the stream
is no longer declared by its shard, so it leaves the LiveMap; its
``index_entity`` component is unmounted, so its row is no longer declared, so
the SQLite target deletes it.  A shard left with no entities is not mounted
again and everything it owned goes away the same way.  An entity that is
re-declared with an equal value (an event that changed nothing, or another
entity of the same shard changing) stops at the LiveMap's ``==`` gate.

The LiveMap and the target's record of what it holds live in memory and
start empty in every process, while the database file stays.  So once a run
has caught up, rows it did not declare are left over from an earlier process
(their entities were deleted while nothing was watching) and are deleted too
(``stale`` in the summary).

Catch-up mode (the default) reads the files, runs to quiescence and prints a
summary.  ``--live`` keeps polling the files for appended lines and shows
progress until Ctrl+C (or SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sqlite3
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal, NamedTuple, TextIO

import anyio
import anyio.to_thread

import livemap as coco
from livemap import KeyedTarget, LiveComponentOperator, LiveMap, TargetBatch

__all__ = [
    "BUNDLED_COUNT",
    "BUNDLED_EVENTS",
    "BadEvent",
    "DEFAULT_DB",
    "Entity",
    "EntityDB",
    "EntityRow",
    "Event",
    "EventFile",
    "EventLog",
    "Pipeline",
    "Summary",
    "app_main",
    "apply_event",
    "declare_shard",
    "generate_events",
    "index_entity",
    "main",
    "parse_event",
    "replay",
    "shard_of",
    "write_events",
]

log = logging.getLogger("livemap.examples.entities")

BUNDLED_EVENTS = Path(__file__).with_name("events.jsonl")
"""The sample stream shipped with the package (``generate_events(BUNDLED_COUNT)``)."""
BUNDLED_COUNT = 400
DEFAULT_DB = "entities.sqlite"
DEFAULT_SHARDS = 16
DEFAULT_INTERVAL = 0.5


# -- the data: events and entities ------------------------------------------------


@dataclass(frozen=True)
class Entity:
    """The current state of one user, org or ticket.

    Compared with ``==`` only: LiveMap never hashes or serialises a value, so
    a plain dict of attributes is fine.  It holds no timestamp or sequence
    number on purpose: an event that changes nothing gives an equal entity,
    which the LiveMap does not pass on.
    """

    id: str
    kind: str
    name: str
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    """One parsed line of the stream."""

    op: Literal["upsert", "patch", "delete"]
    id: str
    kind: str | None = None
    name: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


class BadEvent(ValueError):
    """A line that is not a valid event (JSON errors are ``ValueError`` too)."""


def parse_event(line: str | bytes) -> Event:
    """Parse one JSONL line; :class:`BadEvent` (naming the problem) if it is not an event."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise BadEvent("an event must be a JSON object")
    op, entity_id = data.get("op"), data.get("id")
    if op not in ("upsert", "patch", "delete"):
        raise BadEvent(f"unknown op {op!r}")
    if not isinstance(entity_id, str) or not entity_id:
        raise BadEvent("an event needs a non-empty string id")
    kind, name, attrs = data.get("kind"), data.get("name"), data.get("attrs", {})
    if kind is not None and not isinstance(kind, str):
        raise BadEvent(f"kind must be a string, got {kind!r}")
    if name is not None and not isinstance(name, str):
        raise BadEvent(f"name must be a string, got {name!r}")
    if not isinstance(attrs, dict):
        raise BadEvent(f"attrs must be an object, got {attrs!r}")
    if op == "upsert" and name is None:
        raise BadEvent(f"the upsert of {entity_id!r} has no name")
    return Event(op, entity_id, kind, name, attrs)


def apply_event(entities: dict[str, Entity], event: Event) -> bool:
    """Apply one event to the current states.

    Returns ``False`` when the event was about an entity that does not exist
    (a late patch or a repeated delete), which changes nothing.
    """
    if event.op == "delete":
        return entities.pop(event.id, None) is not None
    if event.op == "upsert":
        assert event.name is not None  # parse_event checks it
        kind = event.kind or event.id.partition(":")[0]
        entities[event.id] = Entity(event.id, kind, event.name, _without_nulls(event.attrs))
        return True
    old = entities.get(event.id)
    if old is None:
        return False
    entities[event.id] = Entity(
        old.id,
        event.kind or old.kind,
        old.name if event.name is None else event.name,
        _without_nulls({**old.attrs, **event.attrs}),
    )
    return True


def _without_nulls(attrs: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in attrs.items() if value is not None}


def replay(lines: Iterable[str | bytes]) -> dict[str, Entity]:
    """The entity states a whole stream leaves; blank lines are skipped and a
    malformed line raises ``ValueError``."""
    entities: dict[str, Entity] = {}
    for line in lines:
        if line.strip():
            apply_event(entities, parse_event(line))
    return entities


def shard_of(entity_id: str, shards: int) -> int:
    """The shard of an id: stable across processes (unlike ``hash()``)."""
    return zlib.crc32(entity_id.encode()) % shards


class EventFile:
    """One JSONL file read incrementally, and the entity states it holds so far.

    :meth:`read_new` applies the lines appended since its last call.  When
    ``follow`` is true (live mode) a last line without its newline is left
    for later, since the writer may be in the middle of it; otherwise it is
    read too.  A file that shrank was truncated or replaced: it is replayed
    from the start.
    """

    def __init__(self, path: str | os.PathLike[str], *, follow: bool = False) -> None:
        self.path = Path(path)
        self.follow = follow
        self.entities: dict[str, Entity] = {}
        self.events = 0
        self.malformed = 0
        self.ignored = 0
        self._offset = 0  # bytes consumed: the end of the last line read
        self._seen_size = -1  # the file's size when it was last read
        self._line_no = 0

    def __repr__(self) -> str:
        return f"<EventFile {self.path} entities={len(self.entities)}>"

    def has_news(self) -> bool:
        """Whether the file's size changed since it was last read."""
        try:
            return self.path.stat().st_size != self._seen_size
        except OSError:
            return False

    def read_new(self) -> int:
        """Apply the lines appended since the last call; return how many events were read."""
        with self.path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < self._offset:
                log.warning("%s shrank: replaying it from the start", self.path)
                self.entities.clear()
                self._offset = self._line_no = 0
            f.seek(self._offset)
            data = f.read()
        self._seen_size = self._offset + len(data)
        end = len(data) if not self.follow else data.rfind(b"\n") + 1
        self._offset += end
        before = self.events
        for raw in data[:end].splitlines():
            self._line_no += 1
            if not raw.strip():
                continue
            try:
                event = parse_event(raw)
            except ValueError as exc:  # JSON and UTF-8 errors are ValueErrors too
                self.malformed += 1
                log.warning("%s:%d: skipping a malformed event: %s", self.path, self._line_no, exc)
                continue
            self.events += 1
            if not apply_event(self.entities, event):
                self.ignored += 1
        return self.events - before

    def shards(self, count: int) -> list[tuple[int, tuple[Entity, ...]]]:
        """The live entities grouped by :func:`shard_of`, for ``mount_each``."""
        groups: dict[int, list[Entity]] = {}
        for entity in self.entities.values():
            groups.setdefault(shard_of(entity.id, count), []).append(entity)
        return [(shard, tuple(groups[shard])) for shard in sorted(groups)]


# -- the producing half -------------------------------------------------------------


@coco.fn
def declare_shard(entities: tuple[Entity, ...], lm: LiveMap[str, Entity]) -> None:
    """Declare one shard's entities.  Whatever this component declared last
    time and not this time (a deleted entity) leaves the map when it commits."""
    for entity in entities:
        lm.declare_entry(entity.id, entity)


class EventLog:
    """A live component following one :class:`EventFile`.

    ``process()`` reads what is new and mounts one :func:`declare_shard` per
    non-empty shard; ``process_live()`` runs it once, marks the component
    ready (the initial catch-up), then polls the file every ``interval``
    seconds and runs it again when the file changed.  In catch-up mode the
    runtime cancels the polling once everything is quiescent.
    """

    def __init__(
        self, source: EventFile, lm: LiveMap[str, Entity], *, shards: int, interval: float
    ) -> None:
        self.source = source
        self.lm = lm
        self.shards = shards
        self.interval = interval

    async def process(self) -> None:
        await anyio.to_thread.run_sync(self.source.read_new)  # file I/O off the event loop
        await coco.mount_each(declare_shard, self.source.shards(self.shards), self.lm)

    async def process_live(self, operator: LiveComponentOperator) -> None:
        await operator.update_full()
        await operator.mark_ready()
        while True:
            await anyio.sleep(self.interval)
            if self.source.has_news():
                await operator.update_full()


# -- the consuming half: SQLite ---------------------------------------------------------


class EntityRow(NamedTuple):
    """One row of the ``entities`` table (``attrs`` as canonical JSON)."""

    id: str
    kind: str
    name: str
    attrs: str

    @classmethod
    def of(cls, entity: Entity) -> EntityRow:
        attrs = json.dumps(entity.attrs, sort_keys=True, separators=(",", ":"))
        return cls(entity.id, entity.kind, entity.name, attrs)


class EntityDB:
    """The SQLite database: one row per entity in table ``entities``."""

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS entities (
            id    TEXT PRIMARY KEY,
            kind  TEXT NOT NULL,
            name  TEXT NOT NULL,
            attrs TEXT NOT NULL  -- JSON
        )
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        # Autocommit mode: transactions are opened explicitly by transaction().
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        if self.path != ":memory:":
            self.conn.execute("PRAGMA journal_mode=WAL")  # readers don't block the writer
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute(self.SCHEMA)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``with db.transaction() as conn:``: commit at the end, roll back on an exception."""
        self.conn.execute("BEGIN")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def apply(self, batch: TargetBatch[str, EntityRow]) -> None:
        """The target's sink: one commit's upserts and deletes, in one transaction.

        If it raises, the target counts the batch as not applied and reports
        the error to the committing component."""
        with self.transaction() as conn:
            conn.executemany("DELETE FROM entities WHERE id = ?", [(k,) for k in batch.deletes])
            conn.executemany(
                "INSERT OR REPLACE INTO entities (id, kind, name, attrs) VALUES (?, ?, ?, ?)",
                [row for _, row in batch.upserts],
            )

    def remove_stale(self, keep: Iterable[str]) -> int:
        """Delete every row whose id is not in ``keep``; return how many."""
        keep = set(keep)
        stale = [(i,) for (i,) in self.conn.execute("SELECT id FROM entities") if i not in keep]
        if stale:
            with self.transaction() as conn:
                conn.executemany("DELETE FROM entities WHERE id = ?", stale)
        return len(stale)

    def rows(self) -> list[EntityRow]:
        """Every row, by id."""
        query = "SELECT id, kind, name, attrs FROM entities ORDER BY id"
        return [EntityRow(*row) for row in self.conn.execute(query)]

    def count(self) -> int:
        (n,) = self.conn.execute("SELECT COUNT(*) FROM entities").fetchone()
        return int(n)

    def close(self) -> None:
        self.conn.close()


@coco.fn
def index_entity(entity: Entity, table: KeyedTarget[str, EntityRow]) -> None:
    """One entity's component: declare its row.  When the entity changes it
    runs again; when the entity disappears it is unmounted and its row is
    deleted."""
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
    await coco.mount_each(index_entity, lm, pipeline.table)


def _log_failure(exc: BaseException, ctx: coco.ExceptionContext) -> None:
    """The app's exception handler: a key claimed by two input files is a data
    problem worth one line; anything else is logged with its traceback."""
    if isinstance(exc, coco.KeyConflictError):
        log.warning("%s", exc)
    else:
        log.error("component %s failed: %s", ctx.path, exc, exc_info=exc)


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

    def format(self) -> str:
        if self.mode == "live":
            head = f"live run stopped after {self.elapsed:.2f} s"
        elif self.interrupted:
            head = f"catch-up interrupted after {self.elapsed:.2f} s"
        else:
            head = f"catch-up done in {self.elapsed:.2f} s"
        return "\n".join(
            [
                head,
                f"  events      {self.events} read, {self.malformed} malformed, "
                f"{self.ignored} about missing entities",
                f"  entities    {self.entities} in the LiveMap",
                f"  changes     {self.changes} committed, {self.suppressed} suppressed by ==, "
                f"{self.conflicts} conflicts",
                f"  sqlite      {self.rows} rows in {self.db}, {self.stale} stale rows removed",
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
        self.live_map: LiveMap[str, Entity] | None = None
        config = coco.AppConfig("entities", exception_handler=_log_failure)
        self.app = coco.App(config, app_main, self)
        self.stale = 0
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
        ``quiet``, live progress and the final summary go to ``out`` (default
        stdout): one line rewritten in place on a terminal, plain lines
        otherwise.
        """
        out = sys.stdout if out is None else out
        stop = anyio.Event() if stop is None else stop
        for source in self.sources:
            source.follow = live
        progress = _Progress(out, enabled=live and not quiet)
        if live and not quiet:
            names = ", ".join(str(s.path) for s in self.sources)
            out.write(f"following {names} -> {self.db.path} (Ctrl+C to stop)\n")
            out.flush()
        self._started = time.perf_counter()
        async with self.app.update(live=live) as handle, anyio.create_task_group() as tg:
            self._handle = handle
            tg.start_soon(_stop_when_set, stop, handle)
            if live:
                await handle.ready()  # the initial catch-up
                self._reconcile(stop)
                tg.start_soon(self._show_progress, progress)
            await handle.result()  # catch-up: quiescence; live: stopped
            if not live:
                self._reconcile(stop)
            tg.cancel_scope.cancel()
        summary = self.last_summary = self.summary(live=live, interrupted=stop.is_set())
        progress.finish()
        if not quiet:
            out.write(summary.format())
            out.flush()
        return summary

    def _reconcile(self, stop: anyio.Event) -> None:
        # Only after a complete catch-up: every live entity's row is declared by now.
        if not stop.is_set():
            self.stale += self.db.remove_stale(key for key, _ in self.table.items())

    async def _show_progress(self, progress: _Progress) -> None:
        while True:
            progress.show(self.progress())
            await anyio.sleep(self.interval)

    def progress(self) -> str:
        """A one-line status: the LiveMap's counters and the rows in SQLite."""
        events = sum(source.events for source in self.sources)
        lm = self.live_map
        if lm is None:
            return f"events {events} | starting"
        s = lm.stats()
        return (
            f"events {events} | entities {s.entries} | changes {s.changes} | "
            f"suppressed {s.suppressed} | conflicts {s.conflicts} | pending {s.pending} | "
            f"rows {self.db.count()}"
        )

    def summary(self, *, live: bool, interrupted: bool) -> Summary:
        """The run's numbers so far (usable after the event loop is gone)."""
        lm = self.live_map
        stats = lm.stats() if lm is not None else None
        update = self._handle.stats() if self._handle is not None else coco.UpdateStats()
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
        )

    def close(self) -> None:
        self.db.close()


async def _stop_when_set(stop: anyio.Event, handle: coco.UpdateHandle) -> None:
    await stop.wait()
    await handle.stop()


class _Progress:
    """Progress lines: rewritten in place on a terminal, one per change otherwise."""

    def __init__(self, out: TextIO, *, enabled: bool) -> None:
        self.out = out
        self.enabled = enabled
        self.tty = enabled and out.isatty()
        self.last = ""

    def show(self, text: str) -> None:
        if not self.enabled or text == self.last:
            return
        self.last = text
        self.out.write(f"\r{text}\x1b[K" if self.tty else f"{text}\n")
        self.out.flush()

    def finish(self) -> None:
        if self.tty and self.last:
            self.out.write("\n")
            self.out.flush()


# -- sample data --------------------------------------------------------------------------------

# fmt: off
_FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Ken", "Radia",
          "Linus", "Frances", "John"]
_LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Hamilton", "Thompson",
         "Perlman", "Allen"]
_ORGS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Tyrell",
         "Cyberdyne", "Aperture", "Wonka"]
# fmt: on
_ORG_SUFFIXES = ["Corp", "Inc", "Labs", "GmbH", "Ltd"]
_SUBJECTS = [
    "Cannot log in",
    "Invoice is wrong",
    "Export to CSV fails",
    "No password reset mail",
    "Feature request: dark mode",
    "App crashes on start",
    "Dashboard is slow",
    "Refund request",
    "Help with SSO setup",
    "API rate limit exceeded",
]
_PLANS = ["free", "team", "business", "enterprise"]
_COUNTRIES = ["DE", "FR", "US", "GB", "JP", "BR", "IN", "NL"]
_ROLES = ["customer", "customer", "customer", "agent", "admin"]
_PRESENCE = ["online", "away", "offline"]
_PRIORITIES = ["low", "normal", "normal", "high", "urgent"]
_NEXT_STATUS = {"open": "pending", "pending": "solved", "solved": "closed"}


class _Pool:
    """Ids to pick from at random: O(1) add, remove and choice, deterministic order."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item: str) -> bool:
        return item in self.index

    def add(self, item: str) -> None:
        if item not in self.index:
            self.index[item] = len(self.items)
            self.items.append(item)

    def discard(self, item: str) -> None:
        i = self.index.pop(item, None)
        if i is not None:
            last = self.items.pop()
            if last != item:
                self.items[i] = last
                self.index[last] = i

    def choice(self, rng: random.Random) -> str:
        return self.items[rng.randrange(len(self.items))]


class _World:
    """The simulated CRM behind :func:`generate_events`.  It tracks what
    exists so that events mostly make sense; a few, as in real streams, are
    redelivered or arrive after their entity was deleted."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.state: dict[str, dict[str, Any]] = {}  # id -> {"kind", "name", "attrs"}
        self.pools = {kind: _Pool() for kind in ("org", "user", "ticket", "agent", "closed")}
        self.members: dict[str, dict[str, None]] = {}  # org -> its users and tickets
        self.slugs: set[str] = set()
        self.gone_tickets: list[str] = []
        self.queue: deque[dict[str, Any]] = deque()
        self.next_user = 1001
        self.next_ticket = 5001
        self.actions: list[Callable[[], dict[str, Any] | None]] = [
            self.new_ticket,
            self.progress_ticket,
            self.assign_ticket,
            self.presence,
            self.change_user,
            self.change_org,
            self.redeliver,
            self.delete_ticket,
            self.delete_user,
            self.delete_org,
            self.late_patch,
        ]
        self.weights = [22, 22, 8, 14, 4, 4, 8, 6, 2, 0.4, 1]

    # -- bookkeeping -------------------------------------------------------------

    def _track(self, entity_id: str) -> None:
        s = self.state[entity_id]
        kind, attrs = s["kind"], s["attrs"]
        self.pools[kind].add(entity_id)
        if kind == "org":
            self.members.setdefault(entity_id, {})
        else:
            self.members[attrs["org"]][entity_id] = None
        for pool, member in (
            ("agent", kind == "user" and attrs["role"] != "customer"),
            ("closed", kind == "ticket" and attrs["status"] == "closed"),
        ):
            if member:
                self.pools[pool].add(entity_id)
            else:
                self.pools[pool].discard(entity_id)

    def upsert(
        self, src: str, entity_id: str, kind: str, name: str, attrs: dict[str, Any]
    ) -> dict[str, Any]:
        self.state[entity_id] = {"kind": kind, "name": name, "attrs": dict(attrs)}
        self._track(entity_id)
        event = {"src": src, "op": "upsert", "id": entity_id, "kind": kind, "name": name}
        return {**event, "attrs": attrs}

    def patch(self, src: str, entity_id: str, **changes: Any) -> dict[str, Any]:
        event: dict[str, Any] = {"src": src, "op": "patch", "id": entity_id}
        name = changes.pop("name", None)
        if name is not None:
            event["name"] = name
        event["attrs"] = changes
        if entity_id in self.state:
            if name is not None:
                self.state[entity_id]["name"] = name
            self.state[entity_id]["attrs"].update(changes)
            self._track(entity_id)
        return event

    def delete(self, src: str, entity_id: str) -> dict[str, Any]:
        s = self.state.pop(entity_id)
        for pool in self.pools.values():
            pool.discard(entity_id)
        if s["kind"] == "org":
            del self.members[entity_id]
        elif s["attrs"]["org"] in self.members:
            del self.members[s["attrs"]["org"]][entity_id]
        if s["kind"] == "ticket":
            self.gone_tickets.append(entity_id)
        return {"src": src, "op": "delete", "id": entity_id}

    # -- what happens ------------------------------------------------------------

    def next_event(self) -> dict[str, Any]:
        if self.queue:
            return self.queue.popleft()
        rng = self.rng
        if len(self.pools["org"]) < 2 or rng.random() < 0.03:
            return self.new_org()
        if len(self.pools["user"]) < 4 or rng.random() < 0.12:
            return self.new_user()
        while True:
            event = rng.choices(self.actions, self.weights)[0]()
            if event is not None:
                return event

    def new_org(self) -> dict[str, Any]:
        base = self.rng.choice(_ORGS)
        slug, n = base.lower(), 2
        while slug in self.slugs:
            slug, n = f"{base.lower()}-{n}", n + 1
        self.slugs.add(slug)
        name = f"{base} {self.rng.choice(_ORG_SUFFIXES)}"
        attrs = {"plan": self.rng.choice(_PLANS), "country": self.rng.choice(_COUNTRIES)}
        return self.upsert("crm", f"org:{slug}", "org", name, attrs)

    def new_user(self) -> dict[str, Any]:
        first, last = self.rng.choice(_FIRST), self.rng.choice(_LAST)
        org = self.pools["org"].choice(self.rng)
        user_id, self.next_user = f"user:{self.next_user}", self.next_user + 1
        attrs = {
            "email": f"{first.lower()}.{last.lower()}@{org.partition(':')[2]}.example",
            "org": org,
            "role": self.rng.choice(_ROLES),
        }
        return self.upsert("crm", user_id, "user", f"{first} {last}", attrs)

    def new_ticket(self) -> dict[str, Any]:
        requester = self.pools["user"].choice(self.rng)
        ticket_id, self.next_ticket = f"ticket:{self.next_ticket}", self.next_ticket + 1
        attrs = {
            "org": self.state[requester]["attrs"]["org"],
            "requester": requester,
            "status": "open",
            "priority": self.rng.choice(_PRIORITIES),
        }
        return self.upsert("helpdesk", ticket_id, "ticket", self.rng.choice(_SUBJECTS), attrs)

    def progress_ticket(self) -> dict[str, Any] | None:
        tickets = self.pools["ticket"]
        if len(tickets) == len(self.pools["closed"]):
            return None
        ticket = tickets.choice(self.rng)
        status = self.state[ticket]["attrs"]["status"]
        if status == "closed":
            return None
        return self.patch("helpdesk", ticket, status=_NEXT_STATUS[status])

    def assign_ticket(self) -> dict[str, Any] | None:
        if not self.pools["ticket"] or not self.pools["agent"]:
            return None
        ticket = self.pools["ticket"].choice(self.rng)
        return self.patch("helpdesk", ticket, assignee=self.pools["agent"].choice(self.rng))

    def presence(self) -> dict[str, Any]:
        user = self.pools["user"].choice(self.rng)
        return self.patch("chat", user, status=self.rng.choice(_PRESENCE))

    def change_user(self) -> dict[str, Any]:
        user = self.pools["user"].choice(self.rng)
        return self.patch("crm", user, role=self.rng.choice(_ROLES))

    def change_org(self) -> dict[str, Any]:
        org = self.pools["org"].choice(self.rng)
        if self.rng.random() < 0.3:
            base = self.state[org]["name"].split()[0]
            return self.patch("crm", org, name=f"{base} {self.rng.choice(_ORG_SUFFIXES)}")
        return self.patch("crm", org, plan=self.rng.choice(_PLANS))

    def redeliver(self) -> dict[str, Any]:
        """A webhook delivered twice: a full upsert of the state as it is."""
        kind = self.rng.choice(["org", "user", "ticket"] if self.pools["ticket"] else ["user"])
        entity_id = self.pools[kind].choice(self.rng)
        s = self.state[entity_id]
        src = "helpdesk" if kind == "ticket" else "crm"
        return self.upsert(src, entity_id, kind, s["name"], dict(s["attrs"]))

    def delete_ticket(self) -> dict[str, Any] | None:
        # Retention deletes closed tickets; spam goes at once.
        pool = self.pools["closed"] if self.pools["closed"] else self.pools["ticket"]
        return self.delete("helpdesk", pool.choice(self.rng)) if pool else None

    def delete_user(self) -> dict[str, Any] | None:
        users = self.pools["user"]
        return self.delete("crm", users.choice(self.rng)) if len(users) > 4 else None

    def delete_org(self) -> dict[str, Any] | None:
        """An org leaves: its users and tickets are deleted in the events after it."""
        if len(self.pools["org"]) < 3:
            return None
        org = self.pools["org"].choice(self.rng)
        for entity_id in list(self.members[org]):
            src = "helpdesk" if entity_id.startswith("ticket:") else "crm"
            self.queue.append(self.delete(src, entity_id))
        return self.delete("crm", org)

    def late_patch(self) -> dict[str, Any] | None:
        """An event about a ticket already deleted: it arrived out of order."""
        if not self.gone_tickets:
            return None
        ticket = self.rng.choice(self.gone_tickets)
        return self.patch("helpdesk", ticket, status="closed")


def generate_events(count: int, *, seed: int = 42) -> Iterator[dict[str, Any]]:
    """``count`` events of a simulated CRM / help-desk / chat stream, the same
    for the same ``count`` and ``seed`` on every run and platform."""
    rng = random.Random(seed)
    world = _World(rng)
    clock = datetime(2024, 3, 4, 9, 0, tzinfo=timezone.utc)
    for _ in range(count):
        clock += timedelta(seconds=rng.randint(1, 90))
        yield {"ts": clock.strftime("%Y-%m-%dT%H:%M:%SZ"), **world.next_event()}


def write_events(path: str | os.PathLike[str], count: int, *, seed: int = 42) -> None:
    """Write :func:`generate_events` as JSONL (``"-"`` for stdout)."""
    lines = (
        json.dumps(event, ensure_ascii=False) + "\n" for event in generate_events(count, seed=seed)
    )
    if os.fspath(path) == "-":
        sys.stdout.writelines(lines)
        return
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)


# -- command line ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m livemap.examples.entities",
        description=(
            "Index the entities of a JSONL event stream into SQLite with livemap: "
            "one row per live entity, updated and deleted as events arrive."
        ),
    )
    parser.add_argument(
        "--input",
        metavar="PATH",
        action="append",
        help="JSONL event file; repeat for several (default: the bundled sample, "
        f"{BUNDLED_COUNT} events)",
    )
    parser.add_argument(
        "--db",
        metavar="PATH",
        default=DEFAULT_DB,
        help=f"SQLite database to maintain (default: ./{DEFAULT_DB}; "
        "':memory:' for a throwaway one)",
    )
    parser.add_argument(
        "--live",
        action="store_true",
        help="after catching up, keep following the input files as lines are appended; "
        "Ctrl+C stops",
    )
    parser.add_argument(
        "--interval",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_INTERVAL,
        help=f"how often --live polls the files and shows progress (default: {DEFAULT_INTERVAL})",
    )
    parser.add_argument(
        "--shards",
        metavar="N",
        type=int,
        default=DEFAULT_SHARDS,
        help=f"producer components per input file (default: {DEFAULT_SHARDS})",
    )
    parser.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="event loop to run on (default: asyncio)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="print no progress or summary, only problems"
    )
    parser.add_argument(
        "--generate",
        nargs=2,
        metavar=("N", "PATH"),
        help="write N sample events to PATH ('-' for stdout) and exit",
    )
    parser.add_argument("--seed", type=int, default=42, help="seed for --generate (default: 42)")
    return parser


async def _stop_on_signal(stop: anyio.Event) -> None:
    """Turn the first Ctrl+C (or SIGTERM) into a clean stop.  The handlers are
    removed once it arrives, so a second Ctrl+C interrupts for good."""
    try:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
    except (NotImplementedError, RuntimeError, ValueError):
        return  # no signal handling here (not the main thread, or Windows): Ctrl+C raises
    stop.set()


async def _run_cli(pipeline: Pipeline, *, live: bool, quiet: bool) -> Summary:
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, stop)
        summary = await pipeline.run(live=live, stop=stop, quiet=quiet)
        tg.cancel_scope.cancel()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (130 when interrupted before
    the end of a catch-up, or by a second Ctrl+C)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # a second Ctrl+C while cleaning up: give up quietly
        return 130


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.generate is not None:
        count, path = args.generate
        if not count.isdigit():
            parser.error(f"--generate: N must be a count, got {count!r}")
        write_events(path, int(count), seed=args.seed)
        if not args.quiet and path != "-":
            print(f"wrote {int(count)} events to {path}")
        return 0
    inputs = [Path(p) for p in args.input] if args.input else [BUNDLED_EVENTS]
    for path in inputs:
        if not path.is_file():
            parser.error(f"no such input file: {path}")
    if args.shards < 1 or args.interval <= 0:
        parser.error("--shards must be >= 1 and --interval positive")
    pipeline = Pipeline(inputs, args.db, shards=args.shards, interval=args.interval)
    try:
        summary = anyio.run(
            lambda: _run_cli(pipeline, live=args.live, quiet=args.quiet), backend=args.backend
        )
    except KeyboardInterrupt:  # a second Ctrl+C, or one where signals can't be caught
        if not args.quiet and pipeline.last_summary is None:
            print()
            print(pipeline.summary(live=args.live, interrupted=True).format(), end="")
        return 130
    finally:
        with suppress(sqlite3.Error):
            pipeline.close()
    if summary.interrupted and not args.live:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
