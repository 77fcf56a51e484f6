"""``Table.lets_go`` against histories the core's own tests do not build:
several owners, releases, deferred drops applied, commits taken back, and
keys that are one key under other spellings (``1``/``True``, ``(1,)``/
``(True,)``, ``0``/``False``).  Exactly what can be let go (no more: a
``True`` too many costs every re-run the question the check saves), the
same on both cores, and nothing changed by asking."""

from __future__ import annotations

import random
from types import ModuleType
from typing import Any

from _cores import PURE_ONLY, load_core

from livemap_core import _fallback

KEYS: list[Any] = ["a", "b", 1, True, (1,), (True,), 0, False, None]


def _cores() -> list[ModuleType]:
    return [_fallback] if PURE_ONLY else [load_core("c"), _fallback]


def _fill(table: Any, owner: object, pairs: list[tuple[Any, int]]) -> Any:
    buf = table.buffer(owner)
    for key, value in pairs:
        if key not in buf:  # (1 and True: one key, declared once)
            buf.declare(key, value)
    return buf


def _state(table: Any, owners: list[object]) -> Any:
    return (
        sorted(repr(item) for item in table.items()),
        [
            (
                sorted(map(repr, table.keys_of(o))),
                sorted(map(repr, table.deferred_of(o))),
                sorted(map(repr, table.claims_of(o))),
            )
            for o in owners
        ],
        [[owners.index(c) for c in table.claimants(k)] for k in KEYS],
    )


def _outcome(result: Any, owners: list[object]) -> Any:
    return (
        [repr(pair) for pair in result.upserts],
        [repr(key) for key in result.deletes],
        [(repr(k), owners.index(a), owners.index(b)) for k, a, b in result.transfers],
        [(r.kind, repr(r.key)) for r in result.rejections],
        result.suppressed,
    )


def _history(rng: random.Random, n: int) -> list[tuple[Any, ...]]:
    ops: list[tuple[Any, ...]] = []
    for _ in range(rng.randrange(0, 8)):
        roll, who = rng.random(), rng.randrange(n)
        if roll < 0.65:
            pairs = [(k, rng.randrange(3)) for k in rng.sample(KEYS, rng.randrange(0, 5))]
            ops.append(("commit", who, pairs, rng.random() < 0.5))
        elif roll < 0.8:
            ops.append(("drop", who))
        elif roll < 0.9:
            ops.append(("release", who))
        else:
            ops.append(("revert",))
    return ops


def _replay(table: Any, owners: list[object], ops: list[tuple[Any, ...]]) -> None:
    done: list[Any] = []
    for op in ops:
        if op[0] == "commit":
            done.append(table.commit(_fill(table, owners[op[1]], op[2]), op[3]))
        elif op[0] == "drop":
            done.append(table.drop_deferred(owners[op[1]]))
        elif op[0] == "release":
            done.append(table.release(owners[op[1]]))
        elif done:
            table.revert(done.pop())


def test_lets_go_is_exact_agrees_across_cores_and_defer_matters_only_then() -> None:
    rng = random.Random(20261202)
    for _ in range(3000):
        n = rng.randrange(1, 4)
        ops = _history(rng, n)
        who = rng.randrange(n)
        pairs = [(k, rng.randrange(3)) for k in rng.sample(KEYS, rng.randrange(0, 5))]
        seen = []
        for core in _cores():
            owners = [object() for _ in range(n)]
            tables = [core.Table("t", track_undo=True), core.Table("u", track_undo=True)]
            for table in tables:
                _replay(table, owners, ops)
            buffers = [_fill(table, owners[who], pairs) for table in tables]
            before = _state(tables[0], owners)
            can = tables[0].lets_go(buffers[0])
            assert type(can) is bool
            assert _state(tables[0], owners) == before  # asking changes nothing
            owner = owners[who]
            expected = bool(tables[0].deferred_of(owner)) or any(
                key not in buffers[0] for key in tables[0].keys_of(owner)
            )
            assert can is expected, (ops, who, pairs, core.__name__)
            deferred = _outcome(tables[0].commit(buffers[0], True), owners)
            plain = _outcome(tables[1].commit(buffers[1], False), owners)
            if not can:
                assert deferred == plain, (ops, who, pairs, core.__name__)
                assert _state(tables[0], owners) == _state(tables[1], owners)
            seen.append((can, deferred, _state(tables[0], owners)))
        assert all(s == seen[0] for s in seen), (ops, who, pairs)  # the cores agree
