"""Events and entities: parsing a JSONL stream, replaying it into the
current entity states, and :class:`EventFile`, which reads a file
incrementally."""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "BadEvent",
    "Entity",
    "Event",
    "EventFile",
    "apply_event",
    "parse_event",
    "replay",
    "shard_of",
]

log = logging.getLogger("livemap.examples.entities")


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

    :meth:`take_changed` tells which entities the lines read since its last
    call changed, so that only their shards are declared again.
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
        self._changed: set[str] | None = set()  # None: replayed from the start

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
                self._changed = None
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
            old = self.entities.get(event.id)
            if not apply_event(self.entities, event):
                self.ignored += 1
            elif self._changed is not None and self.entities.get(event.id) != old:
                self._changed.add(event.id)
        return self.events - before

    def take_changed(self) -> set[str] | None:
        """The ids of the entities that changed (appeared, changed or were
        deleted) in the lines read since the last call; ``None`` if the file
        was replayed from the start, when any of them may have."""
        changed, self._changed = self._changed, set()
        return changed
