"""Bad input (SPEC §7): every misuse gets its specific exception, with a
message naming the offending key, path or call, and leaves every map, target
and component exactly as it was.

One table drives one test.  Each case runs in a fresh live app holding a map
with entries (owned by a producer and its child), a keyed target, and a
consumer (``mount_each``) mirroring the map into a second keyed target.  The
misuse happens inside the producer's own re-run, inside another component's
run (an *intruder*), or outside any component.  Then:

* the exception is raised at the call (and nothing is reported), or reported
  to the right handler chain with the right ``mount_kind`` (and nothing is
  raised);
* the state (map entries and owners, map counters, both targets, consumer
  calls, failed and unmounted components) changed exactly as a clean re-run
  would change it, give or take the counter the misuse itself bumps
  (``conflicts``, ``eq_errors``);
* producer, consumer and targets still work: a later change flows through.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, Mirror, Recorder, Remote, RemoteLive, wait_for

import livemap as coco
from livemap import LiveMap, Symbol

pytestmark = pytest.mark.anyio

REMOTE = (Symbol("RemoteLive"),)
PRODUCER = "/RemoteLive/'producer'"
INTRUDER = "/RemoteLive/'intruder'"
BASE = {"a": ("a", 1), "b": ("b", 2)}


class RaisingEq:
    """A value whose ``==`` raises."""

    def __eq__(self, other: object) -> bool:
        raise ArithmeticError("cannot compare this value")

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "RaisingEq()"


class Unstable:
    """A plain object as a key: not a stable key."""

    def __repr__(self) -> str:
        return "<Unstable key>"


class StrKey(str):
    """A ``str`` subclass: not a stable key (exact types only)."""


class Live:
    """A live-component class."""

    def process(self) -> None:
        pass

    async def process_live(self, op: coco.LiveComponentOperator) -> None:
        await op.mark_ready()


class NullSubscriber:
    async def update_all(self) -> None:
        pass

    async def mark_ready(self) -> None:
        pass

    async def update(self, key: Any, value: Any) -> Any:
        return coco.ReadyHandle()

    async def delete(self, key: Any) -> Any:
        return coco.ReadyHandle()


@dataclass
class World:
    """What a case's misuse gets to work with."""

    remote: Remote
    lm: LiveMap[Any, Any] | None = None
    owned: Mirror = field(default_factory=lambda: Mirror("owned"))
    down: Mirror = field(default_factory=lambda: Mirror("down"))
    rec: Recorder = field(default_factory=Recorder)
    caught: list[BaseException] = field(default_factory=list)
    calls: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    scratch: list[LiveMap[Any, Any]] = field(default_factory=list)  # one per producer run
    handle: coco.UpdateHandle | None = None
    each: coco.ComponentMountHandle | None = None

    @property
    def map(self) -> LiveMap[Any, Any]:
        assert self.lm is not None
        return self.lm


@coco.fn
async def leaf(w: World) -> None:
    w.map.declare_entry("leaf", ("leaf", 0))


@coco.fn
async def noop() -> None:
    pass


@coco.fn
async def producer(w: World, misuse: Callable[[World], Any] | None, values: dict[str, Any]) -> None:
    for key, value in {**BASE, **values, **w.extra}.items():
        w.map.declare_entry(key, value)
    w.owned.target.declare("t", 1)
    await coco.mount(coco.component_subpath("leaf"), leaf, w)
    # a map of this run only: retired by the next run
    w.scratch.append(await LiveMap.create())
    if misuse is not None:
        try:
            outcome = misuse(w)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception as exc:
            w.caught.append(exc)


@coco.fn
async def intruder(w: World, misuse: Callable[[World], Any]) -> None:
    try:
        outcome = misuse(w)
        if inspect.isawaitable(outcome):
            await outcome
    except Exception as exc:
        w.caught.append(exc)


@coco.fn
async def process(value: tuple[str, Any], w: World) -> None:
    w.calls += 1
    w.down.target.declare(value[0], value)


async def run_producer(
    w: World, misuse: Callable[[World], Any] | None = None, values: dict[str, Any] | None = None
) -> None:
    async def job(op: coco.LiveComponentOperator) -> None:
        async with coco.exception_handler(w.rec):
            h = await op.update("producer", producer, w, misuse, values or {})
        await h.ready()

    await w.remote(job)
    await settle(w)


async def run_intruder(w: World, misuse: Callable[[World], Any]) -> None:
    async def job(op: coco.LiveComponentOperator) -> None:
        async with coco.exception_handler(w.rec):
            h = await op.update("intruder", intruder, w, misuse)
        await h.ready()

    await w.remote(job)
    # a second consumer reports from its own task: give it the time to
    await anyio.sleep(0.01)
    await settle(w)


async def settle(w: World) -> None:
    with anyio.fail_after(TIMEOUT):
        await w.map.settle()
        assert w.each is not None
        await w.each.ready()


def snapshot(w: World) -> dict[str, Any]:
    """Everything a misuse must leave as it was."""
    lm = w.map
    stats = lm.stats()
    assert w.handle is not None
    run = w.handle.stats()
    owned = w.owned.target.table_stats()
    return {
        "items": dict(lm.items()),
        "owners": {key: lm.owner_path(key) for key, _ in lm.items()},
        "lm.entries": stats.entries,
        "lm.changes": stats.changes,
        "lm.suppressed": stats.suppressed,
        "lm.conflicts": stats.conflicts,
        "lm.eq_errors": stats.eq_errors,
        "lm.deliveries": stats.deliveries,
        "lm.pending": stats.pending,
        "lm.in_flight": stats.in_flight,
        "lm.failing": dict(stats.failing),
        "lm.consumer": stats.consumer,
        "owned.record": w.owned.record(),
        "owned.rows": dict(w.owned.rows),
        "owned.changes": owned.changes,
        "owned.suppressed": owned.suppressed,
        "owned.conflicts": owned.conflicts,
        "down.record": w.down.record(),
        "down.rows": dict(w.down.rows),
        "consumer.calls": w.calls,
        "components.failed": run.components_failed,
        "components.unmounted": run.components_unmounted,
    }


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Numeric fields: the difference; others: the value after."""
    out: dict[str, Any] = {}
    for name, value in after.items():
        if type(value) is int:
            out[name] = value - before[name]
        else:
            out[name] = value
    return out


# -- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    where: str  # "producer" (its own re-run), "intruder" (another component), "outside"
    error: type[BaseException]
    names: tuple[str, ...]  # what the message must name
    misuse: Callable[[World], Any] | None = None
    values: dict[str, Any] = field(default_factory=dict)  # producer declarations to override
    reported: str | None = None  # the mount_kind it is reported with; None: raised at the call
    path: str | None = None  # where it is reported from
    deltas: dict[str, int] = field(default_factory=dict)  # counters the misuse itself bumps


def declare(key: Any) -> Callable[[World], None]:
    return lambda w: w.map.declare_entry(key, ("x", 0))


async def _mount_outside(w: World) -> None:
    await coco.mount(noop)


async def _mount_each_outside(w: World) -> None:
    await coco.mount_each(process, w.map, w)


async def _use_mount_outside(w: World) -> None:
    await coco.use_mount(noop)


async def _create_outside(w: World) -> None:
    await LiveMap.create()


async def _mount_sibling_twice(w: World) -> None:
    await coco.mount(coco.component_subpath("leaf"), leaf, w)


async def _mount_under_unstable_subpath(w: World) -> None:
    await coco.mount(coco.component_subpath("ok", 1.5), noop)


async def _second_watch(w: World) -> None:
    await w.map.watch(NullSubscriber())


async def _second_mount_each(w: World) -> None:
    await coco.mount_each(process, w.map, w)


async def _use_mount_live(w: World) -> None:
    await coco.use_mount(Live)


async def _mount_each_not_iterable(w: World) -> None:
    await coco.mount_each(noop, 42)


def _declare_into_retired_map(w: World) -> None:
    assert w.scratch[0].retired
    w.scratch[0].declare_entry("z", ("z", 0))


def _duplicate_entry(w: World) -> None:
    w.map.declare_entry("a", ("a", 99))


def _duplicate_target_key(w: World) -> None:
    w.owned.target.declare("t", 99)


CASES = [
    # a non-stable key: TypeError at the call, naming the key
    Case("key-list", "producer", TypeError, ("[1, 2.5]",), declare([1, 2.5])),
    Case("key-dict", "producer", TypeError, ("{'x': 1}",), declare({"x": 1})),
    Case("key-float", "producer", TypeError, ("1.5",), declare(1.5)),
    Case("key-object", "producer", TypeError, ("<Unstable key>",), declare(Unstable())),
    Case("key-nested", "producer", TypeError, ("('k', [3.5])",), declare(("k", [3.5]))),
    Case("key-str-subclass", "producer", TypeError, ("'sub'", "StrKey"), declare(StrKey("sub"))),
    Case(
        "target-key-list",
        "producer",
        TypeError,
        ("['t', 1.5]",),
        lambda w: w.owned.target.declare(["t", 1.5], 1),
    ),
    Case("subpath-float", "producer", TypeError, ("1.5",), _mount_under_unstable_subpath),
    # a call outside any component: NotInComponentError naming the call
    Case("declare-outside", "outside", coco.NotInComponentError, ("declare_entry",), declare("z")),
    Case(
        "target-declare-outside",
        "outside",
        coco.NotInComponentError,
        ("owned.declare",),
        lambda w: w.owned.target.declare("z", 1),
    ),
    Case("mount-outside", "outside", coco.NotInComponentError, ("mount()",), _mount_outside),
    Case(
        "mount-each-outside",
        "outside",
        coco.NotInComponentError,
        ("mount_each()",),
        _mount_each_outside,
    ),
    Case(
        "use-mount-outside",
        "outside",
        coco.NotInComponentError,
        ("use_mount()",),
        _use_mount_outside,
    ),
    Case(
        "create-outside",
        "outside",
        coco.NotInComponentError,
        ("LiveMap.create()",),
        _create_outside,
    ),
    # a key declared twice in one run: raised at the second call, the first stands
    Case("duplicate-entry", "producer", coco.DuplicateDeclarationError, ("'a'",), _duplicate_entry),
    Case(
        "duplicate-target-key",
        "producer",
        coco.DuplicateDeclarationError,
        ("'t'", "owned"),
        _duplicate_target_key,
    ),
    # a key another component owns: reported to the declarer's chain, owner keeps it
    Case(
        "conflict",
        "intruder",
        coco.KeyConflictError,
        ("'a'", PRODUCER, INTRUDER),
        lambda w: w.map.declare_entry("a", ("a", 5)),
        reported="process_live",  # mounted by operator.update()
        path=INTRUDER,
        deltas={"lm.conflicts": 1},
    ),
    Case(
        "target-conflict",
        "intruder",
        coco.KeyConflictError,
        ("'t'", PRODUCER, INTRUDER, "owned"),
        lambda w: w.owned.target.declare("t", 5),
        reported="process_live",  # mounted by operator.update()
        path=INTRUDER,
        deltas={"owned.conflicts": 1},
    ),
    # two siblings at one path: raised by the second mount, the first stays
    Case(
        "duplicate-path",
        "producer",
        coco.DuplicatePathError,
        (f"{PRODUCER}/'leaf'",),
        _mount_sibling_twice,
    ),
    # a second consumer
    Case("second-watch", "outside", RuntimeError, ("LiveMap#", "consumer"), _second_watch),
    Case(
        "second-mount-each",
        "intruder",
        RuntimeError,
        ("LiveMap#", "consumer"),
        _second_mount_each,
        reported="mount_each",
        path=f"{INTRUDER}/process",
    ),
    # a value whose == raises: reported, the held value stays
    Case(
        "raising-eq",
        "producer",
        ValueError,
        ("'a'", "cannot compare this value"),
        values={"a": ("a", RaisingEq())},
        reported="process_live",  # mounted by operator.update()
        path=PRODUCER,
        deltas={"lm.eq_errors": 1, "lm.suppressed": -1},
    ),
    # further misuse the error reference lists
    Case(
        "retired-map",
        "producer",
        coco.MapRetiredError,
        ("LiveMap#", "retired", PRODUCER),
        _declare_into_retired_map,
    ),
    Case("use-mount-live-class", "producer", TypeError, ("Live",), _use_mount_live),
    Case("mount-each-not-iterable", "producer", TypeError, ("int",), _mount_each_not_iterable),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_bad_input(case: Case) -> None:
    with Remote() as remote:
        w = World(remote)

        @coco.fn
        async def main() -> None:
            w.lm = lm = await LiveMap.create()
            await coco.mount(RemoteLive, remote)
            w.each = await coco.mount_each(process, lm, w)

        app = coco.App(coco.AppConfig("bad-input", exception_handler=w.rec), main)
        async with app.update(live=True) as handle:
            w.handle = handle
            with anyio.fail_after(TIMEOUT):
                await handle.ready()
            await run_producer(w)
            held = w.map.get("a")
            assert w.down.rows == {"a": ("a", 1), "b": ("b", 2), "leaf": ("leaf", 0)}

            # a clean re-run: what a run that changes nothing does to the state
            s0 = snapshot(w)
            await run_producer(w)
            s1 = snapshot(w)
            clean = delta(s0, s1)
            assert s1["items"] == s0["items"] and clean["lm.changes"] == 0

            # the misuse
            if case.where == "producer":
                await run_producer(w, case.misuse, case.values)
                expected = dict(clean)
            elif case.where == "intruder":
                assert case.misuse is not None
                await run_intruder(w, case.misuse)
                expected = delta(s1, s1)
            else:
                assert case.misuse is not None
                try:
                    outcome = case.misuse(w)
                    if inspect.isawaitable(outcome):
                        with anyio.fail_after(TIMEOUT):
                            await outcome
                except Exception as exc:
                    w.caught.append(exc)
                await settle(w)
                expected = delta(s1, s1)
            s2 = snapshot(w)

            # the exception: raised at the call, or reported (never both)
            if case.reported is None:
                assert w.rec.calls == [], w.rec.calls
                [exc] = w.caught
            else:
                assert w.caught == []
                [(exc, ctx)] = w.rec.calls
                assert ctx.mount_kind == case.reported
                assert ctx.path == case.path
            assert isinstance(exc, case.error), repr(exc)
            for name in case.names:
                assert name in str(exc), (name, str(exc))
            if case.id == "raising-eq":
                assert "cannot compare" in repr(exc.__cause__)

            # nothing else changed
            for name, bump in case.deltas.items():
                expected[name] += bump
            assert delta(s1, s2) == expected
            assert w.map.get("a") is held

            # and everything still works: a change flows to the consumer
            w.extra["c"] = ("c", 3)
            await run_producer(w)
            await wait_for(lambda: "c" in w.down.rows)
            assert w.down.rows == {
                "a": ("a", 1),
                "b": ("b", 2),
                "leaf": ("leaf", 0),
                "c": ("c", 3),
            }
            assert w.down.rows == w.down.record()
            assert w.map.owner_path("a") == (*REMOTE, "producer")
            assert w.map.owner_path("leaf") == (*REMOTE, "producer", "leaf")
            assert w.map.stats().consumer


# -- the consumer slot frees when its consumer is unmounted ---------------------------------


@coco.fn
async def note(value: tuple[str, Any], got: list[Any]) -> None:
    got.append(value)


@coco.fn
async def consumer_host(lm: LiveMap[Any, Any], got: list[Any]) -> None:
    await coco.mount_each(note, lm, got)


@pytest.mark.parametrize("entries", [{}, BASE], ids=["empty", "entries"])
async def test_a_new_consumer_may_start_once_the_first_is_unmounted(
    entries: dict[str, Any],
) -> None:
    """After the first consumer's ``mount_each`` is unmounted, starting a new
    one is not a "second consumer": no RuntimeError, and the new one works."""
    rec = Recorder()
    got: list[Any] = []
    with Remote() as remote:
        holder: dict[str, Any] = {}

        @coco.fn
        async def main() -> None:
            holder["lm"] = await LiveMap.create()
            await coco.mount(RemoteLive, remote)

        @coco.fn
        async def fill(lm: LiveMap[Any, Any]) -> None:
            for key, value in entries.items():
                lm.declare_entry(key, value)

        async def restart(op: coco.LiveComponentOperator) -> list[bool]:
            lm = holder["lm"]
            h = await op.update("producer", fill, lm)
            await h.ready()
            seen = []
            for _ in range(5):
                async with coco.exception_handler(rec):
                    h = await op.update("consumer", consumer_host, lm, got)
                await h.ready()
                seen.append(lm.stats().consumer)
                await op.delete("consumer")
                # the consumer has ended when its component's unmount returns ...
                seen.append(lm.stats().consumer)
            # ... so a new one started right away is the only consumer
            got.clear()
            async with coco.exception_handler(rec):
                holder["last"] = await op.update("consumer", consumer_host, lm, got)
            await holder["last"].ready()
            return seen

        app = coco.App(coco.AppConfig("bad-input", exception_handler=rec), main)
        async with app.update(live=True) as handle:
            with anyio.fail_after(TIMEOUT):
                await handle.ready()
            seen = await remote(restart)
            assert rec.calls == []
            assert seen == [True, False] * 5
            with anyio.fail_after(TIMEOUT):
                await holder["lm"].settle()
                await holder["last"].ready()
            assert sorted(got) == sorted(entries.values())
            assert holder["lm"].stats().consumer
