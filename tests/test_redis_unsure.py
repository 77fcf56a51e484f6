"""A commit whose outcome in Redis is unknown is never lost.

A commit's script call can fail after Redis ran it (the reply lost), a
commit of several steps can fail between them, and the committing run can
be cancelled (superseded, re-mounted) while a call is in flight, before
the call is written or after the server ran it.  Whatever the owner
declares next, its declarations earlier or the same again, Redis and
every view end with what is declared."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from redis_support import Producer, RedisServer, redis_server
from redis_support.consume import (
    TIMEOUT,
    Faulty,
    Tree,
    check,
    consuming,
    entries,
    snapshot,
    streamed,
    unique,
)

import livemap as coco
from livemap.redis import RedisLiveMapView, connect

__all__ = ["redis_server"]

pytestmark = pytest.mark.anyio


# -- failures: an Exception while the commit is in Redis's hands -----------------------


async def test_a_commit_failed_between_its_steps_then_the_previous_declarations(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A→B fails after B's first step reached Redis; the owner declares A
    again: the table, back at A, finds nothing to send, yet Redis must not
    keep B for the keys of that step."""
    from livemap._redis import _producer

    monkeypatch.setattr(_producer, "CHUNK", 50)
    name = unique()
    async with connect(redis_server.url) as real:
        client = Faulty(real)
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name)
        async with Producer(client, name, shards=3) as producer, consuming(view) as seen:
            a = {f"k{i}": 0 for i in range(120)}
            await producer.commit(entries(a))
            await check(real, name, 3, seen, view, a)
            b = {f"k{i}": 1 for i in range(20, 160)}
            client.fail_from = client.calls + 2  # three steps, the second fails
            await producer.commit(entries(b))
            assert [type(e) for e in producer.errors] == [coco.TargetApplyError]
            assert await snapshot(real, name, 3) != a  # the first step is in
            client.fail_from = None
            producer.errors.clear()
            await producer.commit(entries(a))
            assert producer.errors == []
            await check(real, name, 3, seen, view, a)
            # and the declarations after it go as usual
            await producer.commit(entries(b))
            await check(real, name, 3, seen, view, b)
            assert producer.errors == []


@pytest.mark.parametrize("then", ["previous", "same"])
async def test_a_commit_whose_reply_was_lost(redis_server: RedisServer, then: str) -> None:
    """One step that Redis ran, its reply lost: reported failed, the table
    taken back; either next declaration leaves Redis as declared."""
    name = unique()
    async with connect(redis_server.url) as real:
        client = Faulty(real)
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name)
        async with Producer(client, name, shards=2) as producer, consuming(view) as seen:
            a = {"a": 0, "b": 0, "gone": 0}
            await producer.commit(entries(a))
            await check(real, name, 2, seen, view, a)
            b = {"a": 1, "b": 0, "new": 1}
            client.lose_reply_at = client.calls + 1
            await producer.commit(entries(b))
            assert [type(e) for e in producer.errors] == [coco.TargetApplyError]
            assert await snapshot(real, name, 2) == b  # Redis ran it
            producer.errors.clear()
            state = a if then == "previous" else b
            await producer.commit(entries(state))
            assert producer.errors == []
            await check(real, name, 2, seen, view, state)
            if then == "same":  # not set back on the way
                assert await streamed(real, name, 2, "a") == [0, 1]


async def test_a_repair_that_fails_stays_pending(redis_server: RedisServer) -> None:
    """Redis stays away for the commits after the one cut short: each fails,
    and once it is back the next commit leaves Redis as declared."""
    name = unique()
    async with connect(redis_server.url) as real:
        client = Faulty(real)
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name)
        async with Producer(client, name) as producer, consuming(view) as seen:
            a = {"a": 0, "b": 0}
            await producer.commit(entries(a))
            await check(real, name, 1, seen, view, a)
            client.lose_reply_at = client.calls + 1
            client.fail_from = client.calls + 2
            await producer.commit(entries({"a": 1, "c": 1}))
            await producer.commit(entries(a))
            await producer.commit(entries({"a": 2}))
            assert len(producer.errors) == 3
            assert all(isinstance(e, coco.TargetApplyError) for e in producer.errors)
            assert await snapshot(real, name, 1) == {"a": 1, "c": 1}  # the first ran
            client.fail_from = None
            producer.errors.clear()
            await producer.commit(entries(a))
            assert producer.errors == []
            await check(real, name, 1, seen, view, a)


@pytest.mark.parametrize("by", ["check", "lease"])
async def test_a_cut_commit_is_set_right_without_another_commit(
    redis_server: RedisServer, by: str
) -> None:
    """The commit after the one cut short found Redis away too, and nothing
    commits after it: while the app runs, the map's own checks (every
    ``check_every`` seconds, or the lease's refresh) set Redis right once it
    is back."""
    name = unique()
    options = {"check_every": 0.05} if by == "check" else {"check_every": 60, "lease_ttl": 0.3}
    async with connect(redis_server.url) as real:
        client = Faulty(real)
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name)
        async with Producer(client, name, **options) as producer, consuming(view) as seen:
            a = {"a": 0, "b": 0}
            await producer.commit(entries(a))
            await check(real, name, 1, seen, view, a)
            client.lose_reply_at = client.calls + 1
            client.fail_from = client.calls + 2
            await producer.commit(entries({"a": 1}))
            await producer.commit(entries(a))  # nothing to send, but Redis is not there yet
            assert len(producer.errors) == 2
            assert await snapshot(real, name, 1) == {"a": 1}
            client.fail_from = None
            with anyio.fail_after(TIMEOUT):
                while await snapshot(real, name, 1) != a:
                    await anyio.sleep(0.01)
            await check(real, name, 1, seen, view, a)


async def test_a_cut_commit_is_set_right_as_the_run_ends(redis_server: RedisServer) -> None:
    """The last commit of a run is cut short (its reply lost), and the run
    ends before any check: its end sets Redis back to what is held."""
    name = unique()
    async with connect(redis_server.url) as real:
        client = Faulty(real)
        a = {"a": 0, "b": 0}
        async with Producer(client, name, check_every=60, lease_ttl=60) as producer:
            await producer.commit(entries(a))
            client.lose_reply_at = client.calls + 1
            await producer.commit(entries({"a": 1, "c": 1}))
            assert [type(e) for e in producer.errors] == [coco.TargetApplyError]
            assert await snapshot(real, name, 1) == {"a": 1, "c": 1}
        assert await snapshot(real, name, 1) == a


# -- interruptions: the committing run cancelled while its call is in flight -------------


CASES = [
    # (first, interrupted, then)
    ({"a": 0, "b": 0}, {"a": 1, "b": 0, "c": 1}, "same"),
    ({"a": 0, "b": 0}, {"a": 1, "b": 0, "c": 1}, "previous"),
    ({"a": 0, "b": 0}, {}, "same"),  # (a release of every key it held)
    ({"a": 0, "b": 0}, {}, "previous"),
]


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize(
    ("first", "interrupted", "then"),
    CASES,
    ids=["change-same", "change-previous", "release-same", "release-previous"],
)
async def test_a_commit_cancelled_in_flight_by_a_remount(
    redis_server: RedisServer,
    when: str,
    first: dict[str, int],
    interrupted: dict[str, int],
    then: str,
) -> None:
    """The child is re-mounted while its commit's script call is in flight
    (not yet sent, or run by Redis, its reply not yet read): the re-run,
    declaring the interrupted run's state again or the one before it,
    leaves Redis and the view with what it declares."""
    name = unique()
    async with connect(redis_server.url) as real:
        client = Faulty(real)
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name, shards=[0, 1])
        async with Tree(client, name, shards=2).running() as tree, consuming(view) as seen:
            await tree.declare("d", first)
            await check(real, name, 2, seen, view, first)
            client.blocked = anyio.Event()
            client.block = when
            await tree.mount("d", interrupted)
            with anyio.fail_after(TIMEOUT):
                await client.blocked.wait()
            state = interrupted if then == "same" else first
            await tree.declare("d", state)  # supersedes the run in flight
            await check(real, name, 2, seen, view, state)
            assert tree.errors == []
            if then == "same" and interrupted:  # not set back on the way
                assert await streamed(real, name, 2, "a") == [0, 1]
            # and on from there as usual
            await tree.declare("d", {"z": 9})
            await check(real, name, 2, seen, view, {"z": 9})
            assert tree.errors == []


async def test_a_cut_commit_is_set_right_by_another_components_commit(
    redis_server: RedisServer,
) -> None:
    """A component's commit is cut short (its reply lost) and it does not
    commit again for a while: the next commit of the map, another
    component's, sets Redis right for it first, without sending the rest of
    the map again."""
    name = unique()
    async with connect(redis_server.url) as real:
        client = Faulty(real)
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name)
        async with Tree(client, name).running() as tree, consuming(view) as seen:
            big = {f"big{i}": 0 for i in range(2000)}
            await tree.declare("big", big)
            await tree.declare("small", {"s": 0, "t": 0})
            want = {**big, "s": 0, "t": 0}
            await check(real, name, 1, seen, view, want)
            client.lose_reply_at = client.calls + 1
            await tree.declare("small", {"s": 1})  # the run fails, the table goes back
            assert [type(e) for e in tree.errors] == [coco.TargetApplyError]
            assert await snapshot(real, name, 1) == {**big, "s": 1}
            tree.errors.clear()
            calls = len(client.sizes)
            await tree.declare("other", {"o": 0})
            want["o"] = 0
            await check(real, name, 1, seen, view, want)
            # what went to Redis since: the small one's keys and the new one,
            # not the big one's thousands
            assert 0 < sum(client.sizes[calls:]) < 500
            assert tree.errors == []


async def test_an_upload_after_a_data_loss_cut_short_is_done_again(
    redis_server: RedisServer,
) -> None:
    """Redis lost the map's data; the commit that finds it out uploads what
    the process holds, and the upload fails half-way: the next commit does not
    take the new epoch for whole, it uploads again."""
    name = unique()
    async with connect(redis_server.url) as real:
        client = Faulty(real)
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name)
        async with Tree(client, name, check_every=60).running() as tree:
            await tree.declare("p", {"p1": 0, "p2": 0})
            await tree.declare("r", {"r1": 0})
            await tree.declare("q", {"q1": 0})
            # the map's data lost, its app's lease kept (no taking back)
            lease = (":app:", ":last", ":turn", ":swept")
            lost = [
                bytes(k).decode()
                for k in await real.keys(f"livemap:{{{name}}}:*")
                if not any(part in bytes(k).decode() for part in lease)
            ]
            await real.delete(lost)
            # its step finds the epoch gone; the upload's second call (of
            # three, one per owner) fails
            client.fail_from = client.calls + 3
            await tree.declare("q", {"q1": 1})
            assert [type(e) for e in tree.errors] == [coco.TargetApplyError]
            client.fail_from = None
            tree.errors.clear()
            await tree.declare("q", {"q1": 1})
            want = {"p1": 0, "p2": 0, "r1": 0, "q1": 1}
            assert await snapshot(real, name, 1) == want
            async with consuming(view) as seen:
                assert seen.rows == want
            assert tree.errors == []


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_commits_cut_short_at_random_then_settled(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Rounds of a component re-mounted with one of a few states (so values
    go back and forth), each commit at random run through, failed after
    Redis ran it, or interrupted before or after its call by the next
    re-mount; two components, so a repair meets another's commit.  After
    each round Redis and the view hold what is declared."""
    import random

    from livemap._redis import _producer

    monkeypatch.setattr(_producer, "CHUNK", 4)  # several steps per commit
    rng = random.Random(seed)
    states = [
        {"a": 0, "b": 0, "c": 0, "d": 0, "e": 0},
        {"a": 1, "b": 0, "c": 1, "f": 1, "g": 1, "h": 1},
        {},
        {"a": 0, "e": 2, "f": 2},
    ]
    name = unique()
    async with connect(redis_server.url) as real:
        client = Faulty(real)
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name, shards=[0, 1])
        async with Tree(client, name, shards=2).running() as tree, consuming(view) as seen:
            declared: dict[str, dict[str, int]] = {"x": {}, "y": {}}
            for _ in range(30):
                child = rng.choice(["x", "y"])
                state = {f"{child}{k}": v for k, v in rng.choice(states).items()}
                fault = rng.choice(["none", "lost", "before", "after"])
                if state == declared[child]:
                    fault = "none"  # (no call to cut short)
                if fault in ("before", "after"):
                    client.blocked = anyio.Event()
                    client.block = fault
                    await tree.mount(child, state)
                    with anyio.fail_after(TIMEOUT):
                        await client.blocked.wait()
                    state = {f"{child}{k}": v for k, v in rng.choice(states).items()}
                elif fault == "lost":
                    client.lose_reply_at = client.calls + rng.randint(1, 3)
                await tree.declare(child, state)
                client.lose_reply_at = None
                if tree.errors:
                    # (a failed run: its component declares the same again)
                    assert all(isinstance(e, coco.TargetApplyError) for e in tree.errors)
                    tree.errors.clear()
                    await tree.declare(child, state)
                    assert tree.errors == []
                declared[child] = state
                await check(real, name, 2, seen, view, {**declared["x"], **declared["y"]})


async def test_a_key_handed_over_with_an_equal_value_moves_in_redis(
    redis_server: RedisServer,
) -> None:
    """A key passes to its claimant (its owner unmounted) with a value equal
    to the one held: nothing changes for the views, but the key is the
    claimant's in Redis too, so the claimant's drop deletes it."""
    name = unique()
    async with connect(redis_server.url) as real:
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name)
        async with Tree(real, name).running() as tree, consuming(view) as seen:
            await tree.declare("x", {"k": 1})
            await tree.declare("y", {"k": 1, "j": 0})  # a claim on k
            assert [type(e) for e in tree.errors] == [coco.KeyConflictError]

            async def unmount(op: coco.LiveComponentOperator) -> coco.ReadyHandle:
                return await op.delete("x")

            handle = await tree.remote(unmount)
            with anyio.fail_after(TIMEOUT):
                await handle.ready()
            await check(real, name, 1, seen, view, {"k": 1, "j": 0})
            assert await streamed(real, name, 1, "k") == [1]
            await tree.declare("y", {"j": 0})
            await check(real, name, 1, seen, view, {"j": 0})


async def test_an_unmounted_components_release_cut_short(redis_server: RedisServer) -> None:
    """An unmounted component's release runs in Redis and its reply is
    lost: its keys go from Redis with the next commit (its release tried
    again), and are not put back on the way."""
    name = unique()
    async with connect(redis_server.url) as real:
        client = Faulty(real)
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name)
        async with (
            Tree(client, name, check_every=0.02).running() as tree,
            consuming(view) as seen,
        ):
            await tree.declare("x", {"a": 0, "b": 0})
            await tree.declare("y", {"c": 0})
            client.lose_reply_at = client.calls + 1

            async def unmount(op: coco.LiveComponentOperator) -> coco.ReadyHandle:
                return await op.delete("x")

            handle = await tree.remote(unmount)
            with anyio.fail_after(TIMEOUT):
                await handle.ready()
            assert [type(e) for e in tree.errors] == [coco.TargetApplyError]
            tree.errors.clear()
            await anyio.sleep(0.1)  # (the map's checks meanwhile)
            await tree.declare("y", {"c": 1})
            await check(real, name, 1, seen, view, {"c": 1})
            assert await streamed(real, name, 1, "a") == [0, None]
            assert tree.errors == []
