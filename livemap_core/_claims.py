"""Claims, transfers and deferred drops: the rare path of a table, shared by
both cores.

A table's hot path (``Table._commit`` in each twin) handles the common case:
no key in the table is claimed by a second owner, the committing owner has
no deferred drops, and it declares no key another owner is dropping (the
hot path finds that out at the key, takes back what it did and hands the
commit over).  Other owners' deferred drops do not matter to it: they wait
for their own ``drop_deferred``.  Everything else runs here, in plain Python, on the table's own
dicts (both twins expose them under the same names), so the two cores cannot
drift apart on it.

The state this module keeps, next to a table's ``_holder`` (key -> owner)
and ``_owned`` (an owner's key -> its record, the keys it holds with their
held values: the pair ``(key, value)`` for an owner of one key, else a dict
``{key: value}`` of two keys or more; see :func:`view` and :func:`compact`).
An owner's key, ``table._owner_key(owner)``, is the owner itself when its
type hashes and compares as ``object`` does, else its ``id``:

* ``_claims``: key -> list of the owners claiming it, in the order they
  claimed it.  A claim is a declaration of a key another owner holds and
  still declares.  Invariant: a claimed key is held, and its holder is not
  among its claimants.
* ``_claimed``: the claimant's key -> {key: the value it declared last}.
  Invariant: ``claimant in _claims[key]`` exactly when ``key`` is in the
  claimant's dict.
* ``_dropping``: the owner's key -> {key: None}, keys the owner no longer
  declares whose deletion waits (a commit made with ``defer=True``) until
  ``drop_deferred(owner)``.  Invariant: a dropping key is held by that owner
  and has no claimant (a claim on it is a transfer, made at once).

An owner that lets a key go (stops declaring it, is released, or its
deferred drops are applied) hands it to the key's first claimant if it has
one: a *transfer*, an upsert of the claimant's value (nothing if equal under
``==``), never a delete then an insert.  A declaration of a key whose holder
is dropping it takes it over the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Final

__all__ = [
    "compact",
    "drop_deferred",
    "drop_deferred_many",
    "note_claims",
    "reset",
    "slow_commit",
    "slow_release",
    "view",
]

_MISSING: Final[object] = object()
_EMPTY: Final[dict[Any, Any]] = {}

CONFLICT: Final = "conflict"
EQ_ERROR: Final = "eq_error"


def view(record: tuple[Any, Any] | dict[Any, Any] | None) -> dict[Any, Any]:
    """The keys and values of an owner's ``record`` as a dict, not to be
    written to: the record itself when it is a dict, a new dict for the pair
    of an owner of one key, an empty dict for no record."""
    if record is None:
        return _EMPTY
    if type(record) is tuple:
        return {record[0]: record[1]}
    return record  # type: ignore[return-value]  # a dict


def compact(keys: dict[Any, Any]) -> tuple[Any, Any] | dict[Any, Any]:
    """The record of an owner holding ``keys`` (not empty): the pair
    ``(key, value)`` of its one key, else ``keys`` itself."""
    if len(keys) == 1:
        for pair in keys.items():
            return pair
    return keys


def _same(value: Any, held: Any) -> bool | Exception:
    """``value == held`` as a bool (identity first), or the ``Exception`` it
    raised; a ``BaseException`` propagates."""
    if value is held:
        return True
    try:
        return bool(value == held)
    except Exception as exc:
        return exc


def _remove(items: list[Any], obj: object) -> None:
    for i, item in enumerate(items):
        if item is obj:
            del items[i]
            return


def _transfer(result: Any, key: Any, old: object, new: object) -> None:
    # a commit's transfers are an empty tuple until it has one
    if result.transfers:
        result.transfers.append((key, old, new))
    else:
        result.transfers = [(key, old, new)]


class _Undo:
    """What a slow commit of a ``track_undo`` table changed, to take it back:
    the records, holders and claim state as they were before."""

    __slots__ = ("claimed", "claims", "dropping", "holders", "records", "table")

    def __init__(self, table: Any) -> None:
        self.table = table
        self.records: dict[Hashable, dict[Any, Any] | None] = {}
        self.holders: dict[Any, object] = {}
        # the claim state of each key or owner the commit touches, as it was
        # before the first change (_MISSING: absent); a commit copies only
        # what it changes, however many claims and drops other owners hold
        self.claims: dict[Any, Any] = {}
        self.claimed: dict[Hashable, Any] = {}
        self.dropping: dict[Hashable, Any] = {}

    @staticmethod
    def save(saved: dict[Any, Any], state: dict[Any, Any], name: Any) -> None:
        """Keep ``state[name]`` as it is now (a copy), unless kept already."""
        if name not in saved:
            was = state.get(name)
            saved[name] = _MISSING if was is None else was.copy()

    def record(self, oid: Hashable) -> None:
        if oid not in self.records:
            self.records[oid] = self.table._owned.get(oid)

    def holder(self, key: Any) -> None:
        if key not in self.holders:
            self.holders[key] = self.table._holder.get(key, _MISSING)

    def __call__(self) -> None:
        table = self.table
        owned = table._owned
        for oid, record in self.records.items():
            if record is None:
                owned.pop(oid, None)
            else:
                owned[oid] = record
        holder = table._holder
        for key, who in self.holders.items():
            if who is _MISSING:
                holder.pop(key, None)
            else:
                holder[key] = who
        for state, before in (
            (table._claims, self.claims),
            (table._claimed, self.claimed),
            (table._dropping, self.dropping),
        ):
            for name, was in before.items():
                if was is _MISSING:
                    state.pop(name, None)
                else:
                    state[name] = was


class _Writer:
    """The changes of one slow commit or release, applied as they are made
    (every comparison has been done before the first one)."""

    __slots__ = ("records", "table", "undo")

    def __init__(self, table: Any, track: bool) -> None:
        self.table = table
        self.undo = _Undo(table) if track else None
        # an owner's key -> its new record (a copy of the old one, made on first change)
        self.records: dict[Hashable, dict[Any, Any]] = {}

    def rec(self, oid: Hashable) -> dict[Any, Any]:
        record = self.records.get(oid)
        if record is None:
            if self.undo is not None:
                self.undo.record(oid)
            record = self.records[oid] = dict(view(self.table._owned.get(oid)))
        return record

    def set_holder(self, key: Any, owner: object | None) -> None:
        if self.undo is not None:
            self.undo.holder(key)
        if owner is None:
            del self.table._holder[key]
        else:
            self.table._holder[key] = owner

    def unclaim(self, claimant: object, key: Any) -> None:
        table = self.table
        oid = table._owner_key(claimant)
        undo = self.undo
        if undo is not None:
            undo.save(undo.claimed, table._claimed, oid)
            undo.save(undo.claims, table._claims, key)
        keys = table._claimed[oid]
        del keys[key]
        if not keys:
            del table._claimed[oid]
        who = table._claims[key]
        _remove(who, claimant)
        if not who:
            del table._claims[key]

    def claim(self, claimant: object, key: Any, value: Any) -> None:
        table = self.table
        undo = self.undo
        if undo is not None:
            undo.save(undo.claimed, table._claimed, table._owner_key(claimant))
            undo.save(undo.claims, table._claims, key)
        keys = table._claimed.get(table._owner_key(claimant))
        if keys is None:
            keys = table._claimed[table._owner_key(claimant)] = {}
        if key not in keys:
            who = table._claims.get(key)
            if who is None:
                table._claims[key] = [claimant]
            else:
                who.append(claimant)
        keys[key] = value

    def undrop(self, oid: Hashable, key: Any) -> None:
        dropping = self.table._dropping
        keys = dropping.get(oid)
        if keys is not None and key in keys:
            undo = self.undo
            if undo is not None:
                undo.save(undo.dropping, dropping, oid)
            del keys[key]
            if not keys:
                del dropping[oid]

    def drop_later(self, oid: Hashable, key: Any) -> None:
        dropping = self.table._dropping
        undo = self.undo
        if undo is not None:
            undo.save(undo.dropping, dropping, oid)
        keys = dropping.get(oid)
        if keys is None:
            keys = dropping[oid] = {}
        keys[key] = None

    def store(self) -> None:
        owned = self.table._owned
        for oid, record in self.records.items():
            if record:
                owned[oid] = compact(record)
            else:
                owned.pop(oid, None)


def _plan_let_go(
    table: Any, keys: list[Any], record: dict[Any, Any]
) -> list[tuple[Any, object | None, Any, bool]]:
    """For each key an owner lets go: ``(key, claimant or None, value, changed)``;
    the comparisons (which may raise a ``BaseException``) before any change."""
    claims = table._claims
    plan: list[tuple[Any, object | None, Any, bool]] = []
    for key in keys:
        waiting = claims.get(key)
        if waiting:
            claimant = waiting[0]
            value = table._claimed[table._owner_key(claimant)][key]
            same = _same(value, record[key])
            # a comparison that raises counts as a change: the new value is sent
            plan.append((key, claimant, value, same is not True))
        else:
            plan.append((key, None, None, True))
    return plan


def _let_go(
    w: _Writer,
    owner: object,
    plan: list[tuple[Any, object | None, Any, bool]],
    defer: bool,
    result: Any,
) -> int:
    """Hand each planned key to its claimant, keep it dropping (``defer``) or
    delete it; returns how many transfers changed nothing (suppressed)."""
    oid = w.table._owner_key(owner)
    suppressed = 0
    for key, claimant, value, changed in plan:
        if claimant is not None:
            rec = w.rec(oid)
            del rec[key]
            w.undrop(oid, key)
            w.unclaim(claimant, key)
            w.set_holder(key, claimant)
            w.rec(w.table._owner_key(claimant))[key] = value
            _transfer(result, key, owner, claimant)
            if changed:
                result.upserts.append((key, value))
            else:
                suppressed += 1
        elif defer:
            w.drop_later(oid, key)
        else:
            del w.rec(oid)[key]
            w.undrop(oid, key)
            w.set_holder(key, None)
            result.deletes.append(key)
    return suppressed


def slow_commit(
    table: Any,
    owner: object,
    decls: dict[Any, Any],
    defer: bool,
    result: Any,
    rejection: Callable[..., Any],
    track: bool,
) -> tuple[Callable[[], None] | None, int, int]:
    """Commit ``decls`` as ``owner``'s declared set into ``result`` (a new
    ``Commit``), with claims, transfers and deferred drops.

    Returns ``(undo, suppressed, eq_errors)``; ``undo`` (with ``track``)
    takes the commit back.  Every comparison is made before the table
    changes: a ``BaseException`` from ``__eq__`` leaves it as it was.
    """
    holder = table._holder
    owned = table._owned
    dropping = table._dropping
    oid = table._owner_key(owner)
    record = view(owned.get(oid))
    upserts = result.upserts
    rejections = result.rejections
    # (what, key, value, holder): "keep" a held key (value unchanged), "set"
    # a held key's value, "insert" a new key, "take" a key its holder is
    # dropping, "claim" a key another owner holds
    plan: list[tuple[str, Any, Any, object]] = []
    suppressed = eq_errors = 0
    for key, value in decls.items():
        held = record.get(key, _MISSING)
        if held is not _MISSING:
            same = _same(value, held)
            if same is True:
                suppressed += 1
                plan.append(("keep", key, None, None))
            elif same is False:
                upserts.append((key, value))
                plan.append(("set", key, value, None))
            else:
                rejections.append(rejection(EQ_ERROR, key, value, owner, same))
                eq_errors += 1
                plan.append(("keep", key, None, None))
            continue
        held_by = holder.get(key, _MISSING)
        if held_by is _MISSING:
            upserts.append((key, value))
            plan.append(("insert", key, value, None))
        elif key in dropping.get(table._owner_key(held_by), _EMPTY):
            held = view(owned[table._owner_key(held_by)])[key]
            same = _same(value, held)
            if same is True:
                suppressed += 1
                plan.append(("take", key, held, held_by))
            elif same is False:
                upserts.append((key, value))
                plan.append(("take", key, value, held_by))
            else:  # the key is taken over; the held value stays
                rejections.append(rejection(EQ_ERROR, key, value, owner, same))
                eq_errors += 1
                plan.append(("take", key, held, held_by))
        else:
            rejections.append(rejection(CONFLICT, key, value, held_by, None))
            plan.append(("claim", key, value, held_by))
    gone = [key for key in record if key not in decls]
    let_go = _plan_let_go(table, gone, record)

    w = _Writer(table, track)
    my_claims = table._claimed.get(oid, _EMPTY)
    for what, key, value, held_by in plan:
        if what == "keep":
            w.undrop(oid, key)
        elif what == "set":
            w.rec(oid)[key] = value
            w.undrop(oid, key)
        elif what == "insert":
            w.set_holder(key, owner)
            w.rec(oid)[key] = value
        elif what == "take":
            from_id = table._owner_key(held_by)
            theirs = w.rec(from_id)
            # the key as the table holds it (it may have been declared as
            # another spelling of it: True for 1), which the record keeps
            stored = next(k for k in theirs if k == key)
            del theirs[key]
            w.undrop(from_id, key)
            w.set_holder(key, owner)
            w.rec(oid)[stored] = value
            _transfer(result, key, held_by, owner)
        else:
            w.claim(owner, key, value)
    for key in [key for key in my_claims if key not in decls]:
        w.unclaim(owner, key)  # the claimant stopped declaring it
    suppressed += _let_go(w, owner, let_go, defer, result)
    w.store()
    return w.undo, suppressed, eq_errors


def slow_release(table: Any, owner: object, result: Any, track: bool) -> Callable[[], None] | None:
    """Release everything ``owner`` holds into ``result``: each key goes to
    its first claimant, or is deleted; the owner's own claims are
    withdrawn.  Returns the undo (with ``track``)."""
    oid = table._owner_key(owner)
    record = view(table._owned.get(oid))
    let_go = _plan_let_go(table, list(record), record)
    w = _Writer(table, track)
    for key in list(table._claimed.get(oid, _EMPTY)):
        w.unclaim(owner, key)
    result.suppressed = _let_go(w, owner, let_go, False, result)
    w.store()
    return w.undo


def drop_deferred(table: Any, owner: object, result: Any, track: bool) -> Callable[[], None] | None:
    """Apply ``owner``'s deferred drops into ``result``: each key it still
    does not declare is deleted (or goes to a claimant).  Returns the undo."""
    oid = table._owner_key(owner)
    keys = table._dropping.get(oid)
    if not keys:
        return None
    record = view(table._owned[oid])
    let_go = _plan_let_go(table, list(keys), record)
    w = _Writer(table, track)
    result.suppressed = _let_go(w, owner, let_go, False, result)
    w.store()
    return w.undo


def drop_deferred_many(
    table: Any, owners: list[object], result: Any, track: bool
) -> Callable[[], None] | None:
    """:func:`drop_deferred` of each of ``owners`` in turn, into one
    ``result`` (an owner listed twice counts once; one with no deferred
    drops adds nothing).  Every comparison is made before the table changes.
    Returns the undo of them all."""
    dropping = table._dropping
    owned = table._owned
    if not table._claims:  # (the common case) no claimant: every key is deleted
        return _delete_deferred(table, owners, result, track)
    plans: list[tuple[object, list[tuple[Any, object | None, Any, bool]]]] = []
    seen: set[Hashable] = set()
    for owner in owners:
        oid = table._owner_key(owner)
        keys = dropping.get(oid)
        if keys and oid not in seen:
            seen.add(oid)
            plans.append((owner, _plan_let_go(table, list(keys), view(owned[oid]))))
    if not plans:
        result.suppressed = 0
        return None
    w = _Writer(table, track)
    suppressed = 0
    for owner, plan in plans:
        suppressed += _let_go(w, owner, plan, False, result)
    w.store()
    result.suppressed = suppressed
    return w.undo


def _delete_deferred(
    table: Any, owners: list[object], result: Any, track: bool
) -> Callable[[], None] | None:
    """:func:`drop_deferred_many` in a table without claims: each owner's
    dropping keys are deleted, in the order it first declared them (a
    dropping key has no claimant, and there is none to compare)."""
    dropping = table._dropping
    owned = table._owned
    holder = table._holder
    deletes = result.deletes
    saved: list[tuple[Hashable, object, Any, dict[Any, None]]] | None = [] if track else None
    for owner in owners:
        oid = table._owner_key(owner)
        keys = dropping.pop(oid, None)
        if not keys:
            continue
        record = owned[oid]
        if type(record) is tuple or len(keys) == len(record):  # all of them
            del owned[oid]
        elif saved is None:
            for key in keys:
                del record[key]
            if len(record) == 1:
                owned[oid] = compact(record)
        else:  # (a record's keys never change in place with track_undo)
            owned[oid] = compact({k: v for k, v in record.items() if k not in keys})
        for key in keys:
            del holder[key]
        deletes.extend(keys)
        if saved is not None:
            saved.append((oid, owner, record, keys))
    result.suppressed = 0
    if not saved:
        return None

    def undo() -> None:
        for oid, owner, record, keys in reversed(saved):
            owned[oid] = record
            dropping[oid] = keys
            for key in keys:
                holder[key] = owner

    return undo


def note_claims(table: Any, owner: object, rejections: list[Any]) -> None:
    """After a hot-path commit (the table had no claims and no deferred
    drops): remember each ``CONFLICT`` rejection as a claim of ``owner``
    (its undo is :func:`reset`)."""
    w = _Writer(table, False)
    for r in rejections:
        if r.kind == CONFLICT:
            w.claim(owner, r.key, r.value)


def reset(table: Any, oid: Hashable) -> None:
    """The undo of a hot-path commit of the owner of key ``oid`` that
    claimed keys or deferred drops: forget every claim (there were none
    before it) and the owner's deferred drops (it had none; other owners'
    stay)."""
    table._claims.clear()
    table._claimed.clear()
    table._dropping.pop(oid, None)
