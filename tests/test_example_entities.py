"""The entity-index example (``python -m livemap.examples.entities``), end to end."""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, wait_for

import livemap
from livemap.examples import entities
from livemap.examples.entities import EntityDB, EntityRow, Pipeline, Summary, main, replay

pytestmark = pytest.mark.anyio

BACKENDS = ["asyncio", "trio"]
SUBPROCESS_TIMEOUT = 60.0

Row = tuple[str, str, str, str]


def new_process() -> None:
    """Forget the app trees of this process, as a new process starts with
    none (an app's tree lives on by its name within one process)."""
    from livemap._runtime import _app

    _app._trees.clear()


def line(**event: Any) -> str:
    return json.dumps(event) + "\n"


EVENTS = [
    line(op="upsert", id="org:acme", kind="org", name="Acme Corp",
         attrs={"plan": "team", "country": "DE"}),
    line(op="upsert", id="user:1", kind="user", name="Ada Lovelace", attrs={"org": "org:acme"}),
    line(op="upsert", id="user:2", name="Alan Turing", attrs={"org": "org:acme"}),
    line(op="upsert", id="ticket:1", kind="ticket", name="Cannot log in",
         attrs={"requester": "user:1", "status": "open"}),
    line(op="patch", id="ticket:1", attrs={"status": "pending"}),
    line(op="patch", id="user:1", attrs={"status": "online"}),
    line(op="delete", id="user:2"),
    line(op="patch", id="user:2", attrs={"status": "away"}),  # late: user:2 is gone
    "this is not json\n",
    "\n",
    line(op="patch", id="org:acme", attrs={"country": None}),  # null removes an attribute
    line(op="upsert", id="org:acme", kind="org", name="Acme Corp", attrs={"plan": "team"}),
]  # fmt: skip

ROWS: list[Row] = [
    ("org:acme", "org", "Acme Corp", '{"plan":"team"}'),
    ("ticket:1", "ticket", "Cannot log in", '{"requester":"user:1","status":"pending"}'),
    ("user:1", "user", "Ada Lovelace", '{"org":"org:acme","status":"online"}'),
]

MORE_EVENTS = [
    line(op="patch", id="user:1", name="Ada King", attrs={"status": "away"}),
    line(op="delete", id="ticket:1"),
    line(op="upsert", id="user:3", name="Grace Hopper", attrs={"org": "org:acme"}),
]

MORE_ROWS: list[Row] = [
    ("org:acme", "org", "Acme Corp", '{"plan":"team"}'),
    ("user:1", "user", "Ada King", '{"org":"org:acme","status":"away"}'),
    ("user:3", "user", "Grace Hopper", '{"org":"org:acme"}'),
]


def write(path: Path, lines: list[str], mode: str = "w") -> None:
    with path.open(mode, encoding="utf-8") as f:
        f.writelines(lines)


def db_rows(path: Path) -> list[Row]:
    """The ``entities`` table, read through a connection of its own."""
    if not path.exists():
        return []
    conn = sqlite3.connect(path)
    try:
        query = "SELECT id, kind, name, attrs FROM entities ORDER BY id"
        return [tuple(row) for row in conn.execute(query)]
    except sqlite3.OperationalError:  # the table is not created yet
        return []
    finally:
        conn.close()


def expected_rows(path: Path) -> list[EntityRow]:
    """The rows the replayed stream calls for (an ``EntityRow`` equals its plain tuple)."""
    with path.open(encoding="utf-8") as f:
        states = replay(f)
    return sorted(EntityRow.of(e) for e in states.values())


def numbers_in(text: str, summary: Summary) -> None:
    """The printed summary carries the run's numbers."""
    assert f"events      {summary.events} read, {summary.malformed} malformed" in text
    assert f"entities    {summary.entities} in the LiveMap" in text
    assert (
        f"changes     {summary.changes} committed, {summary.suppressed} suppressed by ==, "
        f"{summary.conflicts} conflicts"
    ) in text
    assert f"sqlite      {summary.rows} rows in" in text
    assert "elapsed" in text


async def run_pipeline(pipeline: Pipeline, **kwargs: Any) -> tuple[Summary, str]:
    out = io.StringIO()
    with anyio.fail_after(TIMEOUT):
        summary = await pipeline.run(out=out, **kwargs)
    return summary, out.getvalue()


@pytest.fixture
def events(tmp_path: Path) -> Path:
    path = tmp_path / "events.jsonl"
    write(path, EVENTS)
    return path


def subprocess_env() -> dict[str, str]:
    root = str(Path(livemap.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


# -- catch-up mode ----------------------------------------------------------------------


async def test_catch_up_indexes_the_replayed_state(events: Path, tmp_path: Path) -> None:
    db = tmp_path / "entities.sqlite"
    pipeline = Pipeline([events], db)
    try:
        summary, text = await run_pipeline(pipeline)
    finally:
        pipeline.close()
    assert db_rows(db) == ROWS
    assert summary.mode == "catch-up"
    assert not summary.interrupted
    assert (summary.events, summary.malformed, summary.ignored) == (10, 1, 1)
    assert (summary.entities, summary.rows, summary.stale, summary.conflicts) == (3, 3, 0, 0)
    assert summary.changes == 3  # one pass over the file: each entity declared once
    assert summary.components_failed == 0
    assert text.startswith("catch-up done in ")
    numbers_in(text, summary)


async def test_generated_stream_matches_its_replay(tmp_path: Path) -> None:
    path, db = tmp_path / "gen.jsonl", tmp_path / "gen.sqlite"
    entities.write_events(path, 2000, seed=3)
    ops = [json.loads(text)["op"] for text in path.read_text().splitlines()]
    assert ops.count("delete") > 50
    pipeline = Pipeline([path], db, shards=7)
    try:
        summary, _ = await run_pipeline(pipeline)
    finally:
        pipeline.close()
    rows = expected_rows(path)
    assert db_rows(db) == rows
    assert summary.entities == summary.rows == len(rows)
    assert summary.events == 2000
    assert summary.malformed == 0


# shards=1: a deleted entity is dropped by its shard's next run; shards=64: every
# entity has a shard of its own, which is unmounted when its entity is deleted.
SHARDS = pytest.mark.parametrize("shards", [1, 64])


@SHARDS
async def test_rerun_in_the_same_process_updates_and_deletes_rows(
    shards: int, events: Path, tmp_path: Path
) -> None:
    db = tmp_path / "entities.sqlite"
    pipeline = Pipeline([events], db, shards=shards)
    try:
        await run_pipeline(pipeline)
        assert db_rows(db) == ROWS
        write(events, MORE_EVENTS, "a")
        summary, text = await run_pipeline(pipeline)
    finally:
        pipeline.close()
    assert db_rows(db) == MORE_ROWS
    # The app re-ran against its tree: only the new lines were read, and the
    # deletion went through the LiveMap, not through the stale-row sweep.
    assert summary.events == 13
    assert summary.stale == 0
    assert summary.rows == summary.entities == 3
    numbers_in(text, summary)


async def test_rerun_on_the_same_db_removes_rows_of_deleted_entities(
    events: Path, tmp_path: Path
) -> None:
    db = tmp_path / "entities.sqlite"
    first = Pipeline([events], db)
    try:
        await run_pipeline(first)
    finally:
        first.close()
    assert db_rows(db) == ROWS
    write(events, MORE_EVENTS, "a")
    second = Pipeline([events], db)  # as a new process would: nothing in memory
    try:
        summary, text = await run_pipeline(second)
    finally:
        second.close()
    assert db_rows(db) == MORE_ROWS
    assert summary.stale == 1  # ticket:1, deleted while no run was watching
    assert "1 stale rows removed" in text


async def test_conflicting_sources_keep_the_first_owner(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b, db = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "db.sqlite"
    write(
        a, [line(op="upsert", id="org:acme", name="Acme A"), line(op="upsert", id="u:1", name="U")]
    )
    write(
        b, [line(op="upsert", id="org:acme", name="Acme B"), line(op="upsert", id="u:2", name="V")]
    )
    pipeline = Pipeline([a, b, a], db)  # a repeated input is read once
    try:
        with caplog.at_level(logging.WARNING, logger="livemap.examples.entities"):
            summary, _ = await run_pipeline(pipeline)
    finally:
        pipeline.close()
    assert len(pipeline.sources) == 2
    assert summary.conflicts == 1
    rows = db_rows(db)
    assert [r[0] for r in rows] == ["org:acme", "u:1", "u:2"]
    assert rows[0][2] in ("Acme A", "Acme B")
    warnings = [r.getMessage() for r in caplog.records if "org:acme" in r.getMessage()]
    assert len(warnings) == 1
    assert "is owned by component" in warnings[0]


# -- a sink that fails -------------------------------------------------------------------


def failing_sink(monkeypatch: pytest.MonkeyPatch, key: str, times: int | None = 1) -> list[str]:
    """Make the example's sink raise ``database is locked`` for the batches that
    write ``key``: the first ``times`` of them, or every one (``None``).
    Returns the keys it failed for, one per failure."""
    apply = EntityDB.apply
    failed: list[str] = []

    def flaky(self: EntityDB, batch: livemap.TargetBatch[str, EntityRow]) -> None:
        if any(k == key for k, _ in batch.upserts) and (times is None or len(failed) < times):
            failed.append(key)
            raise sqlite3.OperationalError("database is locked")
        apply(self, batch)

    monkeypatch.setattr(EntityDB, "apply", flaky)
    return failed


FAST_RETRY = livemap.RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)


async def index_once(events: Path, db: Path) -> None:
    """A first run, as an earlier process would have left the database."""
    pipeline = Pipeline([events], db)
    try:
        await run_pipeline(pipeline)
    finally:
        pipeline.close()
    assert db_rows(db) == ROWS


async def test_a_write_that_fails_once_is_retried_and_no_row_is_lost(
    events: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "entities.sqlite"
    await index_once(events, db)
    failed = failing_sink(monkeypatch, "user:1")
    new_process()
    pipeline = Pipeline([events], db)  # a new process, the example's own retry policy
    try:
        with caplog.at_level(logging.WARNING, logger="livemap.examples.entities"):
            summary, text = await run_pipeline(pipeline)
    finally:
        pipeline.close()
    assert failed == ["user:1"]
    assert db_rows(db) == ROWS  # the row of user:1 is still there, written again
    assert (summary.stale, summary.retries, summary.failing) == (0, 1, 0)
    assert summary.stale_checked
    assert summary.problems == ()
    assert "writes      3 rows written, 0 deleted, 1 retries, 0 failing" in text
    assert not [r for r in caplog.records if "could not write" in r.getMessage()]


async def test_a_write_that_keeps_failing_keeps_the_old_row_and_is_reported(
    events: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "entities.sqlite"
    await index_once(events, db)
    write(events, [line(op="patch", id="user:1", attrs={"status": "away"})], "a")
    failed = failing_sink(monkeypatch, "user:1", times=None)
    new_process()
    pipeline = Pipeline([events], db, retry=FAST_RETRY)
    try:
        with caplog.at_level(logging.WARNING, logger="livemap.examples.entities"):
            summary, text = await run_pipeline(pipeline)
    finally:
        pipeline.close()
    assert failed == ["user:1"] * 3  # FAST_RETRY's three tries
    assert db_rows(db) == ROWS  # not updated, and not swept as stale
    assert (summary.stale, summary.failing, summary.retries) == (0, 1, 2)
    assert len(summary.problems) == 1
    assert "user:1" in summary.problems[0] and "database is locked" in summary.problems[0]
    assert "0 stale rows removed" in text
    (warning,) = [r for r in caplog.records if "could not write" in r.getMessage()]
    assert warning.levelno == logging.WARNING and warning.exc_info is None
    assert "user:1" in warning.getMessage() and "database is locked" in warning.getMessage()


async def test_a_producer_that_fails_leaves_the_sweep_out(
    events: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "entities.sqlite"
    await index_once(events, db)

    def unreadable(self: entities.EventFile) -> int:
        raise OSError(5, "Input/output error", str(self.path))

    monkeypatch.setattr(entities.EventFile, "read_new", unreadable)
    pipeline = Pipeline([events], db)
    try:
        with caplog.at_level(logging.WARNING, logger="livemap.examples.entities"):
            summary, text = await run_pipeline(pipeline)
    finally:
        pipeline.close()
    # Nothing was declared, but the run does not know the entities are gone.
    assert summary.entities == 0
    assert db_rows(db) == ROWS
    assert (summary.stale, summary.stale_checked) == (0, False)
    assert "stale rows not checked" in text
    assert summary.problems
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("Input/output error" in e for e in errors)


def test_cli_reports_rows_it_could_not_write(
    events: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = tmp_path / "cli.sqlite"
    assert main(["--input", str(events), "--db", str(db), "--quiet"]) == 0
    failing_sink(monkeypatch, "ticket:1", times=None)
    write(events, [line(op="patch", id="ticket:1", attrs={"status": "solved"})], "a")
    assert main(["--input", str(events), "--db", str(db)]) == 1
    assert db_rows(db) == ROWS
    out, err = capsys.readouterr()
    assert "1 failing" in out
    (error,) = err.splitlines()
    assert error.startswith("error: ") and "ticket:1" in error and "database is locked" in error


# -- live mode --------------------------------------------------------------------------


class TTYBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


@SHARDS
async def test_live_mode_follows_appended_lines(shards: int, events: Path, tmp_path: Path) -> None:
    db = tmp_path / "entities.sqlite"
    pipeline = Pipeline([events], db, shards=shards, interval=0.02)
    out = io.StringIO()
    stop = anyio.Event()
    result: list[Summary] = []

    async def run_live() -> None:
        result.append(await pipeline.run(live=True, stop=stop, out=out))

    try:
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_live)
                await wait_for(lambda: db_rows(db) == ROWS)
                write(events, MORE_EVENTS, "a")
                await wait_for(lambda: db_rows(db) == MORE_ROWS)
                # Half a line is left for later: the writer may be in the middle of it.
                write(events, ['{"op": "delete", "id": "user:1"'], "a")
                await wait_for(lambda: pipeline.sources[0].has_news() is False)
                await anyio.sleep(0.1)
                assert db_rows(db) == MORE_ROWS
                write(events, ["}\n", "{oops\n"], "a")
                await wait_for(lambda: [r[0] for r in db_rows(db)] == ["org:acme", "user:3"])
                stop.set()
    finally:
        pipeline.close()
    (summary,) = result
    assert summary.mode == "live"
    assert (summary.events, summary.malformed) == (14, 2)
    assert summary.entities == summary.rows == 2
    if shards == 1:  # a change re-declares the shard's other entities: they stop at ==
        assert summary.suppressed > 0
    else:  # every entity has a shard of its own: nothing unchanged is declared again
        assert summary.suppressed == 0
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith(f"following {events}")
    progress = [x for x in lines if x.startswith("events ")]
    assert progress
    assert all(" | rows written " in x or x.endswith(" | starting") for x in progress)
    assert " | rows written " in progress[-1]
    assert "live run stopped after" in text
    numbers_in(text, summary)


def attrs_in_db(db: Path, entity_id: str) -> str | None:
    """The ``attrs`` of one row, read through a connection of its own."""
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT attrs FROM entities WHERE id = ?", (entity_id,)).fetchone()
    except sqlite3.OperationalError:  # the table is not created yet
        return None
    finally:
        conn.close()
    return None if row is None else str(row[0])


async def test_a_poll_declares_only_the_shards_it_changed(tmp_path: Path) -> None:
    path, db = tmp_path / "gen.jsonl", tmp_path / "gen.sqlite"
    entities.write_events(path, 3000, seed=5)
    rows = expected_rows(path)
    shards = 16
    user = next(row.id for row in rows if row.kind == "user")
    shard = entities.shard_of(user, shards)
    shard_size = sum(1 for row in rows if entities.shard_of(row.id, shards) == shard)
    assert shard_size < len(rows) // 4
    pipeline = Pipeline([path], db, shards=shards, interval=0.01)
    stop = anyio.Event()

    def counters() -> tuple[int, int]:
        assert pipeline.live_map is not None
        stats = pipeline.live_map.stats()
        return stats.changes, stats.suppressed

    async def row_has(status: str | None) -> None:
        def done() -> bool:
            attrs = attrs_in_db(db, user)
            return attrs is None if status is None else f'"status":"{status}"' in (attrs or "")

        await wait_for(done, interval=0.01)

    async def polled() -> None:  # the file was read to its end, and a few polls went by
        await wait_for(lambda: not pipeline.sources[0].has_news())
        await anyio.sleep(0.1)

    def grew_by_one_shard_at_most(before: tuple[int, int]) -> tuple[int, int]:
        now = counters()
        assert now[0] == before[0] + 1  # the one entity that changed
        assert 0 <= now[1] - before[1] <= shard_size  # its shard, not every entity
        return now

    try:
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: pipeline.run(live=True, stop=stop, quiet=True))
                await wait_for(lambda: db_rows(db) == rows, interval=0.02)
                await polled()
                before = counters()

                # One line: one entity changes; only its shard is declared again.
                write(path, [line(op="patch", id=user, attrs={"status": "busy"})], "a")
                await row_has("busy")
                before = grew_by_one_shard_at_most(before)

                # Half a line: nothing runs until the line is complete.
                write(
                    path, [f'{{"op": "patch", "id": "{user}", "attrs": {{"status": "away"}}'], "a"
                )
                await polled()
                assert counters() == before
                write(path, ["}\n"], "a")
                await row_has("away")
                before = grew_by_one_shard_at_most(before)

                # A malformed line, a blank one, and an event that changes nothing
                # (a redelivery): nothing runs.
                write(path, ["{oops\n", "\n"], "a")
                write(path, [line(op="patch", id=user, attrs={"status": "away"})], "a")
                await polled()
                assert counters() == before
                assert pipeline.sources[0].malformed == 1

                # A delete: the shard is declared again without the entity.
                write(path, [line(op="delete", id=user)], "a")
                await row_has(None)
                grew_by_one_shard_at_most(before)
                stop.set()
    finally:
        pipeline.close()


async def test_live_progress_on_a_terminal_rewrites_one_line(events: Path, tmp_path: Path) -> None:
    db = tmp_path / "entities.sqlite"
    pipeline = Pipeline([events], db, interval=0.02)
    out = TTYBuffer()
    stop = anyio.Event()
    try:
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: pipeline.run(live=True, stop=stop, out=out))
                await wait_for(lambda: "\r" in out.getvalue())
                write(events, MORE_EVENTS, "a")
                await wait_for(lambda: db_rows(db) == MORE_ROWS)
                await wait_for(lambda: out.getvalue().count("\r") >= 2)
                stop.set()
    finally:
        pipeline.close()
    text = out.getvalue()
    head, _, rest = text.partition("\n")
    assert head.startswith("following ")
    progress, _, summary = rest.partition("\n")
    assert progress.startswith("\revents ")
    assert progress.endswith("\x1b[K")
    assert summary.startswith("live run stopped after")


async def test_stop_cuts_a_catch_up_short(events: Path, tmp_path: Path) -> None:
    stop = anyio.Event()
    stop.set()
    pipeline = Pipeline([events], tmp_path / "db.sqlite")
    try:
        summary, text = await run_pipeline(pipeline, stop=stop)
    finally:
        pipeline.close()
    assert summary.interrupted
    assert text.startswith("catch-up interrupted after")


# -- progress during long work ---------------------------------------------------------

BIG = 100_000


@pytest.fixture(scope="module")
def big_events(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "events.jsonl"
    entities.write_events(path, BIG)
    return path


PROGRESS = re.compile(
    r"events (\d+) \| entities (\d+) \| pending (\d+) \| rows written (\d+) \| "
    r"changes \d+ \| suppressed \d+"
)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the same on trio; once is enough
@pytest.mark.parametrize("live", [False, True])
async def test_progress_shows_during_a_catch_up(
    live: bool, big_events: Path, tmp_path: Path
) -> None:
    pipeline = Pipeline([big_events], tmp_path / "big.sqlite", interval=0.05)
    out = io.StringIO()
    stop = anyio.Event()
    result: list[Summary] = []

    def progress() -> list[tuple[int, ...]]:
        return [tuple(map(int, m.groups())) for m in PROGRESS.finditer(out.getvalue())]

    def seen_reading_and_writing() -> bool:
        lines = progress()
        reading = any(0 < events < BIG for events, *_ in lines)
        writing = any(rows > 0 and pending > 0 for _, _, pending, rows in lines)
        return reading and writing

    async def run() -> None:
        result.append(await pipeline.run(live=live, stop=stop, out=out))

    try:
        with anyio.fail_after(6 * TIMEOUT):  # a big input on a shared machine
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                # The catch-up is far from done, and it already says how far it got:
                # events read while the file is read, then rows written and pending.
                await wait_for(seen_reading_and_writing, timeout=6 * TIMEOUT, interval=0.01)
                stop.set()
    finally:
        pipeline.close()
    (summary,) = result
    assert summary.written < summary.entities  # cut short before the end of the catch-up
    lines = out.getvalue().splitlines()
    if live:
        assert lines.pop(0).startswith("following ")
    numbers = progress()
    assert len(numbers) >= 3
    assert [x for x in lines if x.startswith("events ")] == lines[: len(numbers)]
    for column in (0, 3):  # events read and rows written only grow
        assert [x[column] for x in numbers] == sorted(x[column] for x in numbers)
    summary_head = lines[len(numbers)]
    assert summary_head.startswith("live run stopped" if live else "catch-up interrupted")


async def test_a_log_line_does_not_land_on_the_status_line(events: Path, tmp_path: Path) -> None:
    terminal = TTYBuffer()  # stdout and stderr on one terminal
    handler = logging.StreamHandler(terminal)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    pipeline = Pipeline([events], tmp_path / "entities.sqlite", interval=0.02)
    stop = anyio.Event()
    try:
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: pipeline.run(live=True, stop=stop, out=terminal))

                def status_drawn_last() -> bool:
                    text = terminal.getvalue()
                    return text.endswith("\x1b[K") and not text.endswith("\r\x1b[K")

                await wait_for(
                    lambda: ":9: skipping" in terminal.getvalue() and status_drawn_last()
                )
                write(events, ["{oops\n"], "a")
                await wait_for(lambda: ":13: skipping" in terminal.getvalue())
                at = terminal.getvalue().index(":13: skipping")
                await wait_for(lambda: "\revents " in terminal.getvalue()[at:])
                stop.set()
    finally:
        root.removeHandler(handler)
        pipeline.close()
    text = terminal.getvalue()
    assert not handler.filters  # the status line let go of the handler
    start = text.rindex("WARNING: ", 0, at)
    assert text[start - 4 : start] == "\r\x1b[K"  # the status line was cleared first
    warning, _, after = text[start:].partition("\n")
    assert "skipping a malformed event" in warning and "\r" not in warning
    assert after.startswith("\revents ")  # and drawn again below the log line
    for found in re.finditer("WARNING: ", text):  # every log line has a line of its own
        assert found.start() == 0 or text[: found.start()].endswith(("\n", "\r\x1b[K"))


# -- the command line -----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_catch_up(
    backend: str, events: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "cli.sqlite"
    assert main(["--input", str(events), "--db", str(db), "--backend", backend]) == 0
    assert db_rows(db) == ROWS
    out = capsys.readouterr().out
    assert out.startswith("catch-up done in ")
    assert "events      10 read, 1 malformed, 1 about missing entities" in out
    assert "entities    3 in the LiveMap" in out
    assert "changes     3 committed, 0 suppressed by ==, 0 conflicts" in out
    assert f"sqlite      3 rows in {db}, 0 stale rows removed" in out


def test_cli_default_run_indexes_the_bundled_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    rows = expected_rows(entities.BUNDLED_EVENTS)
    assert len(rows) > 50
    assert db_rows(tmp_path / "entities.sqlite") == rows
    assert f"entities    {len(rows)} in the LiveMap" in capsys.readouterr().out


def test_cli_quiet_prints_nothing(
    events: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--input", str(events), "--db", str(tmp_path / "q.sqlite"), "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_cli_rejects_a_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["--input", str(tmp_path / "nope.jsonl"), "--db", str(tmp_path / "x.sqlite")])
    assert exc_info.value.code == 2
    assert "no such input file" in capsys.readouterr().err


def test_cli_subprocess(events: Path, tmp_path: Path) -> None:
    db = tmp_path / "sub.sqlite"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "livemap.examples.entities",
            "--input",
            str(events),
            "--db",
            str(db),
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert db_rows(db) == ROWS
    assert "entities    3 in the LiveMap" in proc.stdout
    assert "sqlite      3 rows in" in proc.stdout
    assert "WARNING" in proc.stderr and "malformed" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_live_follows_and_stops_on_ctrl_c(backend: str, events: Path, tmp_path: Path) -> None:
    db = tmp_path / "live.sqlite"
    cmd = [sys.executable, "-m", "livemap.examples.entities", "--live", "--interval", "0.05"]
    cmd += ["--input", str(events), "--db", str(db), "--backend", backend]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT

        def wait_until(predicate: Any) -> None:
            while not predicate():
                assert proc.poll() is None, proc.communicate(timeout=SUBPROCESS_TIMEOUT)
                assert time.monotonic() < deadline, "timed out"
                time.sleep(0.02)

        wait_until(lambda: db_rows(db) == ROWS)
        write(events, MORE_EVENTS, "a")
        wait_until(lambda: db_rows(db) == MORE_ROWS)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "KeyboardInterrupt" not in err
    assert "\r" not in out  # stdout is a pipe: plain lines
    assert any(x.startswith("events ") for x in out.splitlines())
    assert "live run stopped after" in out
    assert "entities    3 in the LiveMap" in out


# -- ordinary mistakes: one line and status 1 ------------------------------------------


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line an ordinary mistake leaves on stderr (and no traceback)."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def make_read_only(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the database at ``path`` read-only: its mode bits, and for root
    (whom mode bits do not stop) SQLite's read-only open mode as well."""
    path.chmod(0o444)
    if getattr(os, "geteuid", lambda: -1)() != 0:
        return
    connect = sqlite3.connect

    def read_only(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        if os.fspath(database) == str(path):
            return connect(f"{path.resolve().as_uri()}?mode=ro", *args, uri=True, **kwargs)
        return connect(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only)


@pytest.mark.parametrize(
    ("db", "message"),
    [
        ("missing/entities.sqlite", "cannot open the database {db}: there is no directory"),
        (".", "cannot open the database {db}: it is a directory"),
        ("not-a-db.sqlite", "cannot use the database {db}: file is not a database"),
    ],
)
def test_cli_db_that_cannot_be_opened(
    db: str, message: str, events: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / db
    (tmp_path / "not-a-db.sqlite").write_text("these are not the bytes of a database\n")
    assert main(["--input", str(events), "--db", str(path)]) == 1
    assert one_error_line(capsys).startswith("error: " + message.format(db=path))
    assert not (tmp_path / "missing").exists()


def test_cli_read_only_db(
    events: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = tmp_path / "ro.sqlite"
    assert main(["--input", str(events), "--db", str(db), "--quiet"]) == 0
    before = db.read_bytes()
    make_read_only(db, monkeypatch)
    write(events, MORE_EVENTS, "a")
    assert main(["--input", str(events), "--db", str(db)]) == 1
    assert one_error_line(capsys) == (
        f"error: cannot write to the database {db}: attempt to write a readonly database"
    )
    assert db.read_bytes() == before
    assert db_rows(db) == ROWS


def test_cli_generate_into_a_missing_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "missing" / "events.jsonl"
    assert main(["--generate", "10", str(path)]) == 1
    assert one_error_line(capsys) == f"error: cannot write {path}: No such file or directory"


def test_cli_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "missing" / "events.jsonl"
    assert main(["--generate", "10", str(path), "--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "FileNotFoundError" in err
    assert err.splitlines()[-1] == f"error: cannot write {path}: No such file or directory"


def test_cli_subprocess_error_is_one_line(events: Path, tmp_path: Path) -> None:
    db = tmp_path / "missing" / "entities.sqlite"
    cmd = [sys.executable, "-m", "livemap.examples.entities", "--input", str(events)]
    proc = subprocess.run(
        [*cmd, "--db", str(db)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"error: cannot open the database {db}: there is no directory {db.parent}"
    ]


# -- sample data ----------------------------------------------------------------------


def test_generate_is_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    assert main(["--generate", "500", str(a)]) == 0
    assert main(["--generate", "500", str(b)]) == 0
    assert main(["--generate", "500", str(c), "--seed", "7"]) == 0
    assert "wrote 500 events to" in capsys.readouterr().out
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    lines = a.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 500
    for text in lines:
        event = json.loads(text)
        assert event["op"] in ("upsert", "patch", "delete")
        entities.parse_event(text)
    # a prefix of a longer stream is the shorter stream
    assert main(["--generate", "200", "-"]) == 0
    assert capsys.readouterr().out.splitlines() == lines[:200]


def test_bundled_sample_is_the_generated_one() -> None:
    bundled = entities.BUNDLED_EVENTS.read_text(encoding="utf-8").splitlines()
    assert len(bundled) == entities.BUNDLED_COUNT
    generated = [
        json.dumps(e, ensure_ascii=False) for e in entities.generate_events(entities.BUNDLED_COUNT)
    ]
    assert bundled == generated


def test_replay_semantics() -> None:
    states = replay(EVENTS[:8] + EVENTS[10:])
    assert sorted(EntityRow.of(e) for e in states.values()) == ROWS
    assert "user:2" not in states
    assert states["user:1"].attrs == {"org": "org:acme", "status": "online"}
    with pytest.raises(entities.BadEvent, match="unknown op"):
        entities.parse_event('{"op": "merge", "id": "x"}')
    with pytest.raises(entities.BadEvent, match="has no name"):
        entities.parse_event('{"op": "upsert", "id": "x"}')
    with pytest.raises(ValueError):
        entities.parse_event("{oops")
    assert entities.shard_of("user:1", 16) == entities.shard_of("user:1", 16) < 16


def test_the_example_uses_only_the_public_api() -> None:
    """It imports nothing from livemap but the names ``import livemap`` offers
    (the runtime's own modules may move), nor any private name of them."""
    package = Path(entities.__file__).parent
    used: set[str] = set()
    for module in sorted(package.glob("*.py")):
        tree = ast.parse(module.read_text(encoding="utf-8"))
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("livemap"):
                        assert alias.name == "livemap", (module.name, alias.name)
                        aliases.add(alias.asname or alias.name)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "livemap":
                    used.update(alias.name for alias in node.names)
                elif node.module.startswith("livemap"):
                    assert node.module.startswith("livemap.examples.entities"), (
                        module.name,
                        node.module,
                    )
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                used.add(node.attr)
    assert used
    assert used <= set(livemap.__all__), used - set(livemap.__all__)
