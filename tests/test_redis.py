"""livemap.redis against a real redis-server, producers and consumers in one
process (tests/test_redis_processes.py runs them as separate processes)."""

from __future__ import annotations

import uuid
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from redis_support import Producer, RedisServer, own_redis_server, redis_server
from redis_support.consume import TIMEOUT, consuming, entries, settle, unique

import livemap as coco
from livemap import Symbol
from livemap.redis import (
    Codec,
    CodecError,
    JsonCodec,
    MsgpackCodec,
    RedisLiveMap,
    RedisLiveMapView,
    connect,
    decode_key,
    encode_key,
    shard_of,
)

__all__ = ["own_redis_server", "redis_server"]

pytestmark = pytest.mark.anyio


# -- codecs and keys (no server) -------------------------------------------------


def test_keys_encode_deterministically_and_round_trip() -> None:
    keys: list[Any] = [
        None,
        0,
        -12,
        10**30,
        "",
        "é/x",
        b"\x00\xff",
        uuid.UUID(int=5),
        Symbol("s"),
        (),
        (1, ("a", Symbol("b")), b"c"),
    ]
    for key in keys:
        data = encode_key(key)
        assert decode_key(data) == key
        assert type(decode_key(data)) is type(key)
    # equal keys give equal bytes: 1 and True are one key, a list is its tuple
    assert encode_key(True) == encode_key(1)
    assert encode_key([1, [2, "x"]]) == encode_key((1, (2, "x")))
    assert encode_key("x") != encode_key(Symbol("x"))
    assert encode_key(("ab", "c")) != encode_key(("a", "bc"))
    with pytest.raises(TypeError, match=r"1\.5"):
        encode_key(1.5)


def test_the_shard_hash_is_stable() -> None:
    # the same in every process (not the salted hash()): CRC-32 of the encoding
    assert shard_of(encode_key("user-1"), 4) == zlib.crc32(b"suser-1") % 4
    assert shard_of(encode_key("user-1"), 4) == 3  # pinned: a change would move every key
    spread = {shard_of(encode_key(f"k{i}"), 4) for i in range(100)}
    assert spread == {0, 1, 2, 3}


def test_decoding_in_bulk() -> None:
    codec = JsonCodec()
    datas = [codec.encode(v) for v in [1, "x", [1, {"a": None}], {"b": 2.5}, "é"]]
    assert codec.decode_many(datas) == [codec.decode(d) for d in datas]
    assert codec.decode_many([]) == []
    # a batch of which one item is not a JSON value fails as that item does,
    # even where the items joined would parse (1,2 and 3: [1,2,3])
    with pytest.raises(ValueError, match="Extra data"):
        codec.decode_many([b"1,2", b"3"])
    with pytest.raises(ValueError):
        codec.decode_many([b"[1", b"2]"])
    a: list[Any] = []
    a.append(a)
    with pytest.raises(CodecError, match="cannot encode"):
        codec.encode(a)
    with pytest.raises(CodecError, match="not JSON serializable"):
        codec.encode({"k": object()})


def test_encoding_in_bulk() -> None:
    codec = JsonCodec()
    values: list[Any] = [1, "x", [1, {"b": None, "a": 2}], {"b": 2.5}, "é", None]
    assert codec.encode_many(values) == [codec.encode(v) for v in values]
    assert codec.encode_many([]) == []
    # a batch of which one value cannot be encoded fails as that value does
    with pytest.raises(CodecError, match="not JSON serializable"):
        codec.encode_many([1, {"k": object()}, 3])
    with pytest.raises(CodecError, match="cannot encode nan"):
        codec.encode_many([1, float("nan")])


def test_codecs() -> None:
    json_codec = JsonCodec()
    assert json_codec.encode({"b": 1, "a": [1, "x"]}) == json_codec.encode({"a": [1, "x"], "b": 1})
    assert json_codec.decode(json_codec.encode({"a": [None, 1.5]})) == {"a": [None, 1.5]}
    with pytest.raises(CodecError, match="object"):
        json_codec.encode(object())
    with pytest.raises(CodecError):
        json_codec.encode(float("nan"))
    packed = MsgpackCodec()
    assert packed.decode(packed.encode({"a": b"\x00", "n": [1, 2]})) == {"a": b"\x00", "n": [1, 2]}
    assert isinstance(json_codec, Codec) and isinstance(packed, Codec)


def test_without_a_server_the_tests_skip_unless_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from redis_support import require_server

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("LIVEMAP_REQUIRE_REDIS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis-server is not on PATH"):
        require_server()
    monkeypatch.setenv("LIVEMAP_REQUIRE_REDIS", "1")
    with pytest.raises(pytest.fail.Exception, match="LIVEMAP_REQUIRE_REDIS=1"):
        require_server()


# -- helpers ---------------------------------------------------------------------------


async def produce_once(client: Any, name: str, state: dict[Any, Any], **options: Any) -> None:
    async with Producer(client, name, **options) as producer:
        await producer.commit(state)
        assert producer.errors == []


# -- the map and its view ---------------------------------------------------------------


async def test_snapshot_then_changes_exactly_once(redis_server: RedisServer) -> None:
    name = unique()
    async with connect(redis_server.url) as client, Producer(client, name, shards=3) as producer:
        first = {f"k{i}": i for i in range(50)}
        await producer.commit(entries(first))
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name)
        async with consuming(view) as seen:
            assert sorted(seen.calls) == sorted(first.items())
            assert seen.rows == first
            second = {**first, "k1": 100, "new": 7}
            del second["k2"]
            await producer.commit(entries(second))
            await settle(view)
            assert seen.rows == second
            assert sorted(seen.calls[50:]) == [("k1", 100), ("new", 7)]
            # an equal value re-declared is no change: not even a stream entry
            streams = [await client.xlen(f"livemap:{{{name}}}:x:{s}") for s in range(3)]
            suppressed = producer.map.stats().suppressed
            await producer.commit(entries(second))
            await settle(view)
            assert [await client.xlen(f"livemap:{{{name}}}:x:{s}") for s in range(3)] == streams
            assert len(seen.calls) == 52
            stats = view.stats()
            assert stats.entries == len(second) and stats.pending == 0 and stats.consumer
            assert producer.map.stats().entries == len(second)
            assert producer.map.stats().suppressed == suppressed + len(second)


async def test_changes_while_the_consumer_starts_are_not_lost_or_repeated(
    redis_server: RedisServer,
) -> None:
    name = unique()
    async with connect(redis_server.url) as client, Producer(client, name, shards=2) as producer:
        state = {f"k{i}": 0 for i in range(20)}
        await producer.commit(entries(state))
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name)
        done = anyio.Event()

        async def churn() -> None:
            for round_ in range(1, 30):
                state.update({f"k{i}": round_ for i in range(0, 20, 3)})
                state.pop(f"k{round_ % 20}", None)
                await producer.commit(entries(state))
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(churn)
            async with consuming(view) as seen:
                with anyio.fail_after(TIMEOUT):
                    await done.wait()
                await settle(view)
                assert seen.rows == state
                assert_no_repeats(seen.calls)


def assert_no_repeats(calls: list[tuple[Any, Any]]) -> None:
    last: dict[Any, Any] = {}
    for key, value in calls:
        assert last.get(key) != value, f"{key}={value} delivered twice in a row"
        last[key] = value


async def test_a_shard_has_one_consumer_across_views(redis_server: RedisServer) -> None:
    name = unique()
    async with connect(redis_server.url) as client:
        await produce_once(client, name, entries({"a": 1}), shards=2)
        first: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name, shards=[0, 1])
        async with consuming(first):
            second: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name, shards=[1])
            with anyio.fail_after(TIMEOUT), pytest.raises(coco.ConsumerBusyError, match="shards"):
                await second.watch(_NullSubscriber())
        # the lease went with the first consumer: the second one may start now
        async with consuming(second) as seen:
            shard = shard_of(encode_key("a"), 2)
            assert seen.rows == ({"a": 1} if shard == 1 else {})


class _NullSubscriber:
    async def update_all(self) -> None:
        pass

    async def mark_ready(self) -> None:
        pass

    async def update(self, key: Any, value: Any) -> coco.ReadyHandle:
        return coco.ReadyHandle()

    async def delete(self, key: Any) -> coco.ReadyHandle:
        return coco.ReadyHandle()


async def test_consumers_take_subsets_of_shards(redis_server: RedisServer) -> None:
    name = unique()
    async with connect(redis_server.url) as client:
        state = {f"k{i}": i for i in range(40)}
        await produce_once(client, name, entries(state), shards=4)
        low: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name, shards=[0, 1])
        high: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name, shards=[2, 3])
        async with consuming(low) as a, consuming(high) as b:
            assert not a.rows.keys() & b.rows.keys()
            assert {**a.rows, **b.rows} == state
            for key in a.rows:
                assert shard_of(encode_key(key), 4) in (0, 1)


async def test_a_key_prefix_keeps_maps_apart(redis_server: RedisServer) -> None:
    name = unique()
    async with connect(redis_server.url) as client:
        await produce_once(client, name, entries({"a": 1}), prefix="one")
        await produce_once(client, name, entries({"b": 2}), prefix="two")
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name, prefix="two")
        async with consuming(view) as seen:
            assert seen.rows == {"b": 2}


async def test_conflict_across_producers_names_both_owners(redis_server: RedisServer) -> None:
    name = unique()
    async with (
        connect(redis_server.url) as client,
        Producer(client, name, app="alpha") as owner,
        Producer(client, name, app="beta") as claimant,
    ):
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name)
        await owner.commit(entries({"shared": 1, "a": 1}))
        async with consuming(view) as seen:
            await claimant.commit(entries({"shared": 2, "b": 2}))
            await settle(view)
            assert seen.rows == {"shared": 1, "a": 1, "b": 2}  # the first owner keeps it
            (error,) = claimant.errors
            assert isinstance(error, coco.KeyConflictError)
            assert error.key == "shared"
            assert (error.owner_app, error.owner_path) == ("alpha", "/'declare'")
            assert (error.declarer_app, error.declarer_path) == ("beta", "/'declare'")
            assert "app 'alpha'" in str(error) and "app 'beta'" in str(error)
            assert owner.errors == []
            # the claim stands while it is declared, reported once
            await claimant.commit(entries({"shared": 3, "b": 2}))
            await settle(view)
            assert len(claimant.errors) == 1
            assert seen.rows == {"shared": 1, "a": 1, "b": 2}
            # the owner drops it: the pending claim gets it, as one update
            calls = len(seen.calls)
            await owner.commit(entries({"a": 1}))
            await settle(view)
            assert seen.rows == {"shared": 3, "a": 1, "b": 2}
            assert seen.calls[calls:] == [("shared", 3)]
            # and the claimant now owns it: its drop deletes it
            await claimant.commit(entries({"b": 2}))
            await settle(view)
            assert seen.rows == {"a": 1, "b": 2}
            assert owner.errors == [] and len(claimant.errors) == 1


async def test_a_restarted_producer_takes_its_keys_back(redis_server: RedisServer) -> None:
    name = unique()
    async with connect(redis_server.url) as client:
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name)
        await produce_once(client, name, entries({"a": 1, "b": 2, "c": 3}), app="p")
        async with consuming(view) as seen:
            # the same app and component path, a new process (a new App here)
            async with Producer(client, name, app="p") as restarted:
                await restarted.commit(entries({"b": 2, "c": 30, "d": 4}))
                await settle(view)
                assert restarted.errors == []
                assert seen.rows == {"b": 2, "c": 30, "d": 4}  # "a" is no longer declared
                assert sorted(seen.calls[3:]) == [("c", 30), ("d", 4)]  # "b" was not re-sent
                # another app claiming its keys is a conflict
                async with Producer(client, name, app="q") as other:
                    await other.commit(entries({"b": 5}))
                    assert [type(e) for e in other.errors] == [coco.KeyConflictError]


async def test_big_commits_go_in_chunks(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from livemap._redis import _producer

    monkeypatch.setattr(_producer, "CHUNK", 100)
    name = unique()
    async with connect(redis_server.url) as client:
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name)
        first = {f"k{i}": i for i in range(350)}
        await produce_once(client, name, entries(first), app="p", shards=2)
        async with consuming(view) as seen:
            assert seen.rows == first
            # restarted, declaring a different big set: what it no longer
            # declares goes, what it still declares is not touched
            second = {f"k{i}": i for i in range(100, 460)}
            async with Producer(client, name, app="p", shards=2) as restarted:
                await restarted.commit(entries(second))
                await settle(view)
                assert seen.rows == second
                assert len(seen.calls) == 350 + 110
                assert restarted.map.stats().steps >= 4


class FailingSteps:
    """A client whose commit scripts fail (``ConnectionError``) from the
    ``fail_at``-th call on, while ``fail_at`` is set: a producer that loses
    Redis between the steps of one commit."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls = 0
        self.fail_at: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def register_script(self, source: str) -> Any:
        script = self._client.register_script(source)
        if "XADD" not in source:
            return script

        async def call(**kwargs: Any) -> Any:
            self.calls += 1
            if self.fail_at is not None and self.calls >= self.fail_at:
                raise ConnectionError("lost Redis between two steps")
            return await script(**kwargs)

        return call


async def test_a_commit_cut_between_its_steps_is_sent_again_whole(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from livemap._redis import _producer

    monkeypatch.setattr(_producer, "CHUNK", 50)
    name = unique()
    async with connect(redis_server.url) as real:
        client = FailingSteps(real)
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name)
        async with Producer(client, name, shards=3) as producer, consuming(view) as seen:
            state = {f"k{i}": 0 for i in range(120)}
            await producer.commit(entries(state))
            assert producer.errors == []
            # (seen before the next commit changes them: else its changes
            # coalesce with these, and the count below is short)
            await settle(view)
            # the next commit needs 3 steps; the second one fails
            state = {f"k{i}": 1 for i in range(20, 160)}
            client.fail_at = client.calls + 2
            await producer.commit(entries(state))
            assert [type(e) for e in producer.errors] == [coco.TargetApplyError]
            await settle(view)
            first_step = dict(seen.rows)
            assert first_step != state  # only the first step reached Redis
            client.fail_at = None
            producer.errors.clear()
            await producer.commit(entries(state))  # the same declarations again
            assert producer.errors == []
            await settle(view)
            assert seen.rows == state
            assert_no_repeats(seen.calls)  # what the first step sent is not sent again
            assert len(seen.calls) == 120 + 140


async def test_the_gate_in_redis_amid_updates_of_held_keys(redis_server: RedisServer) -> None:
    """Updates of keys the owner holds pass to the stream in runs; an update
    whose encoding is unchanged (a tuple after the equal list: != in Python,
    one JSON) breaks a run and is not sent; new keys and deletes go between."""
    name = unique()
    async with connect(redis_server.url) as client, Producer(client, name) as producer:
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name)
        state: dict[str, Any] = {f"k{i}": [i, i] for i in range(40)}
        await producer.commit(entries(state))
        async with consuming(view) as seen:
            gone: set[str] = set()
            for round_ in range(1, 4):
                for i in range(40):
                    if f"k{i}" in gone:
                        continue
                    if i % 3 == 0:
                        state[f"k{i}"] = (i, i) if round_ % 2 else [i, i]  # same JSON
                    elif i % 3 == 1:
                        state[f"k{i}"] = [i, round_]
                state[f"new{round_}"] = [round_]
                gone.add(f"k{(5 * round_) % 40 + 2}")
                state.pop(f"k{(5 * round_) % 40 + 2}", None)
                await producer.commit(entries(state))
                await settle(view)
                assert seen.rows == {k: list(v) for k, v in state.items()}
            assert_no_repeats([(k, v) for k, v in seen.calls])
            assert not [k for k, _ in seen.calls[40:] if int(k[1:] if k[0] == "k" else 1) % 3 == 0]


async def test_a_value_the_codec_refuses_changes_nothing(redis_server: RedisServer) -> None:
    name = unique()
    async with connect(redis_server.url) as client, Producer(client, name) as producer:
        await producer.commit({"a": {"k": "a", "v": 1}})
        await producer.commit({"a": {"k": "a", "v": 2}, "b": {"k": "b", "v": object()}})
        (error,) = producer.errors
        assert isinstance(error, CodecError) and "'b'" in str(error)
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name)
        async with consuming(view) as seen:
            assert seen.rows == {"a": 1}  # the whole commit was refused
            # the next commit sends it all again
            await producer.commit({"a": {"k": "a", "v": 2}})
            await settle(view)
            assert seen.rows == {"a": 2}
            assert len(producer.errors) == 1


class BulkCodec:
    """JSON, with an ``encode_many`` that misbehaves as ``mode`` says:
    ``"raise"`` (on a batch with a value that is not a dict), ``"short"`` (one
    value fewer), ``"bytearray"`` (bytearrays, not bytes), else well."""

    def __init__(self, mode: str) -> None:
        self.json = JsonCodec()
        self.mode = mode
        self.batches = 0

    def encode(self, value: Any) -> bytes:
        return self.json.encode(value)

    def decode(self, data: bytes) -> Any:
        return self.json.decode(data)

    def encode_many(self, values: list[Any]) -> list[Any]:
        self.batches += 1
        if self.mode == "raise" and any(type(v) is not dict for v in values):
            raise CodecError("not in this batch")
        datas = [self.json.encode(v) for v in values]
        if self.mode == "short":
            return datas[:-1]
        if self.mode == "bytearray":
            return [bytearray(d) for d in datas]
        return datas


@pytest.mark.parametrize("mode", ["well", "raise", "short", "bytearray"])
async def test_a_codec_that_encodes_in_bulk(redis_server: RedisServer, mode: str) -> None:
    """A commit's values go through ``encode_many`` in one call; a batch it
    gets wrong is encoded value by value, and a value that fails is named
    (the whole commit refused, as without ``encode_many``)."""
    name = unique()
    codec = BulkCodec(mode)
    async with connect(redis_server.url) as client, Producer(client, name, codec=codec) as producer:
        state = {f"k{i}": {"k": f"k{i}", "v": i} for i in range(50)}
        await producer.commit(state)
        assert producer.errors == []
        assert codec.batches == 1
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name, codec=codec)
        async with consuming(view) as seen:
            assert seen.rows == {k: v["v"] for k, v in state.items()}
            bad = {**state, "k1": {"k": "k1", "v": 100}, "k2": {"k": "k2", "v": object()}}
            await producer.commit(bad)
            (error,) = producer.errors
            assert isinstance(error, CodecError) and "'k2'" in str(error)
            await producer.commit({**state, "k1": {"k": "k1", "v": 101}})
            await settle(view)
            assert seen.rows == {**{k: v["v"] for k, v in state.items()}, "k1": 101}
            assert len(producer.errors) == 1
            assert_no_repeats(seen.calls)


async def test_keys_deleted_declared_again_and_refused_keep_their_shard(
    redis_server: RedisServer,
) -> None:
    """What the producer remembers of a key's encoding (its shard, its bytes)
    stays true through deletes, re-declarations, a refused commit and keys
    that are one key (1 and True)."""
    name = unique()
    async with (
        connect(redis_server.url) as client,
        Producer(client, name, shards=4) as producer,
    ):
        view: RedisLiveMapView[Any, Any] = RedisLiveMapView(client, name)
        async with consuming(view) as seen:
            state: dict[Any, Any] = {i: {"k": i, "v": 0} for i in range(40) if i != 1}
            state[True] = {"k": 1, "v": "true"}  # the key 1 (deleted, then declared as 1)
            await producer.commit(state)
            for round_ in range(1, 6):
                for i in range(round_ % 3, 40, 3):
                    state.pop(i, None)  # deleted
                for i in range((round_ + 1) % 3, 40, 3):
                    state[i] = {"k": i, "v": round_}  # declared (again)
                if round_ == 3:
                    refused = {**state, 7: {"k": 7, "v": object()}, 8: {"k": 8, "v": -1}}
                    await producer.commit(refused)
                    assert len(producer.errors) == 1
                await producer.commit(state)
            await settle(view)
            assert seen.rows == {k: v["v"] for k, v in state.items()}
            assert len(producer.errors) == 1
            for s in range(4):
                held = await client.hkeys(f"livemap:{{{name}}}:d:{s}")
                assert all(shard_of(bytes(ek), 4) == s for ek in held)
            total = sum([await client.hlen(f"livemap:{{{name}}}:d:{s}") for s in range(4)])
            assert total == len(state)


async def test_stable_keys_of_every_kind(redis_server: RedisServer) -> None:
    name = unique()
    keys: list[Any] = [None, 7, "s", b"b", uuid.UUID(int=3), Symbol("y"), (1, ("t", Symbol("z")))]
    state = {key: {"k": i, "v": i} for i, key in enumerate(keys)}
    async with connect(redis_server.url) as client:
        await produce_once(client, name, state, codec=MsgpackCodec(), shards=2)
        view: RedisLiveMapView[Any, Any] = RedisLiveMapView(client, name, codec=MsgpackCodec())
        async with consuming(view):
            assert sorted(view.snapshot(), key=lambda kv: kv[1]["k"]) == list(state.items())


async def test_a_user_codec(redis_server: RedisServer) -> None:
    class Digits:
        def encode(self, value: Any) -> bytes:
            return str(value["v"]).encode()

        def decode(self, data: bytes) -> Any:
            return {"k": "?", "v": int(data)}

    name = unique()
    async with connect(redis_server.url) as client:
        await produce_once(client, name, {"a": {"k": "a", "v": 41}}, codec=Digits())
        assert await client.hget(f"livemap:{{{name}}}:d:0", encode_key("a")) == b"41"
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name, codec=Digits())
        async with consuming(view) as seen:
            assert seen.calls == [("?", 41)]


async def test_bad_arguments(redis_server: RedisServer) -> None:
    async with connect(redis_server.url) as client:
        with pytest.raises(ValueError, match="braces"):
            RedisLiveMapView(client, "a{b}")
        with pytest.raises(ValueError, match="shard"):
            RedisLiveMapView(client, "a", shards=[-1])
        with pytest.raises(coco.NotInComponentError):
            await RedisLiveMap.create(client, "a")
        name = unique()
        await produce_once(client, name, {}, shards=2)

        async def wrong() -> None:
            await RedisLiveMap.create(client, name, shards=3)

        with pytest.raises(ValueError, match="has 2 shards in Redis, not the 3"):
            await coco.App("wrong", wrong).update()

        async def never() -> None:
            await RedisLiveMap.create(client, name, shards=2, check_every=0)

        with pytest.raises(ValueError, match="check_every must be a number > 0, got 0"):
            await coco.App("never", never).update()
    async with coco_client(redis_server.url, decode_responses=True) as decoding:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisLiveMapView(decoding, "a")


@asynccontextmanager
async def coco_client(url: str, **options: Any) -> AsyncIterator[Any]:
    from coredis import Redis

    async with Redis.from_url(url, **options) as client:
        yield client


# -- faults, in one process -------------------------------------------------------------


class SlowReads:
    """A client whose stream reads wait for ``gate``: a view that falls behind."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.gate = anyio.Event()
        self.gate.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def xread(self, *args: Any, **kwargs: Any) -> Any:
        await self.gate.wait()
        return await self._client.xread(*args, **kwargs)


async def test_a_trimmed_stream_under_a_slow_consumer(redis_server: RedisServer) -> None:
    name = unique()
    async with connect(redis_server.url) as client, Producer(client, name, maxlen=5) as producer:
        state = {f"k{i}": 0 for i in range(10)}
        await producer.commit(entries(state))
        slow = SlowReads(client)
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(slow, name, block=0.05)
        async with consuming(view) as seen:
            slow.gate = anyio.Event()  # the view stops reading
            await anyio.sleep(0.1)
            for round_ in range(1, 60):
                state[f"k{round_ % 10}"] = round_
                if round_ % 7 == 0:
                    state.pop(f"k{(round_ + 3) % 10}", None)
                await producer.commit(entries(state))
            assert await client.xlen(f"livemap:{{{name}}}:x:0") < 59  # trimmed
            slow.gate.set()
            await settle(view)
            assert seen.rows == state
            assert view.stats().resyncs >= 1  # it was behind the trim
            assert_no_repeats(seen.calls)


class TrimAfterRead(SlowReads):
    """A client whose first stream read after ``armed`` is set returns, but
    before the view applies it, more commits are made and the stream is
    trimmed to its last ``keep`` entries: the view's next batch starts past
    a gap."""

    def __init__(self, client: Any, after: Any, keep: int) -> None:
        super().__init__(client)
        self.armed = False
        self._after = after
        self._keep = keep

    async def xread(self, *args: Any, **kwargs: Any) -> Any:
        reply = await super().xread(*args, **kwargs)
        if self.armed and reply:
            self.armed = False
            await self._after()
            from coredis.tokens import PureToken

            for stream in reply:
                await self._client.xtrim(
                    stream, PureToken.MAXLEN, self._keep, trim_operator=PureToken.EQUAL
                )
        return reply


async def test_a_trim_during_a_batched_read(redis_server: RedisServer) -> None:
    name = unique()
    async with connect(redis_server.url) as client, Producer(client, name, maxlen=1000) as producer:
        state = {f"k{i}": 0 for i in range(10)}
        await producer.commit(entries(state))

        async def more() -> None:
            for round_ in range(20, 40):
                state[f"k{round_ % 10}"] = round_
                if round_ % 6 == 0:
                    state.pop(f"k{(round_ + 4) % 10}", None)
                await producer.commit(entries(state))

        reads = TrimAfterRead(client, more, keep=3)
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(reads, name, block=0.05, batch=4)
        async with consuming(view) as seen:
            reads.gate = anyio.Event()  # the view stops reading ...
            await anyio.sleep(0.1)
            for round_ in range(1, 12):  # ... while commits queue up
                state[f"k{round_ % 10}"] = round_
                await producer.commit(entries(state))
            reads.armed = True
            reads.gate.set()  # a batch of 4 is read; then 20 more and a trim
            await settle(view)
            assert seen.rows == state
            assert view.stats().resyncs >= 1
            assert_no_repeats(seen.calls)


class FlakyCodec:
    """JSON, whose batch decoding fails while ``armed`` when the batch holds
    a value with "poison" in it."""

    def __init__(self) -> None:
        self.json = JsonCodec()
        self.armed = False
        self.failures = 0

    def encode(self, value: Any) -> bytes:
        return self.json.encode(value)

    def decode(self, data: bytes) -> Any:
        return self.json.decode(data)

    def decode_many(self, datas: list[bytes]) -> list[Any]:
        if self.armed and any(b"poison" in data for data in datas):
            self.failures += 1
            raise CodecError("poisoned")
        return self.json.decode_many(datas)


async def test_a_batch_that_fails_to_decode_is_read_again(redis_server: RedisServer) -> None:
    name = unique()
    codec = FlakyCodec()
    async with connect(redis_server.url) as client, Producer(client, name) as producer:
        state: dict[str, Any] = {f"k{i}": i for i in range(6)}
        await producer.commit(entries(state))
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name, codec=codec, block=0.05)
        async with consuming(view) as seen:
            codec.armed = True
            state["k1"] = "poison"
            state["k2"] = 20
            del state["k3"]
            await producer.commit(entries(state))
            with anyio.fail_after(TIMEOUT):
                while codec.failures < 2:  # the batch, then the snapshot read after it
                    await anyio.sleep(0.01)
            assert "k1" not in [k for k, _ in seen.calls[6:]]
            state["k4"] = 40  # a commit while the view cannot decode
            del state["k5"]
            await producer.commit(entries(state))
            await anyio.sleep(0.1)
            codec.armed = False
            await settle(view)
            assert seen.rows == state
            assert view.stats().errors >= 2
            assert dict(view.snapshot()) == entries(state)
            assert_no_repeats(seen.calls)


async def test_a_redis_restart_resynchronises_both_sides(own_redis_server: RedisServer) -> None:
    name = unique()
    server = own_redis_server
    async with connect(server.url) as client, Producer(client, name, shards=2) as producer:
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name, block=0.1)
        state = {f"k{i}": i for i in range(20)}
        await producer.commit(entries(state))
        async with consuming(view) as seen:
            calls = len(seen.calls)
            server.restart()  # nothing saved: Redis comes back empty
            state = {**state, "k1": 100}
            del state["k2"]
            with anyio.fail_after(TIMEOUT):
                while True:  # a commit fails until the connection is made again
                    producer.errors.clear()
                    await producer.commit(entries(state))
                    if not producer.errors:
                        break
                    await anyio.sleep(0.05)
            await settle(view)
            assert seen.rows == state  # the delete made across the restart is there
            assert seen.calls[calls:] == [("k1", 100)]  # and nothing else was repeated
            assert producer.map.stats().resyncs >= 1


async def test_a_producer_that_commits_no_more_uploads_after_data_loss(
    own_redis_server: RedisServer,
) -> None:
    name = unique()
    server = own_redis_server
    async with (
        connect(server.url) as client,
        Producer(client, name, shards=2, check_every=0.05) as producer,
    ):
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name, block=0.1)
        state = {f"k{i}": i for i in range(20)}
        await producer.commit(entries(state))
        async with consuming(view) as seen:
            server.restart()  # nothing saved: Redis comes back empty
            with anyio.fail_after(TIMEOUT):  # no commit: the map uploads by itself
                while producer.map.stats().resyncs == 0:
                    await anyio.sleep(0.02)
            await settle(view)
            assert seen.rows == state
            assert producer.errors == []
            assert await client.hlen(f"livemap:{{{name}}}:d:0") + await client.hlen(
                f"livemap:{{{name}}}:d:1"
            ) == len(state)


async def test_sigstop_under_load_loses_nothing(own_redis_server: RedisServer) -> None:
    name = unique()
    server = own_redis_server
    async with connect(server.url) as client, Producer(client, name, shards=2) as producer:
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name, block=0.1)
        state = {f"k{i}": 0 for i in range(30)}
        await producer.commit(entries(state))
        async with consuming(view) as seen:

            async def load() -> None:
                for round_ in range(1, 40):
                    state[f"k{round_ % 30}"] = round_
                    await producer.commit(entries(state))

            async with anyio.create_task_group() as tg:
                tg.start_soon(load)
                await anyio.sleep(0.05)
                server.pause()
                await anyio.sleep(0.5)
                server.resume()
            assert producer.errors == []
            await settle(view)
            assert seen.rows == state


async def test_client_pause_under_load_loses_nothing(redis_server: RedisServer) -> None:
    name = unique()
    async with connect(redis_server.url) as client, Producer(client, name) as producer:
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name, block=0.1)
        state = {f"k{i}": 0 for i in range(10)}
        await producer.commit(entries(state))
        async with consuming(view) as seen:
            async with connect(redis_server.url) as admin:
                await admin.client_pause(300)  # every client waits 0.3 s
            for round_ in range(1, 20):
                state[f"k{round_ % 10}"] = round_
                await producer.commit(entries(state))
            assert producer.errors == []
            await settle(view)
            assert seen.rows == state


async def test_a_view_that_loses_its_lease_ends(redis_server: RedisServer) -> None:
    name = unique()
    async with connect(redis_server.url) as client:
        await produce_once(client, name, entries({"a": 1}))
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name, lease_ttl=0.3)
        async with anyio.create_task_group() as tg:

            async def steal() -> None:
                with anyio.fail_after(TIMEOUT):
                    while view.stats().entries == 0:
                        await anyio.sleep(0.01)
                await client.set(f"livemap:{{{name}}}:lease:0", "intruder", px=5000)

            tg.start_soon(steal)
            with anyio.fail_after(TIMEOUT), pytest.raises(coco.ConsumerBusyError, match="intruder"):
                await view.watch(_NullSubscriber())
        assert not view.stats().consumer


class _Recording:
    """A plain subscriber (not mount_each) that never scans the view."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any, Any]] = []
        self.ready = False

    async def update_all(self) -> None:
        pass

    async def mark_ready(self) -> None:
        self.ready = True

    async def update(self, key: Any, value: Any) -> coco.ReadyHandle:
        self.events.append(("u", key, value))
        return coco.ReadyHandle()

    async def delete(self, key: Any) -> coco.ReadyHandle:
        self.events.append(("d", key, None))
        return coco.ReadyHandle()


async def test_a_plain_subscriber_continues_from_the_snapshot(redis_server: RedisServer) -> None:
    name = unique()
    async with connect(redis_server.url) as client, Producer(client, name) as producer:
        await producer.commit({"a": 1, "b": 2})
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name)
        subscriber = _Recording()
        async with anyio.create_task_group() as tg:
            tg.start_soon(view.watch, subscriber)
            with anyio.fail_after(TIMEOUT):
                while not subscriber.ready:
                    await anyio.sleep(0.01)
            assert sorted([item async for item in view]) == [("a", 1), ("b", 2)]
            await producer.commit({"a": 1, "b": 3, "c": 4})
            await producer.commit({"b": 3, "c": 4})
            await settle(view)
            assert sorted(subscriber.events) == [("d", "a", None), ("u", "b", 3), ("u", "c", 4)]
            tg.cancel_scope.cancel()
        assert not view.stats().consumer


async def test_a_view_made_from_a_url(redis_server: RedisServer) -> None:
    name = unique()
    async with connect(redis_server.url) as client, Producer(client, name) as producer:
        await producer.commit(entries({"a": 1}))
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(redis_server.url, name)
        async with consuming(view) as seen:
            assert seen.rows == {"a": 1}
            await producer.commit(entries({"a": 2, "b": 3}))
            await settle(view)
            assert seen.rows == {"a": 2, "b": 3}


async def test_a_key_moving_between_components_across_map_instances(
    redis_server: RedisServer,
) -> None:
    """A catch-up app makes a new map instance each update; a key that moves
    from one of its components to another is a transfer, not a conflict."""
    name = unique()
    errors: list[BaseException] = []
    async with connect(redis_server.url) as client:
        owners: dict[str, dict[str, Any]] = {"a": {"k": {"k": "k", "v": 1}}, "b": {}}

        def declare(lm: RedisLiveMap[str, Any], entries: dict[str, Any]) -> None:
            for key, value in entries.items():
                lm.declare_entry(key, value)

        async def main() -> None:
            lm: RedisLiveMap[str, Any] = await RedisLiveMap.create(client, name)
            for child, state in owners.items():
                await coco.mount(coco.component_subpath(child), declare, lm, state)

        app = coco.App(
            coco.AppConfig("mover", exception_handler=lambda e, c: errors.append(e)), main
        )
        with anyio.fail_after(TIMEOUT):
            await app.update()
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(client, name)
        async with consuming(view) as seen:
            owners = {"a": {}, "b": {"k": {"k": "k", "v": 2}}}
            with anyio.fail_after(TIMEOUT):
                await app.update()
            await settle(view)
            assert seen.rows == {"k": 2}
            assert seen.calls == [("k", 1), ("k", 2)]
            assert errors == []
            owner = await client.hget(f"livemap:{{{name}}}:o:0", encode_key("k"))
            assert owner is not None and bytes(owner).startswith(b"mover\x1f/'b'\x1e")
            owners = {"a": {"k": {"k": "k", "v": 2}}, "b": {}}
            with anyio.fail_after(TIMEOUT):
                await app.update()
            await settle(view)
            assert seen.rows == {"k": 2} and errors == []
