"""The compiled core: a typed twin of :mod:`livemap_core._fallback`.

Same public names, same attributes, same behaviour, same exceptions and
messages, same order of upserts, deletes and rejections.  The pure-Python
module is the reference and documents the API; every change there must be
made here too (``tests/test_core_differential.py`` compares the two).

Compiler directives (``language_level=3``, no bounds or wraparound checks,
...) are set in ``setup.py``.
"""

cimport cython
from cpython.contextvars cimport get_value_no_default
from cpython.dict cimport PyDict_GetItemWithError, PyDict_Next, PyDict_SetDefault
from cpython.long cimport PyLong_FromVoidPtr
from cpython.object cimport Py_TYPE, PyObject, PyTypeObject

import uuid
from functools import partial
from types import GenericAlias

from livemap_core._claims import drop_deferred as _drop_deferred
from livemap_core._claims import drop_deferred_many as _drop_deferred_many
from livemap_core._claims import note_claims as _note_claims
from livemap_core._claims import reset as _reset
from livemap_core._claims import slow_commit as _slow_commit
from livemap_core._claims import slow_release as _slow_release
from livemap_core._shared import MAX_KEY_DEPTH, DuplicateDeclarationError, Symbol, _key_error

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

cdef extern from "Python.h":
    Py_ssize_t PyDict_GET_SIZE(object d)
    # no "except" clause: -1 (error set) is handled by the caller
    int _rich_eq "PyObject_RichCompareBool" (object a, object b, int op)
    enum: Py_EQ

cdef str _CONFLICT = "conflict"
cdef str _EQ_ERROR = "eq_error"
cdef dict _NO_DROPS = {}
cdef frozenset _NO_KEYS = frozenset()

CONFLICT = _CONFLICT
"""Rejection kind: the key is held by another owner."""
EQ_ERROR = _EQ_ERROR
"""Rejection kind: comparing the new value with the held one raised."""

cdef object _UUID = uuid.UUID
cdef object _SYMBOL = Symbol
cdef Py_ssize_t _MAX_DEPTH = MAX_KEY_DEPTH


# -- owners --------------------------------------------------------------------

cdef PyTypeObject* _OBJECT = <PyTypeObject*>object


cdef inline object _okey(object owner):
    # The key of an owner's entries in _owned, _claimed and _dropping
    # (owners are compared by identity): an owner whose type hashes and
    # compares as object does is its own key, which costs no int per owner
    # in each table (a runtime component is one); any other owner is keyed
    # by its id.  The two kinds never compare equal.
    cdef PyTypeObject* t = Py_TYPE(owner)
    if t.tp_hash == _OBJECT.tp_hash and t.tp_richcompare == _OBJECT.tp_richcompare:
        return owner
    return PyLong_FromVoidPtr(<void*>owner)


# -- keys ----------------------------------------------------------------------


cdef inline bint _is_scalar(object key) noexcept:
    cdef object t = type(key)
    return (
        t is str
        or t is int
        or key is None
        or t is bool
        or t is bytes
        or t is _SYMBOL
        or t is _UUID
    )


# What a walk of a tuple or list key found (see _fallback).
cdef enum:
    _BAD = 0  # not a stable key
    _PLAIN = 1  # a stable key that holds no list: its own normal form
    _LISTS = 2  # a stable key once its lists are tuples


cdef inline int _scan_part(object part, Py_ssize_t level) except -1:
    # One part of a tuple or list at nesting ``level``.
    cdef object t
    if _is_scalar(part):
        return _PLAIN
    t = type(part)
    if t is tuple or t is list:
        if level >= _MAX_DEPTH:
            return _BAD
        return _scan(part, level + 1)
    return _BAD


cdef int _scan(object seq, Py_ssize_t level) except -1:
    # Whether the tuple or list ``seq``, at nesting ``level`` (a key is at
    # level 1), is stable, and whether it holds a list (itself included).
    # Recursive, but never deeper than MAX_KEY_DEPTH.
    cdef int found
    cdef int sub
    cdef object part
    if type(seq) is tuple:
        found = _PLAIN
        for part in <tuple>seq:
            if _is_scalar(part):
                continue
            sub = _scan_part(part, level)
            if sub == _BAD:
                return _BAD
            if sub == _LISTS:
                found = _LISTS
    else:
        found = _LISTS
        for part in <list>seq:
            if _is_scalar(part):
                continue
            if _scan_part(part, level) == _BAD:
                return _BAD
    return found


cdef object _tupleize(object seq, Py_ssize_t level):
    # The normal form of the tuple or list ``seq`` at nesting ``level``: each
    # list a tuple, each tuple that holds no list kept as it is.  None if
    # ``seq`` is not stable.  Recursive, but never deeper than MAX_KEY_DEPTH.
    cdef list parts = []
    cdef bint changed = type(seq) is list
    cdef object part, t, done
    for part in seq:
        if not _is_scalar(part):
            t = type(part)
            if t is not tuple and t is not list:
                return None
            if level >= _MAX_DEPTH:
                return None
            done = _tupleize(part, level + 1)
            if done is None:
                return None
            if done is not part:
                changed = True
                part = done
        parts.append(part)
    if not changed:
        return seq
    return tuple(parts)


cdef inline bint _is_stable(object key) except -1:
    cdef object t
    if _is_scalar(key):
        return True
    t = type(key)
    if t is tuple or t is list:
        return _scan(key, 1) != _BAD
    return False


cdef int _raise_unstable(object key) except -1:
    raise _key_error(key)


cdef object _normalize(object key):
    # The key itself when it holds no list (no allocation), else its tuple form.
    cdef object t = type(key)
    cdef object out
    cdef int found
    if t is tuple:
        found = _scan(key, 1)
        if found == _PLAIN:
            return key
        if found == _LISTS:
            out = _tupleize(key, 1)
            if out is not None:
                return out
    elif t is list:
        out = _tupleize(key, 1)
        if out is not None:
            return out
    elif _is_scalar(key):
        return key
    _raise_unstable(key)


def is_stable_key(key):
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
    return _is_stable(key)


def check_key(key):
    """Raise ``TypeError`` naming ``key`` unless it is a stable key
    (:func:`is_stable_key`); a key nested too deep gets a ``TypeError`` that
    names its depth and :data:`MAX_KEY_DEPTH`."""
    if not _is_stable(key):
        _raise_unstable(key)


def normalize_key(key):
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
    if _is_scalar(key):
        return key
    return _normalize(key)


# -- results -------------------------------------------------------------------


cdef class Rejection:
    """One declaration a commit did not apply.

    ``kind`` is :data:`CONFLICT` (``holder`` owns the key and keeps it) or
    :data:`EQ_ERROR` (``error`` is what ``==`` raised; the held value stays and
    the declaring owner keeps the key).
    """

    cdef public object kind
    cdef public object key
    cdef public object value
    cdef public object holder
    cdef public object error

    def __init__(self, kind, key, value, holder, error):
        self.kind = kind
        self.key = key
        self.value = value
        self.holder = holder
        self.error = error

    def __repr__(self):
        return f"Rejection({self.kind!r}, {self.key!r}, holder={self.holder!r})"


cdef Rejection _new_rejection(object kind, object key, object value, object holder, object error):
    cdef Rejection r = Rejection.__new__(Rejection)
    r.kind = kind
    r.key = key
    r.value = value
    r.holder = holder
    r.error = error
    return r


cdef class Commit:
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

    cdef public object owner
    cdef public list upserts
    cdef public list deletes
    cdef public list rejections
    cdef public object transfers
    cdef public Py_ssize_t suppressed
    cdef public Py_ssize_t first_seq
    cdef public Py_ssize_t last_seq
    cdef list _undo
    cdef object _prev_record
    cdef object _restore
    cdef object _table
    cdef Py_ssize_t _serial

    def __cinit__(self):
        self.upserts = []
        self.deletes = []
        self.rejections = []
        self.transfers = ()

    def __init__(self, owner, Py_ssize_t first_seq):
        self.owner = owner
        self.upserts = []
        self.deletes = []
        self.rejections = []
        self.transfers = ()
        self.suppressed = 0
        self.first_seq = first_seq
        self.last_seq = first_seq - 1
        self._undo = None
        self._prev_record = None
        self._restore = None
        self._table = None
        self._serial = 0

    __class_getitem__ = classmethod(GenericAlias)

    def __len__(self):
        return len(self.upserts) + len(self.deletes)

    def __bool__(self):
        return bool(self.upserts) or bool(self.deletes)

    def __repr__(self):
        return (
            f"Commit(upserts={len(self.upserts)}, deletes={len(self.deletes)}, "
            f"suppressed={self.suppressed}, rejections={len(self.rejections)}, "
            f"seq={self.first_seq}..{self.last_seq})"
        )


cdef inline Commit _new_commit(object owner, Py_ssize_t first_seq):
    cdef Commit c = Commit.__new__(Commit)
    c.owner = owner
    c.first_seq = first_seq
    c.last_seq = first_seq - 1
    return c


cdef class TableStats:
    """Counters of one table, cheap to keep on."""

    cdef public object entries
    cdef public object commits
    cdef public object changes
    cdef public object suppressed
    cdef public object conflicts
    cdef public object eq_errors

    def __init__(self, entries, commits, changes, suppressed, conflicts, eq_errors):
        self.entries = entries
        self.commits = commits
        self.changes = changes
        self.suppressed = suppressed
        self.conflicts = conflicts
        self.eq_errors = eq_errors

    def as_dict(self):
        return {
            "changes": self.changes,
            "commits": self.commits,
            "conflicts": self.conflicts,
            "entries": self.entries,
            "eq_errors": self.eq_errors,
            "suppressed": self.suppressed,
        }

    def __eq__(self, other):
        if not isinstance(other, TableStats):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    __hash__ = None

    def __repr__(self):
        fields = ", ".join(f"{k}={v}" for k, v in self.as_dict().items())
        return f"TableStats({fields})"


# -- buffers and tables --------------------------------------------------------


cdef class Buffer:
    """One owner's declarations into one table during one run.

    :meth:`declare` checks the key and rejects a second declaration of it; the
    buffer is handed to :meth:`Table.commit` when the run ends.
    """

    cdef public object table
    cdef public object owner
    cdef dict _decls

    def __cinit__(self):
        self._decls = {}

    def __init__(self, table, owner):
        self.table = table
        self.owner = owner
        self._decls = {}

    __class_getitem__ = classmethod(GenericAlias)

    def declare(self, key, value):
        """Buffer ``key -> value``.

        The key is stored in its normal form (:func:`normalize_key`: lists
        become tuples).  Raises ``TypeError`` for a key that is not stable and
        :class:`DuplicateDeclarationError` for a key already declared into
        this buffer (``[1, 2]`` after ``(1, 2)``, or ``True`` after ``1``, is
        the same key); either way the buffer is unchanged.
        """
        self._declare(key, value)

    cdef int _declare(self, object key, object value) except -1:
        cdef dict decls = self._decls
        cdef Py_ssize_t n
        if not _is_scalar(key):
            key = _normalize(key)
        n = PyDict_GET_SIZE(decls)
        PyDict_SetDefault(decls, key, value)
        if PyDict_GET_SIZE(decls) == n:
            raise DuplicateDeclarationError(key, self.owner, self.table.name)
        return 0

    def __len__(self):
        return len(self._decls)

    def __contains__(self, key):
        return key in self._decls

    def items(self):
        return list(self._decls.items())


# A declarer is called once per declaration, so it takes the vectorcall
# protocol (no argument tuple per call): ``declarer(key, value)`` goes straight
# to ``_declare_call``.  Any other call (keywords, a wrong number of arguments)
# goes to the ``__call__`` Cython generates, which parses and checks the
# arguments as for any function.  Cython makes ``tp_call`` only; the pointer
# per instance and the type's flag are set here.
cdef extern from *:
    """
    typedef int (*__livemap_declare_t)(PyObject *, PyObject *, PyObject *);
    static __livemap_declare_t __livemap_declare_impl = NULL;
    static ternaryfunc __livemap_declare_tp_call = NULL;

    static PyObject *__livemap_declarer_vectorcall(
        PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
    {
        Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
        Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
        PyObject *tuple, *kwargs = NULL, *result;
        Py_ssize_t i;
        if (nargs == 2 && nkw == 0) {
            if (__livemap_declare_impl(callable, args[0], args[1]) < 0)
                return NULL;
            Py_RETURN_NONE;
        }
        tuple = PyTuple_New(nargs);
        if (tuple == NULL)
            return NULL;
        for (i = 0; i < nargs; i++) {
            Py_INCREF(args[i]);
            PyTuple_SET_ITEM(tuple, i, args[i]);
        }
        if (nkw) {
            kwargs = PyDict_New();
            if (kwargs == NULL) {
                Py_DECREF(tuple);
                return NULL;
            }
            for (i = 0; i < nkw; i++) {
                if (PyDict_SetItem(kwargs, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0) {
                    Py_DECREF(tuple);
                    Py_DECREF(kwargs);
                    return NULL;
                }
            }
        }
        result = __livemap_declare_tp_call(callable, tuple, kwargs);
        Py_DECREF(tuple);
        Py_XDECREF(kwargs);
        return result;
    }

    static vectorcallfunc __livemap_declarer_vc = __livemap_declarer_vectorcall;

    static void __livemap_fast_calls(PyObject *type, Py_ssize_t offset)
    {
        PyTypeObject *t = (PyTypeObject *)type;
        if (__livemap_declare_tp_call == NULL)
            __livemap_declare_tp_call = t->tp_call;
        t->tp_vectorcall_offset = offset;
        t->tp_flags |= Py_TPFLAGS_HAVE_VECTORCALL;
        PyType_Modified(t);
    }
    """
    ctypedef void (*_vectorcallfunc "vectorcallfunc")()
    ctypedef int (*_declare_t)(object, object, object) except -1
    _declare_t __livemap_declare_impl
    _vectorcallfunc __livemap_declarer_vc
    void __livemap_fast_calls(object type, Py_ssize_t offset)


cdef Py_ssize_t _vectorcall_offset = 0


cdef class Declarer:
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

    cdef _vectorcallfunc _vectorcall
    cdef public object table
    cdef public object target
    cdef object _current
    cdef object _missing
    cdef object _closed_error
    cdef public bint closed

    def __cinit__(self, *args, **kwargs):
        self._vectorcall = __livemap_declarer_vc

    @staticmethod
    def _subclassed(cls):
        """``cls``, a subclass made in Python that defines no ``__call__``,
        is called as fast as this class (before 3.12 such a subclass does not
        inherit the vectorcall protocol)."""
        if not (isinstance(cls, type) and issubclass(cls, Declarer)):
            raise TypeError(f"{cls!r} is not a Declarer subclass")
        if any("__call__" in vars(c) for c in cls.__mro__[: cls.__mro__.index(Declarer)]):
            raise TypeError(f"{cls.__qualname__} defines its own __call__")
        __livemap_fast_calls(cls, _vectorcall_offset)

    def __init__(self, table, target, current, missing, closed_error):
        self.table = table
        self.target = target
        self._current = current
        self._missing = missing
        self._closed_error = closed_error
        self.closed = False

    __class_getitem__ = classmethod(GenericAlias)

    def __call__(self, key, value):
        # (a call with keywords; a positional one takes the vectorcall)
        _declare_call(self, key, value)


cdef int _declare_call(object declarer, object key, object value) except -1:
    # ``Declarer.__call__``, as its vectorcall calls it
    cdef Declarer self = <Declarer>declarer
    # the C-API read of the ContextVar: no method lookup and call
    cdef object run = get_value_no_default(self._current, None)
    cdef object found
    cdef dict buffers
    cdef Buffer buf
    cdef PyObject* hit
    if run is None:
        raise self._missing()
    if self.closed:
        raise self._closed_error()
    found = run.buffers
    if found is None:
        buffers = {}
        run.buffers = buffers
    elif type(found) is not dict:  # the run has ended: its marker
        raise self._missing(found)
    else:
        buffers = <dict>found
    hit = PyDict_GetItemWithError(buffers, self.target)
    if hit == NULL:
        buf = Buffer.__new__(Buffer)
        buf.table = self.table
        buf.owner = run.owner
        buffers[self.target] = buf
    else:
        buf = <Buffer?><object>hit
    buf._declare(key, value)
    return 0


cdef Py_ssize_t _offset_of_vectorcall():
    cdef Declarer probe = Declarer.__new__(Declarer)
    return <char*>&probe._vectorcall - <char*><PyObject*>probe


__livemap_declare_impl = _declare_call
_vectorcall_offset = _offset_of_vectorcall()
__livemap_fast_calls(Declarer, _vectorcall_offset)


cdef int _raise_current() except -1:
    # Called with an exception set (by a C-API call that returned an error):
    # hands it to Cython's error handling, so that an ``except`` clause sees it.
    return -1


cdef inline bint _same_key(object a, object b) except -1:
    # Whether two stable keys are one dict key.  A false "no" only costs a
    # hash lookup later, so keys of different types are simply "no" (even
    # 1 and True, which a dict takes for one key).
    cdef int same
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    same = _rich_eq(a, b, Py_EQ)
    if same < 0:
        _raise_current()
    return same


# How the commit loop walks the owner's record alongside its declarations:
# a run usually declares its keys in the same order as last time, so the next
# record entry is usually the one wanted, found without hashing.  A declared
# key is looked for this many entries ahead (skipping keys no longer
# declared); after this many misses in a row the walk gives up.
cdef enum:
    _LOOKAHEAD = 4
    _MAX_MISSES = 8


cdef object _compact(dict keys):
    # The record of an owner holding ``keys`` (not empty): the pair
    # (key, value) of its one key, else the dict itself (see _fallback).
    cdef Py_ssize_t pos = 0
    cdef PyObject* k
    cdef PyObject* v
    if PyDict_GET_SIZE(keys) == 1 and PyDict_Next(keys, &pos, &k, &v):
        return (<object>k, <object>v)
    return keys


cdef inline object _type_name(object obj):
    cdef object t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


cdef class Table:
    """A keyed collection of owned target states.

    ``owner`` objects are compared by identity (they need not be hashable).
    With ``track_undo`` each :class:`Commit` remembers enough to be taken back
    with :meth:`revert` (targets whose sink may fail need it; a LiveMap does
    not).
    """

    cdef public object name
    cdef bint _track_undo
    # No object per key (see _fallback): key -> the owner holding it, in
    # insertion order; and the owner's key (_okey) -> its record, the keys it holds with
    # their held values in first-declaration order: the pair (key, value) for
    # an owner of one key, a dict {key: value} for one of two keys or more.
    cdef public dict _holder
    cdef public dict _owned
    # claims and deferred drops (see _fallback and livemap_core._claims,
    # which handles every commit while any exists)
    cdef public dict _claims
    cdef public dict _claimed
    cdef public dict _dropping
    # set during a commit (see _fallback)
    cdef bint _busy
    cdef Py_ssize_t _seq
    # commits still in effect (not reverted): the latest one has serial _top
    cdef Py_ssize_t _top
    cdef Py_ssize_t _commits
    cdef Py_ssize_t _changes
    cdef Py_ssize_t _suppressed
    cdef Py_ssize_t _conflicts
    cdef Py_ssize_t _eq_errors

    def __cinit__(self):
        self._holder = {}
        self._owned = {}
        self._claims = {}
        self._claimed = {}
        self._dropping = {}

    def __init__(self, name="table", *, track_undo=False):
        self.name = name
        self._track_undo = track_undo
        self._holder = {}
        self._owned = {}
        self._claims = {}
        self._claimed = {}
        self._dropping = {}
        self._busy = False
        self._seq = 0
        self._top = 0
        self._commits = 0
        self._changes = 0
        self._suppressed = 0
        self._conflicts = 0
        self._eq_errors = 0

    __class_getitem__ = classmethod(GenericAlias)

    def _owner_key(self, owner):
        """The key of ``owner``'s entries (for livemap_core._claims)."""
        return _okey(owner)

    # -- writing -------------------------------------------------------------

    def buffer(self, owner):
        """A new, empty buffer for one run of ``owner``."""
        cdef Buffer buf = Buffer.__new__(Buffer)
        buf.table = self
        buf.owner = owner
        return buf

    def commit(self, buffer, bint defer=False):
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
        cdef Buffer buf
        if not isinstance(buffer, Buffer):
            raise TypeError(
                f"{self.name}: commit() expects a Buffer of this core, got {_type_name(buffer)}"
            )
        buf = <Buffer>buffer
        if buf.table is not self:
            raise ValueError(f"buffer belongs to {buf.table.name}, not {self.name}")
        self._check_idle("commit")
        self._busy = True
        try:
            if self._claims or (
                self._dropping and _okey(buf.owner) in self._dropping
            ):
                return self._slow_commit(buf.owner, buf._decls, defer)
            return self._commit(buf.owner, buf._decls, defer)
        finally:
            self._busy = False

    cdef Commit _slow_commit(self, object owner, dict decls, bint defer):
        cdef Commit result = _new_commit(owner, self._seq + 1)
        cdef object record = self._owned.get(_okey(owner))
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

    cdef Commit _commit(self, object owner, dict decls, bint defer):
        cdef object owner_id, key, value, held, prev
        cdef dict record
        cdef bint one
        cdef dict holder = self._holder
        cdef dict added = {}
        cdef list undo, upserts, rejections, deletes
        # (key, new value) of the owner's keys whose value changed: written
        # to the record once every comparison is done (made on first use)
        cdef list changed = None
        cdef tuple pair
        cdef Commit result
        cdef PyObject* found
        cdef bint track = self._track_undo
        cdef Py_ssize_t eq_errors = 0
        cdef Py_ssize_t n_added, kept, suppressed
        cdef Py_ssize_t rpos = 0
        cdef Py_ssize_t probe, rsize = 0
        cdef PyObject* rkey
        cdef PyObject* rval
        cdef int step
        cdef int misses = 0
        cdef int same, j
        # record keys the walk stepped over; and whether every declared key
        # the owner held was found by the walk (then the keys stepped over and
        # those after the walk's end are exactly the ones not declared)
        cdef PyObject* passed_keys[_LOOKAHEAD]
        cdef list passed = []
        cdef bint clean
        cdef bint walk
        cdef bint claimed = False
        cdef list gone
        # other owners' deferred drops: a key one of them is dropping is
        # taken over, which only the slow path does
        cdef dict dropping = self._dropping
        cdef bint take = False

        owner_id = _okey(owner)
        found = PyDict_GetItemWithError(self._owned, owner_id)
        prev = <object>found if found is not NULL else None
        # the pair of an owner of one key is looked at as a dict of its own
        one = type(prev) is tuple
        if one:
            if PyDict_GET_SIZE(decls) == 1:
                result = self._commit_one(owner, owner_id, <tuple>prev, decls, defer)
                if result is not None:
                    return result
            record = {(<tuple>prev)[0]: (<tuple>prev)[1]}
        else:
            record = <dict>prev
        walk = clean = record is not None
        if walk:
            rsize = PyDict_GET_SIZE(record)
        undo = [] if track else None
        result = _new_commit(owner, self._seq + 1)
        upserts = result.upserts
        rejections = result.rejections
        deletes = result.deletes

        try:
            for key, value in decls.items():
                # The owner's own keys are found in its (smaller) record, with
                # their values; other keys are new or held by another owner.
                found = NULL
                if walk:
                    if PyDict_GET_SIZE(record) == rsize:
                        probe = rpos
                        for step in range(_LOOKAHEAD):
                            if not PyDict_Next(record, &probe, &rkey, &rval):
                                break
                            if _same_key(<object>rkey, key):
                                found = rval
                                rpos = probe
                                misses = 0
                                for j in range(step):
                                    passed.append(<object>passed_keys[j])
                                break
                            passed_keys[step] = rkey
                        if found is NULL:
                            misses += 1
                            walk = misses < _MAX_MISSES
                    else:  # the record changed size (it cannot during a commit)
                        walk = clean = False
                if found is NULL and record is not None:
                    found = PyDict_GetItemWithError(record, key)
                    if found is not NULL:
                        clean = False
                if found is NULL:
                    found = PyDict_GetItemWithError(holder, key)
                    if found is NULL:
                        holder[key] = owner
                        added[key] = value
                        upserts.append((key, value))
                        if track:
                            undo.append((key,))
                    elif dropping and key in dropping.get(
                        _okey(<object>found), _NO_DROPS
                    ):
                        take = True
                        break
                    else:
                        rejections.append(
                            _new_rejection(_CONFLICT, key, value, <object>found, None)
                        )
                    continue
                held = <object>found
                if held is value:
                    continue
                same = _rich_eq(value, held, Py_EQ)  # bool(value == held)
                if same > 0:
                    continue
                if same < 0:
                    try:
                        _raise_current()
                    except Exception as exc:
                        rejections.append(_new_rejection(_EQ_ERROR, key, value, owner, exc))
                        eq_errors += 1
                        continue
                if track:
                    undo.append((key, held))
                pair = (key, value)
                upserts.append(pair)
                if changed is None:
                    changed = [pair]
                else:
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
        if changed is not None:
            for pair in changed:
                # the key is there: the record keeps its layout
                record[pair[0]] = pair[1]
        n_added = len(added)
        # Declared keys the owner already held: every declaration that was
        # neither a new key nor a conflict.
        kept = len(decls) - n_added - (len(rejections) - eq_errors)
        suppressed = kept - (len(upserts) - n_added) - eq_errors
        gone = deletes
        if defer:  # each stays held until drop_deferred()
            gone = []
        if clean and PyDict_GET_SIZE(record) == rsize:
            for key in passed:
                gone.append(key)
            while PyDict_Next(record, &rpos, &rkey, &rval):
                gone.append(<object>rkey)
        elif record is not None and kept < PyDict_GET_SIZE(record):
            for key in record:
                if key not in decls:
                    gone.append(key)
        if defer:
            if gone:
                self._dropping[owner_id] = dict.fromkeys(gone)
                claimed = True
        else:
            for key in deletes:
                del holder[key]
                if track:
                    undo.append((key, None, owner))
        if n_added or deletes:
            self._merge(owner_id, record, deletes, added, track and not one)
        elif one and changed is not None:  # a new pair in place of the old one
            self._owned[owner_id] = ((<tuple>prev)[0], (<tuple>changed[0])[1])
        if len(rejections) > eq_errors:  # conflicts: remembered as claims
            _note_claims(self, owner, rejections)
            claimed = True
        if track:
            result._undo = undo
            result._prev_record = prev
            result._table = self
            if claimed:  # there were no claims, nor deferred drops of the owner
                result._restore = partial(_reset, self, owner_id)
        self._finish(result, suppressed, eq_errors)
        return result

    cdef Commit _commit_one(
        self, object owner, object owner_id, tuple prev, dict decls, bint defer
    ):
        # The commit of an owner of one key that declares one key (a
        # per-entry run): the ``==`` gate alone if it is the key it holds, an
        # insert and a delete if it is a key nobody holds (see _move_one).
        # None otherwise (the general path).
        cdef Py_ssize_t pos = 0
        cdef PyObject* k
        cdef PyObject* v
        cdef object key, value, held
        cdef Commit result
        cdef int same
        cdef Py_ssize_t suppressed = 0
        cdef Py_ssize_t eq_errors = 0
        PyDict_Next(decls, &pos, &k, &v)
        key = <object>k
        value = <object>v
        held = prev[0]
        if key is not held:
            # stable keys: one dict key exactly when equal
            same = _rich_eq(key, held, Py_EQ)
            if same < 0:
                _raise_current()
            if not same:
                return self._move_one(owner, owner_id, prev, key, value, defer)
        held = prev[1]
        result = _new_commit(owner, self._seq + 1)
        if held is value:
            suppressed = 1
        else:
            same = _rich_eq(value, held, Py_EQ)  # bool(value == held)
            if same < 0:
                try:
                    _raise_current()
                except Exception as exc:
                    result.rejections.append(_new_rejection(_EQ_ERROR, key, value, owner, exc))
                    eq_errors = 1
            if PyDict_GET_SIZE(decls) != 1:  # the buffer changed from that == (as _commit's walk)
                raise RuntimeError("dictionary changed size during iteration")
            if same > 0:
                suppressed = 1
            elif same == 0:
                result.upserts.append((key, value))
                self._owned[owner_id] = (prev[0], value)
        if self._track_undo:
            result._undo = [(key, held)] if result.upserts else []
            result._prev_record = prev
            result._table = self
        self._finish(result, suppressed, eq_errors)
        return result

    cdef Commit _move_one(
        self, object owner, object owner_id, tuple prev, object key, object value, bint defer
    ):
        # An owner of one key declaring another key, which nobody holds,
        # without defer: the new key inserted, the old one deleted, a new
        # pair; the same changes and undo steps as the general path.  None
        # if the key is held (a conflict or a take-over) or with defer.
        cdef dict holder = self._holder
        cdef Commit result
        cdef object old
        if defer or key in holder:
            return None
        result = _new_commit(owner, self._seq + 1)
        old = prev[0]
        holder[key] = owner
        del holder[old]
        self._owned[owner_id] = (key, value)
        result.upserts.append((key, value))
        result.deletes.append(old)
        if self._track_undo:
            result._undo = [(key,), (old, None, owner)]
            result._prev_record = prev
            result._table = self
        self._finish(result, 0, 0)
        return result

    cdef int _merge(
        self, object owner_id, dict record, list deletes, dict added, bint copy
    ) except -1:
        # The owner's record without ``deletes`` and with ``added``: from a
        # new dict when ``copy`` (track_undo), else from ``record`` changed in
        # place; a pair if one key is left.
        cdef dict keys
        cdef object key
        if record is None:
            if added:
                self._owned[owner_id] = _compact(added)
            return 0
        keys = record.copy() if copy else record
        if deletes is not None:
            for key in deletes:
                del keys[key]
        if added:
            keys.update(added)
        if keys:
            self._owned[owner_id] = _compact(keys)
        else:
            del self._owned[owner_id]
        return 0

    cdef inline int _check_idle(self, str what) except -1:
        if self._busy:
            raise RuntimeError(f"{self.name}: {what}() called during a commit of this table")
        return 0

    def release(self, owner):
        """Let go of every key ``owner`` holds (the owner went away): each
        goes to its first claimant (a transfer) or is deleted; the owner's own
        claims are withdrawn (an ``__eq__`` it calls, comparing a
        claimant's value with the held one, cannot change the table: that
        raises ``RuntimeError``)."""
        cdef Commit result
        cdef dict holder = self._holder
        cdef object record
        cdef bint track = self._track_undo
        cdef list undo = [] if track else None
        cdef list deletes
        cdef object key
        self._check_idle("release")
        result = _new_commit(owner, self._seq + 1)
        if self._claims or (
            self._dropping and _okey(owner) in self._dropping
        ):
            return self._slow(owner, result, _slow_release)
        deletes = result.deletes
        record = self._owned.pop(_okey(owner), None)
        if record is not None:
            for key in ((<tuple>record)[0],) if type(record) is tuple else <dict>record:
                del holder[key]
                deletes.append(key)
                if track:
                    undo.append((key, None, owner))
        if track:
            result._undo = undo
            result._prev_record = record
            result._table = self
        self._finish(result, 0, 0)
        return result

    def drop_deferred(self, owner):
        """Let go of the keys ``owner`` stopped declaring in commits made with
        ``defer`` and has not declared again since: each goes to its first
        claimant or is deleted."""
        self._check_idle("drop_deferred")
        return self._slow(owner, _new_commit(owner, self._seq + 1), _drop_deferred)

    def drop_deferred_many(self, owners):
        """:meth:`drop_deferred` of each of ``owners`` in turn, as one commit
        (one revert takes it back); its ``owner`` is the list of them.  An
        owner listed twice counts once."""
        cdef list group
        cdef Commit result
        self._check_idle("drop_deferred_many")
        group = list(owners)
        result = _new_commit(group, self._seq + 1)
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

    cdef Commit _slow(self, object owner, Commit result, object step):
        cdef object record = self._owned.get(_okey(owner))
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

    cdef inline void _finish(self, Commit result, Py_ssize_t suppressed, Py_ssize_t eq_errors):
        cdef Py_ssize_t n = len(result.upserts) + len(result.deletes)
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

    def revert(self, result):
        """Take back ``result``, which must be this table's latest commit.

        Entries and the owner's record return to what they were before it;
        sequence numbers keep growing; the change counters drop back.  Once it
        is taken back, the commit before it is the latest again, so a run of
        commits can be taken back newest first.
        """
        cdef Commit res
        cdef dict holder = self._holder
        cdef object record
        cdef list undo
        cdef Py_ssize_t i
        cdef tuple step
        cdef object owner_id
        if not isinstance(result, Commit):
            raise TypeError(
                f"{self.name}: revert() expects a Commit of this core, got {_type_name(result)}"
            )
        self._check_idle("revert")
        res = <Commit>result
        undo = res._undo
        if undo is None:
            raise ValueError(
                f"{self.name}: only a commit of a table made with track_undo=True "
                "can be reverted, once"
            )
        if res._table is not self:
            raise ValueError(f"{self.name}: the commit was made by another table")
        if res._serial != self._top:
            raise ValueError(f"{self.name}: only the latest commit can be reverted")
        # The owner's record as it was before the commit (with the values held
        # now), then each step taken back, newest first.
        record = res._prev_record
        owner_id = _okey(res.owner)
        if record is None:
            self._owned.pop(owner_id, None)
        else:
            self._owned[owner_id] = record
        for i in range(len(undo) - 1, -1, -1):
            step = <tuple>undo[i]
            if len(step) == 2:  # (key, held value): an update
                if type(record) is dict:  # (a pair was replaced: it has the old value)
                    record[step[0]] = step[1]
            elif len(step) == 1:  # (key,): an insert
                del holder[step[0]]
            else:  # (key, None, owner): a delete (the record still has the key)
                holder[step[0]] = step[2]
        if res._restore is not None:  # claims, transfers, deferred drops
            res._restore()
            res._restore = None
        self._changes -= len(res.upserts) + len(res.deletes)
        self._top -= 1
        res._undo = None

    # -- reading -------------------------------------------------------------

    def get(self, key, default=None):
        """The value held for ``key``, or ``default``."""
        cdef PyObject* owner
        cdef object record
        self._check_idle("get")
        owner = PyDict_GetItemWithError(self._holder, key)
        if owner is NULL:
            return default
        record = self._owned[_okey(<object>owner)]
        if type(record) is tuple:
            return (<tuple>record)[1]
        return (<dict>record)[key]

    def owner_of(self, key, default=None):
        """The owner holding ``key``, or ``default``."""
        return self._holder.get(key, default)

    def keys_of(self, owner):
        """The keys ``owner`` holds."""
        self._check_idle("keys_of")
        record = self._owned.get(_okey(owner))
        if record is None:
            return frozenset()
        if type(record) is tuple:
            return frozenset(((<tuple>record)[0],))
        return frozenset(<dict>record)

    def count_of(self, owner):
        """How many keys ``owner`` holds."""
        self._check_idle("count_of")
        record = self._owned.get(_okey(owner))
        if record is None:
            return 0
        return 1 if type(record) is tuple else len(<dict>record)

    def claims_of(self, owner):
        """The keys ``owner`` claims: keys another owner holds and still
        declares, which ``owner`` declared in its latest commit."""
        return frozenset(self._claimed.get(_okey(owner), ()))

    def claimants(self, key):
        """The owners claiming ``key``, first claim first."""
        return tuple(self._claims.get(key, ()))

    def lets_go(self, buffer):
        """Whether committing ``buffer`` could let go of a key its owner holds:
        one it does not declare again (with ``defer``, it would be kept
        dropping), or the owner has deferred drops pending.  False means the
        commit's ``defer`` makes no difference, so a caller can skip working
        it out.  Reads the owner's record as :meth:`count_of` does."""
        cdef Buffer buf
        cdef object owner_id
        cdef object record
        cdef dict decls
        if not isinstance(buffer, Buffer):
            raise TypeError(
                f"{self.name}: lets_go() expects a Buffer of this core, got {_type_name(buffer)}"
            )
        buf = <Buffer>buffer
        if buf.table is not self:
            raise ValueError(f"buffer belongs to {buf.table.name}, not {self.name}")
        self._check_idle("lets_go")
        owner_id = _okey(buf.owner)
        record = self._owned.get(owner_id)
        if record is None:
            return False
        if self._dropping and owner_id in self._dropping:
            return True
        decls = buf._decls
        if type(record) is tuple:
            return (<tuple>record)[0] not in decls
        if len(decls) < len(<dict>record):
            return True
        for key in <dict>record:
            if key not in decls:
                return True
        return False

    def deferred_of(self, owner):
        """The keys ``owner`` holds but stopped declaring in a commit made
        with ``defer``: they wait for :meth:`drop_deferred`."""
        if not self._dropping:  # (the common case)
            return _NO_KEYS
        return frozenset(self._dropping.get(_okey(owner), ()))

    def owners(self):
        """How many owners hold at least one key."""
        return len(self._owned)

    def keys(self):
        """A snapshot of all keys, in the order of :meth:`items`."""
        return list(self._holder)

    def items(self):
        """A snapshot of all ``(key, value)`` pairs."""
        # An owner's keys come in _holder in the order of its record (unless a
        # revert put some back), so each owner's record is walked alongside,
        # without hashing, from where the owner's previous run of keys in
        # _holder left it.  A key out of step is looked up instead, and the
        # walk of that owner's record ends there.
        cdef list out = []
        cdef dict record = None
        cdef object rec
        cdef dict cursors = {}
        cdef object owner_id = None
        cdef object key, value
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t rpos = -1
        cdef Py_ssize_t probe
        cdef PyObject* rkey
        cdef PyObject* owner
        cdef PyObject* last = NULL
        cdef PyObject* found
        cdef PyObject* k
        cdef PyObject* v
        self._check_idle("items")
        while PyDict_Next(self._holder, &pos, &rkey, &owner):
            key = <object>rkey  # a reference of our own before anything allocates
            if owner != last:
                if rpos >= 0:
                    probe = rpos
                    if PyDict_Next(record, &probe, &k, &v):  # keys left: come back here
                        cursors[owner_id] = rpos
                owner_id = _okey(<object>owner)
                rec = self._owned[owner_id]
                last = owner
                if type(rec) is tuple:  # an owner of one key: its pair
                    rpos = -1
                    out.append((key, (<tuple>rec)[1]))
                    continue
                record = <dict>rec
                found = PyDict_GetItemWithError(cursors, owner_id) if cursors else NULL
                rpos = 0 if found is NULL else <Py_ssize_t>(<object>found)
            if rpos >= 0 and PyDict_Next(record, &rpos, &k, &v) and k == rkey:
                value = <object>v
            else:
                rpos = -1
                value = record[key]
            out.append((key, value))
        return out

    def __len__(self):
        return len(self._holder)

    def __contains__(self, key):
        return key in self._holder

    @property
    def seq(self):
        """The sequence number of the latest change (0 before any)."""
        return self._seq

    def stats(self):
        """A snapshot of the counters."""
        return TableStats(
            len(self._holder),
            self._commits,
            self._changes,
            self._suppressed,
            self._conflicts,
            self._eq_errors,
        )

    def __repr__(self):
        return f"<Table {self.name} entries={len(self._holder)} seq={self._seq}>"
