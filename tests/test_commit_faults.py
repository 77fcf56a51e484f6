"""Faults in the commit path: a commit's effects downstream (the consumer of a
LiveMap, the sink of a KeyedTarget) never depend on what happens after them.

* A conflict handler that is interrupted (the component re-mounted, the run
  stopped, the task running the update cancelled) while it runs: the rest of
  the commit has reached the consumer or the sink already.
* A ``BaseException`` from a value's ``__eq__`` in the middle of a commit: the
  commit is all or nothing for the target's record, on both cores.
* A ``KeyedTarget`` used on one event loop after another: nothing bound to the
  first loop is used on the next.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import ModuleType
from typing import Any

import anyio
import pytest
from _cores import core_fixture  # noqa: F401  (the ``core`` fixture)
from helpers import TIMEOUT, Mirror, Remote, RemoteLive, run_app, wait_for

import livemap as coco
from livemap import LiveMap, TargetBatch

pytestmark = pytest.mark.anyio

# -- 1. an async conflict handler interrupted while it runs --------------------------------


class SlowHandler:
    """An async exception handler that stays busy with the first conflict it
    gets until it is cancelled; it deals with later ones at once."""

    def __init__(self) -> None:
        self.entered = anyio.Event()
        self.conflicts: list[coco.KeyConflictError] = []
        self.cancelled = False

    async def __call__(self, exc: BaseException, ctx: coco.ExceptionContext) -> None:
        if not isinstance(exc, coco.KeyConflictError):
            raise exc
        self.conflicts.append(exc)
        if len(self.conflicts) > 1:
            return
        self.entered.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.cancelled = True
            raise


class Scene:
    """Component A owns ``"x"``; B declares ``"x"`` and ``"y"`` and has a slow
    conflict handler.  ``kind`` is ``"map"`` (a LiveMap with a ``mount_each``
    consumer recording what it processes) or ``"target"`` (a KeyedTarget
    whose sink keeps its rows)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.handler = SlowHandler()
        self.seen: dict[str, str] = {}  # what the map's consumer processed
        self.mirror = Mirror("rows")  # the target and its sink's rows
        self.lm: LiveMap[str, tuple[str, str]] | None = None

    def declarer(self) -> Callable[[str, Any], None]:
        if self.kind == "map":
            assert self.lm is not None
            return self.lm.declare_entry
        return self.mirror.target.declare

    def value(self, key: str, who: str) -> Any:
        # the consumer gets the value only: it carries its key
        return (key, who) if self.kind == "map" else who

    async def begin(self) -> None:
        """In the root's run: create the map, mount A (and the consumer), and
        wait until they are ready."""
        if self.kind == "map":
            self.lm = await LiveMap.create()
        a = await coco.mount(
            coco.component_subpath("a"), owner_a, self.declarer(), self.value("x", "a")
        )
        await a.ready()
        if self.kind == "map":
            assert self.lm is not None
            each = await coco.mount_each(consume, self.lm, self.seen)
            await each.ready()

    async def mount_b(self) -> coco.ComponentMountHandle:
        async with coco.exception_handler(self.handler):
            return await coco.mount(
                coco.component_subpath("b"),
                claimant_b,
                self.declarer(),
                self.value("x", "b"),
                self.value("y", "b"),
            )

    async def settle(self) -> None:
        """Wait until the map's consumer has processed every committed change."""
        if self.lm is not None:
            with anyio.fail_after(TIMEOUT):
                await self.lm.settle()

    def check(self) -> None:
        """``y`` is B's, downstream as in the record; ``x`` stays A's."""
        if self.kind == "map":
            lm = self.lm
            assert lm is not None
            assert dict(lm.items()) == {"x": ("x", "a"), "y": ("y", "b")}
            assert self.seen == {"x": "a", "y": "b"}, "the consumer never heard of 'y'"
        else:
            assert self.mirror.record() == {"x": "a", "y": "b"}
            assert self.mirror.rows == self.mirror.record(), "the sink is behind the record"
        assert [exc.key for exc in self.handler.conflicts[:1]] == ["x"]


@coco.fn
async def owner_a(declare: Callable[[str, Any], None], x: Any) -> None:
    declare("x", x)


@coco.fn
async def claimant_b(declare: Callable[[str, Any], None], x: Any, y: Any) -> None:
    declare("x", x)
    declare("y", y)


@coco.fn
def consume(value: tuple[str, str], seen: dict[str, str]) -> None:
    seen[value[0]] = value[1]


@pytest.mark.parametrize("kind", ["map", "target"])
async def test_remount_during_conflict_handler_loses_nothing(kind: str) -> None:
    """B is re-mounted (declaring the same) while its handler runs: the change
    its first commit made downstream is not lost, and is not suppressed by the
    re-run's equal declaration."""
    scene = Scene(kind)
    with Remote() as remote:

        @coco.fn
        async def main() -> None:
            await scene.begin()
            await coco.mount(RemoteLive, remote)

        async def mount_b(op: coco.LiveComponentOperator) -> coco.ComponentMountHandle:
            async with coco.exception_handler(scene.handler):
                return await op.update(
                    "b",
                    claimant_b,
                    scene.declarer(),
                    scene.value("x", "b"),
                    scene.value("y", "b"),
                )

        async with coco.App("commit-faults", main).update(live=True) as handle:
            with anyio.fail_after(TIMEOUT):
                await handle.ready()
            await remote(mount_b)
            with anyio.fail_after(TIMEOUT):
                await scene.handler.entered.wait()
            h = await remote(mount_b)  # the re-run cancels the first one's handler
            with anyio.fail_after(TIMEOUT):
                await h.ready()
            await scene.settle()
            await wait_for(lambda: scene.handler.cancelled)
            assert len(scene.handler.conflicts) == 2  # each run reported its conflict
            scene.check()


@pytest.mark.parametrize("interruption", ["stop", "cancel"])
@pytest.mark.parametrize("kind", ["map", "target"])
async def test_interrupted_conflict_handler_loses_nothing(kind: str, interruption: str) -> None:
    """The run is stopped (``handle.stop()``), or the task awaiting
    ``app.update()`` is cancelled, while B's handler runs: the consumer has
    heard of ``y`` / the sink has it, and a later run declaring the same
    keeps it there."""
    scene = Scene(kind)

    @coco.fn
    async def main() -> None:
        await scene.begin()
        await scene.mount_b()

    app = coco.App("commit-faults", main)
    handle = app.update()
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(handle.result)
            await scene.handler.entered.wait()
            # (the consumer works while the handler runs; wait for it to be done)
            await scene.settle()
            if interruption == "stop":
                await handle.stop()
            else:
                tg.cancel_scope.cancel()
    assert scene.handler.cancelled
    scene.check()
    if kind == "target":
        # A later run of B declares the same: nothing to send, nothing lost.
        await run_app(app)
        assert len(scene.handler.conflicts) == 2
        scene.check()


# -- 2. a BaseException from __eq__ in the middle of a commit ------------------------------


class Abort(BaseException):
    """A non-``Exception`` like ``KeyboardInterrupt`` (which asyncio would
    re-raise out of the event loop, past the test)."""


class InterruptingEq:
    """A value whose ``==`` raises ``exc_type`` (a ``BaseException``)."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, exc_type: type[BaseException]) -> None:
        self.exc_type = exc_type

    def __eq__(self, other: object) -> bool:
        raise self.exc_type("interrupted in __eq__")

    def __repr__(self) -> str:
        return f"InterruptingEq({self.exc_type.__name__})"


class DeclaringEq:
    """A value whose ``==`` declares one more key into the buffer being
    committed (so the commit's walk over the buffer raises ``RuntimeError``)."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self) -> None:
        self.buffer: Any = None

    def __eq__(self, other: object) -> bool:
        self.buffer.declare("sneaked-in", 0)
        return False


def declared(table: Any, owner: object, pairs: dict[Any, Any]) -> Any:
    buffer = table.buffer(owner)
    for key, value in pairs.items():
        buffer.declare(key, value)
    return buffer


def state(table: Any, owners: list[object]) -> tuple[Any, ...]:
    """Everything observable of a table."""
    keys = table.keys()
    return (
        table.items(),
        [table.keys_of(o) for o in owners],
        [table.count_of(o) for o in owners],
        [(k, table.owner_of(k), table.get(k)) for k in keys],
        table.owners(),
        table.seq,
        table.stats().as_dict(),
    )


@pytest.mark.parametrize("track_undo", [False, True], ids=["plain", "undo"])
@pytest.mark.parametrize(
    "exc_type",
    [KeyboardInterrupt, SystemExit, asyncio.CancelledError, Abort],
    ids=["KeyboardInterrupt", "SystemExit", "CancelledError", "Abort"],
)
def test_base_exception_from_eq_leaves_the_table_as_it_was(
    core: ModuleType, exc_type: type[BaseException], track_undo: bool
) -> None:
    table = core.Table("t", track_undo=track_undo)
    other = object()
    held = InterruptingEq(exc_type)
    first = table.commit(declared(table, "o", {"a": 0, "k": held, "gone": 1, "b": 0}))
    table.commit(declared(table, other, {"theirs": 5}))
    before = state(table, ["o", other])
    with pytest.raises(exc_type, match="interrupted in __eq__"):
        # "new" is inserted, "a" updated and then "k"'s comparison raises:
        # none of it may stay ("later", "theirs" and dropping "gone" never came)
        table.commit(
            declared(
                table,
                "o",
                {"new": 2, "a": 1, "theirs": 6, "k": InterruptingEq(exc_type), "b": 1, "later": 3},
            )
        )
    assert state(table, ["o", other]) == before
    assert table.get("a") == 0 and "new" not in table
    # the next commit sends the whole difference again
    result = table.commit(declared(table, "o", {"new": 2, "a": 1, "k": held, "b": 1, "later": 3}))
    assert result.upserts == [("new", 2), ("a", 1), ("b", 1), ("later", 3)]
    assert result.deletes == ["gone"]
    assert (result.first_seq, result.last_seq) == (6, 10)
    assert dict(table.items()) == {"a": 1, "k": held, "b": 1, "new": 2, "later": 3, "theirs": 5}
    if track_undo:
        # the failed commit did not count: the one before is still revertible
        table.revert(result)
        assert dict(table.items()) == dict(before[0])
        assert [table.keys_of(o) for o in ["o", other]] == before[1]
        with pytest.raises(ValueError, match="only the latest commit"):
            table.revert(first)


def test_buffer_changed_during_its_commit_leaves_the_table_as_it_was(core: ModuleType) -> None:
    table = core.Table("t", track_undo=True)
    table.commit(declared(table, "o", {"a": 0, "k": 0}))
    before = state(table, ["o"])
    sneaky = DeclaringEq()
    buffer = declared(table, "o", {"new": 1, "a": 1, "k": sneaky, "later": 2})
    sneaky.buffer = buffer
    with pytest.raises(RuntimeError, match="changed size during iteration"):
        table.commit(buffer)
    assert state(table, ["o"]) == before


class DeclaringEqThen(DeclaringEq):
    """:class:`DeclaringEq` whose ``==`` then says equal, not equal, or
    raises (an ``EQ_ERROR`` if the walk went on)."""

    def __init__(self, outcome: str) -> None:
        super().__init__()
        self.outcome = outcome

    def __eq__(self, other: object) -> bool:
        self.buffer.declare("sneaked-in", 0)
        if self.outcome == "raises":
            raise ValueError("cannot compare")
        return self.outcome == "equal"


@pytest.mark.parametrize("outcome", ["equal", "changed", "raises"])
@pytest.mark.parametrize("track_undo", [False, True], ids=["plain", "undo"])
def test_buffer_of_an_owner_of_one_key_changed_during_its_commit(
    core: ModuleType, track_undo: bool, outcome: str
) -> None:
    # An owner of one key declaring that key again (the commit compares one
    # value): the buffer it declares into from that comparison is caught like
    # any other, and the commit leaves the table as it was.
    table = core.Table("t", track_undo=track_undo)
    table.commit(declared(table, "o", {"k": 0}))
    before = state(table, ["o"])
    sneaky = DeclaringEqThen(outcome)
    buffer = declared(table, "o", {"k": sneaky})
    sneaky.buffer = buffer
    with pytest.raises(RuntimeError, match="changed size during iteration"):
        table.commit(buffer)
    assert state(table, ["o"]) == before
    assert table.get("k") == 0 and "sneaked-in" not in table


class ReadingEq:
    """A value whose ``==`` reads the table being committed: what each read
    gave, or the type of the exception it raised."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, table: Any, key: Any, owner: object) -> None:
        self.table = table
        self.key = key
        self.owner = owner
        self.seen: dict[str, Any] = {}

    def __eq__(self, other: object) -> bool:
        for name, read in (
            ("get", lambda: self.table.get(self.key, "-")),
            ("items", self.table.items),
            ("keys_of", lambda: self.table.keys_of(self.owner)),
            ("count_of", lambda: self.table.count_of(self.owner)),
        ):
            try:
                self.seen[name] = read()
            except Exception as exc:
                self.seen[name] = type(exc)
        return False


@pytest.mark.parametrize("track_undo", [False, True], ids=["plain", "undo"])
def test_a_read_of_the_records_from_eq_during_a_commit_is_refused(
    core: ModuleType, track_undo: bool
) -> None:
    # An owner of one key commits a new key and its old one; the ``==`` of
    # the old one reads the table while the new key is half-inserted (its
    # holder set, the owner's record not yet): each read of the records
    # raises RuntimeError, never gives a key the value of the owner's other
    # key, and the commit goes on.
    table = core.Table("t", track_undo=track_undo)
    table.commit(declared(table, "o", {"a": "va"}))
    owner = table.owner_of("a")
    reader = ReadingEq(table, "b", owner)
    table.commit(declared(table, "o", {"b": "vb", "a": reader}))
    assert reader.seen == {
        "get": RuntimeError,
        "items": RuntimeError,
        "keys_of": RuntimeError,
        "count_of": RuntimeError,
    }
    assert dict(table.items()) == {"a": reader, "b": "vb"}
    assert table.get("b") == "vb" and table.count_of(owner) == 2


def _only(exc: BaseException, cls: type[BaseException]) -> bool:
    """Whether ``exc`` is ``cls`` or a group of nothing else."""
    group = getattr(exc, "exceptions", None)
    if group is not None and not isinstance(exc, cls):
        return all(_only(e, cls) for e in group)
    return isinstance(exc, cls)


async def test_keyed_target_stays_in_step_after_base_exception_from_eq() -> None:
    """A run whose commit is interrupted by ``__eq__`` raising a
    ``BaseException`` changes neither the target's record nor its sink; the
    next clean run sends its changes."""
    mirror = Mirror()
    kept = object()
    decls: dict[str, Any] = {"a": 0, "k": kept}

    @coco.fn
    async def producer() -> None:
        for key, value in decls.items():
            mirror.target.declare(key, value)

    @coco.fn
    async def main() -> None:
        await coco.mount(coco.component_subpath("producer"), producer)

    app = coco.App("eq-interrupt", main)
    await run_app(app)
    assert mirror.rows == mirror.record() == {"a": 0, "k": kept}

    # "a" changes, then comparing "k" raises a BaseException
    decls.update(a=1, k=InterruptingEq(Abort))
    with pytest.raises(BaseException) as info:
        await run_app(app)
    assert _only(info.value, Abort), info.value
    assert mirror.record() == {"a": 0, "k": kept}
    assert mirror.rows == mirror.record()

    # a clean run sends "a" again
    decls.update(a=1, k=kept)
    await run_app(app)
    assert mirror.rows == mirror.record() == {"a": 1, "k": kept}
    assert [b.upserts for b in mirror.batches] == [[("a", 0), ("k", kept)], [("a", 1)]]


# -- 3. a KeyedTarget on one event loop after another ----------------------------------------


class SlowSink:
    """An async sink that takes a while per batch and checks that no two
    batches are applied at once."""

    def __init__(self) -> None:
        self.rows: dict[str, Any] = {}
        self.active = 0
        self.most = 0
        self.batches = 0
        self.target: coco.KeyedTarget[str, Any] = coco.KeyedTarget("slow", self.apply)

    async def apply(self, batch: TargetBatch[str, Any]) -> None:
        self.active += 1
        self.most = max(self.most, self.active)
        try:
            for _ in range(3):
                await anyio.sleep(0.001)
            for key in batch.deletes:
                del self.rows[key]
            self.rows.update(batch.upserts)
            self.batches += 1
        finally:
            self.active -= 1


def _sink_app(name: str, sink: SlowSink, values: dict[str, Any]) -> coco.App:
    @coco.fn
    async def declare_one(key: str) -> None:
        sink.target.declare(key, values["n"])

    @coco.fn
    async def main() -> None:
        # two components (so two commits) into the one target at once
        for part in ("one", "two"):
            await coco.mount(coco.component_subpath(part), declare_one, f"{name}-{part}")

    return coco.App(name, main)


@pytest.mark.parametrize(
    "backends",
    [("asyncio", "trio", "asyncio"), ("trio", "asyncio", "trio")],
    ids=lambda b: "-".join(b),
)
def test_keyed_target_on_one_event_loop_after_another(backends: tuple[str, ...]) -> None:
    """The same target, used by app runs on one event loop after another
    (each ``anyio.run`` its own loop): every run applies its batches, and
    commits made at once (two components, two apps) still reach the sink one
    at a time."""
    sink = SlowSink()
    values: dict[str, Any] = {"n": 0}
    apps = [_sink_app("first", sink, values), _sink_app("second", sink, values)]

    async def one_loop() -> None:
        async with anyio.create_task_group() as tg:
            for app in apps:
                tg.start_soon(run_app, app)

    for n, backend in enumerate(backends, 1):
        values["n"] = n
        anyio.run(one_loop, backend=backend)
        expected = {f"{app.name}-{part}": n for app in apps for part in ("one", "two")}
        assert dict(sink.target.items()) == expected, backend
        assert sink.rows == expected, backend
        assert sink.batches == 4 * n
        assert sink.most == 1, "two batches were applied at once"


# -- 4. a retry of an unmounted owner's deletes, interrupted ---------------------------------


class FlakySink:
    """An async sink: ``fail`` makes the next batch raise, ``block`` makes
    the next one wait until it is cancelled."""

    def __init__(self) -> None:
        self.rows: dict[str, Any] = {}
        self.fail = False
        self.block = False
        self.blocked = anyio.Event()
        self.target: coco.KeyedTarget[str, Any] = coco.KeyedTarget("flaky", self.apply)

    async def apply(self, batch: TargetBatch[str, Any]) -> None:
        await anyio.sleep(0)
        if self.fail:
            self.fail = False
            raise OSError("sink down")
        if self.block:
            self.block = False
            self.blocked.set()
            await anyio.sleep_forever()
        for key in batch.deletes:
            del self.rows[key]
        self.rows.update(batch.upserts)


async def test_interrupted_retry_of_an_unmounted_owners_deletes_is_retried_again() -> None:
    """The deletes of an unmounted component that failed to apply are retried
    with the target's next batch; when that batch's commit is cancelled while
    the retry is in the sink, they are retried with the next one again
    (nothing stays owned by a component that is gone)."""
    sink = FlakySink()
    failures: list[BaseException] = []

    def on_error(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        failures.append(exc)

    @coco.fn
    async def declare(key: str, value: int) -> None:
        sink.target.declare(key, value)

    async def scenario(op: coco.LiveComponentOperator) -> None:
        async with coco.exception_handler(on_error):
            p = await op.update("p", declare, "p", 0)
            q = await op.update("q", declare, "q", 0)
        await p.ready()
        await q.ready()
        assert sink.rows == {"p": 0, "q": 0}
        sink.fail = True  # "p"'s component goes, but its delete fails
        await (await op.delete("p")).ready()
        assert [type(e) for e in failures] == [coco.TargetApplyError]
        assert sink.rows == {"p": 0, "q": 0} == dict(sink.target.items())
        sink.block = True  # q's next commit retries the delete first: it blocks
        async with coco.exception_handler(on_error):
            await op.update("q", declare, "q", 1)
        await sink.blocked.wait()
        async with coco.exception_handler(on_error):  # supersedes the blocked commit
            q = await op.update("q", declare, "q", 2)
        await q.ready()

    with Remote() as remote:

        @coco.fn
        async def main() -> None:
            await coco.mount(RemoteLive, remote)

        async with coco.App("orphans", main).update(live=True) as handle:
            with anyio.fail_after(TIMEOUT):
                await handle.ready()
            await remote(scenario)
            assert sink.target.owner_path("p") is None, "'p' stays owned by a component gone"
            assert dict(sink.target.items()) == sink.rows == {"q": 2}
