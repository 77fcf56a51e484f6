"""``RedisLiveMap``: a keyed target whose entries live in Redis.

A component declares entries as into a LiveMap.  The process keeps the
usual table (ownership among its own components, the ``==`` gate, the
buffers), and each commit's changes go to Redis in one script
(:data:`._scripts.COMMIT`): the owner check across processes, the gate on
the encoded values, the snapshot hashes and one stream entry per shard
touched, all one atomic step.
"""

from __future__ import annotations

import os
import socket
import struct
import uuid
import weakref
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from zlib import crc32

import anyio

from livemap._paths import format_path
from livemap._redis._codecs import (
    Codec,
    CodecError,
    JsonCodec,
    decode_key,
    encode_key,
)
from livemap._redis._scripts import (
    APP_ACQUIRE,
    APP_RELEASE,
    COMMIT,
    INIT,
    OWNER_SEP,
    SWEEP,
    base_key,
)
from livemap._runtime._component import Component, current_run
from livemap._runtime._hosting import Owner, current_run_var
from livemap._runtime._session import AppRun
from livemap._runtime._tables import DeclarerDoc, new_declarer
from livemap._runtime._targets import SinkTarget
from livemap.errors import (
    KeyConflictError,
    LiveMapError,
    MapRetiredError,
    NotInComponentError,
    TargetApplyError,
)
from livemap_core import Commit, Declarer

__all__ = ["ProducerBusyError", "RedisLiveMap", "RedisMapStats", "check_client", "check_name"]

K = TypeVar("K")
V = TypeVar("V")

_CREATE = object()
# changes per script call: each call is one atomic step, so a commit bigger
# than this is several steps (each complete in itself)
CHUNK = 20_000
# one change, as the commit script reads it: op and the key's length, the
# key, the value's length, the value (for an update: as a stream entry has it)
_LENGTH = struct.Struct(">I")
_NO_VALUE = _LENGTH.pack(0)
_U = ord("u")
_UPDATE = partial(struct.Struct(">cI").pack, b"u")
_DELETE = partial(struct.Struct(">cI").pack, b"d")
_RECLAIM = partial(struct.Struct(">cI").pack, b"r")
# what _changes gives: the owners' header, and per (shard, owner index) the
# changes' parts, four per change (see _split)
_Changes = tuple[list[str], dict[tuple[int, int], list[bytes]]]


def _split(groups: dict[tuple[int, int], list[bytes]]) -> Iterator[list[Any]]:
    """The commit script's group arguments for ``groups``, in steps of at
    most CHUNK changes."""
    step: list[Any] = []
    room = CHUNK
    for (shard, oi), parts in groups.items():
        start = 0
        while start < len(parts):
            take = min(len(parts) - start, 4 * room)
            step += (str(shard), str(oi), b"".join(parts[start : start + take]))
            start += take
            room -= take // 4
            if room == 0:
                yield step
                step = []
                room = CHUNK
    if step:
        yield step


_DECLARE_ENTRY_DOC = """Declare ``key -> value`` as owned by the current component run.

Buffered, and committed with the run into Redis, in one atomic step: a key
the component's previous run declared and this one did not is deleted, and
a value whose encoding equals the one held changes nothing.

Raises ``TypeError`` for a key that is not a stable key,
:class:`~livemap.errors.DuplicateDeclarationError` for a key declared twice
in one run, :class:`~livemap.errors.NotInComponentError` outside a component
run and :class:`~livemap.errors.MapRetiredError` once the map is retired.  A
key another component holds, in this process or another app's, is rejected
at commit: a :class:`~livemap.errors.KeyConflictError` naming both owners
goes to the run's exception-handler chain.  A key an earlier process of the
same app held passes to the declaring component (a transfer).
"""

_DECLARE_ENTRY = DeclarerDoc("declare_entry", "RedisLiveMapDeclarer", __name__, _DECLARE_ENTRY_DOC)


def check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name or "{" in name or "}" in name:
        raise ValueError(f"{what} must be a non-empty str without braces, got {name!r}")
    return name


def check_client(client: object) -> None:
    """Refuse a client that decodes responses: values are bytes."""
    pool = getattr(client, "connection_pool", None)
    if getattr(client, "decode_responses", False) or getattr(pool, "decode_responses", False):
        raise ValueError("the Redis client must not decode responses (decode_responses=False)")
    if not callable(getattr(client, "register_script", None)):
        raise TypeError(f"expected a coredis client, got {type(client).__name__}")


class ProducerBusyError(LiveMapError, RuntimeError):
    """Another process produces for the same app into the same map.

    A map's producers are told apart by app name: at most one process per
    app name writes to a map at a time (it holds the app's lease, see
    ``lease_ttl`` of :meth:`RedisLiveMap.create`).  Raised by
    ``RedisLiveMap.create()`` (after waiting up to ``lease_wait`` seconds
    for the lease), and reported to the committing component's handler chain
    when a commit finds the lease taken over (the commit is not applied).
    ``app``, ``map_name`` and ``holder`` (the other process: host, pid and a
    random part) name the parties.
    """

    def __init__(self, app: str, map_name: str, holder: str) -> None:
        super().__init__(
            f"app {app!r} already produces into RedisLiveMap {map_name!r} from another "
            f"process ({holder}); run one process per app name at a time"
        )
        self.app = app
        self.map_name = map_name
        self.holder = holder


def _holder(token: bytes | str) -> str:
    """The process part of an instance token (``host:pid:random``)."""
    text = token.decode() if isinstance(token, bytes) else token
    return ":".join(text.split(":", 3)[:3])


class AppLease:
    """What this process keeps for one app producing into one map (every
    instance of the map the app makes shares it): the app's lease in Redis
    and the sweep of the keys an earlier process of the app left behind.

    ``pending``: a sweep is due (the lease was taken over from another
    process, or its first sweep has not succeeded yet); ``run``: the app run
    whose :meth:`watch` task runs now; ``failed``: owner ids whose latest
    commit into the map failed or was cut short, each with the generation of
    the run that made it (``None`` for a release): their keys in Redis stay
    theirs, until that owner's component has finished a later run (which
    committed nothing into the map, or it would have left ``failed``);
    ``root``:
    the app's root component (see :meth:`keep`); ``sweeps``, ``swept``: the
    sweeps done and the keys they let go.

    ``maps``: the instances of the map the app made in this process (weakly).
    ``turn``: ``(epoch, turn)`` as this process's latest taking or refreshing
    of the lease found them (the app's turn counts the changes of the
    lease's holder, see :data:`._scripts.APP_ACQUIRE`); ``synced``: the
    ``(epoch, turn)`` under which every entry the instances hold was
    committed or uploaded.  Invariant: the sweep runs only when ``synced ==
    turn`` and Redis still has that turn (the SWEEP script checks it), so a
    process that takes its app back from another one uploads its entries
    again (:meth:`settle`) before it deletes what it does not declare.
    ``wake``: set by a commit that took the lease back, to have the lease's
    task upload at once (made by that task, for its run only).
    """

    __slots__ = (
        "app",
        "base",
        "failed",
        "map_name",
        "maps",
        "pending",
        "root",
        "run",
        "sweeps",
        "swept",
        "synced",
        "token",
        "turn",
        "wake",
    )

    def __init__(self, base: str, app: str, map_name: str, token: str) -> None:
        self.base = base
        self.app = app
        self.map_name = map_name
        self.token = token
        self.pending = False
        self.run: AppRun | None = None
        self.failed: dict[str, int | None] = {}
        self.root: Component | None = None
        self.sweeps = 0
        self.swept = 0
        self.maps: weakref.WeakSet[RedisLiveMap[Any, Any]] = weakref.WeakSet()
        self.turn: tuple[str, int] | None = None
        self.synced: tuple[str, int] | None = None
        self.wake: anyio.Event | None = None

    def busy(self, holder: bytes | str) -> ProducerBusyError:
        return ProducerBusyError(self.app, self.map_name, _holder(holder))

    async def acquire(self, client: Any, ttl: float, wait: float) -> None:
        """Take the app's lease (waiting up to ``wait`` seconds while another
        process holds it), or raise ProducerBusyError."""
        script = client.register_script(APP_ACQUIRE)
        deadline = anyio.current_time() + wait
        while True:
            reply = await script(
                keys=[self.base], args=[self.app, self.token, str(max(1, int(ttl * 1000)))]
            )
            if reply[0]:
                if bytes(reply[1]).decode() != self.token:
                    self.pending = True
                self.turn = (bytes(reply[3]).decode(), int(reply[2]))
                if self.synced != self.turn and not self.holding():
                    self.synced = self.turn  # nothing held: nothing to upload
                return
            if anyio.current_time() >= deadline:
                raise self.busy(reply[1])
            await anyio.sleep(min(0.1, ttl / 4))

    def holding(self) -> bool:
        """Whether an instance of the map in use holds entries."""
        return any(len(lm) for lm in list(self.maps) if not lm.retired)

    def taken_back(self) -> None:
        """A commit took the lease back from another process: sweep again,
        and have the lease's task upload what this process holds at once."""
        self.pending = True
        if self.wake is not None:
            self.wake.set()

    async def settle(self, lm: RedisLiveMap[Any, Any], sweep: bool) -> None:
        """If the app's turn moved since this process's entries were made
        whole in Redis (another process of the app held the lease
        meanwhile): upload every instance's entries again, each under its
        lock (as after a data loss).  Then, if ``sweep``, sweep (if due).
        First, each instance's repair of a send cut short, if one is
        pending (see :meth:`RedisLiveMap._repair`)."""
        for each in sorted(self.maps, key=id):
            if each._unsure:
                async with each._get_lock():
                    try:
                        if each._unsure:
                            await each._repair()
                    except Exception:
                        pass  # pending still: tried again with the next send
        turn = self.turn
        if turn is not None and self.synced != turn:
            conflicts: list[tuple[Owner, KeyConflictError]] = []
            for each in sorted(self.maps, key=id):
                if each.retired:
                    continue
                async with each._get_lock():
                    if not each.retired:
                        conflicts += await each._upload()
            self.synced = turn
            for owner, exc in conflicts:
                await owner.report(exc)
        if sweep:
            await self.sweep(lm)

    def keep(self) -> list[str]:
        """The owner ids whose keys the sweep leaves alone besides this
        process's own records: the owners whose latest commit failed, and the
        components of the tree that have not finished a run (a live component
        that has not run ``process()`` yet) or whose latest run failed (they
        keep what they held, as in one process); but not an owner that has
        committed into an instance of the map in use (its first commit
        declared all it holds, and left the rest to the sweep)."""
        failed = self.failed
        kept = set(failed)
        stack = [self.root] if self.root is not None else []
        while stack:
            comp = stack.pop()
            oid = f"{self.app}{OWNER_SEP}{format_path(comp.path)}"
            if comp.latest_run is None or comp.running or comp.exception is not None:
                kept.add(oid)
            elif oid in failed and failed[oid] not in (None, comp.generation):
                kept.discard(oid)  # a later run, done, declared nothing into the map
            if comp.children:
                stack.extend(comp.children.values())
        for lm in list(self.maps):
            if not lm.retired:  # (a retired one may be from before a takeover)
                kept -= lm._seen
        return sorted(kept)

    async def sweep(self, lm: RedisLiveMap[Any, Any]) -> None:
        """If due: let go, in one script, of every key of the app that an
        owner holds from an earlier process and that no component of this
        process declares (see :data:`._scripts.SWEEP`)."""
        if not self.pending or self.synced is None:
            return
        async with AsyncExitStack() as locks:
            # no commit between what keep() sees and the sweep
            for each in sorted(self.maps, key=id):
                await locks.enter_async_context(each._get_lock())
            script = lm._client.register_script(SWEEP)
            args = [
                lm._epoch,
                self.token,
                self.app,
                lm._lease_ms,
                lm._maxlen,
                str(self.synced[1]),
                *self.keep(),
            ]
            # not cut off between Redis running it and its answer (the end
            # of the run cancelling this task): its keys would be let go
            # uncounted, the sweep still due
            with anyio.CancelScope(shield=True) as scope:
                scope.deadline = anyio.current_time() + lm._lease_ttl
                reply = await script(keys=[self.base], args=args)
            if scope.cancelled_caught:
                raise TimeoutError(f"the sweep of app {self.app!r} in {self.map_name!r} timed out")
        if reply[0] == b"busy":
            raise self.busy(reply[1])
        if reply[0] == b"moved":
            return  # another process held the lease since: upload first
        # a new epoch: Redis lost the data, there is nothing left to sweep
        self.pending = False
        if reply[0] == b"ok":
            self.sweeps += 1
            self.swept += int(reply[1])

    async def watch(self, run: AppRun, lm: RedisLiveMap[Any, Any]) -> None:
        """The lease's task for one app run: refreshes the lease, sweeps once
        the run's initial catch-up is done (in a catch-up run: as the run
        ends, after it reached quiescence; never after a stop, a failure or a
        cancellation before that), and gives the lease up when the run
        ends."""
        latest = lm
        caught_up = False
        try:
            if run.live:
                # the initial catch-up, then (for a map made after it) until
                # the tree is ready: every component mounted has committed
                while (run.catching_up or (self.root and self.root.readiness.unready)) and not (
                    run.stop_requested or run.failure
                ):
                    with anyio.move_on_after(0.05):
                        await run.wait()
                caught_up = not (run.stop_requested or run.failure)
            while True:
                latest = _latest.get((self.base, self.app)) or latest
                try:
                    await self.settle(latest, caught_up)
                except Exception:
                    pass  # Redis is away, or the lease is another's: later
                wake = self.wake = anyio.Event()
                with anyio.move_on_after(latest._lease_ttl / 3):
                    await wake.wait()
                try:
                    await self.acquire(latest._client, latest._lease_ttl, 0.0)
                except Exception:
                    pass  # commits report a lease taken over
        finally:
            if self.run is run:
                self.run = None
                self.wake = None
            if run.failure is None and not caught_up:
                # a catch-up run that reached quiescence, or a live run that
                # ended (by itself, or cancelled) after its catch-up
                caught_up = not (run.catching_up or run.stop_requested) if run.live else run.closing
            latest = _latest.get((self.base, self.app)) or latest
            with anyio.CancelScope(shield=True), anyio.move_on_after(latest._lease_ttl):
                try:
                    await self.acquire(latest._client, latest._lease_ttl, 0.0)
                    await self.settle(latest, caught_up and run.failure is None)
                except Exception:
                    pass  # due still: the next update's catch-up sweeps
                try:
                    await latest._client.register_script(APP_RELEASE)(
                        keys=[self.base], args=[self.app, self.token]
                    )
                except Exception:
                    pass  # the lease expires by itself


_leases: dict[tuple[str, str], AppLease] = {}
"""Per (map, app): this process's lease record."""

_process: tuple[int, str] | None = None
# per (map, app): the map instance made last in this process
_latest: weakref.WeakValueDictionary[tuple[str, str], RedisLiveMap[Any, Any]] = (
    weakref.WeakValueDictionary()
)


def instance_token(app: str) -> str:
    """What tells this process's owner records (for app ``app``) from another
    process's, or another app's: the host, the pid, a random part, the app.
    Every map instance an app makes in one process shares it, so a key moving
    between its components across two instances of the map is a transfer."""
    global _process
    pid = os.getpid()
    if _process is None or _process[0] != pid:
        _process = (pid, f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:12]}")
    return f"{_process[1]}:{app}"


@dataclass(frozen=True)
class RedisMapStats:
    """A snapshot of one RedisLiveMap's counters (this process's side).

    ``entries``: keys this process's components hold; ``commits``,
    ``changes``, ``suppressed``, ``eq_errors``: as for a LiveMap (the
    process's table); ``conflicts``: declarations rejected, by a component of
    this process or by another process's owner; ``steps``: scripts run in
    Redis; ``resyncs``: uploads of everything held after Redis lost its data;
    ``sweeps``: sweeps of what an earlier process of the app left behind,
    and ``swept``: the keys they deleted (or handed to a pending claim),
    counted for the app in this process.
    """

    entries: int
    commits: int
    changes: int
    suppressed: int
    conflicts: int
    eq_errors: int
    steps: int
    resyncs: int
    sweeps: int = 0
    swept: int = 0


class RedisLiveMap(SinkTarget[K, V]):
    """A LiveMap whose entries live in Redis, for consumers in any process.

    Create it inside a component with ``await RedisLiveMap.create(client,
    name)``; declare entries with :attr:`declare_entry`.  It is retired, like
    a LiveMap, when its creating component's next run commits or the
    component is unmounted; the entries stay in Redis, owned by the
    components that declared them, until those components drop them.
    Consumers follow it with :class:`RedisLiveMapView`.
    """

    __slots__ = {
        "_base": None,
        "_check_every": None,
        "_client": None,
        "_codec": None,
        "_commit": None,
        "_creator": None,
        "_encode_many": None,
        "_epoch": None,
        "_init": None,
        "_instance": None,
        "_later": None,
        "_lease": None,
        "_lease_ms": None,
        "_lease_ttl": None,
        "_lease_wait": None,
        "_maxlen": None,
        "_reached": None,
        "_remote_conflicts": None,
        "_resyncs": None,
        "_retired": None,
        "_seen": None,
        "_steps": None,
        "_trusted": None,
        "_unsure": None,
        "_unsure_all": None,
        "_where": None,
        "app": None,
        "declare_entry": "``rlm.declare_entry(key, value) -> None``: " + _DECLARE_ENTRY_DOC,
        "map_name": None,
        "shards": None,
    }

    def __init__(
        self,
        _token: object,
        creator: Component,
        client: Any,
        name: str,
        shards: int,
        codec: Codec,
        prefix: str,
        maxlen: int,
        check_every: float,
        lease_ttl: float,
        lease_wait: float,
    ) -> None:
        if _token is not _CREATE:
            raise TypeError(
                "use `await RedisLiveMap.create(client, name)` inside a component to make one"
            )
        super().__init__(f"RedisLiveMap {name!r} (created by {creator.path_str})", track_undo=True)
        self.declare_entry: Declarer[K, V] = new_declarer(
            self._table,
            self,
            current_run_var,
            partial(NotInComponentError, "RedisLiveMap.declare_entry()", target=self.name),
            partial(MapRetiredError, self.name),
            doc=_DECLARE_ENTRY,
        )
        """``rlm.declare_entry(key, value) -> None``: see ``help(rlm.declare_entry)``."""
        self._creator = creator
        self._client = client
        self._codec = codec
        many = getattr(codec, "encode_many", None)
        self._encode_many: Any = many if callable(many) else None
        # the built-in codecs' encode_many gives bytes: not checked one by one
        self._trusted = type(codec) is JsonCodec
        # per key: its change header, its encoding and its shard (made once)
        self._where: dict[Any, tuple[bytes, bytes, int]] = {}
        self._base = base_key(prefix, name)
        self._maxlen = str(maxlen)
        self._check_every = check_every
        self._commit = client.register_script(COMMIT)
        self._init = client.register_script(INIT)
        self._instance = instance_token(creator.session.name)
        self._lease_ttl = lease_ttl
        self._lease_ms = str(max(1, int(lease_ttl * 1000)))
        self._lease_wait = lease_wait
        key = (self._base, creator.session.name)
        lease = _leases.get(key)
        if lease is None or lease.token != self._instance:
            lease = _leases[key] = AppLease(self._base, creator.session.name, name, self._instance)
        self._lease = lease
        lease.maps.add(self)
        self._epoch = ""
        self._seen: set[str] = set()
        self._retired = False
        self._steps = 0
        # script calls that may have changed the map in Redis (see _send)
        self._reached = 0
        # per owner: keys a failed or interrupted send may have changed in
        # Redis for it (see _repair); and the owners for which it may have
        # let go of anything it held (its first commit's reclaim)
        self._unsure: dict[Owner, set[Any]] = {}
        self._unsure_all: set[Owner] = set()
        # conflicts a repair met, reported with the next commit
        self._later: list[tuple[Owner, KeyConflictError]] = []
        self._resyncs = 0
        self._remote_conflicts = 0
        self.map_name = name
        self.shards = shards
        self.app = creator.session.name

    def __repr__(self) -> str:
        state = " retired" if self._retired else ""
        return f"<{self.name} shards={self.shards} entries={len(self._table)}{state}>"

    @classmethod
    async def create(
        cls,
        client: Any,
        name: str,
        *,
        shards: int = 1,
        codec: Codec | None = None,
        prefix: str = "livemap",
        maxlen: int = 10_000,
        check_every: float = 1.0,
        lease_ttl: float = 10.0,
        lease_wait: float | None = None,
    ) -> RedisLiveMap[K, V]:
        """A map named ``name`` in Redis, owned by the current component run.

        ``client``: an entered ``coredis.Redis`` client (``async with
        client:``, see :func:`livemap.redis.connect`), without
        ``decode_responses``.  ``shards``: how many change streams the keys
        are spread over (fixed by the first producer; a different number
        raises ``ValueError``).  ``codec``: how values are encoded
        (:class:`JsonCodec` by default).  ``prefix``: the start of every
        Redis key of the map (maps of one name under two prefixes are two
        maps).  ``maxlen``: about how many entries each shard's stream keeps
        (a consumer further behind re-reads the snapshot).  ``check_every``:
        how often (seconds) the map checks, while its app runs and until it is
        retired, that Redis still has the map's data; when Redis lost it,
        what this process holds is uploaded again without waiting for a
        commit.

        ``lease_ttl``: the producers of a map are told apart by app name, and
        one process per app name produces into a map at a time: it holds the
        app's lease, refreshed every third of ``lease_ttl`` seconds while
        its app runs and given up when the run ends.  ``lease_wait``: how
        long (seconds) ``create()`` waits for another process's lease of the
        app to be given up or to expire (by default ``lease_ttl``: a
        process that died is replaced) before it raises
        :class:`ProducerBusyError`.  Once the initial catch-up of the update
        that took the lease over is done, the keys of the app that an
        earlier process's components held and no component of this one
        declares are deleted (see docs/redis.md).

        Raises :class:`~livemap.errors.NotInComponentError` outside a run.
        """
        run = current_run("RedisLiveMap.create()")
        check_name(name, "the map's name")
        check_name(prefix, "the key prefix")
        check_client(client)
        if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
            raise ValueError(f"shards must be an int >= 1, got {shards!r}")
        if not isinstance(maxlen, int) or isinstance(maxlen, bool) or maxlen < 1:
            raise ValueError(f"maxlen must be an int >= 1, got {maxlen!r}")
        if (
            not isinstance(check_every, (int, float))
            or isinstance(check_every, bool)
            or not check_every > 0
        ):
            raise ValueError(f"check_every must be a number > 0, got {check_every!r}")
        for what, seconds in (("lease_ttl", lease_ttl), ("lease_wait", lease_wait)):
            if seconds is None and what == "lease_wait":
                continue
            if (
                not isinstance(seconds, (int, float))
                or isinstance(seconds, bool)
                or not (seconds > 0 if what == "lease_ttl" else seconds >= 0)
            ):
                bound = "> 0" if what == "lease_ttl" else ">= 0"
                raise ValueError(f"{what} must be a number {bound}, got {seconds!r}")
        if codec is None:
            codec = JsonCodec()
        elif not isinstance(codec, Codec):
            raise TypeError(f"codec must have encode() and decode(), got {codec!r}")
        lm: RedisLiveMap[K, V] = cls(
            _CREATE,
            run.component,
            client,
            name,
            shards,
            codec,
            prefix,
            maxlen,
            float(check_every),
            float(lease_ttl),
            float(lease_ttl if lease_wait is None else lease_wait),
        )
        await lm._start()
        app_run = run.component.session.active
        if app_run is not None:
            app_run.tg.start_soon(lm._keep)
            lease = lm._lease
            root = run.component
            while root.parent is not None:
                root = root.parent
            lease.root = root
            if lease.run is not app_run:
                lease.run = app_run
                app_run.tg.start_soon(lease.watch, app_run, lm)
        _latest[(lm._base, lm.app)] = lm
        if run.created is None:
            run.created = []
        run.created.append(lm)
        return lm

    async def _start(self) -> None:
        epoch, shards = await self._init(
            keys=[self._base], args=[uuid.uuid4().hex, str(self.shards)]
        )
        if int(shards) != self.shards:
            raise ValueError(
                f"map {self.map_name!r} has {int(shards)} shards in Redis, "
                f"not the {self.shards} asked for"
            )
        self._epoch = epoch.decode()
        await self._lease.acquire(self._client, self._lease_ttl, self._lease_wait)

    async def _keep(self) -> None:
        """Until retired (or the app's run ends): every ``check_every``
        seconds, see that Redis still has the map's epoch; upload what this
        process holds when it does not."""
        key = f"{self._base}:epoch"
        while True:
            await anyio.sleep(self._check_every)
            if self._retired:
                return
            try:
                if await self._lost(key):
                    async with self._get_lock():
                        if not self.retired and await self._lost(key):
                            await self._resync()
                elif self._unsure:
                    # a send cut short, and no send since: set Redis right
                    async with self._get_lock():
                        if not self.retired and self._unsure:
                            await self._repair()
            except Exception:
                continue  # Redis is away: look again later

    async def _lost(self, key: str) -> bool:
        epoch = await self._client.get(key)
        return epoch is None or bytes(epoch).decode() != self._epoch

    # -- the target ------------------------------------------------------------

    def _owner_id(self, owner: Any) -> str:
        return f"{self.app}{OWNER_SEP}{format_path(owner.path)}"

    def _encode_value(self, key: Any, value: Any) -> bytes:
        """``value`` encoded; CodecError naming ``key`` when it fails."""
        try:
            data = self._codec.encode(value)
        except CodecError as exc:
            raise CodecError(f"key {key!r} of {self.name}: {exc}") from exc
        if type(data) is not bytes:
            if not isinstance(data, bytes):
                raise CodecError(
                    f"key {key!r} of {self.name}: the codec returned "
                    f"{type(data).__name__}, not bytes"
                )
            data = bytes(data)
        return data

    def _encode_values(self, upserts: list[tuple[K, V]]) -> list[bytes]:
        """The values of ``upserts`` encoded, in one call of the codec's
        ``encode_many`` when it has one; CodecError naming the key whose
        value failed."""
        many = self._encode_many
        if many is not None and upserts:
            try:
                datas = many([value for _, value in upserts])
            except Exception:
                pass  # found (and named) one by one below
            else:
                if (
                    type(datas) is list
                    and len(datas) == len(upserts)
                    and (self._trusted or all(type(d) is bytes for d in datas))
                ):
                    return datas
        encode = self._encode_value
        return [encode(key, value) for key, value in upserts]

    def _changes(self, component: Owner, result: Commit[K, V], reclaim: bool) -> _Changes:
        """The owners' header and the changes of ``result``, packed and
        grouped by shard and owner (see :data:`._scripts.COMMIT`).  Raises
        CodecError naming the key whose value failed."""
        owners: dict[str, int] = {}
        header: list[str] = []
        groups: dict[tuple[int, int], list[bytes]] = {}
        table = self._table
        shards = self.shards
        size = _LENGTH.pack
        where = self._where
        if len(where) > 2 * len(table) + 4096:
            where.clear()  # keys that went without a delete (reverted commits)

        def index(oid: str) -> int:
            i = owners.get(oid)
            if i is None:
                i = owners[oid] = len(owners) + 1
                header.append(oid)
                header.append("1" if reclaim and oid not in self._seen else "0")
            return i

        mine = index(self._owner_id(component))
        upserts = result.upserts
        if result.transfers:
            upserts = upserts + self._equal_transfers(result)
        datas = self._encode_values(upserts)
        owner_of = table.owner_of
        # the groups of this component's own keys, by shard
        own: list[list[bytes] | None] = [None] * shards
        for (key, _), data in zip(upserts, datas, strict=True):
            w = where.get(key)
            if w is None:
                ek = encode_key(key)
                w = where[key] = (_UPDATE(len(ek)), ek, crc32(ek) % shards)
            holder = owner_of(key)
            if holder is None or holder is component:
                parts = own[w[2]]
                if parts is None:
                    parts = groups.get((w[2], mine))
                    if parts is None:
                        parts = groups[(w[2], mine)] = []
                    own[w[2]] = parts
            else:
                at = (w[2], index(self._owner_id(holder)))
                parts = groups.get(at)
                if parts is None:
                    parts = groups[at] = []
            parts += (w[0], w[1], size(len(data)), data)
        newer = _latest.get((self._base, self.app))
        if newer is self:
            newer = None
        for key in result.deletes:
            if newer is not None and key in newer:
                continue  # a newer instance of the map holds it now
            w = where.pop(key, None)
            if w is None:
                ek = encode_key(key)
                shard = crc32(ek) % shards
            else:
                ek, shard = w[1], w[2]
            parts = groups.get((shard, mine))
            if parts is None:
                parts = groups[(shard, mine)] = []
            parts += (_DELETE(len(ek)), ek, _NO_VALUE, b"")
        return header, groups

    def _equal_transfers(self, result: Commit[K, V]) -> list[tuple[K, V]]:
        """The keys ``result`` handed to another owner without an upsert
        (the new owner's value equal to the held one), with the value held:
        sent as updates all the same, so the key's owner moves in Redis too
        (the gate there sends nothing to the streams)."""
        upserted = {key for key, _ in result.upserts}
        get = self._table.get
        return [(key, get(key)) for key, _, _ in result.transfers if key not in upserted]

    async def _step(self, header: list[str], groups: list[Any]) -> list[Any] | None:
        """Run one commit script over ``groups`` (shard, owner index, blob,
        ...); None if the epoch moved (Redis lost its data)."""
        self._steps += 1
        self._reached += 1
        reply = await self._commit(
            keys=[self._base],
            args=[
                self._epoch,
                self._instance,
                self._maxlen,
                self.app,
                self._lease_ms,
                str(len(header) // 2),
                *header,
                *groups,
            ],
        )
        if reply[0] == b"epoch":
            self._reached -= 1  # (refused: nothing changed)
            return None
        if reply[0] == b"busy":
            self._reached -= 1
            raise self._lease.busy(reply[1])
        if reply[1] == b"1":
            self._lease.taken_back()  # after a lapse: upload and sweep again
        return list(reply[2:])

    async def _run_steps(
        self, header: list[str], groups: dict[tuple[int, int], list[bytes]]
    ) -> list[Any] | None:
        """Send ``groups`` in steps of at most CHUNK changes; the claims that
        met another owner, or None if the epoch moved."""
        replies: list[Any] = []
        for step in _split(groups):
            reply = await self._step(header, step)
            if reply is None:
                return None
            replies += reply
        return replies

    async def _send(
        self, component: Owner, result: Commit[K, V], reclaim: bool = True, gen: int | None = None
    ) -> tuple[Exception | None, list[KeyConflictError]]:
        """Send ``result`` to Redis (what an earlier send left unsure first,
        see :meth:`_repair`).  On failure the table goes back to what it was
        before ``result`` and the error is returned; on an interruption (a
        cancellation, any ``BaseException``) it goes back too, and the
        interruption goes on.  Either way, what the send may have changed in
        Redis is noted, to be set right before the map's next send.  ``gen``:
        the generation of the committing run (``None`` for a release)."""
        reached = self._reached
        oid = self._owner_id(component)
        repaired = False
        if self._unsure:
            try:
                # (the keys this send updates anyway are left to it: a key
                # cut short at B and declared B again is not set back first)
                await self._repair({key for key, _ in result.upserts})
                repaired = True
            except Exception as exc:
                # pending still; a send of an owner it concerns fails with it
                if component in self._unsure:
                    return self._failed(component, result, reclaim, reached, exc, gen), []
            except BaseException:
                self._undo(component, result, reclaim, reached)
                self._lease.failed[oid] = gen
                raise
        if not result and not result.transfers:
            # (then the repair left nothing); the owner's commit is done
            self._lease.failed.pop(oid, None)
            return None, []
        conflicts: list[KeyConflictError] = []
        try:
            header, groups = self._changes(component, result, reclaim)
            if sum(len(parts) for parts in groups.values()) > 4 * CHUNK and any(
                f == "1" for f in header[1::2]
            ):
                # several steps: the first must not delete what a later one
                # declares, so what the owners no longer declare is found here
                await self._stale(header, groups)
            reply = await self._run_steps(header, groups)
            if reply is None:
                await self._resync()
            else:
                conflicts = self._conflicts(header, reply)
        except CodecError as exc:
            self._undo(component, result, reclaim, reached)
            return exc, []
        except Exception as exc:
            return self._failed(component, result, reclaim, reached, exc, gen), conflicts
        except BaseException:
            self._undo(component, result, reclaim, reached)
            self._lease.failed[oid] = gen
            raise
        for i in range(0, len(header), 2):
            self._seen.add(header[i])
        self._lease.failed.pop(oid, None)
        if repaired:
            self._unsure.clear()  # (what the repair left to this send)
        return None, conflicts

    def _failed(
        self,
        component: Owner,
        result: Commit[K, V],
        reclaim: bool,
        reached: int,
        exc: Exception,
        gen: int | None,
    ) -> Exception:
        """A send of ``result`` failed with ``exc``: the table taken back
        (see :meth:`_undo`), the owner's keys kept from a sweep; the error
        to report (a ProducerBusyError as it is)."""
        self._undo(component, result, reclaim, reached)
        self._lease.failed[self._owner_id(component)] = gen
        if isinstance(exc, ProducerBusyError):
            return exc
        error = TargetApplyError(
            self.name,
            format_path(component.path),
            len(result.upserts),
            len(result.deletes),
        )
        error.__cause__ = exc
        return error

    def _undo(self, component: Owner, result: Commit[K, V], reclaim: bool, reached: int) -> None:
        """Take ``result`` back from the table; if a script call since
        ``reached`` may have changed Redis, note first which keys ``result``
        sent, and under which owner, for :meth:`_repair` (the committing
        component's keys, and those it handed to other owners)."""
        if self._reached != reached:
            unsure = self._unsure
            seen = self._seen
            every = self._unsure_all

            def keys_of(owner: Owner) -> set[Any]:
                keys = unsure.get(owner)
                if keys is None:
                    keys = unsure[owner] = set()
                if reclaim and owner not in every and self._owner_id(owner) not in seen:
                    every.add(owner)  # its first commit: it may have let go of any of its keys
                return keys

            mine = keys_of(component)
            owner_of = self._table.owner_of
            upserts = result.upserts
            if result.transfers:
                upserts = upserts + self._equal_transfers(result)
            for key, _ in upserts:
                holder = owner_of(key)
                if holder is None or holder is component:
                    mine.add(key)
                else:
                    keys_of(holder).add(key)
            mine.update(result.deletes)
        self._table.revert(result)

    async def _repair(self, skip: set[Any] | None = None) -> None:
        """Make Redis hold what the table holds for every key a failed or
        interrupted send may have changed (:attr:`_unsure`): the value of a
        key held here goes again under its holder (an equal value changes
        nothing in Redis: the gate), a key nobody here holds is deleted, or
        its claim withdrawn, under each owner that may have sent it.  Only
        those keys (and, for an owner whose first commit it was, the keys it
        holds), not the whole map.  The keys of ``skip`` (a send's updates,
        made next) are left pending, for that send, and so are the keys an
        unmounted owner holds still (for its release).  Under the map's lock;
        raises as a send does, the repair pending still."""
        table = self._table
        owner_of = table.owner_of
        newer = _latest.get((self._base, self.app))
        if newer is self:
            newer = None
        shards = self.shards
        size = _LENGTH.pack
        owners: list[Owner] = []
        header: list[str] = []
        index: dict[str, int] = {}
        groups: dict[tuple[int, int], list[bytes]] = {}
        done: set[Any] = set()
        left: dict[Owner, set[Any]] = {}

        def parts(owner: Owner, shard: int) -> list[bytes]:
            oid = self._owner_id(owner)
            oi = index.get(oid)
            if oi is None:
                oi = index[oid] = len(owners) + 1
                owners.append(owner)
                header.extend((oid, "2"))
            return groups.setdefault((shard, oi), [])

        for owner, keys in self._unsure.items():
            if owner in self._unsure_all:
                keys = keys | table.keys_of(owner)
            for key in keys:
                if key in done or (newer is not None and key in newer):
                    continue  # (a newer instance of the map holds it now)
                holder = owner_of(key)
                if (skip and key in skip) or (holder is not None and not holder.alive):
                    # (an unmounted owner's keys wait for its release, which
                    # is retried: not put back in Redis on the way)
                    left.setdefault(owner, set()).add(key)
                    continue
                ek = encode_key(key)
                shard = crc32(ek) % shards
                if holder is None:
                    parts(owner, shard).extend((_DELETE(len(ek)), ek, _NO_VALUE, b""))
                else:
                    done.add(key)
                    data = self._encode_value(key, table.get(key))
                    parts(holder, shard).extend((_UPDATE(len(ek)), ek, size(len(data)), data))
        if groups:
            reply = await self._run_steps(header, groups)
            if reply is None:
                # (what a send cut short left in the new epoch, if anything,
                # an upload of what is held does not delete: then this)
                await self._resync()
                reply = await self._run_steps(header, groups)
                if reply is None:
                    self._epoch = ""
                    raise RuntimeError(f"{self.name}: the map's epoch in Redis keeps changing")
            claimants = [owners[int(reply[i]) - 1] for i in range(2, len(reply), 3)]
            self._later += zip(claimants, self._conflicts(header, reply), strict=True)
        self._unsure = left
        self._unsure_all.clear()

    async def _stale(self, header: list[str], groups: dict[tuple[int, int], list[bytes]]) -> None:
        """Add to ``groups`` a delete of each key a reclaiming owner held in
        Redis and does not declare now; the owners' reclaim flags cleared."""
        declared = set()
        for (shard, oi), parts in groups.items():
            for r in range(0, len(parts), 4):
                if parts[r][0] == _U:
                    declared.add((oi, shard, parts[r + 1]))
        for o in range(0, len(header), 2):
            if header[o + 1] != "1":
                continue
            header[o + 1] = "2"  # (noted in the app's owners still)
            oi = o // 2 + 1
            members = await self._client.smembers(f"{self._base}:k:{header[o]}")
            for member in members:
                shard_text, _, ek = bytes(member).partition(b"|")
                shard = int(shard_text)
                if (oi, shard, ek) not in declared:
                    groups.setdefault((shard, oi), []).extend(
                        (_RECLAIM(len(ek)), ek, _NO_VALUE, b"")
                    )

    def _conflicts(self, header: list[str], reply: list[Any]) -> list[KeyConflictError]:
        out = []
        for i in range(0, len(reply), 3):
            key = decode_key(reply[i])
            holder = reply[i + 1].decode()
            claimant = header[(int(reply[i + 2]) - 1) * 2]
            holder_app, _, holder_path = holder.partition(OWNER_SEP)
            claimant_app, _, claimant_path = claimant.partition(OWNER_SEP)
            out.append(
                KeyConflictError(
                    key,
                    self.name,
                    holder_path,
                    claimant_path,
                    owner_app=holder_app,
                    declarer_app=claimant_app,
                )
            )
        self._remote_conflicts += len(out)
        return out

    def _held_updates(self) -> Iterator[tuple[Owner, int, tuple[bytes, ...]]]:
        """Every entry this instance holds, encoded as an update of a commit
        step: its owner, its shard and the update's parts (for an upload of
        everything held)."""
        encode = self._codec.encode
        table = self._table
        size = _LENGTH.pack
        shards = self.shards
        for key, value in table.items():
            holder = table.owner_of(key)
            if holder is None:
                continue
            ek = encode_key(key)
            data = encode(value)
            yield holder, crc32(ek) % shards, (_UPDATE(len(ek)), ek, size(len(data)), data)

    async def _resync(self) -> None:
        """Redis lost the map's data (or another producer found it lost and
        started a new epoch): upload everything this process holds."""
        self._resyncs += 1
        for _ in range(5):
            epoch, _ = await self._init(
                keys=[self._base], args=[uuid.uuid4().hex, str(self.shards)]
            )
            self._epoch = epoch.decode()
            by_owner: dict[str, dict[tuple[int, int], list[bytes]]] = {}
            for holder, shard, parts in self._held_updates():
                groups = by_owner.setdefault(self._owner_id(holder), {})
                groups.setdefault((shard, 1), []).extend(parts)
            try:
                for oid, groups in by_owner.items():
                    if await self._run_steps([oid, "2"], groups) is None:
                        break
                else:
                    return
            except BaseException:
                # cut short: no send may take the half-made upload as done
                # (each finds the epoch moved, and uploads again)
                self._epoch = ""
                raise
        self._epoch = ""
        raise RuntimeError(f"{self.name}: the map's epoch in Redis keeps changing")

    async def _upload(self) -> list[tuple[Owner, KeyConflictError]]:
        """Upload everything this instance holds, each owner's keys as its
        first commit sends them (what it held in Redis and does not hold here
        is let go): after the app's lease was taken back from another process
        of the app, which may have changed or deleted them.  (Under the map's
        lock.)  The conflicts met, with the owner each is reported to."""
        owners: list[Owner] = []
        header: list[str] = []
        index: dict[str, int] = {}
        groups: dict[tuple[int, int], list[bytes]] = {}
        for holder, shard, parts in self._held_updates():
            oid = self._owner_id(holder)
            oi = index.get(oid)
            if oi is None:
                oi = index[oid] = len(owners) + 1
                owners.append(holder)
                header += (oid, "1")
            groups.setdefault((shard, oi), []).extend(parts)
        if not groups:
            return []
        if sum(len(parts) for parts in groups.values()) > 4 * CHUNK:
            await self._stale(header, groups)
        reply = await self._run_steps(header, groups)
        if reply is None:
            await self._resync()
            return []
        claimants = [owners[int(reply[i]) - 1] for i in range(2, len(reply), 3)]
        return list(zip(claimants, self._conflicts(header, reply), strict=True))

    async def _send_drops(self, component: Owner, result: Commit[K, V]) -> Exception | None:
        failed, _ = await self._send(component, result, False)
        return failed

    async def commit_run(self, component: Owner, buffer: Any, gen: int) -> Exception | None:
        if self._retired or not component.current(gen):
            return None
        async with self._get_lock():
            if self._orphans:
                await self._retry_orphans()
            if self._retired or not component.current(gen):
                return None
            result = self._table.commit(buffer, self._defer(component, buffer))
            failed, conflicts = await self._send(component, result, True, gen)
            drop_now = failed is None and self._settled(component, result)
        if drop_now:
            failed = await self._drop_now(component)
        if result.rejections:
            await self._report_rejections(component, result)
        for exc in conflicts:
            await component.report(exc)
        if self._later:
            later, self._later = self._later, []
            for owner, exc in later:
                if owner.alive:
                    await owner.report(exc)
        return failed

    def retire(self) -> None:
        """No more declarations (the creating run was superseded or its
        component unmounted).  The entries stay in Redis with their owners."""
        self._retired = True
        self.declare_entry.closed = True

    @property
    def retired(self) -> bool:
        """Whether the map takes no more declarations."""
        return self._retired

    def stats(self) -> RedisMapStats:
        """This process's counters (see :class:`RedisMapStats`)."""
        table = self._table.stats()
        return RedisMapStats(
            entries=table.entries,
            commits=table.commits,
            changes=table.changes,
            suppressed=table.suppressed,
            conflicts=table.conflicts + self._remote_conflicts,
            eq_errors=table.eq_errors,
            steps=self._steps,
            resyncs=self._resyncs,
            sweeps=self._lease.sweeps,
            swept=self._lease.swept,
        )
