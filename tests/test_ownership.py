"""Ownership: a key moving from one component to another in one update is a
transfer (one update downstream, never a delete and an insert, no error);
two components that keep declaring one key are a conflict, reported once the
update has settled, and the claim is remembered until the owner lets go.

Each scene runs on both backends (and, in the pure-core run of the suite, on
the pure core), with the components as sync and as async functions.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, Recorder, run_app, wait_for

import livemap as coco
from livemap import KeyedTarget, LiveMap, TargetBatch

pytestmark = pytest.mark.anyio

_names = itertools.count()


def unique(name: str) -> str:
    """An app name no other test uses (an app's tree lives on by its name)."""
    return f"{name}-{next(_names)}"


Plan = dict[str, dict[str, Any]]
"""Component name -> what it declares (in the order main mounts them)."""


class Scene:
    """One app whose main mounts one component per name of ``plan`` (in
    order); each declares its keys into a KeyedTarget.  Records the sink's
    batches and the reported exceptions."""

    def __init__(self, name: str, *, sync: bool) -> None:
        self.plan: Plan = {}
        self.batches: list[tuple[list[tuple[str, Any]], list[str]]] = []
        self.recorder = Recorder()
        self.target: KeyedTarget[str, Any] = KeyedTarget("rows", self._apply)
        self.sync = sync
        self.app = coco.App(
            coco.AppConfig(unique(name), exception_handler=self.recorder), self._main()
        )

    def _apply(self, batch: TargetBatch[str, Any]) -> None:
        self.batches.append((list(batch.upserts), list(batch.deletes)))

    def _main(self) -> Callable[[], Any]:
        scene = self

        @coco.fn
        def sync_part(name: str) -> None:
            for key, value in scene.plan[name].items():
                scene.target.declare(key, value)

        @coco.fn
        async def async_part(name: str) -> None:
            await anyio.sleep(0)
            for key, value in scene.plan[name].items():
                scene.target.declare(key, value)

        @coco.fn
        async def main() -> None:
            part = sync_part if scene.sync else async_part
            handles = [
                await coco.mount(coco.component_subpath(name), part, name) for name in scene.plan
            ]
            # (async children commit while main's run is still in progress:
            # a key one of them drops may pass to another)
            for h in handles:
                await h.ready()

        return main

    async def run(self, plan: Plan) -> None:
        self.plan = plan
        self.batches.clear()
        await run_app(self.app)

    def owner(self, key: str) -> Any:
        path = self.target.owner_path(key)
        return None if path is None else path[-1]

    def conflicts(self) -> list[coco.KeyConflictError]:
        return [e for e, _ in self.recorder.of_type(coco.KeyConflictError)]  # type: ignore[misc]


@pytest.fixture(params=["sync", "async"])
def sync(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "sync")


async def test_a_new_component_takes_the_key_of_an_unmounted_one(sync: bool) -> None:
    scene = Scene("transfer-after", sync=sync)
    await scene.run({"c1": {"x": 1, "a": 0}})
    assert scene.batches and scene.owner("x") == "c1"
    # run 2: c1 is no longer mounted; c2, mounted instead, declares x
    await scene.run({"c2": {"x": 2}})
    assert scene.conflicts() == []
    assert scene.owner("x") == "c2"
    assert scene.target.get("x") == 2
    upserts = [u for b, _ in scene.batches for u in b]
    deletes = [d for _, b in scene.batches for d in b]
    assert upserts == [("x", 2)]
    assert deletes == ["a"]  # x is never deleted
    # the new owner lets it go as its own
    await scene.run({"c2": {}})
    assert scene.batches == [([], ["x"])]
    assert len(scene.target) == 0


@pytest.mark.parametrize("order", ["old-first", "new-first"])
async def test_a_key_moving_between_two_mounted_components_is_one_upsert(
    sync: bool, order: str
) -> None:
    scene = Scene("transfer-both", sync=sync)
    first: Plan = {"c1": {"x": 1}, "c2": {"y": 0}}
    await scene.run(first if order == "old-first" else dict(reversed(first.items())))
    # run 2: both still mounted; c1 stops declaring x, c2 declares it
    second: Plan = {"c1": {}, "c2": {"y": 0, "x": 2}}
    await scene.run(second if order == "old-first" else dict(reversed(second.items())))
    assert scene.conflicts() == []
    assert scene.owner("x") == "c2"
    assert [u for b, _ in scene.batches for u in b] == [("x", 2)]
    assert [d for _, b in scene.batches for d in b] == []


async def test_a_transfer_of_an_equal_value_sends_nothing(sync: bool) -> None:
    scene = Scene("transfer-equal", sync=sync)
    await scene.run({"c1": {"x": [1, 2]}})
    await scene.run({"c2": {"x": [1, 2]}})
    assert scene.batches == []
    assert scene.owner("x") == "c2"
    assert scene.conflicts() == []


async def test_a_chain_of_transfers(sync: bool) -> None:
    scene = Scene("transfer-chain", sync=sync)
    await scene.run({"c1": {"x": 1}})
    for n, name in enumerate(["c2", "c3", "c4"], start=2):
        await scene.run({name: {"x": n}})
        assert scene.batches == [([("x", n)], [])], name
        assert scene.owner("x") == name
    # two hops in one update: c4's key to c5, c5's own key to c6
    await scene.run({"c1": {"x": 1}})
    await scene.run({"c5": {"x": 5, "z": 0}})
    await scene.run({"c6": {"z": 1}, "c7": {"x": 7}})
    assert sorted(u for b, _ in scene.batches for u in b) == [("x", 7), ("z", 1)]
    assert [d for _, b in scene.batches for d in b] == []
    assert scene.conflicts() == []


async def test_a_real_conflict_is_reported_once_the_update_settles(sync: bool) -> None:
    scene = Scene("conflict", sync=sync)
    await scene.run({"c1": {"x": 1}, "c2": {"x": 2}})
    # the first owner (the first to commit) keeps the key and its value
    owner = scene.owner("x")
    other = "c2" if owner == "c1" else "c1"
    assert scene.target.get("x") == {"c1": 1, "c2": 2}[owner]
    if sync:
        assert owner == "c1"
    [exc] = scene.conflicts()
    assert exc.key == "x"
    assert (exc.owner_path, exc.declarer_path) == (f"/'{owner}'", f"/'{other}'")
    assert f"/'{owner}'" in str(exc) and f"/'{other}'" in str(exc) and "'conflict" in str(exc)
    [(_, ctx)] = scene.recorder.of_type(coco.KeyConflictError)
    assert str(ctx.stable_path) == exc.declarer_path
    # run 2: the owner stops declaring x while the other keeps declaring it:
    # a transfer in the same update, and no new report
    await scene.run({owner: {}, other: {"x": 3}})
    assert len(scene.conflicts()) == 1
    assert scene.owner("x") == other
    assert scene.target.get("x") == 3
    # (if the owner commits first, its key goes to the pending claim, with
    # the value claimed, and the claimant's own commit then updates it)
    upserts = [u for b, _ in scene.batches for u in b]
    assert upserts in ([("x", 3)], [("x", {"c1": 1, "c2": 2}[other]), ("x", 3)])
    assert [d for _, b in scene.batches for d in b] == []


async def test_a_claimant_that_stops_declaring_drops_its_claim(sync: bool) -> None:
    scene = Scene("claim-withdrawn", sync=sync)
    await scene.run({"c1": {"x": 1}, "c2": {"x": 1}})
    assert len(scene.conflicts()) == 1
    owner = scene.owner("x")
    other = "c2" if owner == "c1" else "c1"
    await scene.run({owner: {"x": 1}, other: {}})
    assert len(scene.conflicts()) == 1  # nothing claimed, nothing reported
    await scene.run({"c1": {}, "c2": {}})
    assert scene.batches == [([], ["x"])]
    assert "x" not in scene.target


async def test_a_pending_claim_gets_the_key_when_the_owner_lets_go_later() -> None:
    """Two apps declare one key into a shared target: the second one's claim
    waits (reported at once: no common ancestor), and when the first app's
    component stops declaring the key, the claimant gets it with the value
    it declared, without running again."""
    owner_app = unique("owner-app")
    claimant_app = unique("claimant-app")
    batches: list[tuple[list[tuple[str, Any]], list[str]]] = []

    def apply(batch: TargetBatch[str, int]) -> None:
        batches.append((list(batch.upserts), list(batch.deletes)))

    target: KeyedTarget[str, int] = KeyedTarget("shared", apply)
    owns = {"x": 1}
    recorder = Recorder()

    @coco.fn
    def first() -> None:
        for key, value in owns.items():
            target.declare(key, value)

    @coco.fn
    def second() -> None:
        target.declare("x", 2)

    await run_app(coco.App(owner_app, first))
    await run_app(coco.App(coco.AppConfig(claimant_app, exception_handler=recorder), second))
    [(exc, _)] = recorder.of_type(coco.KeyConflictError)
    assert isinstance(exc, coco.KeyConflictError)
    assert exc.owner_app == owner_app and exc.declarer_app == claimant_app
    assert f"of app {owner_app!r}" in str(exc) and f"of app {claimant_app!r}" in str(exc)
    assert target.get("x") == 1
    batches.clear()
    owns.clear()
    await run_app(coco.App(owner_app, first))
    assert batches == [([("x", 2)], [])]
    assert target.get("x") == 2


async def test_a_consumer_sees_a_transfer_as_one_update() -> None:
    """A LiveMap producer's keys move to another producer in one update (a
    live component's ``update_full()`` mounts the new one instead of the
    old): the ``mount_each`` consumer of the map sees one call with the new
    value, never a delete, and nothing for a key whose value is equal."""
    consumer_transfer = unique("consumer-transfer")
    rounds: list[Plan] = [
        {"c1": {"x": 1, "y": 0}},
        {"c2": {"x": 2, "y": 0}},
        {"c3": {"x": 2, "y": 0}},
    ]
    plan: list[Plan] = [rounds[0]]
    seen: list[Any] = []
    recorder = Recorder()
    step = anyio.Event()

    @coco.fn
    async def produce(lm: LiveMap[str, Any], decls: dict[str, Any]) -> None:
        await anyio.sleep(0)
        for key, value in decls.items():
            lm.declare_entry(key, value)

    class Producers:
        def __init__(self, lm: LiveMap[str, Any]) -> None:
            self.lm = lm

        async def process(self) -> None:
            for name, decls in plan[0].items():
                await coco.mount(coco.component_subpath(name), produce, self.lm, decls)

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            nonlocal step
            await op.update_full()
            await op.mark_ready()
            for new in rounds[1:]:
                await step.wait()
                step = anyio.Event()
                plan[0] = new
                await op.update_full()

    @coco.fn
    async def consume(value: Any) -> None:
        seen.append(value)

    holder: dict[str, LiveMap[str, Any]] = {}

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, Any] = await LiveMap.create()
        holder["lm"] = lm
        await coco.mount(Producers, lm)
        await coco.mount_each(consume, lm)

    def owner(key: str) -> Any:
        path = holder["lm"].owner_path(key)
        return None if path is None else path[-1]

    app = coco.App(coco.AppConfig(consumer_transfer, exception_handler=recorder), main)
    async with app.update(live=True) as h:
        with anyio.fail_after(TIMEOUT):
            await h.ready()
            lm = holder["lm"]
            await lm.settle()
            assert sorted(seen) == [0, 1]
            step.set()
            await wait_for(lambda: owner("x") == "c2" and owner("y") == "c2")
            await lm.settle()
            # one call: x changed 1 -> 2; y moved with an equal value: nothing
            assert sorted(seen) == [0, 1, 2]
            assert lm.stats().changes == 3
            step.set()
            await wait_for(lambda: owner("x") == "c3" and owner("y") == "c3")
            await lm.settle()
            assert sorted(seen) == [0, 1, 2]  # equal values: nothing
            assert lm.stats().changes == 3
            assert dict(lm.items()) == {"x": 2, "y": 0}
            await h.stop()
    assert recorder.calls == []


async def test_a_transfer_survives_an_update_stopped_before_it_settles() -> None:
    """Run 2 mounts the new owner (its claim commits), then stops before the
    parent commits: the old owner still holds the key, nothing was deleted;
    the next update completes the transfer with one upsert."""
    stopped_transfer = unique("stopped-transfer")
    batches: list[tuple[list[tuple[str, Any]], list[str]]] = []

    def apply(batch: TargetBatch[str, int]) -> None:
        batches.append((list(batch.upserts), list(batch.deletes)))

    target: KeyedTarget[str, int] = KeyedTarget("rows", apply)
    recorder = Recorder()
    state = {"name": "c1", "value": 1, "block": False}
    committed = anyio.Event()

    @coco.fn
    async def part(value: int) -> None:
        target.declare("x", value)

    @coco.fn
    async def main() -> None:
        h = await coco.mount(coco.component_subpath(state["name"]), part, state["value"])
        if state["block"]:
            await h.ready()
            committed.set()
            await anyio.sleep_forever()  # stopped here, before main commits

    app = coco.App(coco.AppConfig(stopped_transfer, exception_handler=recorder), main)
    await run_app(app)
    assert batches == [([("x", 1)], [])]
    batches.clear()
    state.update(name="c2", value=2, block=True)
    with anyio.fail_after(TIMEOUT):
        async with app.update(live=True) as h:
            await committed.wait()
            await h.stop()
    assert batches == []  # the claim is pending: no delete, no upsert
    assert target.owner_path("x") == ("c1",)
    assert target.get("x") == 1
    state["block"] = False
    await run_app(app)
    assert batches == [([("x", 2)], [])]
    assert target.owner_path("x") == ("c2",)
    assert recorder.of_type(coco.KeyConflictError) == []


async def test_a_superseded_claimant_run_lands_nothing() -> None:
    """The new owner is re-mounted while its first run is in flight: only the
    second run's value reaches the sink when the old owner goes."""
    remount_transfer = unique("remount-transfer")
    batches: list[tuple[list[tuple[str, Any]], list[str]]] = []

    def apply(batch: TargetBatch[str, int]) -> None:
        batches.append((list(batch.upserts), list(batch.deletes)))

    target: KeyedTarget[str, int] = KeyedTarget("rows", apply)
    recorder = Recorder()
    gate = anyio.Event()
    started = anyio.Event()

    @coco.fn
    async def slow(value: int) -> None:
        started.set()
        await gate.wait()
        target.declare("x", value)

    @coco.fn
    def fast(value: int) -> None:
        target.declare("x", value)

    class Controller:
        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await (await op.update("c1", fast, 1)).ready()
            batches.clear()
            await op.update("c2", slow, 2)
            await started.wait()
            # re-mounted mid-flight: the first run is cancelled, never commits
            await (await op.update("c2", fast, 3)).ready()
            gate.set()
            await (await op.delete("c1")).ready()
            await op.mark_ready()

    @coco.fn
    async def main() -> None:
        await coco.mount(Controller)

    app = coco.App(coco.AppConfig(remount_transfer, exception_handler=recorder), main)
    with anyio.fail_after(TIMEOUT):
        await app.update()
    assert batches == [([("x", 3)], [])]
    assert target.owner_path("x") == (coco.Symbol("Controller"), "c2")
    # (the claim was reported at once: the live component is not in a run)
    [(exc, _)] = recorder.of_type(coco.KeyConflictError)
    assert isinstance(exc, coco.KeyConflictError) and exc.key == "x"


# -- ownership is per app ---------------------------------------------------------------


def shared_target() -> tuple[KeyedTarget[str, int], list[tuple[list[Any], list[str]]]]:
    batches: list[tuple[list[Any], list[str]]] = []

    def apply(batch: TargetBatch[str, int]) -> None:
        batches.append((list(batch.upserts), list(batch.deletes)))

    return KeyedTarget("shared", apply), batches


async def test_a_new_app_object_of_the_same_name_continues_its_tree() -> None:
    continued = unique("continued")
    other = unique("other")
    target, batches = shared_target()
    recorder = Recorder()
    keys = {"a": 1, "b": 2}

    @coco.fn
    def part(key: str, value: int) -> None:
        target.declare(key, value)

    @coco.fn
    async def main() -> None:
        for key, value in keys.items():
            await coco.mount(coco.component_subpath(key), part, key, value)

    await run_app(coco.App(coco.AppConfig(continued, exception_handler=recorder), main))
    assert sorted(u for b, _ in batches for u in b) == [("a", 1), ("b", 2)]
    batches.clear()
    # a new object, as after a restart of the code that made the first one:
    # its components take their keys back; a vanished one is unmounted
    del keys["b"]
    app = coco.App(coco.AppConfig(continued, exception_handler=recorder), main)
    await run_app(app)
    assert recorder.calls == []
    assert batches == [([], ["b"])]
    assert target.owner_path("a") == ("a",)
    # another app declaring the same key conflicts, naming the owning app
    await run_app(coco.App(coco.AppConfig(other, exception_handler=recorder), main))
    [(exc, ctx)] = recorder.of_type(coco.KeyConflictError)
    assert isinstance(exc, coco.KeyConflictError)
    assert exc.owner_app == continued and ctx.env_name == other
    assert f"owned by component /'a' of app {continued!r}" in str(exc)
    await coco.App(other, main).drop()
    await app.drop()


async def test_drop_releases_everything_the_app_owns() -> None:
    dropped = unique("dropped")
    target, batches = shared_target()
    seen: list[Any] = []

    @coco.fn
    def part(value: int) -> None:
        target.declare("x", value)

    @coco.fn
    async def consume(value: int) -> None:
        seen.append(value)

    holder: dict[str, LiveMap[str, int]] = {}

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        holder["lm"] = lm
        lm.declare_entry("m", 1)
        await coco.mount(part, 1)

    app = coco.App(dropped, main)
    await run_app(app)
    batches.clear()
    await app.drop()
    assert batches == [([], ["x"])]
    assert len(target) == 0
    assert holder["lm"].retired and len(holder["lm"]) == 0
    await app.drop()  # nothing left: a no-op
    # the next update (of any object of that name) starts from an empty tree
    await run_app(coco.App(dropped, main))
    assert batches == [([], ["x"]), ([("x", 1)], [])]
    # another app may take the key now that the first let it go
    await coco.App(dropped, main).drop()
    assert len(target) == 0


async def test_drop_while_updating_raises() -> None:
    busy = unique("busy")

    @coco.fn
    async def main() -> None:
        await anyio.sleep_forever()

    app = coco.App(busy, main)
    with anyio.fail_after(TIMEOUT):
        async with app.update(live=True) as h:
            await anyio.sleep(0.01)
            with pytest.raises(coco.UpdateInProgressError):
                await coco.App(busy, main).drop()
            await h.stop()
    await app.drop()


def test_drop_blocking() -> None:
    dropped_blocking = unique("dropped-blocking")
    target, batches = shared_target()

    @coco.fn
    def main() -> None:
        target.declare("k", 1)

    app = coco.App(dropped_blocking, main)
    app.update_blocking()
    app.drop_blocking(backend="trio")
    assert batches == [([("k", 1)], []), ([], ["k"])]
