"""The pure-Python core: the reference implementation.

``livemap_core._core`` (Cython) implements exactly this API with the same
observable behaviour; the types here are the one API both keep.

A :class:`Table` is one keyed target: for each key it holds the current value
and the owner that declared it.  A component run fills a :class:`Buffer` with
its declarations; :meth:`Table.commit` diffs that buffer against everything the
owner held before, applies the ``==`` gate against the held values, rejects
declarations of keys another owner holds, and returns the resulting changes as
a :class:`Commit`.
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable, Iterable
from functools import partial
from typing import Any, Final, Generic, TypeAlias, TypeVar

from livemap_core._claims import compact as _compact
from livemap_core._claims import drop_deferred as _drop_deferred
from livemap_core._claims import drop_deferred_many as _drop_deferred_many
from livemap_core._claims import note_claims as _note_claims
from livemap_core._claims import reset as _reset
from livemap_core._claims import slow_commit as _slow_commit
from livemap_core._claims import slow_release as _slow_release
from livemap_core._shared import (
    _SCALARS,
    MAX_KEY_DEPTH,
    DuplicateDeclarationError,
    Symbol,
    _key_error,
)

__all__ = [
    "CONFLICT",
    "EQ_ERROR",
    "MAX_KEY_DEPTH",
    "Buffer",
    "Commit",
    "Declarer",
    "Rejection",
    "Table",
    "TableStats",
    "check_key",
    "is_stable_key",
    "normalize_key",
]

K = TypeVar("K")
V = TypeVar("V")

CONFLICT: Final = "conflict"
"""Rejection kind: the key is held by another owner."""
EQ_ERROR: Final = "eq_error"
"""Rejection kind: comparing the new value with the held one raised."""

StableKey: TypeAlias = (
    bool | int | str | bytes | uuid.UUID | Symbol | tuple["StableKey", ...] | None
)
"""What :func:`normalize_key` returns: a stable key in its normal form (no lists)."""

# What a walk of a tuple or list key found.
_BAD: Final = 0  # not a stable key
_PLAIN: Final = 1  # a stable key that holds no list: its own normal form
_LISTS: Final = 2  # a stable key once its lists are tuples


def _scan(key: tuple[object, ...] | list[object]) -> int:
    # Whether the tuple or list ``key`` is stable, and whether it holds a list
    # (itself included).  Iterative, and never deeper than MAX_KEY_DEPTH.
    plain = type(key) is tuple
    for part in key:
        if type(part) not in _SCALARS:
            break
    else:  # the common case: a flat tuple of scalars
        return _PLAIN if plain else _LISTS
    stack = [iter(key)]
    while stack:
        for part in stack[-1]:
            t = type(part)
            if t in _SCALARS:
                continue
            if t is tuple or t is list:
                if len(stack) >= MAX_KEY_DEPTH:
                    return _BAD
                if t is list:
                    plain = False
                stack.append(iter(part))  # type: ignore[call-overload]
                break
            return _BAD
        else:
            stack.pop()
    return _PLAIN if plain else _LISTS


def _tupleize(key: tuple[object, ...] | list[object]) -> StableKey | None:
    # The normal form of the tuple or list ``key``: each list a tuple, each
    # tuple that holds no list kept as it is.  None if ``key`` is not stable.
    # Iterative, and never deeper than MAX_KEY_DEPTH.  A frame is [the tuple
    # or list, its iterator, its parts in normal form so far, whether they
    # differ from its own].
    stack: list[list[Any]] = [[key, iter(key), [], type(key) is list]]
    while True:
        frame = stack[-1]
        parts = frame[2]
        for part in frame[1]:
            t = type(part)
            if t in _SCALARS:
                parts.append(part)
                continue
            if t is tuple or t is list:
                if len(stack) >= MAX_KEY_DEPTH:
                    return None
                stack.append([part, iter(part), [], t is list])
                break
            return None
        else:
            stack.pop()
            done = tuple(parts) if frame[3] else frame[0]
            if not stack:
                return done
            parent = stack[-1]
            parent[2].append(done)
            if done is not frame[0]:
                parent[3] = True


def is_stable_key(key: object) -> bool:
    """Whether ``key`` is a stable key: ``None``, ``bool``, ``int``, ``str``,
    ``bytes``, ``uuid.UUID``, :class:`Symbol` (exact types, no subclasses), or
    a tuple or list of stable keys, nested at most :data:`MAX_KEY_DEPTH`
    levels deep.

    A list is a stable key (``is_stable_key([1])`` is true): it is accepted
    wherever a key is, as the equal tuple (see :func:`normalize_key`).

    Stable keys compare as dict keys do: ``1`` and ``True`` are one key (and
    so are ``(1, "a")`` and ``(True, "a")``), ``"x"`` and ``Symbol("x")`` are
    two.  A table keeps the key object it got first: an owner that declared
    ``1`` and now declares ``True`` keeps the key ``1`` (the commit's upsert
    names the key as declared, ``True``).
    """
    if type(key) in _SCALARS:
        return True
    if type(key) is tuple or type(key) is list:
        return _scan(key) != _BAD
    return False


def check_key(key: object) -> None:
    """Raise ``TypeError`` naming ``key`` unless it is a stable key
    (:func:`is_stable_key`); a key nested too deep gets a ``TypeError`` that
    names its depth and :data:`MAX_KEY_DEPTH`."""
    if type(key) not in _SCALARS and not is_stable_key(key):
        raise _key_error(key)


def normalize_key(key: object) -> StableKey:
    """The normal form of the stable key ``key``: every list in it (at any
    depth, ``key`` itself included) turned into the equal tuple.

    A key that holds no list is returned as it is (no copy), so this is cheap
    for the usual ``str``, ``int`` and tuple keys; a tuple that holds lists is
    copied, and only its parts that hold lists are.  Anything else raises
    ``TypeError`` like :func:`check_key`.  Declarations (:meth:`Buffer.declare`,
    :class:`Declarer`) store the normal form: ``[1, 2]`` and ``(1, 2)`` are
    one key, and (as for any stable keys, see :func:`is_stable_key`) so are
    ``[1]`` and ``(True,)``.
    """
    if type(key) in _SCALARS:
        return key  # type: ignore[return-value]  # one of the scalar types
    out: StableKey | None
    if type(key) is tuple:
        found = _scan(key)
        if found == _PLAIN:
            return key
        if found == _LISTS:
            out = _tupleize(key)
            if out is not None:
                return out
    elif type(key) is list:
        out = _tupleize(key)
        if out is not None:
            return out
    raise _key_error(key)


class Rejection:
    """One declaration a commit did not apply.

    ``kind`` is :data:`CONFLICT` (``holder`` owns the key and keeps it) or
    :data:`EQ_ERROR` (``error`` is what ``==`` raised; the held value stays and
    the declaring owner keeps the key).
    """

    __slots__ = ("error", "holder", "key", "kind", "value")

    def __init__(
        self, kind: str, key: Any, value: Any, holder: object, error: BaseException | None
    ) -> None:
        self.kind = kind
        self.key = key
        self.value = value
        self.holder = holder
        self.error = error

    def __repr__(self) -> str:
        return f"Rejection({self.kind!r}, {self.key!r}, holder={self.holder!r})"


class Commit(Generic[K, V]):
    """What one commit (or release) changed.

    ``upserts`` are ``(key, new value)`` pairs for keys that appeared or whose
    value changed under ``==``, in declaration order (then the keys handed
    to a claimant, in the order the owner first declared them); ``deletes``
    are the keys that disappeared.  ``transfers`` are ``(key, previous
    owner, new owner)`` for keys that changed owner (a key the committing
    owner took over from one that was dropping it, a key it let go that
    went to the key's first claimant): one upsert of the new owner's value,
    or nothing if it is equal under ``==``, never a delete and an insert
    (an empty tuple when there is none).  Each change has a sequence number: the upserts carry
    ``first_seq, first_seq + 1, ...`` and the deletes follow them, up to
    ``last_seq``.  Sequence numbers grow strictly across all commits of a
    table.  ``suppressed`` counts declarations the ``==`` gate turned into
    no-ops.
    """

    __slots__ = (
        "_prev_record",
        "_restore",
        "_serial",
        "_table",
        "_undo",
        "deletes",
        "first_seq",
        "last_seq",
        "owner",
        "rejections",
        "suppressed",
        "transfers",
        "upserts",
    )

    def __init__(self, owner: object, first_seq: int) -> None:
        self.owner = owner
        self.upserts: list[tuple[K, V]] = []
        self.deletes: list[K] = []
        self.rejections: list[Rejection] = []
        self.transfers: list[tuple[K, object, object]] | tuple[()] = ()
        self.suppressed = 0
        self.first_seq = first_seq
        self.last_seq = first_seq - 1
        self._undo: list[tuple[Any, ...]] | None = None
        self._prev_record: Record | None = None
        self._restore: Any = None
        self._table: object = None
        self._serial = 0

    def __len__(self) -> int:
        return len(self.upserts) + len(self.deletes)

    def __bool__(self) -> bool:
        return bool(self.upserts) or bool(self.deletes)

    def __repr__(self) -> str:
        return (
            f"Commit(upserts={len(self.upserts)}, deletes={len(self.deletes)}, "
            f"suppressed={self.suppressed}, rejections={len(self.rejections)}, "
            f"seq={self.first_seq}..{self.last_seq})"
        )


class TableStats:
    """Counters of one table, cheap to keep on."""

    __slots__ = ("changes", "commits", "conflicts", "entries", "eq_errors", "suppressed")

    def __init__(
        self,
        entries: int,
        commits: int,
        changes: int,
        suppressed: int,
        conflicts: int,
        eq_errors: int,
    ) -> None:
        self.entries = entries
        self.commits = commits
        self.changes = changes
        self.suppressed = suppressed
        self.conflicts = conflicts
        self.eq_errors = eq_errors

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TableStats):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.as_dict().items())
        return f"TableStats({fields})"


Record: TypeAlias = "tuple[Any, Any] | dict[Any, Any]"
"""An owner's record in a table: the pair ``(key, value)`` of an owner that
holds one key, else a dict ``{key: value}`` of its keys (two or more)."""

_MISSING: Final[object] = object()
"""What a lookup gives for a key that is not there (values and owners may be ``None``)."""

_NO_RECORD: Final[dict[Any, Any]] = {}

_OBJECT_HASH: Final = object.__hash__
_OBJECT_EQ: Final = object.__eq__


def _okey(owner: object) -> Hashable:
    """The key of ``owner``'s entries in ``_owned``, ``_claimed`` and
    ``_dropping`` (owners are compared by identity).

    An owner whose type hashes and compares as ``object`` does is its own
    key, which costs no int per owner in each table (a runtime component is
    one); any other owner is keyed by its ``id``.  The two kinds never
    compare equal."""
    t = type(owner)
    if t.__hash__ is _OBJECT_HASH and t.__eq__ is _OBJECT_EQ:
        return owner
    return id(owner)


"""The record of an owner that holds nothing (never written to)."""


class Buffer(Generic[K, V]):
    """One owner's declarations into one table during one run.

    :meth:`declare` checks the key and rejects a second declaration of it; the
    buffer is handed to :meth:`Table.commit` when the run ends.
    """

    __slots__ = ("_decls", "owner", "table")

    def __init__(self, table: Table[K, V], owner: object) -> None:
        self.table = table
        self.owner = owner
        self._decls: dict[K, V] = {}

    def declare(self, key: K, value: V) -> None:
        """Buffer ``key -> value``.

        The key is stored in its normal form (:func:`normalize_key`: lists
        become tuples).  Raises ``TypeError`` for a key that is not stable and
        :class:`DuplicateDeclarationError` for a key already declared into
        this buffer (``[1, 2]`` after ``(1, 2)``, or ``True`` after ``1``, is
        the same key); either way the buffer is unchanged.
        """
        decls = self._decls
        if type(key) not in _SCALARS:
            key = normalize_key(key)  # type: ignore[assignment]
        if key in decls:
            raise DuplicateDeclarationError(key, self.owner, self.table.name)
        decls[key] = value

    def __len__(self) -> int:
        return len(self._decls)

    def __contains__(self, key: object) -> bool:
        return key in self._decls

    def items(self) -> list[tuple[K, V]]:
        return list(self._decls.items())


class Declarer(Generic[K, V]):
    """``declarer(key, value)``: declare into ``table`` for the current run.

    The hot path of a declaration in one call.  ``current`` is a
    ``ContextVar`` whose value is ``None`` outside a run, else the run: an
    object with an ``owner`` (the declaring owner) and a writable ``buffers``
    (``None``, or a dict mapping ``target`` to that run's :class:`Buffer` of
    ``table``).  Outside a run the call raises ``missing()``; when the run's
    ``buffers`` is neither ``None`` nor a dict (the marker the runtime leaves
    there once the run has ended), ``missing(marker)``; once ``closed``
    is set it raises ``closed_error()``.  Otherwise it behaves like
    :meth:`Buffer.declare` on the run's buffer, made on first use.
    """

    __slots__ = ("_closed_error", "_current", "_missing", "closed", "table", "target")

    def __init__(
        self,
        table: Table[K, V],
        target: object,
        current: Any,
        missing: Any,
        closed_error: Any,
    ) -> None:
        self.table = table
        self.target = target
        self._current = current
        self._missing = missing
        self._closed_error = closed_error
        self.closed = False

    @staticmethod
    def _subclassed(cls: type[Declarer[Any, Any]]) -> None:
        """``cls``, a subclass made in Python that defines no ``__call__``,
        is called as fast as this class (nothing to do in this core)."""
        if not (isinstance(cls, type) and issubclass(cls, Declarer)):
            raise TypeError(f"{cls!r} is not a Declarer subclass")
        if any("__call__" in vars(c) for c in cls.__mro__[: cls.__mro__.index(Declarer)]):
            raise TypeError(f"{cls.__qualname__} defines its own __call__")

    def __call__(self, key: K, value: V) -> None:
        run = self._current.get(None)
        if run is None:
            raise self._missing()
        if self.closed:
            raise self._closed_error()
        buffers = run.buffers
        if buffers is None:
            buffers = run.buffers = {}
        elif type(buffers) is not dict:  # the run has ended: its marker
            raise self._missing(buffers)
        buffer = buffers.get(self.target)
        if buffer is None:
            buffer = buffers[self.target] = Buffer(self.table, run.owner)
        buffer.declare(key, value)


class Table(Generic[K, V]):
    """A keyed collection of owned target states.

    ``owner`` objects are compared by identity (they need not be hashable).
    With ``track_undo`` each :class:`Commit` remembers enough to be taken back
    with :meth:`revert` (targets whose sink may fail need it; a LiveMap does
    not).
    """

    __slots__ = (
        "_busy",
        "_changes",
        "_claimed",
        "_claims",
        "_commits",
        "_conflicts",
        "_dropping",
        "_eq_errors",
        "_holder",
        "_owned",
        "_seq",
        "_suppressed",
        "_top",
        "_track_undo",
        "name",
    )

    _owner_key = staticmethod(_okey)  # (for livemap_core._claims)

    def __init__(self, name: str = "table", *, track_undo: bool = False) -> None:
        self.name = name
        self._track_undo = bool(track_undo)
        # No object per key.  key -> the owner holding it, in the order the
        # keys were inserted (the order of items()).
        self._holder: dict[K, object] = {}
        # The owners' records: _okey(owner) -> the keys it holds with their held
        # values, in the order it first declared them: the pair (key, value)
        # for an owner of one key (most owners: one per entry), a dict
        # {key: value} for one of two keys or more.  An owner that comes to
        # hold a second key gets a dict in place of its pair, one left with a
        # single key gets a pair again.  A record exists only while the owner
        # holds a key; _holder then refers to the owner, so an id used as a
        # key cannot be reused meanwhile.  With track_undo a record's keys never change in
        # place (a commit that adds or deletes keys puts a new record in its
        # place, and its undo keeps the previous one); held values of a dict
        # are changed in place and the undo remembers the old ones (a pair is
        # replaced: the previous one still holds the old value).
        self._owned: dict[Hashable, Record] = {}
        # Claims and deferred drops (see livemap_core._claims, which handles
        # every commit while any exists): key -> its claimants in claim order;
        # _okey(claimant) -> {key: its value}; _okey(owner) -> {key: None} of the
        # keys it holds but no longer declares, deleted by drop_deferred().
        # All empty in the common case: a commit then costs two checks more.
        self._claims: dict[K, list[object]] = {}
        self._claimed: dict[Hashable, dict[K, V]] = {}
        self._dropping: dict[Hashable, dict[K, None]] = {}
        # Set during a commit: an __eq__ it calls must not change the table
        # under it.
        self._busy = False
        self._seq = 0
        # Commits still in effect (not reverted): the latest one has serial _top.
        self._top = 0
        self._commits = 0
        self._changes = 0
        self._suppressed = 0
        self._conflicts = 0
        self._eq_errors = 0

    # -- writing -------------------------------------------------------------

    def buffer(self, owner: object) -> Buffer[K, V]:
        """A new, empty buffer for one run of ``owner``."""
        return Buffer(self, owner)

    def commit(self, buffer: Buffer[K, V], defer: bool = False) -> Commit[K, V]:
        """Make ``buffer`` the owner's declared set and return what changed.

        Keys the owner held but did not declare this time are let go (in the
        order the owner first declared them): each goes to its first claimant
        (a transfer), or, with ``defer``, stays held until
        :meth:`drop_deferred` (a declaration of it by another owner meanwhile
        takes it over), or is deleted.  Keys held by another owner that still
        declares them are rejected (:data:`CONFLICT`) and left alone, and the
        declaration is remembered as a claim: it is withdrawn by a commit of
        the claimant that does not declare the key again (or its release), and
        the key goes to the claimant with its latest declared value when the
        owner lets it go.  A key that its holder is dropping (``defer``) is
        taken over by the declaring owner.  Values equal (``==``) to
        the held one are suppressed; a comparison that raises an
        ``Exception`` is rejected (:data:`EQ_ERROR`), the held value stays and
        the owner keeps the key.  Anything else that escapes (a
        ``BaseException`` from ``__eq__``: ``KeyboardInterrupt``,
        ``SystemExit``, a cancellation) propagates and leaves the table
        exactly as it was: a commit is all or nothing.

        The table cannot be changed during a commit: a commit, release or
        revert of it from an ``__eq__`` the commit calls raises
        ``RuntimeError`` (so that comparison is an :data:`EQ_ERROR`).  Nor
        can its owners' records be read then (they are half-written):
        ``get()``, ``items()``, ``keys_of()`` and ``count_of()`` raise
        ``RuntimeError`` too.
        """
        if not isinstance(buffer, Buffer):
            raise TypeError(
                f"{self.name}: commit() expects a Buffer of this core, got "
                f"{type(buffer).__module__}.{type(buffer).__qualname__}"
            )
        if buffer.table is not self:
            raise ValueError(f"buffer belongs to {buffer.table.name}, not {self.name}")
        self._check_idle("commit")
        self._busy = True
        try:
            owner = buffer.owner
            if self._claims or (self._dropping and _okey(owner) in self._dropping):
                return self._slow_commit(owner, buffer._decls, defer)
            return self._commit(owner, buffer._decls, defer)
        finally:
            self._busy = False

    def _slow_commit(self, owner: object, decls: dict[K, V], defer: bool) -> Commit[K, V]:
        result: Commit[K, V] = Commit(owner, self._seq + 1)
        record = self._owned.get(_okey(owner))
        undo, suppressed, eq_errors = _slow_commit(
            self, owner, decls, defer, result, Rejection, self._track_undo
        )
        if undo is not None:
            result._undo = []
            result._prev_record = record
            result._restore = undo
            result._table = self
        self._finish(result, suppressed, eq_errors)
        return result

    def _commit(self, owner: object, decls: dict[K, V], defer: bool) -> Commit[K, V]:
        holder = self._holder
        t = type(owner)  # (_okey, inline)
        owner_id = owner if t.__hash__ is _OBJECT_HASH and t.__eq__ is _OBJECT_EQ else id(owner)
        prev = self._owned.get(owner_id)
        if type(prev) is tuple and len(decls) == 1:
            one_key = self._commit_one(owner, owner_id, prev, decls, defer)
            if one_key is not None:
                return one_key
        # The owner's own keys are found in its (smaller) record, with their
        # values; other keys are new or held by another owner.  The pair of
        # an owner of one key is looked at as a dict of its own, made here.
        one = type(prev) is tuple
        record: dict[K, V] | None = {prev[0]: prev[1]} if one else prev  # type: ignore[index, assignment]
        mine = (_NO_RECORD if record is None else record).get
        theirs = holder.get
        undo: list[tuple[Any, ...]] | None = [] if self._track_undo else None
        result: Commit[K, V] = Commit(owner, self._seq + 1)
        upserts = result.upserts
        rejections = result.rejections
        added: dict[K, V] = {}
        # (key, new value) of the owner's keys whose value changed: written
        # to the record once every comparison is done
        changed: list[tuple[K, V]] = []
        eq_errors = 0
        # other owners' deferred drops: a key one of them is dropping is
        # taken over, which only the slow path does
        dropping = self._dropping
        take = False
        try:
            for key, value in decls.items():
                held = mine(key, _MISSING)
                if held is _MISSING:
                    held_by = theirs(key, _MISSING)
                    if held_by is _MISSING:
                        holder[key] = owner
                        added[key] = value
                        upserts.append((key, value))
                        if undo is not None:
                            undo.append((key,))
                    elif dropping and key in dropping.get(_okey(held_by), _NO_RECORD):
                        take = True
                        break
                    else:
                        rejections.append(Rejection(CONFLICT, key, value, held_by, None))
                    continue
                if held is value:
                    continue
                try:
                    if value == held:
                        continue
                except Exception as exc:
                    rejections.append(Rejection(EQ_ERROR, key, value, owner, exc))
                    eq_errors += 1
                    continue
                if undo is not None:
                    undo.append((key, held))
                pair = (key, value)
                upserts.append(pair)
                changed.append(pair)
        except BaseException:
            # Whatever escaped (an __eq__'s BaseException such as
            # KeyboardInterrupt, SystemExit or a cancellation; a buffer changed
            # by one): the commit is all or nothing.  Only the keys inserted so
            # far changed the table; they go again, and it is as it was.
            for key in added:
                del holder[key]
            raise
        if take:  # (nothing else changed yet)
            for key in added:
                del holder[key]
            return self._slow_commit(owner, decls, defer)
        if changed:
            for key, value in changed:
                record[key] = value  # type: ignore[index]  # a held key: a record
        n_added = len(added)
        # Declared keys the owner already held: every declaration that was
        # neither a new key nor a conflict.
        kept = len(decls) - n_added - (len(rejections) - eq_errors)
        suppressed = kept - (len(upserts) - n_added) - eq_errors
        deletes = result.deletes
        claimed = False
        if record is not None and kept < len(record):
            if defer:  # each stays held until drop_deferred()
                self._dropping[owner_id] = {key: None for key in record if key not in decls}
                claimed = True
            else:
                for key in record:
                    if key not in decls:
                        del holder[key]
                        deletes.append(key)
                        if undo is not None:
                            undo.append((key, None, owner))
        if n_added or deletes:
            self._merge(owner_id, record, deletes, added, undo is not None and not one)
        elif one and changed:  # a new pair in place of the old one
            self._owned[owner_id] = (prev[0], changed[0][1])  # type: ignore[index]
        if len(rejections) > eq_errors:  # conflicts: remembered as claims
            _note_claims(self, owner, rejections)
            claimed = True
        if undo is not None:
            result._undo = undo
            result._prev_record = prev
            result._table = self
            if claimed:  # there were no claims, nor deferred drops of the owner
                result._restore = partial(_reset, self, owner_id)
        self._finish(result, suppressed, eq_errors)
        return result

    def _commit_one(
        self,
        owner: object,
        owner_id: Hashable,
        prev: tuple[Any, Any],
        decls: dict[K, V],
        defer: bool,
    ) -> Commit[K, V] | None:
        # The commit of an owner of one key that declares one key (a per-entry
        # run): the == gate alone if it is the key it holds; if it is a key
        # nobody holds (and without defer) the new key inserted, the old one
        # deleted, a new pair.  The same changes and undo steps as _commit;
        # None for anything else (a conflict, a take-over, defer).
        for key, value in decls.items():
            held_key, held = prev
            result: Commit[K, V] = Commit(owner, self._seq + 1)
            suppressed = eq_errors = 0
            if key is held_key or key == held_key:  # stable keys: one dict key when equal
                if held is value:
                    suppressed = 1
                else:
                    same: bool | None
                    try:
                        same = bool(value == held)
                    except Exception as exc:
                        result.rejections.append(Rejection(EQ_ERROR, key, value, owner, exc))
                        eq_errors = 1
                        same = None
                    if len(decls) != 1:  # the buffer changed from that == (as _commit's walk)
                        raise RuntimeError("dictionary changed size during iteration")
                    if same is not None:
                        if same:
                            suppressed = 1
                        else:
                            result.upserts.append((key, value))
                            self._owned[owner_id] = (held_key, value)
                undo: list[tuple[Any, ...]] = [(key, held)] if result.upserts else []
            elif defer or key in self._holder:
                return None
            else:
                holder = self._holder
                holder[key] = owner
                del holder[held_key]
                self._owned[owner_id] = (key, value)
                result.upserts.append((key, value))
                result.deletes.append(held_key)
                undo = [(key,), (held_key, None, owner)]
            if self._track_undo:
                result._undo = undo
                result._prev_record = prev
                result._table = self
            self._finish(result, suppressed, eq_errors)
            return result
        return None

    def _merge(
        self,
        owner_id: Hashable,
        record: dict[K, V] | None,
        deletes: list[K] | tuple[()],
        added: dict[K, V],
        copy: bool,
    ) -> None:
        # The owner's record without ``deletes`` and with ``added``: from a
        # new dict when ``copy`` (track_undo), else from ``record`` changed in
        # place; a pair if one key is left.
        if record is None:
            if added:
                self._owned[owner_id] = _compact(added)
            return
        keys = record.copy() if copy else record
        for key in deletes:
            del keys[key]
        keys.update(added)
        if keys:
            self._owned[owner_id] = _compact(keys)
        else:
            del self._owned[owner_id]

    def _check_idle(self, what: str) -> None:
        if self._busy:
            raise RuntimeError(f"{self.name}: {what}() called during a commit of this table")

    def release(self, owner: object) -> Commit[K, V]:
        """Let go of every key ``owner`` holds (the owner went away): each
        goes to its first claimant (a transfer) or is deleted; the owner's own
        claims are withdrawn (an ``__eq__`` it calls, comparing a
        claimant's value with the held one, cannot change the table: that
        raises ``RuntimeError``)."""
        self._check_idle("release")
        result: Commit[K, V] = Commit(owner, self._seq + 1)
        if self._claims or (self._dropping and _okey(owner) in self._dropping):
            return self._slow(owner, result, _slow_release)
        record = self._owned.pop(_okey(owner), None)
        undo: list[tuple[Any, ...]] | None = [] if self._track_undo else None
        if record is not None:
            holder = self._holder
            deletes = result.deletes
            for key in (record[0],) if type(record) is tuple else record:
                del holder[key]
                deletes.append(key)
                if undo is not None:
                    undo.append((key, None, owner))
        if undo is not None:
            result._undo = undo
            result._prev_record = record
            result._table = self
        self._finish(result, 0, 0)
        return result

    def drop_deferred(self, owner: object) -> Commit[K, V]:
        """Let go of the keys ``owner`` stopped declaring in commits made with
        ``defer`` and has not declared again since: each goes to its first
        claimant or is deleted."""
        self._check_idle("drop_deferred")
        result: Commit[K, V] = Commit(owner, self._seq + 1)
        return self._slow(owner, result, _drop_deferred)

    def drop_deferred_many(self, owners: Iterable[object]) -> Commit[K, V]:
        """:meth:`drop_deferred` of each of ``owners`` in turn, as one commit
        (one revert takes it back); its ``owner`` is the list of them.  An
        owner listed twice counts once."""
        self._check_idle("drop_deferred_many")
        group = list(owners)
        result: Commit[K, V] = Commit(group, self._seq + 1)
        self._busy = True
        try:
            undo = _drop_deferred_many(self, group, result, self._track_undo)
        finally:
            self._busy = False
        if self._track_undo:
            result._undo = []
            result._prev_record = None  # (no record is the list's)
            result._restore = undo
            result._table = self
        self._finish(result, result.suppressed, 0)
        return result

    def _slow(self, owner: object, result: Commit[K, V], step: Any) -> Commit[K, V]:
        record = self._owned.get(_okey(owner))
        # (an __eq__ it calls, a claimant's value against the held one,
        # cannot change the table meanwhile)
        self._busy = True
        try:
            undo = step(self, owner, result, self._track_undo)
        finally:
            self._busy = False
        if self._track_undo:
            result._undo = []
            result._prev_record = record
            result._restore = undo
            result._table = self
        self._finish(result, result.suppressed, 0)
        return result

    def _finish(self, result: Commit[K, V], suppressed: int, eq_errors: int) -> None:
        n = len(result.upserts) + len(result.deletes)
        self._seq += n
        result.last_seq = self._seq
        result.suppressed = suppressed
        self._commits += 1
        self._top += 1
        result._serial = self._top
        self._changes += n
        self._suppressed += suppressed
        self._conflicts += len(result.rejections) - eq_errors
        self._eq_errors += eq_errors

    def revert(self, result: Commit[K, V]) -> None:
        """Take back ``result``, which must be this table's latest commit.

        Entries and the owner's record return to what they were before it;
        sequence numbers keep growing; the change counters drop back.  Once it
        is taken back, the commit before it is the latest again, so a run of
        commits can be taken back newest first.
        """
        if not isinstance(result, Commit):
            raise TypeError(
                f"{self.name}: revert() expects a Commit of this core, got "
                f"{type(result).__module__}.{type(result).__qualname__}"
            )
        self._check_idle("revert")
        undo = result._undo
        if undo is None:
            raise ValueError(
                f"{self.name}: only a commit of a table made with track_undo=True "
                "can be reverted, once"
            )
        if result._table is not self:
            raise ValueError(f"{self.name}: the commit was made by another table")
        if result._serial != self._top:
            raise ValueError(f"{self.name}: only the latest commit can be reverted")
        # The owner's record as it was before the commit (with the values
        # held now), then each step taken back, newest first.
        record = result._prev_record
        owner_id = _okey(result.owner)
        if record is None:
            self._owned.pop(owner_id, None)
        else:
            self._owned[owner_id] = record
        holder = self._holder
        for step in reversed(undo):
            if len(step) == 2:  # (key, held value): an update
                if type(record) is dict:  # (a pair was replaced: it has the old value)
                    record[step[0]] = step[1]
            elif len(step) == 1:  # (key,): an insert
                del holder[step[0]]
            else:  # (key, None, owner): a delete (the record still has the key)
                holder[step[0]] = step[2]
        if result._restore is not None:  # claims, transfers, deferred drops
            result._restore()
            result._restore = None
        self._changes -= len(result.upserts) + len(result.deletes)
        self._top -= 1
        result._undo = None

    # -- reading -------------------------------------------------------------

    def get(self, key: K, default: Any = None) -> Any:
        """The value held for ``key``, or ``default``."""
        if self._busy:
            self._check_idle("get")
        owner = self._holder.get(key, _MISSING)
        if owner is _MISSING:
            return default
        t = type(owner)  # (_okey, inline: one call fewer per read)
        record = self._owned[
            owner if t.__hash__ is _OBJECT_HASH and t.__eq__ is _OBJECT_EQ else id(owner)
        ]
        return record[1] if type(record) is tuple else record[key]  # type: ignore[call-overload]

    def owner_of(self, key: K, default: Any = None) -> Any:
        """The owner holding ``key``, or ``default``."""
        return self._holder.get(key, default)

    def keys_of(self, owner: object) -> frozenset[K]:
        """The keys ``owner`` holds."""
        if self._busy:
            self._check_idle("keys_of")
        record = self._owned.get(_okey(owner))
        if record is None:
            return frozenset()
        return frozenset((record[0],) if type(record) is tuple else record)

    def count_of(self, owner: object) -> int:
        """How many keys ``owner`` holds."""
        if self._busy:
            self._check_idle("count_of")
        t = type(owner)  # (_okey, inline)
        record = self._owned.get(
            owner if t.__hash__ is _OBJECT_HASH and t.__eq__ is _OBJECT_EQ else id(owner)
        )
        if record is None:
            return 0
        return 1 if type(record) is tuple else len(record)

    def claims_of(self, owner: object) -> frozenset[K]:
        """The keys ``owner`` claims: keys another owner holds and still
        declares, which ``owner`` declared in its latest commit."""
        return frozenset(self._claimed.get(_okey(owner), ()))

    def claimants(self, key: K) -> tuple[object, ...]:
        """The owners claiming ``key``, first claim first."""
        return tuple(self._claims.get(key, ()))

    def lets_go(self, buffer: Buffer[K, V]) -> bool:
        """Whether committing ``buffer`` could let go of a key its owner holds:
        one it does not declare again (with ``defer``, it would be kept
        dropping), or the owner has deferred drops pending.  False means the
        commit's ``defer`` makes no difference, so a caller can skip working
        it out.  Reads the owner's record as :meth:`count_of` does."""
        if not isinstance(buffer, Buffer):
            raise TypeError(
                f"{self.name}: lets_go() expects a Buffer of this core, got "
                f"{type(buffer).__module__}.{type(buffer).__qualname__}"
            )
        if buffer.table is not self:
            raise ValueError(f"buffer belongs to {buffer.table.name}, not {self.name}")
        if self._busy:
            self._check_idle("lets_go")
        owner = buffer.owner
        t = type(owner)  # (_okey, inline)
        owner_id = owner if t.__hash__ is _OBJECT_HASH and t.__eq__ is _OBJECT_EQ else id(owner)
        record = self._owned.get(owner_id)
        if record is None:
            return False
        if self._dropping and owner_id in self._dropping:
            return True
        decls = buffer._decls
        if type(record) is tuple:
            return record[0] not in decls
        if len(decls) < len(record):
            return True
        return any(key not in decls for key in record)

    def deferred_of(self, owner: object) -> frozenset[K]:
        """The keys ``owner`` holds but stopped declaring in a commit made
        with ``defer``: they wait for :meth:`drop_deferred`."""
        dropping = self._dropping
        if not dropping:  # (the common case)
            return frozenset()
        return frozenset(dropping.get(_okey(owner), ()))

    def owners(self) -> int:
        """How many owners hold at least one key."""
        return len(self._owned)

    def keys(self) -> list[K]:
        """A snapshot of all keys, in the order of :meth:`items`."""
        return list(self._holder)

    def items(self) -> list[tuple[K, V]]:
        """A snapshot of all ``(key, value)`` pairs."""
        if self._busy:
            self._check_idle("items")
        owned = self._owned
        out: list[tuple[K, V]] = []
        last: object = _MISSING
        record: Record = _NO_RECORD
        for key, owner in self._holder.items():
            if owner is not last:
                record = owned[_okey(owner)]
                last = owner
            out.append((key, record[1] if type(record) is tuple else record[key]))  # type: ignore[call-overload]
        return out

    def __len__(self) -> int:
        return len(self._holder)

    def __contains__(self, key: object) -> bool:
        return key in self._holder

    @property
    def seq(self) -> int:
        """The sequence number of the latest change (0 before any)."""
        return self._seq

    def stats(self) -> TableStats:
        """A snapshot of the counters."""
        return TableStats(
            len(self._holder),
            self._commits,
            self._changes,
            self._suppressed,
            self._conflicts,
            self._eq_errors,
        )

    def __repr__(self) -> str:
        return f"<Table {self.name} entries={len(self._holder)} seq={self._seq}>"
