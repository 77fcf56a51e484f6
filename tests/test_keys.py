"""Stable keys, on both cores (``core`` ids ``c`` and ``py``).

* Depth: a key nests at most ``MAX_KEY_DEPTH`` (64) tuples or lists inside one
  another.  A key nested deeper is rejected with a ``TypeError`` naming the
  depth and the limit, and the check never recurses past the limit: a key
  nested a million levels deep (which would crash the interpreter when
  hashed) is turned away at once.
* Lists: a list is a stable key when its parts are; it is declared (and
  ``normalize_key`` returns it) as the equal tuple, at any depth.
"""

from __future__ import annotations

import time
import uuid
from types import ModuleType
from typing import Any

import pytest
from _cores import core_fixture  # noqa: F401  (the ``core`` fixture)

import livemap_core
from livemap_core import DuplicateDeclarationError, Symbol

KEY_HELP = (
    "a stable key is None, bool, int, str, bytes, uuid.UUID, Symbol, or a tuple or list "
    "of these nested at most 64 levels deep"
)
TOO_DEEP = (
    "is not a stable key: it is nested at least 65 levels deep, and a stable key "
    "nests tuples or lists at most MAX_KEY_DEPTH = 64 levels deep"
)


def nest(depth: int, leaf: Any = "leaf", kind: type = tuple) -> Any:
    """``leaf`` inside ``depth`` tuples (or lists): ``nest(2) == (("leaf",),)``."""
    key = leaf
    for _ in range(depth):
        key = kind((key,))
    return key


def typed(key: Any) -> Any:
    """A form of ``key`` that tells tuples from lists and ``1`` from ``True``."""
    if type(key) in (tuple, list):
        return (type(key).__name__, [typed(part) for part in key])
    return (type(key).__name__, key)


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


def test_lists_count_towards_the_depth(core: ModuleType) -> None:
    assert core.is_stable_key(nest(64, kind=list)) is True
    assert core.is_stable_key(nest(32, leaf=nest(32, kind=list))) is True
    for key in (nest(65, kind=list), nest(32, leaf=nest(33, kind=list))):
        assert core.is_stable_key(key) is False
        with pytest.raises(TypeError) as info:
            core.normalize_key(key)
        assert "nested at least 65 levels deep" in str(info.value)
        assert str(declare_fails(core, key)) == str(info.value)
    normal = core.normalize_key(nest(64, kind=list))
    assert typed(normal) == typed(nest(64))


def test_a_list_that_holds_itself_is_too_deep(core: ModuleType) -> None:
    key: list[Any] = [1]
    key.append(key)
    assert core.is_stable_key(key) is False
    message = f"[1, [1, [1, [1, [...]]]]] (list) {TOO_DEEP}"
    for check in (core.check_key, core.normalize_key):
        with pytest.raises(TypeError) as info:
            check(key)
        assert str(info.value) == message
    assert str(declare_fails(core, key)) == message
    key.append([key, key])  # each level is wider: the walk still stops at the limit
    assert core.is_stable_key(key) is False


def test_a_million_lists_deep_is_rejected_quickly(core: ModuleType) -> None:
    key = nest(1_000_000, kind=list)
    started = time.perf_counter()
    assert core.is_stable_key(key) is False
    with pytest.raises(TypeError, match="nested at least 65 levels deep"):
        core.normalize_key(key)
    assert "nested at least 65 levels deep" in str(declare_fails(core, key))
    assert time.perf_counter() - started < 1.0


# -- lists become tuples ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "normal"),
    [
        ([], ()),
        ([1, "a"], (1, "a")),
        ([[1], [2, [3]]], ((1,), (2, (3,)))),
        (("a", [1, 2]), ("a", (1, 2))),
        (
            [None, True, b"x", Symbol("s"), uuid.UUID(int=3)],
            (None, True, b"x", Symbol("s"), uuid.UUID(int=3)),
        ),
        (("t", ("u", [()])), ("t", ("u", ((),)))),
    ],
    ids=repr,
)
def test_lists_become_tuples(core: ModuleType, key: Any, normal: Any) -> None:
    assert core.is_stable_key(key) is True
    assert core.check_key(key) is None
    got = core.normalize_key(key)
    assert typed(got) == typed(normal)
    assert hash(got) == hash(normal)
    assert core.normalize_key(got) is got  # the normal form is its own


def test_parts_without_lists_are_kept(core: ModuleType) -> None:
    plain = ("p", (1, 2))
    key = [plain, ["l"], plain[1]]
    got = core.normalize_key(key)
    assert got == (plain, ("l",), (1, 2))
    assert got[0] is plain and got[2] is plain[1]
    inner = ("i", [1])
    got = core.normalize_key((plain, inner))
    assert got == (plain, ("i", (1,)))
    assert got[0] is plain


@pytest.mark.parametrize(
    "key",
    [None, True, 0, 2**100, "k", b"k", uuid.UUID(int=1), Symbol("s"), (), (1, ("a", b"b"))],
    ids=repr,
)
def test_a_key_without_lists_is_returned_as_it_is(core: ModuleType, key: Any) -> None:
    assert core.normalize_key(key) is key


@pytest.mark.parametrize(
    "key", [[1.5], [1, [2, {"a": 1}]], ("a", ["b", 2.5]), [frozenset()]], ids=repr
)
def test_a_list_with_a_bad_part_is_not_stable(core: ModuleType, key: Any) -> None:
    message = f"{key!r} ({type(key).__name__}) is not a stable key: {KEY_HELP}"
    assert core.is_stable_key(key) is False
    for check in (core.check_key, core.normalize_key):
        with pytest.raises(TypeError) as info:
            check(key)
        assert str(info.value) == message
    assert str(declare_fails(core, key)) == message


def test_declaring_a_list_declares_the_tuple(core: ModuleType) -> None:
    table = core.Table("t")
    owner = object()
    buf = table.buffer(owner)
    buf.declare([1, 2], "a")
    buf.declare(("n", ["m"]), "b")
    assert [typed(k) for k, _ in buf.items()] == [typed((1, 2)), typed(("n", ("m",)))]
    assert (1, 2) in buf
    result = table.commit(buf)
    assert [typed(k) for k, _ in result.upserts] == [typed((1, 2)), typed(("n", ("m",)))]
    # the table and the owner's record hold the tuples
    keys = table.keys()
    assert [typed(k) for k in keys] == [typed((1, 2)), typed(("n", ("m",)))]
    assert table.keys_of(owner) == frozenset({(1, 2), ("n", ("m",))})
    assert all(type(k) is tuple for k in table.keys_of(owner))
    assert table.get((1, 2)) == "a"
    assert table.owner_of(("n", ("m",))) is owner
    # the next run spells the key as a tuple: the same key, value unchanged
    buf = table.buffer(owner)
    buf.declare((1, 2), "a")
    buf.declare(["n", ("m",)], "b2")
    result = table.commit(buf)
    assert (result.upserts, result.deletes, result.suppressed) == ([(("n", ("m",)), "b2")], [], 1)


@pytest.mark.parametrize(
    ("first", "second"),
    [([1, 2], (1, 2)), ((1, 2), [1, 2]), ([1, [2]], (1, [2])), ([True], (1,))],
    ids=repr,
)
def test_a_list_and_its_tuple_are_one_declaration(
    core: ModuleType, first: Any, second: Any
) -> None:
    buf = core.Table("things").buffer("comp")
    buf.declare(first, "first")
    with pytest.raises(DuplicateDeclarationError) as info:
        buf.declare(second, "second")
    normal = core.normalize_key(second)
    assert typed(info.value.key) == typed(normal)
    assert str(info.value) == (
        f"key {normal!r} was already declared into things during this run of 'comp'; "
        "the first declaration stands"
    )
    assert [(typed(k), v) for k, v in buf.items()] == [(typed(core.normalize_key(first)), "first")]


def test_declarer_declares_the_tuple(core: ModuleType) -> None:
    import contextvars

    class Run:
        def __init__(self) -> None:
            self.owner = "o"
            self.buffers: dict[object, Any] | None = None

    current: contextvars.ContextVar[Run | None] = contextvars.ContextVar("run", default=None)
    table = core.Table("t")
    declare = core.Declarer(table, "t", current, LookupError, EOFError)
    run = Run()
    token = current.set(run)
    try:
        declare(["a", [1]], 1)
        with pytest.raises(DuplicateDeclarationError):
            declare(("a", (1,)), 2)
        with pytest.raises(TypeError, match="nested at least 65 levels deep"):
            declare(nest(65, kind=list), 3)
    finally:
        current.reset(token)
    assert run.buffers is not None
    result = table.commit(run.buffers["t"])
    assert [typed(k) for k, _ in result.upserts] == [typed(("a", (1,)))]


# -- 1 and True are one key ------------------------------------------------------------
#
# Keys compare as dict keys do.  A table keeps the key object it got first; a
# commit's upserts and rejections name the key as declared in that run.


def run(table: Any, owner: object, pairs: list[tuple[Any, Any]]) -> Any:
    buf = table.buffer(owner)
    for key, value in pairs:
        buf.declare(key, value)
    return table.commit(buf)


@pytest.mark.parametrize("track_undo", [False, True], ids=["plain", "undo"])
@pytest.mark.parametrize(
    ("first", "then"),
    [(1, True), (True, 1), ((1, "a"), (True, "a")), ((1, "a"), [True, "a"]), (0, False)],
    ids=repr,
)
@pytest.mark.parametrize("others", [0, 3], ids=["alone", "among-others"])
def test_switching_spelling_keeps_the_first_key_object(
    core: ModuleType, track_undo: bool, first: Any, then: Any, others: int
) -> None:
    # among-others: the compiled core finds the held key by walking the
    # owner's record in step with the declarations; alone: by hashing
    table = core.Table("t", track_undo=track_undo)
    owner = object()
    extra = [(f"x{i}", i) for i in range(others)]
    run(table, owner, [*extra, (first, "a")])
    kept = typed(first)
    declared = typed(core.normalize_key(then))

    result = run(table, owner, [*extra, (then, "b")])
    assert [(typed(k), v) for k, v in result.upserts] == [(declared, "b")]
    assert result.deletes == []
    assert [(typed(k), v) for k, v in table.items()][-1] == (kept, "b")
    assert [typed(k) for k in table.keys_of(owner) if k == first] == [kept]
    assert table.get(core.normalize_key(then)) == "b"
    assert table.get(first) == "b"

    result = run(table, owner, [*extra, (then, "b")])  # equal: suppressed
    assert (result.upserts, result.deletes, result.suppressed) == ([], [], 1 + others)
    assert typed(table.keys()[-1]) == kept

    if track_undo:
        changed = run(table, owner, [*extra, (then, "c")])
        table.revert(changed)
        assert [(typed(k), v) for k, v in table.items()][-1] == (kept, "b")

    result = table.release(owner)
    assert typed(result.deletes[-1]) == kept

    # once the key is gone, the next spelling declared is the one kept
    run(table, owner, [(then, "d")])
    assert [typed(k) for k, _ in table.items()] == [declared]


def test_another_owner_cannot_take_true_from_one(core: ModuleType) -> None:
    table = core.Table("t")
    holder, other = object(), object()
    run(table, holder, [(1, "a")])
    result = run(table, other, [(True, "b")])
    assert result.upserts == []
    [rejection] = result.rejections
    assert rejection.kind == core.CONFLICT
    assert typed(rejection.key) == typed(True)
    assert rejection.holder is holder
    assert [(typed(k), v) for k, v in table.items()] == [(typed(1), "a")]
    assert table.owner_of(True) is holder


def test_one_and_true_are_one_declaration(core: ModuleType) -> None:
    buf = core.Table("t").buffer("o")
    buf.declare((1, [0]), "a")
    for key in ((True, (0,)), [1, [False]], (True, [0])):
        with pytest.raises(DuplicateDeclarationError):
            buf.declare(key, "b")
    assert [(typed(k), v) for k, v in buf.items()] == [(typed((1, (0,))), "a")]
