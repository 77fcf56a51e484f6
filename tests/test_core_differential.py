"""Differential test: the same random operations on the compiled core, the
pure-Python core and a small dict-based model written here from the contract.

Every output (commit results, exceptions and their messages) and the whole
observable state after every step must agree.  Behaviour that drifts between
two implementations of one API is the most common bug of such projects; this
is the net for it.

Profiles (``HYPOTHESIS_PROFILE``): ``livemap-core`` (the default, 500
examples), ``livemap-core-quick`` (100) and ``livemap-core-thorough`` (5,000).
Any other value leaves the default in place.
"""

from __future__ import annotations

import dataclasses
import os
import reprlib
import uuid
from types import ModuleType
from typing import Any

import pytest
from _cores import PURE_ONLY, load_core
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemap_core import _fallback
from livemap_core._shared import DuplicateDeclarationError, StableKeyError, Symbol

settings.register_profile(
    "livemap-core",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("livemap-core-quick", max_examples=100, deadline=None)
settings.register_profile(
    "livemap-core-thorough",
    max_examples=5_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
_requested = os.environ.get("HYPOTHESIS_PROFILE", "")
PROFILE = settings.get_profile(
    _requested if _requested.startswith("livemap-core") else "livemap-core"
)

CONFLICT = "conflict"
EQ_ERROR = "eq_error"
KEY_HELP = (
    "a stable key is None, bool, int, str, bytes, uuid.UUID, Symbol, or a tuple or list "
    "of these nested at most 64 levels deep"
)
MAX_DEPTH = 64
TOO_DEEP = (
    "is not a stable key: it is nested at least 65 levels deep, and a stable key "
    "nests tuples or lists at most MAX_KEY_DEPTH = 64 levels deep"
)
# how a key too deep is shown: reprlib's short form
SHORT = reprlib.Repr()
SHORT.maxlevel = 4
SHORT.maxstring = 40
SHORT.maxother = 40


# -- the pools operations draw from ------------------------------------------------


class StrSub(str):
    pass


def nest(depth: int, leaf: Any = "leaf", kind: type = tuple) -> Any:
    """``leaf`` inside ``depth`` tuples (or lists)."""
    key = leaf
    for _ in range(depth):
        key = kind((key,))
    return key


def mixed_nest(kinds: list[bool], leaf: Any) -> Any:
    """``leaf`` inside one list (True) or tuple (False) per item of ``kinds``."""
    key = leaf
    for is_list in kinds:
        key = [key] if is_list else (key,)
    return key


CYCLE: list[Any] = ["c"]
CYCLE.append(CYCLE)


GOOD_KEYS: list[Any] = [
    "a",
    "b",
    "c",
    0,
    1,
    True,  # == 1: one key with two spellings
    False,
    None,
    b"a",
    Symbol("a"),  # != "a"
    uuid.UUID(int=7),
    (1, "a"),
    (True, "a"),  # == (1, "a")
    ("n", (None, (Symbol("s"), b"x"))),
    (),
    # lists: each the same key as its tuple
    [1, "a"],  # == (1, "a")
    ["n", [None, [Symbol("s"), b"x"]]],  # == ("n", (None, (Symbol("s"), b"x")))
    [],  # == ()
    [1],
    (1, ("x", [0])),
    # at the depth limit
    nest(64),
    nest(64, kind=list),  # == nest(64)
    nest(62, leaf=[1, [2]]),  # [2] is the 64th container
]
BAD_KEYS: list[Any] = [
    1.5,
    ("a", 2.5),
    StrSub("a"),
    object(),
    [1.5],
    ("k", [{"x"}]),
    nest(65),
    nest(65, kind=list),
    nest(63, leaf=[1, [2]]),  # [2] is the 65th
    (nest(66), 1.5),  # too deep first
    (1.5, nest(66)),  # a bad part first
    CYCLE,
]
KEYS = GOOD_KEYS + BAD_KEYS


class EqError(Exception):
    pass


class RaisingEq:
    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        raise EqError(f"cannot compare with {type(other).__name__}")


class Interrupt(BaseException):
    """What an ``__eq__`` may raise that is not an ``Exception`` (like
    ``KeyboardInterrupt`` or a cancellation): the commit is all or nothing."""


class InterruptingEq:
    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        raise Interrupt(f"interrupted comparing with {type(other).__name__}")


class _Truth:
    def __bool__(self) -> bool:
        raise EqError("ambiguous truth value")


class Ambiguous:
    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> Any:
        return _Truth()


@dataclasses.dataclass
class Doc:
    n: int
    tags: list[int]


class EqualOwner:
    """All instances compare equal and hash alike; the cores must tell them apart."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EqualOwner)

    def __hash__(self) -> int:
        return 0


@dataclasses.dataclass(eq=True)
class UnhashableOwner:
    name: str


N_OWNERS = 5


def make_owners() -> list[object]:
    return [object(), object(), EqualOwner(), EqualOwner(), UnhashableOwner("u")]


def make_value(spec: tuple[Any, ...], shared: list[object]) -> Any:
    kind = spec[0]
    if kind == "int":
        return spec[1]
    if kind == "list":
        return [spec[1]]  # equal to, but not the same object as, an earlier one
    if kind == "doc":
        return Doc(spec[1], [spec[1]])
    if kind == "str":
        return "".join(["v", str(spec[1])])
    if kind == "shared":
        return shared[spec[1]]
    if kind == "none":
        return None
    if kind == "eq-raises":
        return RaisingEq()
    if kind == "bool-raises":
        return Ambiguous()
    if kind == "eq-interrupts":
        return InterruptingEq()
    raise AssertionError(spec)


small = st.integers(0, 2)
value_specs = st.one_of(
    st.tuples(st.just("int"), small),
    st.tuples(st.just("list"), small),
    st.tuples(st.just("doc"), small),
    st.tuples(st.just("str"), small),
    st.tuples(st.just("shared"), small),
    st.just(("none",)),
    st.just(("eq-raises",)),
    st.just(("bool-raises",)),
    st.just(("eq-interrupts",)),
)
owner_ids = st.integers(0, N_OWNERS - 1)
key_ids = st.integers(0, len(KEYS) - 1)
# Keys drawn whole: lists and tuples of scalars (now and then a bad part),
# nested; and keys nested about as deep as the limit, each level a list or a
# tuple.
scalar_keys = st.sampled_from(
    [0, 1, True, False, None, "a", "b", b"a", Symbol("a"), uuid.UUID(int=7)]
)
bad_parts = st.sampled_from([1.5, StrSub("a"), frozenset()])
nested_keys = st.recursive(
    st.one_of(scalar_keys, scalar_keys, scalar_keys, bad_parts),
    lambda parts: st.one_of(st.lists(parts, max_size=3), st.lists(parts, max_size=3).map(tuple)),
    max_leaves=6,
)
deep_keys = st.builds(
    mixed_nest,
    st.integers(MAX_DEPTH - 3, MAX_DEPTH + 3).flatmap(
        lambda n: st.lists(st.booleans(), min_size=n, max_size=n)
    ),
    st.one_of(scalar_keys, st.lists(scalar_keys, max_size=2), bad_parts),
)
drawn_keys = st.one_of(nested_keys, nested_keys, deep_keys)
# Edits turning an owner's previous run into its next one (see materialise()).
edits = st.lists(
    st.one_of(
        st.tuples(st.just("drop"), st.integers(0, 63)),
        st.tuples(st.just("move"), st.integers(0, 63), st.integers(0, 63)),
        st.tuples(st.just("insert"), st.integers(0, 63), st.integers(0, 99)),
        # the same key spelled as a list: a duplicate of the tuple, if there
        st.tuples(st.just("insert-list"), st.integers(0, 63), st.integers(0, 99)),
        st.tuples(st.just("change"), st.integers(0, 63), value_specs),
    ),
    max_size=6,
)
ops = st.one_of(
    st.tuples(st.just("declare"), owner_ids, key_ids, value_specs),
    st.tuples(st.just("declare"), owner_ids, st.integers(0, 4), value_specs),  # crowd
    st.tuples(st.just("commit"), owner_ids),
    st.tuples(st.just("commit-defer"), owner_ids),
    st.tuples(st.just("drop-deferred"), owner_ids),
    # the drops of several owners settled together (one listed twice, too)
    st.tuples(st.just("drop-deferred-many"), st.lists(owner_ids, max_size=4)),
    # a whole component run: a few declarations, then the commit
    st.tuples(
        st.just("run"),
        owner_ids,
        st.lists(st.tuples(st.integers(0, 6), value_specs), max_size=6),
    ),
    # the owner's previous run again, a little changed: bigger key sets
    st.tuples(st.just("rerun"), owner_ids, edits),
    st.tuples(st.just("rerun"), owner_ids, edits),
    # the same, its drops deferred
    st.tuples(st.just("rerun-defer"), owner_ids, edits),
    st.tuples(st.just("release"), owner_ids),
    st.tuples(st.just("revert"), st.integers(0, 2)),
    st.tuples(st.just("check"), key_ids),
    # the same with keys drawn whole (see drawn_keys)
    st.tuples(st.just("declare-drawn"), owner_ids, drawn_keys, value_specs),
    st.tuples(
        st.just("run-drawn"),
        owner_ids,
        st.lists(st.tuples(drawn_keys, value_specs), max_size=6),
    ),
    st.tuples(st.just("check-drawn"), drawn_keys),
)


# Owners of one key each, now and then of two or none: runs over a few keys
# (so that owners conflict, claim, and take over keys another one is
# dropping), among them 1 and True, (1, "a") and (True, "a") (one key each, two
# spellings); values equal, changed, or whose ``==`` raises or interrupts the
# commit.  A table's record of an owner of one key is not a dict (see
# _fallback): these cross that boundary (1 -> 2 -> 1 -> 0 keys) all the time.
few_keys = st.sampled_from([0, 1, 4, 5, 11, 12])  # indexes into KEYS
one_key_runs = st.one_of(
    st.lists(st.tuples(few_keys, value_specs), max_size=1),
    st.lists(st.tuples(few_keys, value_specs), max_size=1),
    st.lists(st.tuples(few_keys, value_specs), min_size=2, max_size=2),
)
one_key_ops = st.one_of(
    st.tuples(st.just("run"), owner_ids, one_key_runs),
    st.tuples(st.just("run"), owner_ids, one_key_runs),
    st.tuples(st.just("run"), owner_ids, one_key_runs),
    st.tuples(st.just("run-defer"), owner_ids, one_key_runs),
    st.tuples(st.just("drop-deferred"), owner_ids),
    st.tuples(st.just("drop-deferred-many"), st.lists(owner_ids, max_size=3)),
    st.tuples(st.just("release"), owner_ids),
    st.tuples(st.just("revert"), st.just(0)),
    st.tuples(st.just("revert"), st.integers(0, 1)),
)


class Driver:
    """Turns drawn operations into concrete ones (keys and values are objects,
    the same ones for every implementation)."""

    def __init__(self) -> None:
        # shared values are declared again as the very same object
        self.shared: list[object] = [["shared", 0], ["shared", 1], RaisingEq()]
        self.last_run: dict[int, list[tuple[Any, Any]]] = {}

    def materialise(self, op: tuple[Any, ...]) -> tuple[Any, ...]:
        name = op[0]
        if name == "declare":
            return ("declare", op[1], KEYS[op[2]], make_value(op[3], self.shared))
        if name == "check":
            return ("check", KEYS[op[1]])
        if name in ("run", "run-defer"):
            pairs = [(KEYS[k], make_value(spec, self.shared)) for k, spec in op[2]]
            self.last_run[op[1]] = pairs
            return (name, op[1], pairs)
        if name == "declare-drawn":
            return ("declare", op[1], op[2], make_value(op[3], self.shared))
        if name == "check-drawn":
            return ("check", op[1])
        if name == "run-drawn":
            pairs = [(key, make_value(spec, self.shared)) for key, spec in op[2]]
            self.last_run[op[1]] = pairs
            return ("run", op[1], pairs)
        if name in ("rerun", "rerun-defer"):
            pairs = self.edit(list(self.last_run.get(op[1], [])), op[2])
            self.last_run[op[1]] = pairs
            return ("run" if name == "rerun" else "run-defer", op[1], pairs)
        return op

    def edit(self, pairs: list[tuple[Any, Any]], steps: list[tuple[Any, ...]]) -> Any:
        if not pairs:  # a first run: 40 keys, each owner a block of its own and some shared
            pairs = [((k // 8, k), k % 3) for k in range(40)]
        for step in steps:
            kind, at = step[0], step[1] % (len(pairs) + 1)
            if kind in ("insert", "insert-list"):
                key: Any = (step[2] // 8, step[2])
                if kind == "insert-list":
                    key = list(key)
                if all(k != key for k, _ in pairs):
                    pairs.insert(at, (key, step[2] % 3))
            elif not pairs or at == len(pairs):
                continue
            elif kind == "drop":
                del pairs[at]
            elif kind == "move":
                pairs.insert(step[2] % len(pairs), pairs.pop(at))
            elif kind == "change":
                pairs[at] = (pairs[at][0], make_value(step[2], self.shared))
        return pairs


# -- normalising outputs ------------------------------------------------------------


def tk(key: Any) -> Any:
    """A typed form of a key: ``1`` and ``True`` are one dict key but differ
    here, and so do a tuple and a list."""
    if type(key) in (tuple, list):
        return (type(key).__name__, tuple(tk(part) for part in key))
    return (type(key).__name__, key)


def exc_form(exc: BaseException) -> tuple[str, str]:
    return (type(exc).__name__, str(exc))


# -- the model --------------------------------------------------------------------


def model_problem(key: Any, around: int = 0) -> str | None:
    """The first problem met walking ``key`` depth first, left to right
    (``around`` containers enclose it): ``"deep"`` for a tuple or list that is
    the 65th container, ``"bad"`` for a part that is not a stable key; None
    for a stable key."""
    if key is None or type(key) in (bool, int, str, bytes, uuid.UUID, Symbol):
        return None
    if type(key) not in (tuple, list):
        return "bad"
    if around == MAX_DEPTH:
        return "deep"
    for part in key:
        problem = model_problem(part, around + 1)
        if problem is not None:
            return problem
    return None


def model_is_stable(key: Any) -> bool:
    return model_problem(key) is None


def model_normal(key: Any) -> Any:
    """A stable key with every list a tuple."""
    if type(key) in (tuple, list):
        return tuple(model_normal(part) for part in key)
    return key


def model_has_list(key: Any) -> bool:
    if type(key) is list:
        return True
    return type(key) is tuple and any(model_has_list(part) for part in key)


def model_key_error(key: Any) -> StableKeyError:
    if model_problem(key) == "deep":
        return StableKeyError(f"{SHORT.repr(key)} ({type(key).__name__}) {TOO_DEEP}")
    return StableKeyError(f"{key!r} ({type(key).__name__}) is not a stable key: {KEY_HELP}")


class Model:
    """The contract, written as plainly as possible.  Owners are their indexes."""

    def __init__(self, name: str, track_undo: bool) -> None:
        self.name = name
        self.track_undo = track_undo
        self.entries: dict[Any, tuple[int, Any]] = {}
        # owner -> its keys in the order it first declared them
        self.records: dict[int, dict[Any, None]] = {}
        # key -> its claimants, first claim first; owner -> {claimed key: value}
        self.claims: dict[Any, list[int]] = {}
        self.claimed: dict[int, dict[Any, Any]] = {}
        # owner -> keys it holds but stopped declaring (with defer)
        self.dropping: dict[int, dict[Any, None]] = {}
        self.buffers: dict[int, dict[Any, Any]] = {}
        self.seq = 0
        self.stats = dict.fromkeys(
            ("changes", "commits", "conflicts", "entries", "eq_errors", "suppressed"), 0
        )
        # per commit: [number of changes, state before it, reverted?]; commits
        # are taken back newest first: only the latest one still in effect.
        self.history: list[list[Any]] = []
        self.in_effect: list[int] = []

    def check(self, key: Any) -> None:
        if not model_is_stable(key):
            raise model_key_error(key)

    def declare(self, owner: int, owner_obj: object, key: Any, value: Any) -> None:
        self.check(key)
        key = model_normal(key)
        buf = self.buffers.setdefault(owner, {})
        if key in buf:
            raise DuplicateDeclarationError(key, owner_obj, self.name)
        buf[key] = value

    def _snapshot(self) -> Any:
        return (
            dict(self.entries),
            {o: dict(keys) for o, keys in self.records.items()},
            {k: list(who) for k, who in self.claims.items()},
            {o: dict(keys) for o, keys in self.claimed.items()},
            {o: dict(keys) for o, keys in self.dropping.items()},
        )

    def _restore(self, before: Any) -> None:
        entries, records, claims, claimed, dropping = before
        self.entries = dict(entries)
        self.records = {o: dict(keys) for o, keys in records.items()}
        self.claims = {k: list(who) for k, who in claims.items()}
        self.claimed = {o: dict(keys) for o, keys in claimed.items()}
        self.dropping = {o: dict(keys) for o, keys in dropping.items()}

    def _move(self, key: Any, old: int, new: int, value: Any) -> None:
        """``key`` changes owner."""
        del self.records[old][key]
        if not self.records[old]:
            del self.records[old]
        self.records.setdefault(new, {})[key] = None
        self.entries[key] = (new, value)
        self.dropping.get(old, {}).pop(key, None)
        if old in self.dropping and not self.dropping[old]:
            del self.dropping[old]

    def _unclaim(self, owner: int, key: Any) -> None:
        del self.claimed[owner][key]
        if not self.claimed[owner]:
            del self.claimed[owner]
        self.claims[key].remove(owner)
        if not self.claims[key]:
            del self.claims[key]

    def _let_go(
        self, owner: int, keys: list[Any], defer: bool, upserts: list[Any], transfers: list[Any]
    ) -> tuple[list[Any], int]:
        """Each key goes to its first claimant, stays dropping, or is deleted."""
        plan = []
        for key in keys:  # every comparison first
            if self.claims.get(key):
                claimant = self.claims[key][0]
                value = self.claimed[claimant][key]
                held = self.entries[key][1]
                try:
                    same = value is held or bool(value == held)
                except Exception:
                    same = False
                plan.append((key, claimant, value, same))
            else:
                plan.append((key, None, None, False))
        deletes = []
        suppressed = 0
        for key, claimant, value, same in plan:
            if claimant is not None:
                self._unclaim(claimant, key)
                self._move(key, owner, claimant, value)
                transfers.append((key, owner, claimant))
                if same:
                    suppressed += 1
                else:
                    upserts.append((key, value))
            elif defer:
                self.dropping.setdefault(owner, {})[key] = None
            else:
                del self.entries[key]
                del self.records[owner][key]
                if not self.records[owner]:
                    del self.records[owner]
                self.dropping.get(owner, {}).pop(key, None)
                if owner in self.dropping and not self.dropping[owner]:
                    del self.dropping[owner]
                deletes.append(key)
        return deletes, suppressed

    def _finish(self, upserts: list[Any], deletes: list[Any], before: Any) -> tuple[int, int]:
        first = self.seq + 1
        n = len(upserts) + len(deletes)
        self.seq += n
        self.stats["commits"] += 1
        self.stats["changes"] += n
        self.in_effect.append(len(self.history))
        self.history.append([n, before, False])
        return first, self.seq

    def commit(self, owner: int, defer: bool = False) -> tuple[Any, ...]:
        return self._guarded(self._commit, owner, self.buffers.pop(owner, {}), defer)

    def _guarded(self, step: Any, *args: Any) -> tuple[Any, ...]:
        before = self._snapshot()
        stats = dict(self.stats)
        try:
            return step(*args, before)  # type: ignore[no-any-return]
        except Interrupt:  # all or nothing: the table is as it was
            self._restore(before)
            self.stats = stats
            raise

    def _commit(
        self, owner: int, decls: dict[Any, Any], defer: bool, before: Any
    ) -> tuple[Any, ...]:
        record = dict(self.records.get(owner, {}))
        upserts: list[tuple[Any, Any]] = []
        rejections: list[tuple[Any, ...]] = []
        transfers: list[Any] = []
        suppressed = 0
        for key, value in decls.items():
            if key not in self.entries:
                self.entries[key] = (owner, value)
                self.records.setdefault(owner, {})[key] = None
                upserts.append((key, value))
                continue
            holder, held = self.entries[key]
            if holder != owner and key not in self.dropping.get(holder, {}):
                rejections.append((CONFLICT, key, value, holder, None))
                self.stats["conflicts"] += 1
                if key not in self.claimed.get(owner, {}):
                    self.claims.setdefault(key, []).append(owner)
                self.claimed.setdefault(owner, {})[key] = value
                continue
            try:
                same = held is value or bool(value == held)
            except Exception as exc:
                rejections.append((EQ_ERROR, key, value, owner, exc))
                self.stats["eq_errors"] += 1
                same = None
            if holder != owner:  # taken over from an owner dropping it
                # (the records, like the table, keep the key as first declared)
                self._move(next(k for k in self.entries if k == key), holder, owner, held)
                transfers.append((key, holder, owner))
            else:
                self.dropping.get(owner, {}).pop(key, None)
                if owner in self.dropping and not self.dropping[owner]:
                    del self.dropping[owner]
            if same:
                suppressed += 1
            elif same is not None:
                self.entries[key] = (owner, value)
                upserts.append((key, value))
        for key in [key for key in self.claimed.get(owner, {}) if key not in decls]:
            self._unclaim(owner, key)
        gone = [key for key in record if key not in decls]
        deletes, given = self._let_go(owner, gone, defer, upserts, transfers)
        suppressed += given
        self.stats["suppressed"] += suppressed
        first, last = self._finish(upserts, deletes, before)
        return upserts, deletes, rejections, suppressed, first, last, transfers

    def release(self, owner: int) -> tuple[Any, ...]:
        return self._guarded(self._release, owner)

    def _release(self, owner: int, before: Any) -> tuple[Any, ...]:
        for key in list(self.claimed.get(owner, {})):
            self._unclaim(owner, key)
        upserts: list[Any] = []
        transfers: list[Any] = []
        keys = list(self.records.get(owner, {}))
        deletes, suppressed = self._let_go(owner, keys, False, upserts, transfers)
        self.stats["suppressed"] += suppressed
        first, last = self._finish(upserts, deletes, before)
        return upserts, deletes, [], suppressed, first, last, transfers

    def drop_deferred(self, owner: int) -> tuple[Any, ...]:
        return self._guarded(self._drop_deferred, owner)

    def _drop_deferred(self, owner: int, before: Any) -> tuple[Any, ...]:
        upserts: list[Any] = []
        transfers: list[Any] = []
        keys = list(self.dropping.get(owner, {}))
        deletes, suppressed = self._let_go(owner, keys, False, upserts, transfers)
        self.stats["suppressed"] += suppressed
        first, last = self._finish(upserts, deletes, before)
        return upserts, deletes, [], suppressed, first, last, transfers

    def drop_deferred_many(self, owners: list[int]) -> tuple[Any, ...]:
        return self._guarded(self._drop_deferred_many, owners)

    def _drop_deferred_many(self, owners: list[int], before: Any) -> tuple[Any, ...]:
        upserts: list[Any] = []
        transfers: list[Any] = []
        deletes: list[Any] = []
        suppressed = 0
        for owner in dict.fromkeys(owners):
            keys = list(self.dropping.get(owner, {}))
            dropped, given = self._let_go(owner, keys, False, upserts, transfers)
            deletes.extend(dropped)
            suppressed += given
        self.stats["suppressed"] += suppressed
        first, last = self._finish(upserts, deletes, before)
        return upserts, deletes, [], suppressed, first, last, transfers

    def revert(self, index: int) -> None:
        n, before, reverted = self.history[index]
        if not self.track_undo or reverted:
            raise ValueError(
                f"{self.name}: only a commit of a table made with track_undo=True "
                "can be reverted, once"
            )
        if self.in_effect[-1] != index:
            raise ValueError(f"{self.name}: only the latest commit can be reverted")
        self.in_effect.pop()
        self._restore(before)
        self.stats["changes"] -= n
        self.history[index][2] = True


NORMAL_GOOD_KEYS = [model_normal(key) for key in GOOD_KEYS]
"""The good keys as tables hold them (a list is not hashable: it cannot be
looked up)."""


# -- driving the cores and the model ----------------------------------------------------


class CoreRun:
    def __init__(self, core: ModuleType, owners: list[object], track_undo: bool) -> None:
        self.core = core
        self.owners = owners
        self.table = core.Table("diff", track_undo=track_undo)
        self.buffers: dict[int, Any] = {}
        self.commits: list[Any] = []

    def holder(self, obj: object) -> int:
        return next(i for i, o in enumerate(self.owners) if o is obj)

    def result(self, res: Any) -> tuple[Any, ...]:
        assert isinstance(res, self.core.Commit)
        assert len(res) == len(res.upserts) + len(res.deletes)
        assert bool(res) is bool(len(res))
        self.commits.append(res)
        return (
            [(tk(k), id(v)) for k, v in res.upserts],
            [tk(k) for k in res.deletes],
            [
                (
                    r.kind,
                    tk(r.key),
                    id(r.value),
                    self.holder(r.holder),
                    None if r.error is None else exc_form(r.error),
                )
                for r in res.rejections
            ],
            res.suppressed,
            res.first_seq,
            res.last_seq,
            [(tk(k), self.holder(a), self.holder(b)) for k, a, b in res.transfers],
        )

    def apply(self, op: tuple[Any, ...]) -> Any:
        if op[0] in ("run", "run-defer"):
            out = [self.apply(("declare", op[1], key, value)) for key, value in op[2]]
            commit = "commit" if op[0] == "run" else "commit-defer"
            return (out, self.apply((commit, op[1])))
        name = op[0]
        try:
            if name == "declare":
                owner = op[1]
                buf = self.buffers.get(owner)
                if buf is None:
                    buf = self.buffers[owner] = self.table.buffer(self.owners[owner])
                size = len(buf)
                try:
                    buf.declare(op[2], op[3])
                except Exception:
                    assert len(buf) == size
                    raise
                return ("ok",)
            if name in ("commit", "commit-defer"):
                buf = self.buffers.pop(op[1], None)
                if buf is None:
                    buf = self.table.buffer(self.owners[op[1]])
                if name == "commit":
                    return self.result(self.table.commit(buf))
                return self.result(self.table.commit(buf, defer=True))
            if name == "release":
                return self.result(self.table.release(self.owners[op[1]]))
            if name == "drop-deferred":
                return self.result(self.table.drop_deferred(self.owners[op[1]]))
            if name == "drop-deferred-many":
                group = self.table.drop_deferred_many(self.owners[i] for i in op[1])
                assert group.owner == [self.owners[i] for i in op[1]]
                return self.result(group)
            if name == "revert":
                self.table.revert(self.commits[-1 - op[1]])
                return ("ok",)
            if name == "check":
                key = op[1]
                stable = self.core.is_stable_key(key)
                assert type(stable) is bool
                if stable:
                    assert self.core.check_key(key) is None
                    normal = self.core.normalize_key(key)
                    return ("checked", True, tk(normal), normal is key)
                try:
                    self.core.normalize_key(key)
                except TypeError as exc:
                    rejected = exc_form(exc)
                else:
                    raise AssertionError(f"normalize_key accepted {key!r}")
                try:
                    self.core.check_key(key)
                except TypeError as exc:
                    assert exc_form(exc) == rejected
                    raise
                raise AssertionError(f"check_key accepted {key!r}")
        except (Exception, Interrupt) as exc:
            return ("raised", exc_form(exc))
        raise AssertionError(op)

    def state(self, ordered: bool) -> tuple[Any, ...]:
        t = self.table
        items = [(tk(k), id(v)) for k, v in t.items()]
        assert len(t) == len(items)
        per_key = []
        for key in NORMAL_GOOD_KEYS:
            holder = t.owner_of(key, "-")
            per_key.append(
                (
                    key in t,
                    id(t.get(key, "-")) if key in t else None,
                    "-" if holder == "-" else self.holder(holder),
                )
            )
        return (
            items if ordered else sorted(items, key=repr),
            [sorted(map(tk, t.keys_of(o)), key=repr) for o in self.owners],
            [t.count_of(o) for o in self.owners],
            [sorted(map(tk, t.claims_of(o)), key=repr) for o in self.owners],
            [sorted(map(tk, t.deferred_of(o)), key=repr) for o in self.owners],
            [[self.holder(c) for c in t.claimants(key)] for key in NORMAL_GOOD_KEYS],
            per_key,
            t.owners(),
            t.seq,
            t.stats().as_dict(),
        )


class ModelRun:
    def __init__(self, owners: list[object], track_undo: bool) -> None:
        self.owners = owners
        self.model = Model("diff", track_undo)
        self.commits: list[int] = []

    def result(self, out: tuple[Any, ...]) -> tuple[Any, ...]:
        upserts, deletes, rejections, suppressed, first, last, transfers = out
        self.commits.append(len(self.model.history) - 1)
        return (
            [(tk(k), id(v)) for k, v in upserts],
            [tk(k) for k in deletes],
            [
                (kind, tk(k), id(v), holder, None if err is None else exc_form(err))
                for kind, k, v, holder, err in rejections
            ],
            suppressed,
            first,
            last,
            [(tk(k), a, b) for k, a, b in transfers],
        )

    def apply(self, op: tuple[Any, ...]) -> Any:
        if op[0] in ("run", "run-defer"):
            out = [self.apply(("declare", op[1], key, value)) for key, value in op[2]]
            commit = "commit" if op[0] == "run" else "commit-defer"
            return (out, self.apply((commit, op[1])))
        m = self.model
        name = op[0]
        try:
            if name == "declare":
                m.declare(op[1], self.owners[op[1]], op[2], op[3])
                return ("ok",)
            if name == "commit":
                return self.result(m.commit(op[1]))
            if name == "commit-defer":
                return self.result(m.commit(op[1], defer=True))
            if name == "release":
                return self.result(m.release(op[1]))
            if name == "drop-deferred":
                return self.result(m.drop_deferred(op[1]))
            if name == "drop-deferred-many":
                return self.result(m.drop_deferred_many(op[1]))
            if name == "revert":
                m.revert(self.commits[-1 - op[1]])
                return ("ok",)
            if name == "check":
                key = op[1]
                m.check(key)
                return ("checked", True, tk(model_normal(key)), not model_has_list(key))
        except (Exception, Interrupt) as exc:
            return ("raised", exc_form(exc))
        raise AssertionError(op)

    def state(self) -> tuple[Any, ...]:
        m = self.model
        items = [(tk(k), id(v)) for k, (_, v) in m.entries.items()]
        per_key = []
        for key in NORMAL_GOOD_KEYS:
            present = key in m.entries
            per_key.append(
                (
                    present,
                    id(m.entries[key][1]) if present else None,
                    m.entries[key][0] if present else "-",
                )
            )
        stats = dict(m.stats, entries=len(m.entries))
        return (
            sorted(items, key=repr),
            [sorted(map(tk, m.records.get(o, {})), key=repr) for o in range(N_OWNERS)],
            [len(m.records.get(o, {})) for o in range(N_OWNERS)],
            [sorted(map(tk, m.claimed.get(o, {})), key=repr) for o in range(N_OWNERS)],
            [sorted(map(tk, m.dropping.get(o, {})), key=repr) for o in range(N_OWNERS)],
            [list(m.claims.get(key, [])) for key in NORMAL_GOOD_KEYS],
            per_key,
            len(m.records),
            m.seq,
            stats,
        )


@pytest.fixture(scope="module")
def cores() -> list[ModuleType]:
    """The cores to compare: both, or only the pure one in a pure-Python run."""
    if PURE_ONLY:
        return [_fallback]
    return [load_core("c"), _fallback]


@PROFILE
@given(track_undo=st.booleans(), program=st.lists(ops, max_size=60))
def test_cores_agree_with_each_other_and_the_model(
    cores: list[ModuleType], track_undo: bool, program: list[tuple[Any, ...]]
) -> None:
    owners = make_owners()
    driver = Driver()
    runs = [CoreRun(core, owners, track_undo) for core in cores]
    model = ModelRun(owners, track_undo)
    for step, drawn in enumerate(program):
        if drawn[0] == "revert" and len(model.commits) <= drawn[1]:
            continue
        agree(runs, model, step, driver.materialise(drawn))


def agree(runs: list[CoreRun], model: ModelRun, step: int, op: tuple[Any, ...]) -> None:
    """Apply ``op`` to each core and to the model: the same outputs, and the
    same observable state after it."""
    expected = model.apply(op)
    expected_state = model.state()
    reference_state = None
    for run in runs:
        got = run.apply(op)
        assert got == expected, (step, op, run.core.__name__)
        state = run.state(ordered=True)
        if reference_state is None:
            reference_state = state
        else:  # the cores agree exactly, entry order included
            assert state == reference_state, (step, op, run.core.__name__)
        unordered = (sorted(state[0], key=repr), *state[1:])
        assert unordered == expected_state, (step, op, run.core.__name__)


@PROFILE
@given(track_undo=st.booleans(), program=st.lists(one_key_ops, max_size=40))
def test_owners_of_one_key_cross_to_two_and_back(
    cores: list[ModuleType], track_undo: bool, program: list[tuple[Any, ...]]
) -> None:
    """Owners going from one key to two, back to one and to none, with
    claims, transfers, deferred drops, ``==`` that raises or interrupts the
    commit, and reverts; then (with ``track_undo``) every commit still in
    effect taken back, newest first, each step checked."""
    owners = make_owners()
    driver = Driver()
    runs = [CoreRun(core, owners, track_undo) for core in cores]
    model = ModelRun(owners, track_undo)
    step = 0
    for step, drawn in enumerate(program):
        if drawn[0] == "revert" and len(model.commits) <= drawn[1]:
            continue
        agree(runs, model, step, driver.materialise(drawn))
    if not track_undo:
        return
    in_effect = list(model.model.in_effect)
    for i in reversed(range(len(model.commits))):
        if model.commits[i] in in_effect:  # (each in turn the latest)
            agree(runs, model, step + 1, ("revert", len(model.commits) - 1 - i))
            step += 1
    for run in runs:
        assert run.table.items() == [] and run.table.owners() == 0


def test_profile_runs_enough_examples() -> None:
    assert settings.get_profile("livemap-core").max_examples >= 500
    assert settings.get_profile("livemap-core").deadline is None
