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
                                  lm.declare_entry(entity.id, entity); a poll runs
                                  again only the shards whose entities changed
    LiveMap[str, Entity]          owned entries; the consumer hears only of real changes (==)
      └─ index_entity x entity    mount_each: one component per entity:
                                  table.declare(entity.id, EntityRow.of(entity))
    KeyedTarget "sqlite:entities" applies each batch of upserts and deletes to SQLite
                                  in one transaction

Nothing in it deletes anything explicitly.  An entity deleted from the stream
is no longer declared by its shard, so it leaves the LiveMap; its
``index_entity`` component is unmounted, so its row is no longer declared, so
the SQLite target deletes it.  A shard left with no entities is unmounted
and everything it owned goes away the same way.  A poll re-runs only the
shards whose entities the new lines changed (``operator.update`` of one
child), so a poll that read a partial or malformed line, or an event that
changed nothing, runs nothing; the other entities of a shard that does run
are re-declared with equal values and stop at the LiveMap's ``==`` gate.

The LiveMap and the target's record of what it holds live in memory and
start empty in every process, while the database file stays.  So once a run
has caught up, having read every input, a row whose id is not in the LiveMap
is left over from an earlier process (its entity was deleted while nothing
was watching) and is deleted too (``stale`` in the summary).  The LiveMap is
what the run *declares*; what the target has *written* is not the test: a
write that failed leaves its entity declared, so its old row stays.

A write that fails (the sink raises, say ``database is locked``) is not
applied; the consumer's retry policy runs the entity's component again,
which sends the row again.  A row that still fails is logged, counted as
``failing`` and sent again when its entity next changes.

Catch-up mode (the default) reads the files, runs to quiescence and prints a
summary, with a progress line every ``--interval`` seconds meanwhile (events
read, entities, pending, rows written).  ``--live`` shows progress from the
start, keeps polling the files for appended lines until Ctrl+C (or SIGTERM).
On a terminal the progress is one line rewritten in place, and a log line
first clears it.

The package, one concern a module:

* :mod:`.events`: events and entities, replaying a stream, reading a file
  incrementally (:class:`EventFile`);
* :mod:`.pipeline`: the components and :class:`Pipeline`, which runs them;
* :mod:`.database`: the SQLite table and the target's sink (:class:`EntityDB`);
* :mod:`.status`: the progress line, kept apart from log lines;
* :mod:`.sample`: the sample generator and the bundled ``events.jsonl``;
* :mod:`.cli`: the command line (``__main__`` runs it).
"""

from .cli import main
from .database import EntityDB, EntityDBError, EntityRow
from .events import (
    BadEvent,
    Entity,
    Event,
    EventFile,
    apply_event,
    parse_event,
    replay,
    shard_of,
)
from .pipeline import (
    DEFAULT_DB,
    EventLog,
    Pipeline,
    Summary,
    app_main,
    declare_shard,
    index_entity,
)
from .sample import BUNDLED_COUNT, BUNDLED_EVENTS, generate_events, write_events

__all__ = [
    "BUNDLED_COUNT",
    "BUNDLED_EVENTS",
    "BadEvent",
    "DEFAULT_DB",
    "Entity",
    "EntityDB",
    "EntityDBError",
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
