"""The consuming half's store: the SQLite table ``entities``, one row per
entity, and the sink of the ``KeyedTarget`` that keeps it."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from livemap import TargetBatch

from .events import Entity

__all__ = ["EntityDB", "EntityDBError", "EntityRow"]


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


class EntityDBError(Exception):
    """The database cannot be opened or written; the message says which and why."""


class EntityDB:
    """The SQLite database: one row per entity in table ``entities``.

    Opening it checks that it can be used, so a wrong ``--db`` is one
    :class:`EntityDBError` at the start rather than a failed write per row:
    it must open as an SQLite database (not a directory, not another kind of
    file, in a directory that exists) and take a write (not read-only).
    """

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
        try:
            # Autocommit mode: transactions are opened explicitly by transaction().
            self.conn = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise EntityDBError(f"cannot open the database {self.path}: {self._why(exc)}") from exc
        try:
            if self.path != ":memory:":
                self.conn.execute("PRAGMA journal_mode=WAL")  # readers don't block the writer
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute(self.SCHEMA)
            # A write that changes nothing: it fails on a read-only database.
            with self.transaction() as conn:
                conn.execute("DELETE FROM entities WHERE 0")
        except sqlite3.Error as exc:
            self.conn.close()
            verb = "write to" if "readonly" in str(exc) else "use"
            raise EntityDBError(f"cannot {verb} the database {self.path}: {exc}") from exc
        self.written = 0  # rows upserted by apply(), since this object was made
        self.deleted = 0  # rows deleted by apply()

    def _why(self, exc: sqlite3.Error) -> str:
        path = Path(self.path)
        if path.is_dir():
            return "it is a directory"
        if not path.parent.is_dir():
            return f"there is no directory {path.parent}"
        return str(exc)

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
        self.written += len(batch.upserts)
        self.deleted += len(batch.deletes)

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
