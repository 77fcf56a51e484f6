"""Hostile checks of a RedisLiveMap's repair of commits cut short.

A send cut short takes the process's table back and notes the keys it may
have changed in Redis, per owner; they are set right before the map's next
send, at its checks and as the run ends.  Here the repair itself is cut
short, meets another owner's commit, meets a codec that fails (with an
``Exception`` or a ``BaseException``), and the multi-step send is cancelled
before any step ran.  Each test ends by reading Redis and a view."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from redis_support import RedisServer, redis_server
from redis_support.consume import (
    TIMEOUT,
    Faulty,
    Tree,
    check,
    consuming,
    declare,
    snapshot,
    streamed,
    unique,
)

import livemap as coco
from livemap.redis import CodecError, JsonCodec, RedisLiveMapView, connect

__all__ = ["redis_server"]

pytestmark = pytest.mark.anyio


async def cut(client: Faulty, tree: Tree, child: str, state: dict[str, int]) -> None:
    """``child`` declares ``state``; the commit runs in Redis, its reply
    lost: reported failed, the table taken back, a repair pending."""
    client.lose_reply_at = client.calls + 1
    await tree.declare(child, state)
    client.lose_reply_at = None
    assert [type(e) for e in tree.errors] == [coco.TargetApplyError]
    tree.errors.clear()


# -- a repair cut short ------------------------------------------------------------------


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("then", ["previous", "same", "other"])
async def test_a_repair_cancelled_then_retried(
    redis_server: RedisServer, when: str, then: str
) -> None:
    """A commit cut short leaves a repair pending; the owner's next commit
    runs the repair first, and is re-mounted while the repair's call is in
    flight (before it is sent, or after Redis ran it): the re-run repairs
    again and Redis and the view end with what it declares."""
    name = unique()
    first = {"a": 0, "b": 0}
    cut_state = {"a": 1, "c": 1}
    async with connect(redis_server.url) as real:
        client = Faulty(real)
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name, shards=[0, 1])
        async with (
            Tree(client, name, shards=2, check_every=60, lease_ttl=60).running() as tree,
            consuming(view) as seen,
        ):
            await tree.declare("d", first)
            await check(real, name, 2, seen, view, first)
            await cut(client, tree, "d", cut_state)
            assert await snapshot(real, name, 2) == cut_state
            calls = client.calls
            client.blocked = anyio.Event()
            client.block = when
            await tree.mount("d", {"x": 5})  # its repair's call blocks
            with anyio.fail_after(TIMEOUT):
                await client.blocked.wait()
            assert client.calls == calls + 1  # (the repair's, not the send's)
            state = {"previous": first, "same": cut_state, "other": {"x": 5, "y": 6}}[then]
            await tree.declare("d", state)
            await check(real, name, 2, seen, view, state)
            assert tree.errors == []
            if then == "same":
                # not set back on the way; (after:) what the cut repair
                # stored, the deletes the superseded run's commit implied,
                # for a while
                assert await streamed(real, name, 2, "a") == (
                    [0, 1] if when == "before" else [0, 1, None, 1]
                )
            await tree.declare("d", {"z": 9})
            await check(real, name, 2, seen, view, {"z": 9})
            assert tree.errors == []


# -- two owners --------------------------------------------------------------------------


@pytest.mark.parametrize("repair", ["runs", "fails", "cancelled"])
async def test_another_owners_commit_meets_a_pending_repair(
    redis_server: RedisServer, repair: str
) -> None:
    """Owner x's commit is cut short; owner y commits next, its send
    running x's repair first.  Whether that repair runs, fails (Redis away
    for that call only) or is cut short by y's re-mount, y's commit goes
    through unharmed, and x's keys end as x declares them."""
    name = unique()
    async with connect(redis_server.url) as real:
        client = Faulty(real)
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name)
        async with (
            Tree(client, name, check_every=60, lease_ttl=60).running() as tree,
            consuming(view) as seen,
        ):
            await tree.declare("x", {"xa": 0, "xb": 0})
            await tree.declare("y", {"ya": 0})
            await check(real, name, 1, seen, view, {"xa": 0, "xb": 0, "ya": 0})
            # x's cut commit also takes a key y declares next
            await cut(client, tree, "x", {"xa": 1, "xc": 1, "shared": 1})
            assert await snapshot(real, name, 1) == {"xa": 1, "xc": 1, "shared": 1, "ya": 0}
            y = {"ya": 1, "shared": 2}
            if repair == "fails":
                client.fail_at = client.calls + 1  # the repair's call
                await tree.declare("y", y)
                client.fail_at = None
            elif repair == "cancelled":
                client.blocked = anyio.Event()
                client.block = "after"
                await tree.mount("y", {"ya": 7})
                with anyio.fail_after(TIMEOUT):
                    await client.blocked.wait()
                await tree.declare("y", y)
            else:
                await tree.declare("y", y)
            assert tree.errors == []  # y's commit is not x's repair's
            held = await snapshot(real, name, 1)
            assert (held["ya"], held["shared"]) == (1, 2)
            assert tree.map._table.owner_of("shared").path_str == "/RemoteLive/'y'"
            if repair != "fails":
                await check(real, name, 1, seen, view, {"xa": 0, "xb": 0, **y})
            # x declares what it held before (nothing to send): Redis is set right
            await tree.declare("x", {"xa": 0, "xb": 0})
            await check(real, name, 1, seen, view, {"xa": 0, "xb": 0, **y})
            assert tree.errors == []
            # and shared is y's in Redis too: y's drop deletes it
            await tree.declare("y", {"ya": 1})
            await check(real, name, 1, seen, view, {"xa": 0, "xb": 0, "ya": 1})
            assert tree.errors == []


# -- cancelled while reading, before any step --------------------------------------------


async def test_a_big_first_commit_cancelled_while_it_reads(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted process's component commits for the first time, in
    several steps: before the first step it reads what its owner held in
    Redis, and it is re-mounted during that read (no step ran).  Nothing is
    taken for sent: the re-run's commit sends all it declares, and the keys
    it no longer declares go."""
    from livemap._redis import _producer

    monkeypatch.setattr(_producer, "CHUNK", 4)
    name = unique()
    app = unique("app")
    old = {f"k{i}": 0 for i in range(10)}
    async with connect(redis_server.url) as real:
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name)
        async with Tree(real, name, app=app).running() as tree:
            await tree.declare("d", old)
            assert await snapshot(real, name, 1) == old
        client = Faulty(real)
        async with Tree(client, name, app=app).running() as tree:
            client.blocked = anyio.Event()
            client.block_reads = True
            calls = client.calls
            await tree.mount("d", {f"k{i}": 1 for i in range(8)})
            with anyio.fail_after(TIMEOUT):
                await client.blocked.wait()
            assert client.calls == calls  # no step sent
            # (some values as the cut commit had them: sent all the same)
            want = {**{f"k{i}": 1 for i in range(3, 8)}, "k10": 2, "k11": 2}
            await tree.declare("d", want)
            assert tree.errors == []
            async with consuming(view) as seen:
                await check(real, name, 1, seen, view, want)
            assert tree.map.stats().entries == len(want)


# -- the sweep after a commit cut short ---------------------------------------------------


class Steps:
    """A live component that runs ``steps`` (each ``await step(op)``)
    before it marks itself ready, then idles."""

    def __init__(self, steps: list[Any]) -> None:
        self.steps = steps

    def process(self) -> None:
        pass

    async def process_live(self, op: coco.LiveComponentOperator) -> None:
        for step in self.steps:
            await step(op)
        await op.mark_ready()
        await anyio.sleep_forever()


class StepsApp:
    """An app whose root makes the map (:attr:`map`) and mounts
    :class:`Steps` at ``/RemoteLive`` (where a :class:`Tree`'s children
    are).  What goes to the handler chain lands in ``errors``."""

    def __init__(self, client: Any, name: str, app: str, errors: list[BaseException]) -> None:
        from livemap.redis import RedisLiveMap

        self.map: Any = None
        self.steps: list[Any] = []

        async def main() -> None:
            self.map = await RedisLiveMap.create(client, name, check_every=60)
            await coco.mount(coco.component_subpath("RemoteLive"), Steps, self.steps)

        def handler(exc: BaseException, ctx: coco.ExceptionContext) -> None:
            errors.append(exc)

        self.app = coco.App(coco.AppConfig(app, exception_handler=handler), main)

    def mounting(self, child: str, state: dict[str, int], round_: int = 0) -> Any:
        """A step that (re-)mounts ``child`` declaring ``state``, and waits
        until it is ready."""

        async def step(op: coco.LiveComponentOperator) -> None:
            handle = await op.update(child, declare, self.map, state, round_)
            with anyio.fail_after(TIMEOUT):
                await handle.ready()

        return step


@pytest.mark.parametrize("how", ["cancelled", "failed"])
async def test_the_sweep_after_a_first_commit_cut_short(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A restarted process's component's first commit is cut short (its
    run re-mounted while the call is in flight, or the call failing), and
    its next run declares nothing, during the update's catch-up: its latest
    run succeeded, so the sweep lets go of the keys its earlier process's
    self held, as a run declaring nothing does in one process; the keys of
    a component that declares them again stay."""
    name = unique()
    app = unique("app")
    async with connect(redis_server.url) as real:
        errors: list[BaseException] = []
        first = StepsApp(real, name, app, errors)
        first.steps += [first.mounting("x", {"a": 0, "b": 0}), first.mounting("y", {"y": 0})]
        async with first.app.update(live=True) as handle:
            with anyio.fail_after(TIMEOUT):
                await handle.ready()
            assert await snapshot(real, name, 1) == {"a": 0, "b": 0, "y": 0}
            await handle.stop()
        assert errors == []
        # as a new process of the app: another instance token, no app trees
        from livemap._redis import _producer
        from livemap._runtime import _app

        monkeypatch.setattr(_producer, "_process", None)
        _app._trees.clear()
        client = Faulty(real)
        again = StepsApp(client, name, app, errors)

        async def cut_x(op: coco.LiveComponentOperator) -> None:
            if how == "cancelled":
                client.blocked = anyio.Event()
                client.block = "before"
                await op.update("x", declare, again.map, {"a": 1}, 1)
                with anyio.fail_after(TIMEOUT):
                    await client.blocked.wait()
            else:
                client.fail_at = client.calls + 1
                handle = await op.update("x", declare, again.map, {"a": 1}, 1)
                with anyio.fail_after(TIMEOUT):
                    await handle.ready()
                client.fail_at = None
                assert [type(e) for e in errors] == [coco.TargetApplyError]
                errors.clear()

        again.steps += [cut_x, again.mounting("x", {}, 2), again.mounting("y", {"y": 0}, 3)]
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name)
        async with again.app.update(live=True) as handle:
            with anyio.fail_after(TIMEOUT):
                await handle.ready()
                while again.map.stats().sweeps < 1:
                    await anyio.sleep(0.01)
            # x's run after the cut one committed: its keys are not kept from a sweep
            lease = again.map._lease
            assert not any(oid.endswith("'x'") for oid in lease.keep())
            assert again.map.stats().swept == 2  # a and b
            assert errors == []
            async with consuming(view) as seen:
                await check(real, name, 1, seen, view, {"y": 0})
            await handle.stop()


# -- codecs that fail ---------------------------------------------------------------------


class Interrupt(BaseException):
    """Not an Exception: a KeyboardInterrupt of one's own."""


class Trap:
    """JSON, with traps: ``refuse`` (values ``v`` whose encoding raises
    CodecError), ``interrupt`` (a ``v`` whose next encoding raises
    Interrupt, once) and ``interrupt_decode`` (likewise for a decoding)."""

    def __init__(self) -> None:
        self.json = JsonCodec()
        self.refuse: set[Any] = set()
        self.interrupt: Any = None
        self.interrupt_decode: Any = None
        self.raised = 0

    def encode(self, value: Any) -> bytes:
        if value["v"] in self.refuse:
            raise CodecError(f"refused {value['v']!r}")
        if self.interrupt is not None and value["v"] == self.interrupt:
            self.interrupt = None
            self.raised += 1
            raise Interrupt
        return self.json.encode(value)

    def decode(self, data: bytes) -> Any:
        value = self.json.decode(data)
        if self.interrupt_decode is not None and value["v"] == self.interrupt_decode:
            self.interrupt_decode = None
            self.raised += 1
            raise Interrupt
        return value


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is an Interrupt, or a group holding one."""
    inner = getattr(exc, "exceptions", None)  # (a BaseExceptionGroup)
    if inner is not None:
        return any(interrupted(e) for e in inner)
    return isinstance(exc, Interrupt)


async def test_a_base_exception_from_the_codec_during_a_send(redis_server: RedisServer) -> None:
    """The codec raises a BaseException as a commit encodes its values:
    the update ends with it, Redis has nothing of the commit, and the next
    update of the app, declaring it again, sends it."""
    name = unique()
    app = unique("app")
    codec = Trap()
    async with connect(redis_server.url) as real:
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name)
        raised: list[BaseException] = []
        tree = Tree(real, name, app=app, codec=codec)
        try:
            with anyio.fail_after(TIMEOUT):
                async with tree.running():
                    await tree.declare("d", {"a": 0, "b": 0})
                    codec.interrupt = 1
                    await tree.mount("d", {"a": 1, "c": 1})
                    await anyio.sleep_forever()
        except BaseException as exc:
            raised.append(exc)
        assert len(raised) == 1 and interrupted(raised[0]), raised
        assert codec.raised == 1
        assert await snapshot(real, name, 1) == {"a": 0, "b": 0}
        async with Tree(real, name, app=app, codec=codec).running() as again:
            await again.declare("d", {"a": 1, "c": 1})
            async with consuming(view) as seen:
                await check(real, name, 1, seen, view, {"a": 1, "c": 1})
            assert again.errors == []


@pytest.mark.parametrize("by", ["commit", "check"])
async def test_a_base_exception_from_the_codec_during_a_repair(
    redis_server: RedisServer, by: str
) -> None:
    """A repair is pending, and the codec raises a BaseException as the
    repair encodes a held value (run by another owner's commit, or by the
    map's own check): the update ends with it, and Redis is set right all
    the same (the run's end repairs again), the other owner's commit not
    taken for sent."""
    name = unique()
    codec = Trap()
    check_every = 60 if by == "commit" else 0.02
    async with connect(redis_server.url) as real:
        client = Faulty(real)
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name)
        tree = Tree(client, name, codec=codec, check_every=check_every, lease_ttl=60)
        raised: list[BaseException] = []
        try:
            with anyio.fail_after(TIMEOUT):
                async with tree.running():
                    await tree.declare("d", {"a": 0, "b": 0})
                    await tree.declare("e", {"e": 0})
                    codec.interrupt = 0  # the held values, as the repair encodes them
                    await cut(client, tree, "d", {"a": 1})
                    if by == "commit":
                        await tree.mount("e", {"e": 5})
                    await anyio.sleep_forever()
        except BaseException as exc:
            raised.append(exc)
        assert len(raised) == 1 and interrupted(raised[0]), raised
        assert codec.raised == 1
        assert await snapshot(real, name, 1) == {"a": 0, "b": 0, "e": 0}
        async with consuming(view) as seen:
            await check(real, name, 1, seen, view, {"a": 0, "b": 0, "e": 0})
        assert tree.map._unsure == {}


@pytest.mark.parametrize("where", ["snapshot", "stream"])
async def test_a_base_exception_from_the_codec_during_a_views_read(
    redis_server: RedisServer, where: str
) -> None:
    """The view's codec raises a BaseException while the view decodes what
    it read (the first snapshot, or a stream entry): the consumer's update
    ends with it, and the next watch of the view holds what Redis holds."""
    name = unique()
    codec = Trap()
    async with connect(redis_server.url) as real:
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name, codec=codec)
        async with Tree(real, name, check_every=60).running() as tree:
            await tree.declare("d", {"a": 0, "b": 0})
            raised: list[BaseException] = []
            try:
                with anyio.fail_after(TIMEOUT):
                    if where == "snapshot":
                        codec.interrupt_decode = 0
                        async with consuming(view):
                            await anyio.sleep_forever()
                    async with consuming(view) as seen:
                        codec.interrupt_decode = 1
                        await tree.declare("d", {"a": 1, "b": 0, "c": 1})
                        await anyio.sleep_forever()
            except BaseException as exc:
                raised.append(exc)
            assert len(raised) == 1 and interrupted(raised[0]), raised
            assert codec.raised == 1
            await tree.declare("d", {"a": 1, "c": 2})
            async with consuming(view) as seen:
                await check(real, name, 1, seen, view, {"a": 1, "c": 2})
                assert dict(view.snapshot()) == {
                    "a": {"k": "a", "v": 1},
                    "c": {"k": "c", "v": 2},
                }
            assert tree.errors == []


@pytest.mark.parametrize("then", ["other values", "dropped", "codec back"])
async def test_a_pending_repair_whose_value_no_longer_encodes(
    redis_server: RedisServer, then: str
) -> None:
    """A repair is pending for values the codec has since started to
    refuse: the owner's commits fail (TargetApplyError, its cause the
    CodecError naming the key) while the repair cannot encode them, another
    owner's commits go through, and once the owner declares other values
    for those keys or drops them (or the codec takes them again) Redis is
    set right."""
    name = unique()
    codec = Trap()
    async with connect(redis_server.url) as real:
        client = Faulty(real)
        view: RedisLiveMapView[str, Any] = RedisLiveMapView(real, name)
        async with (
            Tree(client, name, codec=codec, check_every=0.02).running() as tree,
            consuming(view) as seen,
        ):
            await tree.declare("d", {"a": 0, "b": 0})
            codec.refuse = {0}  # (before the cut: no check repairs it first)
            await cut(client, tree, "d", {"a": 1})
            await anyio.sleep(0.1)  # (the map's checks meanwhile: they fail too)
            await tree.declare("e", {"e": 5})
            assert tree.errors == []
            await tree.declare("d", {"a": 0, "b": 0})  # nothing to send, the repair fails
            assert [type(e) for e in tree.errors] == [coco.TargetApplyError]
            cause = tree.errors[0].__cause__
            assert isinstance(cause, CodecError)
            assert "key 'a'" in str(cause) or "key 'b'" in str(cause)
            tree.errors.clear()
            assert await snapshot(real, name, 1) == {"a": 1, "e": 5}
            if then == "other values":
                state = {"a": 2, "b": 3}
            elif then == "dropped":
                state = {"b": 3}
            else:
                codec.refuse = set()
                state = {"a": 0, "b": 0}
            await tree.declare("d", state)
            assert tree.errors == []
            await check(real, name, 1, seen, view, {**state, "e": 5})
            assert tree.map._unsure == {}
