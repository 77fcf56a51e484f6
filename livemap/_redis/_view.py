"""``RedisLiveMapView``: a shared map followed from any process.

The view keeps a mirror of the shards it consumes (encoded and decoded), and
the consumer machinery of a LiveMap (:class:`livemap._feed._consumer.Consumer`)
runs over that mirror: coalescing, concurrency, retries, ``settle()`` and
the exact seam come from there.  A reader task applies each shard's stream
to the mirror and notifies the consumer of the keys that changed.

The mirror starts from a snapshot read in one atomic step together with
each shard's change counter and last stream id, so the stream continues
exactly where the snapshot stands.  Each stream entry carries the shard's
counter and the map's epoch: a counter that jumps (the stream was trimmed
past what the view had read), an epoch that changed (Redis lost its data),
a dropped connection or a failed read make the view read the snapshot again
and deliver only what differs from its mirror.
"""

from __future__ import annotations

import os
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel

from livemap._feed._consumer import Consumer, scan
from livemap._feed._each import EachSubscriber
from livemap._feed._protocols import ConsumerOptions, LiveMapSubscriber, RetryPolicy
from livemap._redis._codecs import Codec, CodecError, JsonCodec, decode_key
from livemap._redis._producer import check_client, check_name
from livemap._redis._scripts import LEASE_ACQUIRE, LEASE_RELEASE, SNAPSHOT, base_key
from livemap._runtime._session import AppRun
from livemap.errors import ConsumerBusyError

__all__ = ["RedisLiveMapView", "RedisViewStats"]

K = TypeVar("K")
V = TypeVar("V")

_LEN = struct.Struct(">I")
_MISSING: Any = object()


@dataclass(frozen=True)
class RedisViewStats:
    """A snapshot of one view's counters.

    ``entries``: keys in the view's shards; ``applied``: stream entries
    applied; ``resyncs``: snapshots read again (after a gap, a trim, an epoch
    change or a lost connection) and ``errors``: failed reads; the rest as
    for a LiveMap (``deliveries``, ``pending``, ``in_flight``, ``failing``,
    ``consumer``).
    """

    entries: int
    applied: int
    resyncs: int
    errors: int
    deliveries: int
    pending: int
    in_flight: int
    failing: dict[Any, BaseException]
    consumer: bool


class RedisLiveMapView(Generic[K, V]):
    """The shards ``shards`` of the shared map ``name``, as a
    :class:`~livemap.LiveMapView`: ``mount_each(fn, view)`` follows it like a
    local LiveMap, ``async for`` scans what the view holds.

    ``client``: an entered ``coredis.Redis`` client (or a ``redis://`` URL:
    the view then opens its own connection while it watches).  ``shards``:
    the shard numbers to consume, all of them when ``None``; a shard has one
    consumer at a time across all processes (a lease in Redis, refreshed
    every ``lease_ttl / 3`` seconds): a second one raises
    :class:`~livemap.ConsumerBusyError`, after waiting up to ``lease_wait``
    seconds for the lease to expire.  ``codec`` and ``prefix`` as given to
    the producers' :meth:`RedisLiveMap.create`.  ``concurrency`` and
    ``retry`` as for ``LiveMap.consumer()``.  ``block``: how long one read of
    the streams waits for news (seconds) before checking the map's epoch.
    """

    def __init__(
        self,
        client: Any,
        name: str,
        *,
        shards: Iterable[int] | None = None,
        codec: Codec | None = None,
        prefix: str = "livemap",
        concurrency: int = 64,
        retry: RetryPolicy | None = None,
        lease_ttl: float = 10.0,
        lease_wait: float = 0.0,
        block: float = 1.0,
        batch: int = 1000,
    ) -> None:
        check_name(name, "the map's name")
        check_name(prefix, "the key prefix")
        if isinstance(client, str):
            self._url: str | None = client
            self._client: Any = None
        else:
            check_client(client)
            self._url = None
            self._client = client
        self._wanted = None if shards is None else sorted(set(shards))
        if self._wanted is not None and (
            not self._wanted or any(type(s) is not int or s < 0 for s in self._wanted)
        ):
            raise ValueError(f"shards must be shard numbers (ints >= 0), got {shards!r}")
        if lease_ttl <= 0 or lease_wait < 0 or block <= 0 or batch < 1:
            raise ValueError("lease_ttl and block must be > 0, lease_wait >= 0, batch >= 1")
        self._own_client: Any = None  # the connection a URL view opened
        self.name = f"RedisLiveMapView {name!r}"
        self.map_name = name
        self.options = ConsumerOptions(concurrency, retry)
        self._codec = codec if codec is not None else JsonCodec()
        many = getattr(self._codec, "decode_many", None)
        self._decode_many: Any = many if callable(many) else self._decode_each
        self._base = base_key(prefix, name)
        self._lease_ttl = lease_ttl
        self._lease_wait = lease_wait
        self._block_ms = max(1, int(block * 1000))
        self._batch = batch
        self._token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        # the mirror: per shard, encoded key -> encoded value; and decoded
        self._raw: dict[int, dict[bytes, bytes]] = {}
        self._values: dict[Any, Any] = {}
        self._keys: dict[bytes, Any] = {}
        self._seq: dict[int, int] = {}
        self._ids: dict[int, bytes] = {}
        self._epoch = b""
        # encoded keys whose values failed to decode: the decoded mirror may
        # not follow the encoded one for them until the next snapshot
        self._unsure: set[bytes] = set()
        self._shards: list[int] = []
        self._consumer: Consumer[K, V] | None = None
        self._app_run: AppRun | None = None
        self._progress: anyio.Event | None = None
        self._synced: anyio.Event | None = None
        self._applied = 0
        self._resyncs = 0
        self._errors = 0
        self._deliveries = 0
        self._failing: dict[Any, BaseException] = {}

    def __repr__(self) -> str:
        return f"<{self.name} shards={self._wanted or 'all'} entries={len(self._values)}>"

    # -- what the consumer reads (ConsumedMap) --------------------------------

    def get(self, key: K, default: Any = None) -> Any:
        return self._values.get(key, default)

    def items(self) -> list[tuple[K, V]]:
        return list(self._values.items())

    def snapshot(self) -> list[tuple[K, V]]:
        """What the view holds now, as a list (what ``async for`` yields)."""
        return list(self._values.items())

    def app_run(self) -> AppRun | None:
        return self._app_run

    def consumer_ended(self, consumer: Consumer[K, V]) -> None:
        self._deliveries += consumer.deliveries
        self._failing = consumer.failing_keys()
        if self._consumer is consumer:
            self._consumer = None

    def __aiter__(self) -> AsyncIterator[tuple[K, V]]:
        """What the view holds now (empty until a watch has read the snapshot)."""
        return scan(self._consumer, self.items())

    # -- reading Redis ----------------------------------------------------------

    async def _read_shards(self, client: Any) -> list[int]:
        if self._wanted is not None:
            return self._wanted
        while True:
            total = await client.hget(f"{self._base}:meta", "shards")
            if total is not None:
                return list(range(int(total)))
            await anyio.sleep(min(0.1, self._block_ms / 1000))

    async def _snapshot(self, client: Any, *, notify: bool = True) -> None:
        """Read the shards' snapshot and bring the mirror to it, telling the
        consumer which keys differ (unless ``notify`` is false: the first
        snapshot, which the consumer's initial scan reads whole)."""
        script = client.register_script(SNAPSHOT)
        reply = await script(keys=[self._base], args=[str(s) for s in self._shards])
        epoch = await client.get(f"{self._base}:epoch")
        pending: list[Any] = []
        eks: list[bytes] = []
        datas: list[bytes] = []
        unsure = self._unsure
        gone: set[bytes] = set(unsure)
        for n, shard in enumerate(self._shards):
            seq, last, flat = reply[3 * n], reply[3 * n + 1], reply[3 * n + 2]
            fresh = {bytes(flat[i]): bytes(flat[i + 1]) for i in range(0, len(flat), 2)}
            old = self._raw.get(shard, {})
            gone.update(old.keys() - fresh.keys())
            gone.difference_update(fresh.keys())
            for ek, ev in fresh.items():
                if old.get(ek) != ev or ek in unsure:
                    key = self._keys.get(ek, _MISSING)
                    if key is _MISSING:
                        key = self._keys[ek] = decode_key(ek)
                    pending.append(key)
                    eks.append(ek)
                    datas.append(ev)
            self._raw[shard] = fresh
            self._seq[shard] = int(seq)
            self._ids[shard] = bytes(last)
        try:
            changed = self._set_values(pending, eks, datas)
        except BaseException:
            unsure.update(gone)
            raise
        self._delete(gone, changed)
        unsure.clear()
        self._epoch = b"" if epoch is None else bytes(epoch)
        if changed and notify and self._consumer is not None:
            self._consumer.notify(changed)
        self._wake()

    def _decode_each(self, datas: list[bytes]) -> list[Any]:
        decode = self._codec.decode
        return [decode(data) for data in datas]

    def _wake(self) -> None:
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    def _apply(self, shard: int, payload: bytes, touched: dict[bytes, bytes | None]) -> None:
        """Apply one stream entry's changes to the encoded mirror; the keys
        it touched go to ``touched`` with their encoded value now (``None``:
        deleted), decoded later by :meth:`_decode`."""
        raw = self._raw[shard]
        unpack = _LEN.unpack_from
        pos = 0
        end = len(payload)
        while pos < end:
            (size,) = unpack(payload, pos + 1)
            start = pos + 5
            pos = start + size
            ek = payload[start:pos]
            if payload[start - 5] == 0x75:  # 'u'
                (vsize,) = unpack(payload, pos)
                pos += 4
                raw[ek] = touched[ek] = payload[pos : pos + vsize]
                pos += vsize
            else:
                raw.pop(ek, None)
                touched[ek] = None

    def _decode(self, touched: dict[bytes, bytes | None]) -> list[Any]:
        """Bring the decoded mirror to the encoded one for the keys in
        ``touched`` (their values decoded in one batch); the keys changed."""
        keys = self._keys
        known = keys.get
        pending: list[Any] = []
        eks: list[bytes] = []
        datas: list[bytes] = []
        gone: list[bytes] = []
        for ek, ev in touched.items():
            if ev is None:
                gone.append(ek)
                continue
            key = known(ek, _MISSING)
            if key is _MISSING:
                key = keys[ek] = decode_key(ek)
            pending.append(key)
            eks.append(ek)
            datas.append(ev)
        try:
            changed = self._set_values(pending, eks, datas)
        except BaseException:
            self._unsure.update(gone)
            raise
        self._delete(gone, changed)
        return changed

    def _delete(self, eks: Iterable[bytes], changed: list[Any]) -> None:
        """Drop the encoded keys ``eks`` from the decoded mirror; the keys it
        held go to ``changed`` (one made and deleted in one batch was never
        there)."""
        for ek in eks:
            key = self._keys.pop(ek, _MISSING)
            if key is not _MISSING:
                self._values.pop(key, None)
                changed.append(key)

    def _set_values(self, keys: list[Any], eks: list[bytes], datas: list[bytes]) -> list[Any]:
        """Decode ``datas`` (the encodings of ``keys``, encoded ``eks``) into
        the decoded mirror; ``keys``.  When decoding fails, the keys are
        marked unsure (the next snapshot decodes or deletes them, whatever
        the encoded mirror says) and the error raised."""
        try:
            decoded = list(self._decode_many(datas))
        except BaseException:
            self._unsure.update(eks)
            raise
        if len(decoded) != len(datas):
            self._unsure.update(eks)
            raise CodecError(
                f"{self.name}: the codec decoded {len(datas)} values into {len(decoded)}"
            )
        self._values.update(zip(keys, decoded, strict=True))
        return keys

    async def _follow(self, client: Any) -> None:
        """Apply the streams forever; re-read the snapshot when needed."""
        streams = {s: f"{self._base}:x:{s}" for s in self._shards}
        epoch_key = f"{self._base}:epoch"
        if self._unsure:  # values that failed to decode: read them again first
            self._resyncs += 1
            await self._snapshot(client)
        while True:
            reply = await client.xread(
                {streams[s]: self._ids[s] for s in self._shards},
                count=self._batch,
                block=self._block_ms,
            )
            if not reply:
                epoch = await client.get(epoch_key)
                if (b"" if epoch is None else bytes(epoch)) != self._epoch:
                    self._resyncs += 1
                    await self._snapshot(client)
                continue
            touched: dict[bytes, bytes | None] = {}
            resync = False
            for stream, entries in reply.items():
                shard = int(bytes(stream).rsplit(b":", 1)[1])
                for entry in entries:
                    fields = entry.field_values
                    seq = int(fields[b"n"])
                    if fields.get(b"e", b"") != self._epoch:
                        resync = True
                        break
                    if seq <= self._seq[shard]:
                        self._ids[shard] = bytes(entry.identifier)
                        continue
                    if seq != self._seq[shard] + 1:
                        resync = True
                        break
                    self._apply(shard, bytes(fields[b"p"]), touched)
                    self._seq[shard] = seq
                    self._ids[shard] = bytes(entry.identifier)
                    self._applied += 1
                if resync:
                    break
            changed = self._decode(touched)
            if changed and self._consumer is not None:
                self._consumer.notify(changed)
            if resync:
                self._resyncs += 1
                await self._snapshot(client)
            else:
                self._wake()

    async def _lease(self, client: Any, keys: list[str]) -> None:
        script = client.register_script(LEASE_ACQUIRE)
        ttl = str(int(self._lease_ttl * 1000))
        deadline = anyio.current_time() + self._lease_wait
        while True:
            ok, holders = await script(keys=keys, args=[self._token, ttl])
            if ok:
                return
            if anyio.current_time() >= deadline:
                busy = sorted(
                    {bytes(h).decode() for h in holders if h and bytes(h) != self._token.encode()}
                )
                raise ConsumerBusyError(
                    f"{self.name} shards {self._shards} (consumed by {', '.join(busy)})"
                )
            await anyio.sleep(min(0.1, self._lease_ttl / 4))

    async def _keep_lease(
        self, client: Any, keys: list[str], lost: list[BaseException], scope: anyio.CancelScope
    ) -> None:
        try:
            await self._refresh_lease(client, keys)
        except ConsumerBusyError as exc:
            lost.append(exc)
            scope.cancel()

    async def _refresh_lease(self, client: Any, keys: list[str]) -> None:
        script = client.register_script(LEASE_ACQUIRE)
        ttl = str(int(self._lease_ttl * 1000))
        while True:
            await anyio.sleep(self._lease_ttl / 3)
            try:
                ok, holders = await script(keys=keys, args=[self._token, ttl])
            except Exception:
                self._errors += 1
                continue
            if not ok:
                busy = sorted({bytes(h).decode() for h in holders if h})
                raise ConsumerBusyError(
                    f"{self.name} shards {self._shards} (lease lost to {', '.join(busy)})"
                )

    async def _run_reader(self, client: Any) -> None:
        backoff = 0.05
        while True:
            try:
                await self._follow(client)
            except Exception:
                self._errors += 1
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                try:
                    self._resyncs += 1
                    await self._snapshot(client)
                    backoff = 0.05
                except Exception:
                    self._errors += 1

    # -- consuming ----------------------------------------------------------------

    async def watch(self, subscriber: LiveMapSubscriber[K, V]) -> None:
        """Follow the shards: ``update_all()``, ``mark_ready()``, then every
        later change, until the watching task is cancelled.

        A second watch of a shard (in this process or any other) raises
        :class:`~livemap.ConsumerBusyError`."""
        if self._consumer is not None:
            raise ConsumerBusyError(self.name)
        if self._client is not None:
            await self._watch(self._client, subscriber)
            return
        from coredis import Redis

        assert self._url is not None
        client = Redis.from_url(self._url, decode_responses=False)
        async with client:
            self._own_client = client
            try:
                await self._watch(client, subscriber)
            finally:
                self._own_client = None

    async def _watch(self, client: Any, subscriber: LiveMapSubscriber[K, V]) -> None:
        consumer = Consumer(self, subscriber, self.options)
        self._consumer = consumer
        synced = self._synced = anyio.Event()
        if isinstance(subscriber, EachSubscriber):
            self._app_run = subscriber.component.session.active
        lease_keys: list[str] = []
        try:
            self._shards = await self._read_shards(client)
            lease_keys = [f"{self._base}:lease:{s}" for s in self._shards]
            await self._lease(client, lease_keys)
            try:
                self._raw = {}
                self._values = {}
                self._keys = {}
                self._unsure = set()
                await self._snapshot(client, notify=False)
                # a subscriber that does not scan the view continues from this
                # snapshot, as from the map when watch() was called
                consumer.rebase(self.items())
                synced.set()
                lost: list[BaseException] = []
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._keep_lease, client, lease_keys, lost, tg.cancel_scope)
                    tg.start_soon(self._run_reader, client)
                    await consumer.run()
                    tg.cancel_scope.cancel()
                if lost:
                    raise lost[0]
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    try:
                        release = client.register_script(LEASE_RELEASE)
                        await release(keys=lease_keys, args=[self._token])
                    except Exception:
                        pass
        finally:
            synced.set()
            consumer.release()
            self._app_run = None

    async def settle(self) -> None:
        """Wait until every change committed to the view's shards before the
        call has been applied and processed by the consumer.  Returns at once
        when no consumer is watching."""
        consumer = self._consumer
        if consumer is None or self._synced is None:
            return
        await self._synced.wait()  # the first snapshot
        if self._consumer is not consumer:
            return
        client = self._client if self._client is not None else self._own_client
        if client is None:
            return
        keys = [f"{self._base}:n:{s}" for s in self._shards]
        keys.append(f"{self._base}:epoch")
        while True:
            # shielded (for a while): a read cancelled as it opens a
            # connection leaves coredis's half-made connection behind
            values: Any = None
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                values = await client.mget(keys)
            if values is None:
                await anyio.lowlevel.checkpoint()  # a cancellation lands here
                continue
            *counts, epoch = values
            target = {s: int(v or 0) for s, v in zip(self._shards, counts, strict=True)}
            if (
                all(self._seq.get(s, 0) >= n for s, n in target.items())
                and (b"" if epoch is None else bytes(epoch)) == self._epoch
                and not self._unsure
            ):
                break
            if self._consumer is not consumer:
                return
            event = self._progress
            if event is None:
                event = self._progress = anyio.Event()
            with anyio.move_on_after(self._block_ms / 1000):
                await event.wait()
        await consumer.settle()

    def stats(self) -> RedisViewStats:
        """The view's counters (see :class:`RedisViewStats`)."""
        consumer = self._consumer
        deliveries = self._deliveries
        pending = in_flight = 0
        failing = dict(self._failing)
        if consumer is not None:
            deliveries += consumer.deliveries
            pending = len(consumer.queued)
            in_flight = len(consumer.in_flight)
            failing = consumer.failing_keys()
        return RedisViewStats(
            entries=len(self._values),
            applied=self._applied,
            resyncs=self._resyncs,
            errors=self._errors,
            deliveries=deliveries,
            pending=pending,
            in_flight=in_flight,
            failing=failing,
            consumer=consumer is not None,
        )
