"""livemap_core: every behaviour, on both cores (``core`` ids ``c`` and ``py``)."""

from __future__ import annotations

import dataclasses
import random
import uuid
from types import ModuleType
from typing import Any, NamedTuple

import pytest
from _cores import core_fixture  # noqa: F401  (the ``core`` fixture)

from livemap_core._shared import DuplicateDeclarationError, Symbol

KEY_HELP = (
    "a stable key is None, bool, int, str, bytes, uuid.UUID, Symbol, or a tuple or list "
    "of these nested at most 64 levels deep"
)


class StrSub(str):
    pass


class IntSub(int):
    pass


class TupleSub(tuple):  # type: ignore[type-arg]
    pass


class ListSub(list):  # type: ignore[type-arg]
    pass


class Point(NamedTuple):
    x: int
    y: int


@dataclasses.dataclass
class Doc:
    """Unhashable (eq=True without frozen), compared by value."""

    title: str
    tags: list[str]


class EqError(Exception):
    pass


class RaisingEq:
    """A value whose ``==`` raises."""

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        raise EqError("cannot compare")


class Ambiguous:
    """``==`` returns something whose truth value raises (like a numpy array)."""

    class _Truth:
        def __bool__(self) -> bool:
            raise EqError("ambiguous truth value")

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> Any:
        return Ambiguous._Truth()


class InterruptingEq:
    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        raise KeyboardInterrupt


@dataclasses.dataclass(eq=True)
class UnhashableOwner:
    name: str


class EqualOwner:
    """Owners that all compare equal: the table must still tell them apart."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EqualOwner)

    def __hash__(self) -> int:
        return 0


def deep_tuple(depth: int) -> tuple[Any, ...]:
    key: tuple[Any, ...] = (1, "leaf")
    for i in range(depth):
        key = (i, key)
    return key


STABLE_KEYS = [
    None,
    True,
    False,
    0,
    -7,
    2**100,
    "",
    "key",
    b"",
    b"key",
    uuid.UUID(int=42),
    Symbol("sym"),
    (),
    (1, "a"),
    (None, (True, (b"x", (Symbol("s"), uuid.UUID(int=1))))),
    ((), ((),)),
]

UNSTABLE_KEYS = [
    1.5,
    float("nan"),
    [1.5],  # a list is a stable key when its parts are (tests/test_keys.py)
    {"a": 1},
    {1},
    frozenset({1}),
    object(),
    StrSub("a"),
    IntSub(1),
    TupleSub((1,)),
    ListSub([1]),
    Point(1, 2),
    bytearray(b"x"),
    (1, [2.0]),
    ("a", (1, (2.0,))),
    (1, StrSub("x")),
    1j,
]


def declared(table: Any, owner: object, pairs: Any) -> Any:
    """A buffer of ``owner`` filled with ``pairs`` (a dict or ``(key, value)`` pairs)."""
    buf = table.buffer(owner)
    for key, value in dict(pairs).items():
        buf.declare(key, value)
    return buf


def commit(table: Any, owner: object, pairs: Any) -> Any:
    return table.commit(declared(table, owner, pairs))


def as_dict(table: Any) -> dict[Any, Any]:
    return dict(table.items())


# -- module surface --------------------------------------------------------------


def test_constants(core: ModuleType) -> None:
    assert core.CONFLICT == "conflict"
    assert core.EQ_ERROR == "eq_error"
    assert core.MAX_KEY_DEPTH == 64


def test_generic_subscription(core: ModuleType) -> None:
    for cls in (core.Table, core.Buffer, core.Commit):
        alias = cls[str, int]
        assert alias.__origin__ is cls
    table = core.Table[str, int]("t")
    assert isinstance(table, core.Table)
    buf = core.Buffer[str, int](table, "o")
    assert isinstance(buf, core.Buffer)
    assert isinstance(core.Commit[str, int]("o", 1), core.Commit)
    for cls in (core.Rejection, core.TableStats):
        with pytest.raises(TypeError):
            cls[int]


def test_no_instance_dict(core: ModuleType) -> None:
    table = core.Table()
    objects = [
        table,
        table.buffer("o"),
        core.Commit("o", 1),
        core.Rejection(core.CONFLICT, "k", 1, "h", None),
        table.stats(),
    ]
    for obj in objects:
        with pytest.raises(AttributeError):
            obj.no_such_attribute = 1


# -- keys ------------------------------------------------------------------------


@pytest.mark.parametrize("key", STABLE_KEYS, ids=repr)
def test_stable_keys(core: ModuleType, key: object) -> None:
    assert core.is_stable_key(key) is True
    assert core.check_key(key) is None
    assert core.normalize_key(key) is key
    table = core.Table()
    result = commit(table, "o", [(key, "v")])
    assert result.upserts == [(key, "v")]
    assert table.get(key) == "v"


def test_deeply_nested_tuple_key(core: ModuleType) -> None:
    # deep_tuple(n) nests n + 1 tuples; the limit and beyond: tests/test_keys.py
    key = deep_tuple(core.MAX_KEY_DEPTH - 1)
    assert core.is_stable_key(key) is True
    core.check_key(key)
    buf = core.Table().buffer("o")
    buf.declare(key, 1)
    assert len(buf) == 1
    assert core.is_stable_key(deep_tuple(core.MAX_KEY_DEPTH)) is False
    assert core.is_stable_key((deep_tuple(5_000), 1.5)) is False


@pytest.mark.parametrize("key", UNSTABLE_KEYS, ids=repr)
def test_unstable_keys(core: ModuleType, key: object) -> None:
    assert core.is_stable_key(key) is False
    message = f"{key!r} ({type(key).__name__}) is not a stable key: {KEY_HELP}"
    with pytest.raises(TypeError) as info:
        core.check_key(key)
    assert str(info.value) == message
    with pytest.raises(TypeError) as info:
        core.normalize_key(key)
    assert str(info.value) == message
    buf = core.Table().buffer("o")
    buf.declare("before", 1)
    with pytest.raises(TypeError) as info:
        buf.declare(key, 2)
    assert str(info.value) == message
    assert buf.items() == [("before", 1)]


def test_unstable_key_checked_before_duplicate(core: ModuleType) -> None:
    buf = core.Table().buffer("o")
    buf.declare(1, "a")
    with pytest.raises(TypeError, match="not a stable key"):
        buf.declare(1.0, "b")  # equal to 1, but a float
    assert buf.items() == [(1, "a")]


def test_symbol_is_not_its_name(core: ModuleType) -> None:
    table = core.Table()
    commit(table, "o", {"x": 1, Symbol("x"): 2})
    assert table.get("x") == 1
    assert table.get(Symbol("x")) == 2
    assert len(table) == 2


# -- buffers and duplicate declarations ------------------------------------------------


def test_buffer_basics(core: ModuleType) -> None:
    table = core.Table("things")
    owner = object()
    buf = table.buffer(owner)
    assert isinstance(buf, core.Buffer)
    assert buf.table is table
    assert buf.owner is owner
    assert len(buf) == 0
    buf.declare("b", 2)
    buf.declare("a", 1)
    assert len(buf) == 2
    assert "a" in buf
    assert "c" not in buf
    assert buf.items() == [("b", 2), ("a", 1)]
    direct = core.Buffer(table, owner)
    assert direct.table is table
    assert direct.owner is owner
    assert len(direct) == 0
    assert len(table) == 0  # declaring does not touch the table


def test_duplicate_declaration(core: ModuleType) -> None:
    table = core.Table("things")
    buf = table.buffer("comp")
    buf.declare(("k", 1), "first")
    with pytest.raises(DuplicateDeclarationError) as info:
        buf.declare(("k", 1), "second")
    err = info.value
    assert isinstance(err, ValueError)
    assert err.key == ("k", 1)
    assert err.owner == "comp"
    assert err.target == "things"
    assert str(err) == (
        "key ('k', 1) was already declared into things during this run of 'comp'; "
        "the first declaration stands"
    )
    assert buf.items() == [(("k", 1), "first")]
    result = table.commit(buf)
    assert result.upserts == [(("k", 1), "first")]
    assert table.get(("k", 1)) == "first"


def test_duplicate_of_same_value_object(core: ModuleType) -> None:
    buf = core.Table().buffer("o")
    value = ["v"]
    buf.declare("k", value)
    with pytest.raises(DuplicateDeclarationError):
        buf.declare("k", value)
    assert len(buf) == 1


def test_duplicate_follows_key_equality(core: ModuleType) -> None:
    # Keys are dict keys: 1 and True are one key, "x" and Symbol("x") are two.
    buf = core.Table().buffer("o")
    buf.declare(1, "int")
    with pytest.raises(DuplicateDeclarationError):
        buf.declare(True, "bool")
    buf.declare(Symbol("x"), 1)
    buf.declare("x", 2)
    assert buf.items() == [(1, "int"), (Symbol("x"), 1), ("x", 2)]


def test_duplicate_error_is_shared_class(core: ModuleType) -> None:
    import livemap_core

    # both cores raise the one class from livemap_core._shared
    assert livemap_core.DuplicateDeclarationError is DuplicateDeclarationError
    assert vars(core)["DuplicateDeclarationError"] is DuplicateDeclarationError


# -- commits ---------------------------------------------------------------------


def test_first_commit_inserts_in_declaration_order(core: ModuleType) -> None:
    table = core.Table("t")
    owner = object()
    result = commit(table, owner, [("b", 2), ("a", 1), ("c", 3)])
    assert isinstance(result, core.Commit)
    assert result.owner is owner
    assert result.upserts == [("b", 2), ("a", 1), ("c", 3)]
    assert result.deletes == []
    assert result.rejections == []
    assert result.suppressed == 0
    assert (result.first_seq, result.last_seq) == (1, 3)
    assert len(result) == 3
    assert bool(result) is True
    assert table.seq == 3
    assert len(table) == 3
    assert table.items() == [("b", 2), ("a", 1), ("c", 3)]
    assert table.keys_of(owner) == frozenset({"a", "b", "c"})
    assert table.owner_of("a") is owner
    assert table.owners() == 1
    assert "a" in table
    assert "z" not in table
    assert repr(result) == ("Commit(upserts=3, deletes=0, suppressed=0, rejections=0, seq=1..3)")
    assert repr(table) == "<Table t entries=3 seq=3>"


def test_update_delete_and_suppress(core: ModuleType) -> None:
    table = core.Table()
    commit(table, "o", {"a": 1, "b": 2, "c": 3, "d": 4})
    result = commit(table, "o", {"b": 20, "a": 1, "e": 5, "d": 4})
    assert result.upserts == [("b", 20), ("e", 5)]
    assert result.deletes == ["c"]
    assert result.suppressed == 2
    assert (result.first_seq, result.last_seq) == (5, 7)
    assert as_dict(table) == {"a": 1, "b": 20, "d": 4, "e": 5}
    assert table.keys_of("o") == frozenset("abde")
    assert table.count_of("o") == 4
    assert table.count_of("nobody") == 0


def test_deletes_follow_first_declaration_order(core: ModuleType) -> None:
    table = core.Table()
    commit(table, "o", {"x": 0, "m": 0, "a": 0})
    commit(table, "o", {"a": 0, "z": 0, "x": 0, "m": 0})
    result = commit(table, "o", {})
    assert result.deletes == ["x", "m", "a", "z"]
    assert (result.first_seq, result.last_seq) == (5, 8)
    assert table.owners() == 0
    assert table.keys_of("o") == frozenset()


def test_empty_commit(core: ModuleType) -> None:
    table = core.Table()
    result = commit(table, "o", {})
    assert result.upserts == result.deletes == result.rejections == []
    assert len(result) == 0
    assert bool(result) is False
    assert (result.first_seq, result.last_seq) == (1, 0)
    assert table.seq == 0
    assert table.stats().commits == 1
    assert table.owners() == 0


def test_commit_same_buffer_twice(core: ModuleType) -> None:
    table = core.Table()
    buf = declared(table, "o", {"a": [1]})
    assert table.commit(buf).upserts == [("a", [1])]
    again = table.commit(buf)
    assert not again
    assert again.suppressed == 1


def test_seq_strictly_increasing_across_owners(core: ModuleType) -> None:
    table = core.Table()
    last = 0
    for round_ in range(4):
        for owner in ("p", "q", "r"):
            pairs = {(owner, i): round_ if i % 2 else 0 for i in range(round_ + 2)}
            result = commit(table, owner, pairs)
            assert result.first_seq == last + 1
            assert result.last_seq == last + len(result)
            last = result.last_seq
            assert table.seq == last
    released = table.release("q")
    assert released.first_seq == last + 1
    assert released.last_seq == last + len(released.deletes) == table.seq


def test_value_none(core: ModuleType) -> None:
    table = core.Table()
    assert commit(table, "o", {"k": None}).upserts == [("k", None)]
    assert "k" in table
    assert table.get("k", "missing") is None
    assert commit(table, "o", {"k": None}).suppressed == 1
    assert commit(table, "o", {"k": 0}).upserts == [("k", 0)]
    assert commit(table, "o", {"k": None}).upserts == [("k", None)]


# -- the == gate -----------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: [1, [2, 3]],
        lambda: {"a": [1]},
        lambda: Doc("title", ["x", "y"]),
        lambda: "".join(["abc", "def"] * 10),
        lambda: (1, "two", [3]),
        lambda: int("1" * 30),
    ],
    ids=["list", "dict", "dataclass", "str", "tuple", "bigint"],
)
def test_equal_distinct_values_suppressed(core: ModuleType, make: Any) -> None:
    table = core.Table()
    first = make()
    commit(table, "o", {"k": first})
    again = make()
    assert again is not first
    assert again == first
    result = commit(table, "o", {"k": again})
    assert not result
    assert result.suppressed == 1
    assert table.get("k") is first  # the held value stays the one truth
    assert table.stats().suppressed == 1
    assert table.stats().changes == 1


def test_unequal_values_update(core: ModuleType) -> None:
    table = core.Table()
    commit(table, "o", {"k": Doc("t", ["a"])})
    new = Doc("t", ["a", "b"])
    result = commit(table, "o", {"k": new})
    assert result.upserts == [("k", new)]
    assert result.upserts[0][1] is new
    assert table.get("k") is new


def test_nan_is_never_equal(core: ModuleType) -> None:
    table = core.Table()
    nan = float("nan")
    commit(table, "o", {"k": nan})
    assert commit(table, "o", {"k": nan}).suppressed == 1  # same object
    assert commit(table, "o", {"k": float("nan")}).upserts[0][0] == "k"


def test_same_object_is_not_compared(core: ModuleType) -> None:
    table = core.Table()
    value = RaisingEq()
    commit(table, "o", {"k": value})
    result = commit(table, "o", {"k": value})
    assert result.rejections == []
    assert result.suppressed == 1


# -- a raising __eq__ ------------------------------------------------------------------


@pytest.mark.parametrize("make", [RaisingEq, Ambiguous], ids=["eq-raises", "bool-raises"])
def test_raising_eq_keeps_held_value(core: ModuleType, make: Any) -> None:
    table = core.Table()
    held = make()
    commit(table, "o", {"k": held, "other": 1})
    new = make()
    result = commit(table, "o", {"k": new, "other": 2, "added": 3})
    assert result.upserts == [("other", 2), ("added", 3)]
    assert result.deletes == []
    assert result.suppressed == 0
    [rejection] = result.rejections
    assert isinstance(rejection, core.Rejection)
    assert rejection.kind == core.EQ_ERROR
    assert rejection.key == "k"
    assert rejection.value is new
    assert rejection.holder == "o"
    assert isinstance(rejection.error, EqError)
    assert table.get("k") is held
    assert table.owner_of("k") == "o"
    assert table.keys_of("o") == frozenset({"k", "other", "added"})
    stats = table.stats()
    assert (stats.eq_errors, stats.conflicts) == (1, 0)
    # The owner still holds the key: leaving it out deletes it.
    result = commit(table, "o", {"other": 2, "added": 3})
    assert result.deletes == ["k"]


def test_raising_eq_against_plain_held_value(core: ModuleType) -> None:
    table = core.Table()
    commit(table, "o", {"k": 1})
    result = commit(table, "o", {"k": RaisingEq()})
    assert [r.kind for r in result.rejections] == [core.EQ_ERROR]
    assert table.get("k") == 1
    # a comparable value later goes through
    assert commit(table, "o", {"k": 2}).upserts == [("k", 2)]


@pytest.mark.parametrize("track_undo", [False, True])
def test_base_exception_from_eq_propagates(core: ModuleType, track_undo: bool) -> None:
    table = core.Table(track_undo=track_undo)
    held = InterruptingEq()
    commit(table, "o", {"a": 1, "k": held})
    with pytest.raises(KeyboardInterrupt):
        commit(table, "o", {"new": 2, "a": 10, "k": InterruptingEq(), "later": 3})
    # The commit is all or nothing: what it did before the interruption is
    # undone, and the table agrees with itself.
    assert table.keys() == ["a", "k"]
    assert table.get("a") == 1 and table.get("k") is held
    assert "new" not in table and table.owner_of("new") is None
    assert table.keys_of("o") == frozenset({"a", "k"})
    assert table.count_of("o") == 2
    assert table.release("o").deletes == ["a", "k"]
    assert len(table) == 0
    assert table.owners() == 0


# -- owners of one key ----------------------------------------------------------


def record_of(table: Any, owner: object) -> Any:
    """The owner's record as the table keeps it (white box: its layout)."""
    return table._owned.get(table._owner_key(owner))


def observed(table: Any, owners: list[object]) -> Any:
    keys = table.keys()
    return (
        table.items(),
        [(type(k), k) for k in keys],
        [(sorted(map(repr, table.keys_of(o))), table.count_of(o)) for o in owners],
        sorted((repr(k), table.get(k)) for k in keys),
        table.owners(),
        table.stats(),
    )


@pytest.mark.parametrize("track_undo", [False, True])
def test_record_of_an_owner_of_one_key_is_a_pair(core: ModuleType, track_undo: bool) -> None:
    table = core.Table(track_undo=track_undo)
    owner, other = object(), object()
    # (commit, what was observed before it, the owner's record before it)
    steps: list[tuple[Any, Any, Any]] = []

    def step(make: Any) -> Any:
        before = observed(table, [owner, other])
        record = record_of(table, owner)
        result = make()
        steps.append((result, before, record))
        return result

    def run(pairs: dict[Any, Any], defer: bool = False) -> Any:
        return step(lambda: table.commit(declared(table, owner, pairs), defer=defer))

    commit(table, other, {"o": 0})
    assert record_of(table, other) == ("o", 0)
    assert run({"a": 1}).upserts == [("a", 1)]
    assert record_of(table, owner) == ("a", 1)
    assert run({"a": 2}).upserts == [("a", 2)]  # a new pair
    assert record_of(table, owner) == ("a", 2)
    assert run({"a": 2}).suppressed == 1
    assert run({"a": 2, "b": 3}).upserts == [("b", 3)]  # two keys: a dict
    assert type(record_of(table, owner)) is dict
    assert list(record_of(table, owner).items()) == [("a", 2), ("b", 3)]
    assert run({"b": 4}).deletes == ["a"]  # one again: a pair
    assert record_of(table, owner) == ("b", 4)
    assert run({"c": 5}).deletes == ["b"]  # another key
    assert record_of(table, owner) == ("c", 5)
    assert run({"d": 6}, defer=True).upserts == [("d", 6)]  # "c" waits
    assert list(record_of(table, owner).items()) == [("c", 5), ("d", 6)]
    assert table.deferred_of(owner) == frozenset({"c"})
    assert step(lambda: table.drop_deferred(owner)).deletes == ["c"]
    assert record_of(table, owner) == ("d", 6)
    assert table.get("d") == 6 and table.keys_of(owner) == frozenset({"d"})
    assert table.count_of(owner) == 1
    assert table.items() == [("o", 0), ("d", 6)]
    assert step(lambda: table.release(owner)).deletes == ["d"]
    assert record_of(table, owner) is None
    assert record_of(table, other) == ("o", 0)
    if not track_undo:
        return
    # newest first, each commit taken back: the state and the record before it
    while steps:
        result, before, record = steps.pop()
        table.revert(result)
        now = observed(table, [owner, other])
        assert sorted(now[0]) == sorted(before[0])
        assert now[2:5] == before[2:5]
        assert record_of(table, owner) == record
        assert type(record_of(table, owner)) is type(record)
    assert table.items() == [("o", 0)] and record_of(table, owner) is None


@pytest.mark.parametrize("track_undo", [False, True])
def test_owner_of_one_key_declaring_it_again(core: ModuleType, track_undo: bool) -> None:
    """The ``==`` gate of an owner of one key re-declaring it, spelled as
    first declared or not (``True`` for ``1``)."""
    table = core.Table(track_undo=track_undo)
    commit(table, "o", {(1, "a"): 1})
    record = record_of(table, "o")
    assert commit(table, "o", {(True, "a"): 1}).suppressed == 1
    assert record_of(table, "o") is record  # nothing changed: the same pair
    result = commit(table, "o", {(True, "a"): 2})
    assert result.upserts == [((True, "a"), 2)]  # named as declared
    keys = table.keys()
    assert [(type(k[0]), k) for k in keys] == [(int, (1, "a"))]  # kept as first
    assert record_of(table, "o") == ((1, "a"), 2)
    held = record_of(table, "o")
    raising = RaisingEq()
    result = commit(table, "o", {(1, "a"): raising})
    assert [(r.kind, r.key, r.value) for r in result.rejections] == [
        (core.EQ_ERROR, (1, "a"), raising)
    ]
    assert isinstance(result.rejections[0].error, EqError)
    assert result.suppressed == 0 and not result.upserts
    assert record_of(table, "o") is held and table.get((1, "a")) == 2
    assert table.stats().eq_errors == 1
    table.release("o")
    commit(table, "o", {(1, "a"): InterruptingEq()})
    held = record_of(table, "o")
    stats = table.stats()
    with pytest.raises(KeyboardInterrupt):
        commit(table, "o", {(1, "a"): 3})
    assert record_of(table, "o") is held and table.stats() == stats
    with pytest.raises(KeyboardInterrupt):  # a second key, then the interruption
        commit(table, "o", {"new": 1, (1, "a"): 3})
    assert record_of(table, "o") is held and table.stats() == stats
    assert "new" not in table and table.keys() == [(1, "a")]
    assert table.count_of("o") == 1


def test_key_taken_over_keeps_its_first_spelling(core: ModuleType) -> None:
    """A key taken over from an owner dropping it, declared as another
    spelling of it, is still the key as first declared, after a revert too."""
    table = core.Table(track_undo=True)
    commit(table, "a", {"x": 0, (1, "k"): 0})
    table.commit(declared(table, "a", {}), defer=True)
    taken = commit(table, "b", {(True, "k"): 1})
    assert taken.transfers == [((True, "k"), "a", "b")]
    assert table.owner_of((1, "k")) == "b"
    gone = commit(table, "b", {})
    assert [(type(k[0]), k) for k in gone.deletes] == [(int, (1, "k"))]
    table.revert(gone)
    keys = table.keys()
    assert [(type(k[0]), k) for k in keys if k != "x"] == [(int, (1, "k"))]
    assert table.get((1, "k")) == 1


# -- conflicts -------------------------------------------------------------------


def test_conflict_first_owner_keeps_key(core: ModuleType) -> None:
    table = core.Table()
    first, second = object(), object()
    commit(table, first, {"shared": "mine", "a": 1})
    result = commit(table, second, {"b": 2, "shared": "yours", "c": 3})
    assert result.upserts == [("b", 2), ("c", 3)]
    [rejection] = result.rejections
    assert rejection.kind == core.CONFLICT
    assert rejection.key == "shared"
    assert rejection.value == "yours"
    assert rejection.holder is first
    assert rejection.error is None
    assert repr(rejection).startswith("Rejection('conflict', 'shared', holder=")
    assert table.get("shared") == "mine"
    assert table.owner_of("shared") is first
    assert table.keys_of(second) == frozenset({"b", "c"})
    assert table.stats().conflicts == 1
    assert (result.first_seq, result.last_seq) == (3, 4)


def test_claim_is_remembered_and_transfers_when_owner_drops(core: ModuleType) -> None:
    table = core.Table()
    first, second = object(), object()
    commit(table, first, {"k": 1})
    claim = commit(table, second, {"k": 2})
    assert [r.kind for r in claim.rejections] == [core.CONFLICT]
    assert table.claims_of(second) == frozenset({"k"})
    assert table.claimants("k") == (second,)
    assert table.get("k") == 1
    # the first owner drops the key: the claimant gets it, one upsert, no delete
    dropped = commit(table, first, {})
    assert dropped.upserts == [("k", 2)]
    assert dropped.deletes == []
    assert dropped.transfers == [("k", first, second)]
    assert table.owner_of("k") is second
    assert table.get("k") == 2
    assert table.keys_of(second) == frozenset({"k"})
    assert table.claims_of(second) == frozenset()
    assert table.claimants("k") == ()
    assert table.owners() == 1
    # the new owner lets it go as its own
    assert commit(table, second, {}).deletes == ["k"]
    assert len(table) == 0


def test_claim_transfers_on_release_with_equal_value_as_nothing(core: ModuleType) -> None:
    table = core.Table()
    first, second = object(), object()
    commit(table, first, {"k": [1]})
    commit(table, second, {"k": [1]})
    released = table.release(first)
    assert not released
    assert released.transfers == [("k", first, second)]
    assert released.suppressed == 1
    assert table.owner_of("k") is second
    assert table.get("k") == [1]


def test_claimant_that_stops_declaring_drops_its_claim(core: ModuleType) -> None:
    table = core.Table()
    first, second = object(), object()
    commit(table, first, {"k": 1})
    commit(table, second, {"k": 2})
    assert not commit(table, second, {"j": 3}).rejections
    assert table.claims_of(second) == frozenset()
    dropped = commit(table, first, {})
    assert dropped.deletes == ["k"]
    assert dropped.transfers == ()
    assert "k" not in table


def test_claims_are_served_in_claim_order_with_latest_values(core: ModuleType) -> None:
    table = core.Table()
    a, b, c = object(), object(), object()
    commit(table, a, {"k": 1})
    commit(table, b, {"k": 2})
    commit(table, c, {"k": 3})
    commit(table, b, {"k": 22})  # a claim again: its value is the latest
    assert table.claimants("k") == (b, c)
    assert table.release(a).upserts == [("k", 22)]
    assert table.owner_of("k") is b
    assert table.claimants("k") == (c,)
    assert table.release(b).upserts == [("k", 3)]
    assert table.owner_of("k") is c
    # a released claimant's claims go with it
    commit(table, a, {"k": 9})
    table.release(a)
    assert table.claimants("k") == ()


def test_deferred_drop_is_taken_over_by_a_later_declaration(core: ModuleType) -> None:
    table = core.Table()
    first, second = object(), object()
    commit(table, first, {"k": 1, "j": 5})
    dropped = table.commit(table.buffer(first), defer=True)
    assert not dropped
    assert table.deferred_of(first) == frozenset({"k", "j"})
    assert table.get("k") == 1
    taken = commit(table, second, {"k": 2})
    assert taken.upserts == [("k", 2)]
    assert taken.transfers == [("k", first, second)]
    assert not taken.rejections
    assert table.owner_of("k") is second
    assert table.deferred_of(first) == frozenset({"j"})
    settled = table.drop_deferred(first)
    assert settled.deletes == ["j"]
    assert table.deferred_of(first) == frozenset()
    assert table.owners() == 1
    assert not table.drop_deferred(first)


def test_commits_beside_other_owners_deferred_drops(core: ModuleType) -> None:
    """Owners dropping keys change nothing for a commit that declares none of
    their keys; one that declares a dropped key takes it over (its inserts
    before that key too), and a revert of it keeps the others' drops."""
    table = core.Table(track_undo=True)
    a, b, c = object(), object(), object()
    commit(table, a, {"a1": 1, "a2": 2})
    commit(table, b, {"b1": 1})
    table.commit(table.buffer(a), defer=True)
    table.commit(table.buffer(b), defer=True)
    plain = commit(table, c, {"c1": 1, "c2": 2})
    assert plain.upserts == [("c1", 1), ("c2", 2)] and not plain.transfers
    held = commit(table, c, {"c1": 1, "c3": 3, "b1": 1})
    assert held.upserts == [("c3", 3)]
    assert held.deletes == ["c2"]
    assert held.transfers == [("b1", b, c)]
    assert table.owner_of("b1") is c and table.owner_of("c3") is c
    assert table.deferred_of(b) == frozenset()
    table.revert(held)
    assert table.owner_of("b1") is b and "c3" not in table
    assert table.get("c2") == 2
    assert table.deferred_of(b) == frozenset({"b1"})
    assert table.deferred_of(a) == frozenset({"a1", "a2"})
    table.revert(plain)
    assert "c1" not in table and table.deferred_of(a) == frozenset({"a1", "a2"})
    # a release beside them, and a conflict (a claim) beside them
    commit(table, c, {"c1": 1, "a1": 7})
    assert table.owner_of("a1") is c
    d = object()
    assert commit(table, d, {"c1": 5}).rejections[0].kind == core.CONFLICT
    assert table.release(c).upserts == [("c1", 5)]
    assert table.owner_of("c1") is d
    assert table.deferred_of(a) == frozenset({"a2"})


def test_drop_deferred_many_is_one_commit(core: ModuleType) -> None:
    table = core.Table(track_undo=True)
    a, b, c, idle = object(), object(), object(), object()
    commit(table, a, {"a1": 1, "a2": 2})
    commit(table, b, {"b1": 1})
    commit(table, c, {"c1": 1})
    for owner in (a, b):
        table.commit(table.buffer(owner), defer=True)
    before = table.stats()
    group = table.drop_deferred_many([a, idle, b, a])
    assert group.owner == [a, idle, b, a]
    assert group.deletes == ["a1", "a2", "b1"] and group.upserts == []
    assert (group.first_seq, group.last_seq) == (before.changes + 1, before.changes + 3)
    assert table.stats().commits == before.commits + 1
    assert table.keys() == ["c1"] and table.owners() == 1
    table.revert(group)
    assert table.deferred_of(a) == frozenset({"a1", "a2"})
    assert table.deferred_of(b) == frozenset({"b1"})
    assert sorted(table.items()) == [("a1", 1), ("a2", 2), ("b1", 1), ("c1", 1)]
    assert not table.drop_deferred_many([idle, c])
    assert table.drop_deferred_many([b]).deletes == ["b1"]


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("claims", [False, True], ids=["no-claims", "claims"])
def test_drop_deferred_many_keeps_what_each_owner_still_declares(
    core: ModuleType, track: bool, claims: bool
) -> None:
    table = core.Table(track_undo=track)
    a, b, other = object(), object(), object()
    commit(table, a, {"a1": 1, "a2": 2, "a3": 3})
    commit(table, b, {"b1": 1, "b2": 2})
    if claims:  # a claim elsewhere in the table: the general path
        commit(table, other, {"o": 0})
        commit(table, b, {"b1": 1, "b2": 2, "o": 5})
    table.commit(declared(table, a, {"a2": 2}), defer=True)
    table.commit(declared(table, b, {"b2": 2, **({"o": 5} if claims else {})}), defer=True)
    assert table.deferred_of(a) == frozenset({"a1", "a3"})
    group = table.drop_deferred_many([b, a])
    assert group.deletes == ["b1", "a1", "a3"]
    assert table.keys_of(a) == frozenset({"a2"}) and table.keys_of(b) == frozenset({"b2"})
    assert table.deferred_of(a) == frozenset() == table.deferred_of(b)
    assert table.claimants("o") == ((b,) if claims else ())
    if track:
        table.revert(group)
        assert table.keys_of(a) == frozenset({"a1", "a2", "a3"})
        assert table.deferred_of(b) == frozenset({"b1"})
        assert table.get("a3") == 3 and table.owner_of("b1") is b


def test_deferred_drop_declared_again_stays(core: ModuleType) -> None:
    table = core.Table()
    owner = object()
    commit(table, owner, {"k": 1})
    table.commit(table.buffer(owner), defer=True)
    again = commit(table, owner, {"k": 1})
    assert not again
    assert table.deferred_of(owner) == frozenset()
    assert not table.drop_deferred(owner)
    assert table.get("k") == 1


def test_revert_takes_back_a_transfer(core: ModuleType) -> None:
    table = core.Table(track_undo=True)
    first, second = object(), object()
    commit(table, first, {"k": 1})
    commit(table, second, {"k": 2})
    released = table.release(first)
    assert released.upserts == [("k", 2)]
    table.revert(released)
    assert table.owner_of("k") is first
    assert table.get("k") == 1
    assert table.claimants("k") == (second,)
    assert table.keys_of(second) == frozenset()


def test_revert_takes_back_a_claim_and_a_deferred_drop(core: ModuleType) -> None:
    table = core.Table(track_undo=True)
    first, second = object(), object()
    commit(table, first, {"k": 1, "j": 2})
    claim = commit(table, second, {"k": 2})
    table.revert(claim)
    assert table.claimants("k") == ()
    buffer = table.buffer(first)
    buffer.declare("k", 1)
    deferred = table.commit(buffer, defer=True)
    assert table.deferred_of(first) == frozenset({"j"})
    table.revert(deferred)
    assert table.deferred_of(first) == frozenset()
    assert table.keys_of(first) == frozenset({"k", "j"})


def test_revert_leaves_other_owners_claims_and_drops_alone(core: ModuleType) -> None:
    """A slow commit's undo takes back what that commit changed, and only
    that: the claims and deferred drops of other owners, made before it and
    touched or not by it, are as they were."""
    table = core.Table(track_undo=True)
    a, b, c, d = object(), object(), object(), object()
    commit(table, a, {"x": 1, "y": 2})
    commit(table, b, {"p": 1, "q": 2})
    commit(table, c, {"x": 5})  # a claim on a's key
    buffer = table.buffer(b)
    buffer.declare("p", 1)
    table.commit(buffer, defer=True)  # b drops q, deferred
    assert table.deferred_of(b) == frozenset({"q"})
    # d claims y and takes q (b is dropping it); then a lets y go: d gets it
    taken = commit(table, d, {"y": 7, "q": 2})
    assert table.owner_of("q") is d and table.claimants("y") == (d,)
    buffer = table.buffer(a)
    buffer.declare("x", 1)
    passed = table.commit(buffer, defer=True)
    assert table.owner_of("y") is d and table.get("y") == 7
    table.revert(passed)
    assert table.owner_of("y") is a and table.get("y") == 2
    assert table.claimants("y") == (d,)
    assert table.keys_of(a) == frozenset({"x", "y"})
    assert table.deferred_of(b) == frozenset()  # (q is d's until the next revert)
    table.revert(taken)
    assert table.owner_of("q") is b
    assert table.deferred_of(b) == frozenset({"q"})
    assert table.claimants("y") == ()
    assert table.claimants("x") == (c,)
    assert table.keys_of(d) == frozenset()


def test_conflict_only_commit_leaves_no_record(core: ModuleType) -> None:
    table = core.Table()
    commit(table, "a", {"k": 1})
    result = commit(table, "b", {"k": 2})
    assert not result
    assert table.owners() == 1
    assert table.keys_of("b") == frozenset()
    assert table.release("b").deletes == []


def test_owners_compared_by_identity(core: ModuleType) -> None:
    table = core.Table()
    one, two = EqualOwner(), EqualOwner()
    assert one == two
    commit(table, one, {"k": 1})
    result = commit(table, two, {"k": 2, "j": 3})
    assert [r.kind for r in result.rejections] == [core.CONFLICT]
    assert result.deletes == []
    assert table.keys_of(one) == frozenset({"k"})
    assert table.keys_of(two) == frozenset({"j"})
    assert table.owners() == 2
    assert table.release(two).deletes == ["j"]
    assert table.keys_of(one) == frozenset({"k"})


def test_unhashable_owner(core: ModuleType) -> None:
    table = core.Table()
    owner = UnhashableOwner("comp")
    with pytest.raises(TypeError):
        hash(owner)
    commit(table, owner, {"k": 1})
    assert table.owner_of("k") is owner
    assert table.keys_of(owner) == frozenset({"k"})
    assert table.release(owner).deletes == ["k"]


class SlotOwner:
    """An owner like a runtime component: slots, identity ``==`` and hash."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class HashOnlyOwner:
    """Identity ``==``, but a hash of its own (all the same)."""

    def __hash__(self) -> int:
        return 7


def test_owner_kinds_side_by_side(core: ModuleType) -> None:
    # Owners compared by identity whatever their type: ones that are their
    # own key in the table (identity hash and ==) next to ones keyed by their
    # id (equal to each other, unhashable, a hash of their own, an int equal
    # to another owner's id, a str), through claims, a transfer, deferred
    # drops, release and revert.
    table = core.Table(track_undo=True)
    plain, slot = object(), SlotOwner("s")
    eq1, eq2 = EqualOwner(), EqualOwner()
    unhashable, hashed1, hashed2 = UnhashableOwner("u"), HashOnlyOwner(), HashOnlyOwner()
    as_int = id(plain)  # an owner equal to another owner's id
    owners: list[object] = [plain, slot, eq1, eq2, unhashable, hashed1, hashed2, as_int, "str"]
    for i, owner in enumerate(owners):
        commit(table, owner, {f"own{i}": i, "shared": i})
    assert table.owner_of("shared") is plain
    assert table.claimants("shared") == tuple(owners[1:])
    for i, owner in enumerate(owners):
        assert table.keys_of(owner) == frozenset({f"own{i}"} | ({"shared"} if i == 0 else set()))
        assert table.count_of(owner) == (2 if i == 0 else 1)
    # each holder in turn drops the key: it goes to the next claimant
    for i, owner in enumerate(owners[:-1]):
        dropped = commit(table, owner, {f"own{i}": i})
        assert dropped.transfers == [("shared", owner, owners[i + 1])]
        assert table.owner_of("shared") is owners[i + 1]
    # deferred drops of two kinds of owner, then applied
    table.commit(declared(table, slot, {}), defer=True)
    table.commit(declared(table, eq2, {}), defer=True)
    assert table.deferred_of(slot) == frozenset({"own1"})
    assert table.deferred_of(eq1) == frozenset()
    assert table.deferred_of(eq2) == frozenset({"own3"})
    assert table.drop_deferred(eq2).deletes == ["own3"]
    assert table.keys_of(slot) == frozenset({"own1"})
    applied = table.drop_deferred(slot)
    assert applied.deletes == ["own1"]
    table.revert(applied)
    assert table.get("own1") == 1 and table.owner_of("own1") is slot
    assert table.deferred_of(slot) == frozenset({"own1"})
    assert table.release(slot).deletes == ["own1"]
    assert table.release(hashed2).deletes == ["own6"]
    assert table.keys_of(hashed1) == frozenset({"own5"})
    assert table.release(as_int).deletes == ["own7"]
    assert table.keys_of(plain) == frozenset({"own0"})
    assert table.owners() == len(owners) - 4


def test_an_identity_owner_is_its_own_key(core: ModuleType) -> None:
    # White box: an owner whose type hashes and compares as object does keys
    # its record itself (no int per owner in each table); any other owner is
    # keyed by its id.
    table = core.Table()
    slot, eq = SlotOwner("s"), EqualOwner()
    commit(table, slot, {"a": 1})
    commit(table, eq, {"b": 2})
    keys = list(table._owned)
    assert keys[0] is slot
    assert keys[1] == id(eq) and type(keys[1]) is int
    assert table._owner_key(slot) is slot
    assert table._owner_key("str") == id("str")


def test_commit_of_another_tables_buffer(core: ModuleType) -> None:
    mine, other = core.Table("mine"), core.Table("other")
    commit(mine, "o", {"k": 1})
    buf = declared(other, "o", {"k": 2})
    with pytest.raises(ValueError, match=r"^buffer belongs to other, not mine$"):
        mine.commit(buf)
    assert mine.items() == [("k", 1)]
    assert mine.seq == 1
    assert mine.stats().commits == 1


def test_commit_of_a_non_buffer(core: ModuleType) -> None:
    table = core.Table("t")
    with pytest.raises(TypeError, match=r"^t: commit\(\) expects a Buffer of this core, got "):
        table.commit({"k": 1})
    assert table.stats().commits == 0


# -- release ---------------------------------------------------------------------


def test_release(core: ModuleType) -> None:
    table = core.Table()
    commit(table, "a", {"x": 1, "y": 2})
    commit(table, "b", {"z": 3})
    result = table.release("a")
    assert isinstance(result, core.Commit)
    assert result.owner == "a"
    assert result.deletes == ["x", "y"]
    assert result.upserts == []
    assert (result.first_seq, result.last_seq) == (4, 5)
    assert table.items() == [("z", 3)]
    assert table.owners() == 1
    again = table.release("a")
    assert not again
    assert (again.first_seq, again.last_seq) == (6, 5)
    assert table.stats().commits == 4


# -- revert ----------------------------------------------------------------------


def test_revert_needs_track_undo(core: ModuleType) -> None:
    table = core.Table("plain")
    result = commit(table, "o", {"k": 1})
    with pytest.raises(ValueError) as info:
        table.revert(result)
    assert str(info.value) == (
        "plain: only a commit of a table made with track_undo=True can be reverted, once"
    )
    assert table.items() == [("k", 1)]


def test_revert_insert_update_delete(core: ModuleType) -> None:
    table = core.Table("t", track_undo=True)
    owner = object()
    commit(table, owner, {"keep": 1, "change": None, "drop": 3})
    before = (as_dict(table), table.keys_of(owner), table.stats())
    result = commit(table, owner, {"keep": 1, "change": 2, "new": None})
    assert result.upserts == [("change", 2), ("new", None)]
    assert result.deletes == ["drop"]
    table.revert(result)
    assert as_dict(table) == before[0]
    assert table.keys_of(owner) == before[1]
    assert table.owner_of("drop") is owner
    stats = table.stats()
    assert stats.changes == before[2].changes
    assert stats.commits == before[2].commits + 1  # commits are not taken back
    assert table.seq == result.last_seq  # sequence numbers keep growing
    nxt = commit(table, owner, {"keep": 1, "change": 5, "drop": 3})
    assert nxt.first_seq == result.last_seq + 1
    assert nxt.upserts == [("change", 5)]
    assert nxt.deletes == []


def test_revert_value_none_cases(core: ModuleType) -> None:
    table = core.Table(track_undo=True)
    # inserted with value None: revert removes the key
    result = commit(table, "o", {"k": None})
    table.revert(result)
    assert "k" not in table
    assert table.owners() == 0
    # held None updated: revert brings None back
    commit(table, "o", {"k": None})
    result = commit(table, "o", {"k": 1})
    table.revert(result)
    assert "k" in table
    assert table.get("k", "missing") is None
    # deleted while holding None: revert restores it
    result = commit(table, "o", {})
    assert result.deletes == ["k"]
    table.revert(result)
    assert table.get("k", "missing") is None
    assert table.keys_of("o") == frozenset({"k"})


def test_revert_first_commit_forgets_owner(core: ModuleType) -> None:
    table = core.Table(track_undo=True)
    result = commit(table, "o", {"a": 1, "b": 2})
    table.revert(result)
    assert len(table) == 0
    assert table.owners() == 0
    assert table.keys_of("o") == frozenset()
    assert table.stats().changes == 0
    assert commit(table, "o", {"a": 1}).upserts == [("a", 1)]


def test_revert_only_latest_and_once(core: ModuleType) -> None:
    table = core.Table("t", track_undo=True)
    first = commit(table, "o", {"a": 1})
    second = commit(table, "p", {"b": 2})
    with pytest.raises(ValueError, match=r"^t: only the latest commit can be reverted$"):
        table.revert(first)
    table.revert(second)
    with pytest.raises(ValueError, match=r"reverted, once$"):
        table.revert(second)
    assert table.items() == [("a", 1)]
    # taken back newest first: the one before is the latest again
    table.revert(first)
    assert len(table) == 0
    with pytest.raises(ValueError, match=r"reverted, once$"):
        table.revert(first)
    third = commit(table, "o", {"c": 3})
    assert third.first_seq == second.last_seq + 1
    table.revert(third)
    assert len(table) == 0


def test_revert_order_with_empty_commits(core: ModuleType) -> None:
    table = core.Table(track_undo=True)
    first = commit(table, "o", {"a": 1})
    empty = commit(table, "o", {"a": 1})
    assert not empty
    # an empty commit is still a later commit: the first one is not the latest
    with pytest.raises(ValueError, match="only the latest"):
        table.revert(first)
    table.revert(empty)
    table.revert(first)
    assert len(table) == 0
    assert table.keys_of("o") == frozenset()
    # the owner's record agrees with the entries: a later commit works normally
    assert not commit(table, "o", {})
    assert commit(table, "o", {"a": 2}).upserts == [("a", 2)]


def test_revert_release(core: ModuleType) -> None:
    table = core.Table(track_undo=True)
    commit(table, "o", {"a": 1, "b": 2})
    result = table.release("o")
    table.revert(result)
    assert as_dict(table) == {"a": 1, "b": 2}
    assert table.keys_of("o") == frozenset({"a", "b"})
    nothing = table.release("nobody")
    table.revert(nothing)
    assert len(table) == 2


def test_revert_with_rejections(core: ModuleType) -> None:
    table = core.Table(track_undo=True)
    commit(table, "a", {"k": 1, "e": RaisingEq()})
    result = commit(table, "a", {"k": 2, "e": RaisingEq()})
    assert [r.kind for r in result.rejections] == [core.EQ_ERROR]
    table.revert(result)
    assert table.get("k") == 1
    result = commit(table, "b", {"k": 3, "own": 4})
    assert [r.kind for r in result.rejections] == [core.CONFLICT]
    table.revert(result)
    assert table.keys_of("b") == frozenset()
    assert table.keys_of("a") == frozenset({"k", "e"})


def test_revert_commit_of_another_table(core: ModuleType) -> None:
    one, two = core.Table("one", track_undo=True), core.Table("two", track_undo=True)
    commit(one, "o", {"k": 1})
    result = commit(two, "o", {"k": 2})
    assert result.last_seq == one.seq
    with pytest.raises(ValueError, match=r"^one: the commit was made by another table$"):
        one.revert(result)
    assert one.items() == [("k", 1)]


def test_revert_of_a_non_commit(core: ModuleType) -> None:
    table = core.Table("t", track_undo=True)
    with pytest.raises(TypeError, match=r"^t: revert\(\) expects a Commit of this core, got "):
        table.revert("latest")


def test_revert_of_a_hand_made_commit(core: ModuleType) -> None:
    table = core.Table("t", track_undo=True)
    with pytest.raises(ValueError, match="track_undo=True"):
        table.revert(core.Commit("o", 1))


# -- reading ---------------------------------------------------------------------


def test_reading(core: ModuleType) -> None:
    table = core.Table()
    owner = object()
    commit(table, owner, {"k": 1})
    assert table.get("k") == 1
    assert table.get("missing") is None
    assert table.get("missing", 7) == 7
    assert table.owner_of("k") is owner
    assert table.owner_of("missing") is None
    assert table.owner_of("missing", "nobody") == "nobody"
    assert table.keys_of(object()) == frozenset()
    assert len(table) == 1
    assert 1 not in table
    with pytest.raises(TypeError):
        [1] in table  # noqa: B015
    with pytest.raises(TypeError):
        table.get([1])


def test_keys(core: ModuleType) -> None:
    table = core.Table(track_undo=True)
    assert table.keys() == []
    commit(table, "a", {"x": 1, "y": 2})
    commit(table, "b", {("t", 1): 3, "x": 4})
    keys = table.keys()
    assert keys == ["x", "y", ("t", 1)]
    assert keys == [key for key, _ in table.items()]
    # a snapshot: later changes do not show in it, and changing it changes nothing
    result = commit(table, "a", {"z": 5})
    # ("x" went to "b", which claimed it: it keeps its place)
    assert table.keys() == ["x", ("t", 1), "z"]
    assert table.get("x") == 4
    assert keys == ["x", "y", ("t", 1)]
    keys.append("w")
    assert "w" not in table
    table.revert(result)
    assert sorted(map(repr, table.keys())) == sorted(map(repr, ["x", "y", ("t", 1)]))
    assert table.keys() == [key for key, _ in table.items()]
    table.release("a")
    table.release("b")
    assert table.keys() == []


def test_snapshots_are_isolated(core: ModuleType) -> None:
    table = core.Table()
    first = commit(table, "o", {"a": 1, "b": 2})
    items = table.items()
    keys = table.keys_of("o")
    upserts = list(first.upserts)
    commit(table, "o", {"a": 10, "c": 3})
    assert items == [("a", 1), ("b", 2)]
    assert keys == frozenset({"a", "b"})
    assert isinstance(keys, frozenset)
    assert first.upserts == upserts
    items.append(("zzz", 0))
    assert "zzz" not in table


def test_stats(core: ModuleType) -> None:
    table = core.Table()
    assert table.stats() == core.TableStats(0, 0, 0, 0, 0, 0)
    commit(table, "a", {"x": 1, "y": 2, "z": 3})
    commit(table, "a", {"x": 1, "y": 20, "e": RaisingEq()})
    commit(table, "a", {"x": 1, "y": 20, "e": RaisingEq()})
    commit(table, "b", {"x": 9, "w": 0})
    stats = table.stats()
    assert isinstance(stats, core.TableStats)
    assert stats.as_dict() == {
        "changes": 3 + 3 + 0 + 1,
        "commits": 4,
        "conflicts": 1,
        "entries": 4,
        "eq_errors": 1,
        "suppressed": 1 + 2,
    }
    assert list(stats.as_dict()) == [
        "changes",
        "commits",
        "conflicts",
        "entries",
        "eq_errors",
        "suppressed",
    ]
    assert repr(stats) == (
        "TableStats(changes=7, commits=4, conflicts=1, entries=4, eq_errors=1, suppressed=3)"
    )
    assert stats == core.TableStats(4, 4, 7, 3, 1, 1)
    assert stats != core.TableStats(4, 4, 7, 3, 1, 2)
    assert stats != stats.as_dict()
    with pytest.raises(TypeError):
        hash(stats)
    table.release("a")
    assert table.stats().changes == 7 + 3


def test_hand_made_results(core: ModuleType) -> None:
    result = core.Commit("o", 5)
    assert (result.owner, result.first_seq, result.last_seq, result.suppressed) == ("o", 5, 4, 0)
    assert result.upserts == result.deletes == result.rejections == []
    assert not result
    assert repr(result) == "Commit(upserts=0, deletes=0, suppressed=0, rejections=0, seq=5..4)"
    rejection = core.Rejection(core.EQ_ERROR, "k", 1, "h", None)
    assert (rejection.kind, rejection.key, rejection.value, rejection.holder) == (
        core.EQ_ERROR,
        "k",
        1,
        "h",
    )
    assert repr(rejection) == "Rejection('eq_error', 'k', holder='h')"
    stats = core.TableStats(entries=1, commits=2, changes=3, suppressed=4, conflicts=5, eq_errors=6)
    assert stats.as_dict()["eq_errors"] == 6


def test_table_name(core: ModuleType) -> None:
    assert core.Table().name == "table"
    table = core.Table("mine")
    assert table.name == "mine"
    table.name = "renamed"
    assert repr(table) == "<Table renamed entries=0 seq=0>"


def test_keyword_arguments(core: ModuleType) -> None:
    table = core.Table(name="kw", track_undo=True)
    buf = table.buffer(owner="o")
    buf.declare(key="k", value=1)
    result = table.commit(buffer=buf)
    assert table.get(key="k", default=None) == 1
    assert table.get(key="x", default=2) == 2
    assert table.owner_of(key="x", default=3) == 3
    assert table.keys_of(owner="o") == frozenset({"k"})
    table.revert(result=result)
    assert table.release(owner="o").deletes == []
    assert core.Commit(owner="o", first_seq=3).last_seq == 2
    rejection = core.Rejection(kind=core.CONFLICT, key="k", value=1, holder="h", error=None)
    assert rejection.holder == "h"
    assert core.Buffer(table=table, owner="o").owner == "o"


class ReentrantEq:
    """A value whose ``==`` changes the table being committed to."""

    def __init__(self, table: Any, owner: object, action: str, commits: list[Any]) -> None:
        self.table = table
        self.owner = owner
        self.action = action
        self.commits = commits

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        if self.action == "commit":
            inner = self.table.buffer(self.owner)
            inner.declare("fresh", 0)
            self.table.commit(inner)
        elif self.action == "release":
            self.table.release(self.owner)
        else:
            self.table.revert(self.commits[-1])
        return False


@pytest.mark.parametrize("action", ["commit", "release", "revert"])
@pytest.mark.parametrize("track_undo", [False, True])
def test_table_cannot_change_under_its_commit(
    core: ModuleType, track_undo: bool, action: str
) -> None:
    # An __eq__ the commit calls cannot commit into, release from or revert
    # the very table being committed to: it gets a RuntimeError, so the
    # comparison is an EQ_ERROR and the table is left as it was.
    table = core.Table("t", track_undo=track_undo)
    owner = object()
    keys = [f"k{i}" for i in range(20)]
    commits: list[Any] = []
    commits.append(
        commit(table, owner, {k: ReentrantEq(table, owner, action, commits) for k in keys})
    )
    before = (as_dict(table), table.seq)
    declared_now = {k: ReentrantEq(table, owner, action, commits) for k in keys[::-1][:15]}
    result = commit(table, owner, declared_now)
    assert result.upserts == []
    assert result.deletes == keys[:5]
    assert [r.kind for r in result.rejections] == [core.EQ_ERROR] * 15
    for rejection in result.rejections:
        assert type(rejection.error) is RuntimeError
        assert str(rejection.error) == f"t: {action}() called during a commit of this table"
    assert as_dict(table) == {k: v for k, v in before[0].items() if k in declared_now}
    assert table.keys_of(owner) == frozenset(declared_now)
    assert table.seq == before[1] + 5
    # once the commit is done the table changes again as usual
    assert table.release(owner).deletes == keys[5:]
    assert len(table) == 0


# -- the declarer ------------------------------------------------------------------


class _Run:
    """What a Declarer expects of the current run: an owner and its buffers."""

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.buffers: dict[object, object] | None = None


def test_declarer_buffers_into_the_current_run(core: ModuleType) -> None:
    import contextvars

    current: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("run", default=None)
    table = core.Table("t")
    target = object()
    declare = core.Declarer(
        table, target, current, lambda: LookupError("no run"), lambda: EOFError("closed")
    )
    with pytest.raises(LookupError, match="no run"):
        declare("a", 1)
    run = _Run("owner-1")
    token = current.set(run)
    try:
        declare("a", 1)
        declare(("b", 2), [2])
        with pytest.raises(core_dup_error()):
            declare("a", 3)
        with pytest.raises(TypeError, match=r"\[1\.5\]"):
            declare([1.5], 1)
        assert run.buffers is not None
        buffer = run.buffers[target]
        assert buffer.owner == "owner-1" and buffer.table is table
        assert buffer.items() == [("a", 1), (("b", 2), [2])]
        result = table.commit(buffer)
        assert result.upserts == [("a", 1), (("b", 2), [2])]
        declare.closed = True
        with pytest.raises(EOFError, match="closed"):
            declare("c", 1)
    finally:
        current.reset(token)
    assert table.owner_of("a") == "owner-1"


def core_dup_error() -> type[Exception]:
    from livemap_core import DuplicateDeclarationError

    return DuplicateDeclarationError


def _declarer_in_run(core: ModuleType) -> tuple[Any, Any, Any, _Run, Any]:
    """A declarer, its context variable, the token of the run set in it,
    the run and the target."""
    import contextvars

    current: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("run", default=None)
    table = core.Table("t")
    target = object()
    declare = core.Declarer(table, target, current, LookupError, EOFError)
    run = _Run("owner-1")
    return declare, current, current.set(run), run, target


@pytest.mark.parametrize("subclassed", [False, True], ids=["class", "subclass"])
def test_a_declarer_takes_every_way_of_calling_it(core: ModuleType, subclassed: bool) -> None:
    """Positional, keyword, ``*args``/``**kwargs``, through ``partial``; the
    wrong ones raise ``TypeError`` and declare nothing; a subclass made in
    Python (as the runtime documents its declarers) behaves the same."""
    import functools

    declare, current, token, run, target = _declarer_in_run(core)
    if subclassed:
        cls = type("Documented", (core.Declarer,), {"__slots__": ()})
        core.Declarer._subclassed(cls)
        declare = cls(declare.table, target, current, LookupError, EOFError)
    try:
        declare("a", 1)
        declare("b", value=2)
        declare(key="c", value=3)
        declare(value=4, key="d")
        declare(*("e", 5))
        declare(key="f", value=6)
        functools.partial(declare, "g")(7)
        for bad_args, bad_kwargs in [
            ((), {}),
            (("x",), {}),
            (("x", 1, 2), {}),
            (("x",), {"key": "y"}),
            (("x", 1), {"other": 2}),
            ((), {"value": 1}),
        ]:
            with pytest.raises(TypeError):
                declare(*bad_args, **bad_kwargs)
        assert run.buffers is not None
        assert run.buffers[target].items() == list(zip("abcdefg", range(1, 8), strict=True))
    finally:
        current.reset(token)


def test_a_declarers_errors_go_through_every_way_of_calling_it(core: ModuleType) -> None:
    """A failing declaration raises the same exception whichever way it is
    called, and leaves the buffer as it was."""
    declare, current, token, run, target = _declarer_in_run(core)
    try:
        declare("a", 1)
        for call in (
            lambda: declare("a", 2),
            lambda: declare(key="a", value=2),
            lambda: declare(*("a", 2)),
        ):
            with pytest.raises(DuplicateDeclarationError):
                call()
        for call in (lambda: declare([1.5], 2), lambda: declare(key=[1.5], value=2)):
            with pytest.raises(TypeError, match=r"\[1\.5\]"):
                call()
        assert run.buffers is not None
        assert run.buffers[target].items() == [("a", 1)]
    finally:
        current.reset(token)


def test_a_declarer_subclass_with_a_call_of_its_own_is_refused(core: ModuleType) -> None:
    class Own(core.Declarer):  # type: ignore[misc, name-defined]
        __slots__ = ()

        def __call__(self, key: object, value: object) -> None:
            pass

    class Under(Own):
        __slots__ = ()

    for cls in (Own, Under):
        with pytest.raises(TypeError, match="own __call__"):
            core.Declarer._subclassed(cls)
    for other in (int, object(), "Declarer"):
        with pytest.raises(TypeError, match="not a Declarer subclass"):
            core.Declarer._subclassed(other)


# -- lets_go: whether a commit's defer can matter --------------------------------


def test_lets_go_is_whether_a_commit_can_let_go_of_a_key(core: ModuleType) -> None:
    table = core.Table("t")
    owner, other = object(), object()
    assert not table.lets_go(declared(table, owner, {"a": 1}))  # holds nothing yet
    commit(table, owner, {"a": 1})
    assert not table.lets_go(declared(table, owner, {"a": 2}))  # one key, declared again
    assert not table.lets_go(declared(table, owner, {True: 0, "a": 2}))  # and a new one
    assert table.lets_go(declared(table, owner, {"b": 2}))  # "a" would go
    assert table.lets_go(declared(table, owner, {}))
    commit(table, owner, {"a": 1, "b": 2, 1: 3})
    assert not table.lets_go(declared(table, owner, {"a": 1, "b": 2, True: 3}))  # 1 == True
    assert table.lets_go(declared(table, owner, {"a": 1, "b": 2, "c": 3}))
    assert table.lets_go(declared(table, owner, {"a": 1, "b": 2}))
    assert not table.lets_go(declared(table, other, {"a": 1}))  # a claim: nothing it holds
    table.commit(declared(table, owner, {"a": 1, "b": 2}), True)  # 1 waits, dropping
    assert table.deferred_of(owner) == frozenset({1})
    # deferred drops pending: a commit of the owner may settle them, defer or not
    assert table.lets_go(declared(table, owner, {"a": 1, "b": 2, 1: 3}))


def test_lets_go_false_means_defer_makes_no_difference(core: ModuleType) -> None:
    """Randomized: two tables alike, a commit with and one without
    ``defer``: where ``lets_go`` says False, they come out the same."""
    rng = random.Random(7)
    keys = ["a", "b", "c", 1, 2]
    for _ in range(300):
        tables = [core.Table("x"), core.Table("y")]
        owners = [object(), object()]
        history = []
        for _ in range(rng.randrange(0, 4)):
            who = rng.randrange(2)
            pairs = {k: rng.randrange(3) for k in rng.sample(keys, rng.randrange(0, 4))}
            history.append((who, pairs, rng.random() < 0.3))
        for table in tables:
            for who, pairs, defer in history:
                table.commit(declared(table, owners[who], pairs), defer)
        who = rng.randrange(2)
        pairs = {k: rng.randrange(3) for k in rng.sample(keys, rng.randrange(0, 4))}
        bufs = [declared(t, owners[who], pairs) for t in tables]
        can = tables[0].lets_go(bufs[0])
        assert can == tables[1].lets_go(bufs[1])
        with_defer, without = tables[0].commit(bufs[0], True), tables[1].commit(bufs[1], False)
        same = (
            with_defer.upserts == without.upserts
            and with_defer.deletes == without.deletes
            and tables[0].deferred_of(owners[who]) == tables[1].deferred_of(owners[who])
            and as_dict(tables[0]) == as_dict(tables[1])
        )
        if not can:
            assert same, (history, who, pairs)
        elif not tables[0].deferred_of(owners[who]) and without.deletes:
            raise AssertionError("lets_go said True, yet nothing was kept dropping")


def test_lets_go_refuses_what_commit_refuses(core: ModuleType) -> None:
    table, other = core.Table("t"), core.Table("u")
    owner = object()
    with pytest.raises(TypeError, match="lets_go"):
        table.lets_go(object())
    with pytest.raises(ValueError, match="u, not t"):
        table.lets_go(other.buffer(owner))
    commit(table, owner, {"k": 1})
    seen: list[BaseException] = []

    class Peeks:
        def __eq__(self, value: object) -> bool:
            try:
                table.lets_go(table.buffer(owner))
            except RuntimeError as exc:
                seen.append(exc)
            return False

    commit(table, owner, {"k": Peeks()})
    assert len(seen) == 1 and "lets_go" in str(seen[0])
