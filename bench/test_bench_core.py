"""Benchmarks of the livemap_core hot path: compiled core, pure core, and a floor.

Every scenario runs three ways (the ``impl`` parameter):

* ``cython``: ``livemap_core._core`` (skipped when it is not built);
* ``python``: ``livemap_core._fallback``;
* ``floor``: the same work written inline with plain dicts and sets and no
  library: one ``key -> value`` dict per table, one key set per owner, the
  ``==`` gate, a simple conflict check.  What a pure-Python core could at best
  get close to.

Each round does what a real component run does: fill a declaration buffer,
then commit it.  Rounds alternate between two declared states, so that every
round makes the same number of changes.

``test_memory_per_entry`` measures what a table costs per entry instead, in a
fresh process; its figures are in each result's ``extra_info``.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

IMPLS = ["cython", "python", "floor"]

N_ENTRIES = 100_000
N_OWNERS = 1_000
KEYS_PER_OWNER = 100


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "cython":
        try:
            importlib.import_module("livemap_core._core")
        except ImportError as exc:
            pytest.skip(f"compiled core not available: {exc}")
    return name


def core_module(impl: str) -> ModuleType:
    module = "livemap_core._core" if impl == "cython" else "livemap_core._fallback"
    return importlib.import_module(module)


# -- the floor -----------------------------------------------------------------


class FloorTable:
    """Plain dicts and sets: ``key -> value``, ``key -> owner``, ``owner -> keys``."""

    def __init__(self) -> None:
        self.values: dict[Any, Any] = {}
        self.holders: dict[Any, Any] = {}
        self.owned: dict[Any, set[Any]] = {}


def floor_declare_all(pairs: Iterator[tuple[Any, Any]]) -> dict[Any, Any]:
    decls: dict[Any, Any] = {}
    for key, value in pairs:
        if key in decls:
            raise ValueError(key)
        decls[key] = value
    return decls


def floor_commit(
    table: FloorTable, owner: object, decls: dict[Any, Any]
) -> tuple[list[tuple[Any, Any]], list[Any], list[Any]]:
    values = table.values
    holders = table.holders
    mine = table.owned.get(owner, set())
    upserts: list[tuple[Any, Any]] = []
    conflicts: list[Any] = []
    for key, value in decls.items():
        if key in mine:
            held = values[key]
            if held is value:
                continue
            try:
                if held == value:
                    continue
            except Exception:  # the held value stays
                continue
            values[key] = value
            upserts.append((key, value))
        elif key in holders:
            conflicts.append(key)
        else:
            values[key] = value
            holders[key] = owner
            upserts.append((key, value))
    new_keys = set(decls)
    if conflicts:
        new_keys.difference_update(conflicts)
    deletes = list(mine - new_keys)
    for key in deletes:
        del values[key]
        del holders[key]
    if new_keys:
        table.owned[owner] = new_keys
    else:
        table.owned.pop(owner, None)
    return upserts, deletes, conflicts


# -- runners -------------------------------------------------------------------

Pairs = Callable[[], Iterator[tuple[Any, Any]]]


def make_runner(impl: str) -> tuple[Callable[[], Any], Callable[[Any, object, Pairs], int]]:
    """``(new_table, run)``; ``run(table, owner, pairs)`` declares and commits, returns
    the number of changes."""
    if impl == "floor":

        def run_floor(table: FloorTable, owner: object, pairs: Pairs) -> int:
            upserts, deletes, _ = floor_commit(table, owner, floor_declare_all(pairs()))
            return len(upserts) + len(deletes)

        return FloorTable, run_floor

    core = core_module(impl)

    def run_core(table: Any, owner: object, pairs: Pairs) -> int:
        buf = table.buffer(owner)
        declare = buf.declare
        for key, value in pairs():
            declare(key, value)
        return len(table.commit(buf))

    return core.Table, run_core


# -- scenarios -----------------------------------------------------------------


def test_commit_one_owner_1pct_changed(benchmark: Any, impl: str) -> None:
    """(a) One owner, 100k entries, 1% of the values change each round."""
    new_table, run = make_runner(impl)
    keys = [f"key-{i}" for i in range(N_ENTRIES)]
    state_a = list(range(N_ENTRIES))
    state_b = [v + N_ENTRIES if v % 100 == 0 else v for v in state_a]
    table = new_table()
    owner = object()
    run(table, owner, lambda: zip(keys, state_a, strict=False))
    states = [state_b, state_a]
    turn = [0]

    def one_round() -> int:
        values = states[turn[0] & 1]
        turn[0] += 1
        return run(table, owner, lambda: zip(keys, values, strict=False))

    changes = benchmark(one_round)
    assert changes == N_ENTRIES // 100


def test_commit_noop_equal_values(benchmark: Any, impl: str) -> None:
    """(b) One owner re-commits 100k values equal to, but not the same objects as,
    the held ones."""
    new_table, run = make_runner(impl)
    keys = [f"key-{i}" for i in range(N_ENTRIES)]

    def fresh() -> Iterator[tuple[Any, Any]]:
        return ((key, (i, "v")) for i, key in enumerate(keys))

    table = new_table()
    owner = object()
    run(table, owner, fresh)

    def one_round() -> int:
        return run(table, owner, fresh)

    changes = benchmark(one_round)
    assert changes == 0


def test_commit_many_owners_churn(benchmark: Any, impl: str) -> None:
    """(c) 1,000 owners x 100 keys; each round every owner drops 3 keys, adds 3 and
    changes 4 values (10% churn)."""
    new_table, run = make_runner(impl)
    owners = [object() for _ in range(N_OWNERS)]
    state_a: list[list[tuple[Any, int]]] = []
    state_b: list[list[tuple[Any, int]]] = []
    for o in range(N_OWNERS):
        a = [((o, k), k) for k in range(KEYS_PER_OWNER)]
        b = [((o, k), k + 1000 if k < 7 else k) for k in range(3, KEYS_PER_OWNER + 3)]
        state_a.append(a)
        state_b.append(b)
    table = new_table()
    for owner, decls in zip(owners, state_a, strict=False):
        run(table, owner, decls.__iter__)
    states = [state_b, state_a]
    turn = [0]

    def one_round() -> int:
        state = states[turn[0] & 1]
        turn[0] += 1
        total = 0
        for owner, decls in zip(owners, state, strict=False):
            total += run(table, owner, decls.__iter__)
        return total

    changes = benchmark(one_round)
    # per owner and round: 3 deletes, 3 inserts, 4 updates
    assert changes == N_OWNERS * 10


def test_declare_throughput(benchmark: Any, impl: str) -> None:
    """(d) 100k declarations into a fresh buffer."""
    keys = [f"key-{i}" for i in range(N_ENTRIES)]
    values = list(range(N_ENTRIES))
    if impl == "floor":

        def one_round() -> int:
            return len(floor_declare_all(zip(keys, values, strict=False)))

    else:
        table = core_module(impl).Table()

        def one_round() -> int:
            buf = table.buffer(None)
            declare = buf.declare
            for key, value in zip(keys, values, strict=False):
                declare(key, value)
            return len(buf)

    assert benchmark(one_round) == N_ENTRIES


# -- owners of one key each ------------------------------------------------------------
#
# The shape of a per-entry component that declares one key into a target: one
# owner per entry, one small commit per owner and round.


def one_key_owner_rounds(impl: str, states: list[list[list[tuple[Any, Any]]]]) -> Any:
    """``one_round()`` committing, for each of ``N_ENTRIES`` owners, its next
    declared state (``states[round % len(states)][owner]``, declared then
    committed); returns the number of changes."""
    new_table, run = make_runner(impl)
    owners = [object() for _ in range(N_ENTRIES)]
    table = new_table()
    for owner, decls in zip(owners, states[-1], strict=True):
        run(table, owner, decls.__iter__)
    turn = [0]

    def one_round() -> int:
        state = states[turn[0] % len(states)]
        turn[0] += 1
        total = 0
        for owner, decls in zip(owners, state, strict=True):
            total += run(table, owner, decls.__iter__)
        return total

    return one_round


def test_commit_one_key_owners_1pct_changed(benchmark: Any, impl: str) -> None:
    """(f) 100k owners x 1 key, one commit each per round; 1% of the values change."""
    a = [[(f"key-{i}", i)] for i in range(N_ENTRIES)]
    b = [[(f"key-{i}", i + N_ENTRIES if i % 100 == 0 else i)] for i in range(N_ENTRIES)]
    assert benchmark(one_key_owner_rounds(impl, [b, a])) == N_ENTRIES // 100


def test_commit_one_key_owners_move(benchmark: Any, impl: str) -> None:
    """(g) 100k owners x 1 key; each round every owner declares another key
    than the round before (a delete and an insert each)."""
    a = [[(f"key-{i}", i)] for i in range(N_ENTRIES)]
    b = [[(f"alt-{i}", i)] for i in range(N_ENTRIES)]
    assert benchmark(one_key_owner_rounds(impl, [b, a])) == 2 * N_ENTRIES


def test_commit_one_key_owners_grow_shrink(benchmark: Any, impl: str) -> None:
    """(h) 100k owners going from 1 key to 2 and back, round by round (an
    insert or a delete each)."""
    a = [[(f"key-{i}", i)] for i in range(N_ENTRIES)]
    b = [[(f"key-{i}", i), (f"alt-{i}", i)] for i in range(N_ENTRIES)]
    assert benchmark(one_key_owner_rounds(impl, [b, a])) == N_ENTRIES


# -- the commit alone ----------------------------------------------------------------
#
# The same diffs as (a) and (c) with the declarations made beforehand: what the
# core itself costs, without the Python loop that calls ``declare``.


def prepared_commits(impl: str, runs: list[tuple[object, list[list[tuple[Any, Any]]]]]) -> Any:
    """``one_round()`` committing, for each ``(owner, [state, state])``, the two
    prepared states in turn; returns the number of changes."""
    turn = [0]
    if impl == "floor":
        floor = FloorTable()
        prepared = [(o, [dict(s) for s in states]) for o, states in runs]
        for owner, decls in prepared:
            floor_commit(floor, owner, decls[1])

        def one_round_floor() -> int:
            which = turn[0] & 1
            turn[0] += 1
            total = 0
            for owner, decls in prepared:
                upserts, deletes, _ = floor_commit(floor, owner, decls[which])
                total += len(upserts) + len(deletes)
            return total

        return one_round_floor
    table = core_module(impl).Table()
    buffers = []
    for owner, states in runs:
        pair = []
        for state in states:
            buf = table.buffer(owner)
            for key, value in state:
                buf.declare(key, value)
            pair.append(buf)
        buffers.append(pair)
    commit = table.commit
    for pair in buffers:
        commit(pair[1])

    def one_round() -> int:
        which = turn[0] & 1
        turn[0] += 1
        total = 0
        for pair in buffers:
            total += len(commit(pair[which]))
        return total

    return one_round


def test_commit_only_one_owner_1pct_changed(benchmark: Any, impl: str) -> None:
    """(a) without the declarations: one owner, 100k entries, 1% changed."""
    keys = [f"key-{i}" for i in range(N_ENTRIES)]
    a = [(key, i) for i, key in enumerate(keys)]
    b = [(key, i + N_ENTRIES if i % 100 == 0 else i) for i, key in enumerate(keys)]
    one_round = prepared_commits(impl, [(object(), [a, b])])
    assert benchmark(one_round) == N_ENTRIES // 100


def test_commit_only_many_owners_churn(benchmark: Any, impl: str) -> None:
    """(c) without the declarations: 1,000 owners x 100 keys, 10% churn."""
    runs = []
    for o in range(N_OWNERS):
        a = [((o, k), k) for k in range(KEYS_PER_OWNER)]
        b = [((o, k), k + 1000 if k < 7 else k) for k in range(3, KEYS_PER_OWNER + 3)]
        runs.append((object(), [a, b]))
    one_round = prepared_commits(impl, runs)
    assert benchmark(one_round) == N_OWNERS * 10


# -- memory ----------------------------------------------------------------------------

MEMORY_SCRIPT = r"""
import gc, importlib, json, sys, tracemalloc

n, n_owners, impl, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
keys = [f"k{i}" for i in range(n)]
values = list(range(n))
owners = [object() for _ in range(n_owners)]
per = n // n_owners


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


if impl == "floor":
    table = ({}, {}, {})  # key -> value, key -> owner, owner -> key set

    def fill(owner, start):
        mine = set()
        for i in range(start, start + per):
            table[0][keys[i]] = values[i]
            table[1][keys[i]] = owner
            mine.add(keys[i])
        table[2][owner] = mine

else:
    module = "livemap_core._core" if impl == "cython" else "livemap_core._fallback"
    table = importlib.import_module(module).Table("memory")

    def fill(owner, start):
        buf = table.buffer(owner)
        for i in range(start, start + per):
            buf.declare(keys[i], values[i])
        table.commit(buf)


gc.collect()
if mode == "tracemalloc":
    tracemalloc.start()
before = (tracemalloc.get_traced_memory()[0], rss(), len(gc.get_objects()))
for o, owner in enumerate(owners):
    fill(owner, o * per)
gc.collect()
after = (tracemalloc.get_traced_memory()[0], rss(), len(gc.get_objects()))
bytes_ = after[0] - before[0] if mode == "tracemalloc" else after[1] - before[1]
print(json.dumps({"bytes_per_entry": bytes_ / n, "tracked_per_entry": (after[2] - before[2]) / n}))
"""


@pytest.mark.parametrize("owners", [1, N_OWNERS, N_ENTRIES])
def test_memory_per_entry(benchmark: Any, impl: str, owners: int) -> None:
    """(e) Bytes per entry of a table holding 100k entries (``f"k{i}" -> i``) of
    one owner, of 1,000 owners x 100 or of 100k owners x 1: allocated memory as tracemalloc sees
    it, RSS (measured without tracemalloc) and long-lived GC-tracked objects,
    each in a fresh process; keys, values and owners are made beforehand."""
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("RSS is read from /proc")
    result: dict[str, float] = {}

    def measure(mode: str) -> dict[str, float]:
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, str(N_ENTRIES), str(owners), impl, mode],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        figures: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
        return figures

    def run() -> None:
        traced = measure("tracemalloc")
        result["traced_bytes_per_entry"] = traced["bytes_per_entry"]
        result["tracked_per_entry"] = traced["tracked_per_entry"]
        result["rss_bytes_per_entry"] = measure("rss")["bytes_per_entry"]

    benchmark.pedantic(run, rounds=1, iterations=1)
    for name, value in result.items():
        benchmark.extra_info[name] = round(value, 3 if name == "tracked_per_entry" else 1)
    assert result["traced_bytes_per_entry"] > 0
