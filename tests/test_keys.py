"""Stable keys: how deep a key may nest, on both cores (``core`` ids ``c`` and
``py``).

A key nests at most ``MAX_KEY_DEPTH`` (64) tuples inside one another.  A key
nested deeper is rejected with a ``TypeError`` naming the depth and the limit,
and the check never recurses past the limit: a key nested a million levels
deep (which would crash the interpreter when hashed) is turned away at once.
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

import pytest
from _cores import core_fixture  # noqa: F401  (the ``core`` fixture)

import livemap_core

KEY_HELP = (
    "a stable key is None, bool, int, str, bytes, uuid.UUID, Symbol, or a tuple "
    "of these nested at most 64 levels deep"
)
TOO_DEEP = (
    "is not a stable key: it is nested at least 65 levels deep, and a stable key "
    "nests tuples at most MAX_KEY_DEPTH = 64 levels deep"
)


def nest(depth: int, leaf: Any = "leaf") -> Any:
    """``leaf`` inside ``depth`` tuples: ``nest(2) == (("leaf",),)``."""
    key = leaf
    for _ in range(depth):
        key = (key,)
    return key


def declare_fails(core: ModuleType, key: object) -> TypeError:
    """Declare ``key`` into a buffer holding one entry: the TypeError it raised
    (the buffer must be unchanged)."""
    buf = core.Table("t").buffer("o")
    buf.declare("before", 0)
    with pytest.raises(TypeError) as info:
        buf.declare(key, 1)
    assert buf.items() == [("before", 0)]
    return info.value


def test_the_limit_is_exported() -> None:
    assert livemap_core.MAX_KEY_DEPTH == 64
    assert "MAX_KEY_DEPTH" in livemap_core.__all__


@pytest.mark.parametrize(
    "key",
    [
        nest(64),
        nest(63, leaf=()),  # the empty tuple is the 64th
        ("a", nest(63), b"x", nest(10)),  # the deepest branch decides
        (nest(63, leaf=1), nest(63, leaf=2)),
    ],
    ids=["plain", "empty-leaf", "branches", "twins"],
)
def test_key_at_the_limit_is_stable(core: ModuleType, key: Any) -> None:
    assert core.is_stable_key(key) is True
    assert core.check_key(key) is None
    table = core.Table("t")
    buf = table.buffer("o")
    buf.declare(key, "v")
    result = table.commit(buf)
    assert result.upserts == [(key, "v")]
    assert table.get(key) == "v"


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        (nest(65), "(((((...),),),),)"),
        (nest(64, leaf=()), "(((((...),),),),)"),
        (("a", 1, nest(64)), "('a', 1, ((((...),),),))"),
        ((nest(3), (nest(70), 1.5)), "(((('leaf',),),), ((((...),),), 1.5))"),
    ],
    ids=["plain", "empty-leaf", "last-branch", "before-a-bad-part"],
)
def test_key_past_the_limit_is_rejected(core: ModuleType, key: Any, shown: str) -> None:
    message = f"{shown} (tuple) {TOO_DEEP}"
    assert core.is_stable_key(key) is False
    with pytest.raises(TypeError) as info:
        core.check_key(key)
    assert str(info.value) == message
    assert str(declare_fails(core, key)) == message


def test_first_problem_is_reported(core: ModuleType) -> None:
    # depth first, left to right: a bad part met before a part too deep is the
    # one named (with the key's own repr), and the other way round
    key = (1.5, nest(70))
    with pytest.raises(TypeError) as info:
        core.check_key(key)
    assert str(info.value) == f"{key!r} (tuple) is not a stable key: {KEY_HELP}"
    key = (nest(70), 1.5)
    with pytest.raises(TypeError, match="nested at least 65 levels deep"):
        core.check_key(key)


def test_bad_part_within_the_limit(core: ModuleType) -> None:
    key = ("a", nest(60, leaf=1.5))
    assert core.is_stable_key(key) is False
    message = f"{key!r} (tuple) is not a stable key: {KEY_HELP}"
    with pytest.raises(TypeError) as info:
        core.check_key(key)
    assert str(info.value) == message
    assert str(declare_fails(core, key)) == message


def test_a_million_levels_deep_is_rejected_quickly(core: ModuleType) -> None:
    key = nest(1_000_000)
    started = time.perf_counter()
    assert core.is_stable_key(key) is False
    with pytest.raises(TypeError, match="nested at least 65 levels deep"):
        core.check_key(key)
    message = str(declare_fails(core, key))
    assert message == f"(((((...),),),),) (tuple) {TOO_DEEP}"
    # a bad part before the deep one: the message still names the key (cut
    # short, as its full repr is too deep to make)
    with pytest.raises(TypeError, match=r"^\(1\.5, \(\(\(\(\.\.\.\),\),\),\)\) \(tuple\) is not"):
        core.check_key((1.5, key))
    # each check stops at the limit: well under a second on the slowest core
    assert time.perf_counter() - started < 1.0
