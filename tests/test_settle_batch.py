"""What waits for a ``mount_each``'s update to settle, at scale: the wait
knows which children are unready without looking at every child, and the
keys many entries' components let go in one update reach each target as one
batch (SPEC section 4, Ownership; section 5, Targets): with a transfer in the
middle of it, a sink that raises on it, an unmount in the middle of it.

The deletes are held until the consumer's update settles; every assertion
is made once the map's ``settle()`` has returned."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import wait_for

import livemap as coco
from livemap import KeyedTarget, LiveMap, TargetBatch
from livemap._paths import format_path
from livemap.errors import TargetApplyError

pytestmark = pytest.mark.anyio

_names = itertools.count()


class Sink:
    """A keyed target recording each batch (and its owner), mirroring the
    rows it was sent, and raising on the batches ``fail`` picks."""

    def __init__(self, name: str = "rows") -> None:
        self.batches: list[tuple[list[tuple[str, Any]], list[str], Any]] = []
        self.rows: dict[str, Any] = {}
        self.errors: list[BaseException] = []
        self.fail: Any = None  # batch -> bool: raise on it
        self.target: KeyedTarget[str, Any] = KeyedTarget(name, self._apply)

    def _apply(self, batch: TargetBatch[str, Any]) -> None:
        if self.fail is not None and self.fail(batch):
            raise OSError("sink down")
        self.batches.append((list(batch.upserts), list(batch.deletes), batch.owner))
        for key in batch.deletes:
            del self.rows[key]  # (a delete of a row never sent raises here)
        for key, value in batch.upserts:
            self.rows[key] = value

    @property
    def deletes(self) -> list[str]:
        return [key for _, deletes, _ in self.batches for key in deletes]

    async def handler(self, exc: BaseException, ctx: coco.ExceptionContext) -> None:
        self.errors.append(exc)


class Scene:
    """A live app: a producer whose state the test sets, and a ``mount_each``
    over its map whose per-entry processor declares ``row-<row>`` into each
    sink (``value = (row, payload)``), after ``gates[row]`` if set."""

    def __init__(self, state: dict[str, tuple[str, int]], sinks: list[Sink]) -> None:
        self.state = state
        self.sinks = sinks
        self.maps: list[LiveMap[str, tuple[str, int]]] = []
        self.handles: list[coco.ComponentMountHandle] = []
        self.gates: dict[str, anyio.Event] = {}
        self.changes: Any = None
        self.streams: list[Any] = []
        scene = self

        @coco.fn
        async def per_entry(value: tuple[str, int], key_of: Any) -> None:
            gate = scene.gates.get(key_of(value))
            if gate is not None:
                await gate.wait()
            await anyio.lowlevel.checkpoint()
            for sink in scene.sinks:
                sink.target.declare(f"row-{value[0]}", value[1])

        self.per_entry = per_entry

    def app(self) -> coco.App:
        scene = self
        send, recv = anyio.create_memory_object_stream[anyio.Event](10)
        self.changes = send
        self.streams = [send, recv]

        class Producer:
            def __init__(self, lm: LiveMap[str, tuple[str, int]]) -> None:
                self.lm = lm

            def process(self) -> None:
                for key, value in scene.state.items():
                    self.lm.declare_entry(key, value)

            async def process_live(self, operator: coco.LiveComponentOperator) -> None:
                await operator.update_full()
                await operator.mark_ready()
                async for done in recv:
                    await operator.update_full()
                    done.set()

        @coco.fn
        async def main() -> None:
            async with coco.exception_handler(scene.sinks[0].handler):
                lm: LiveMap[str, tuple[str, int]] = await LiveMap.create()
                scene.maps.append(lm)
                await coco.mount(Producer, lm)
                scene.handles.append(await coco.mount_each(scene.per_entry, lm, _key))

        return coco.App(f"settle-batch-{next(_names)}", main)

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc: object) -> None:
        for stream in self.streams:
            stream.close()

    async def commit(self) -> None:
        """The producer commits the current state (one commit)."""
        done = anyio.Event()
        await self.changes.send(done)
        await done.wait()

    async def settled(self) -> None:
        await self.maps[0].settle()

    @property
    def each(self) -> Any:
        return self.handles[0]._component

    def held(self, n: int) -> bool:
        """Whether each sink's target holds the drops of ``n`` components,
        waiting for the update to settle."""
        return all(len(s.target._table._dropping) == n for s in self.sinks)


def _key(value: tuple[str, int]) -> str:
    return value[0]


def _rows(state: dict[str, tuple[str, int]]) -> dict[str, int]:
    return {f"row-{row}": n for row, n in state.values()}


async def _started(scene: Scene, h: Any) -> None:
    await h.ready()
    await scene.settled()
    await wait_for(lambda: all(s.rows == _rows(scene.state) for s in scene.sinks))


async def test_the_wait_knows_the_unready_children() -> None:
    """The ``mount_each`` keeps the readiness of each unready child: exactly
    those (a closed one aside) while some are blocked, none once settled."""
    state = {f"e{i}": (f"e{i}", 0) for i in range(40)}
    sink = Sink()
    scene = Scene(state, [sink])
    app = scene.app()

    def check() -> None:
        each = scene.each
        tracked = each.readiness.tracked
        unready = {c.readiness for c in (each.children or {}).values() if c.readiness.unready}
        assert unready <= tracked
        assert all(r.unready or r.closed for r in tracked)

    with scene, anyio.fail_after(10):
        async with app.update(live=True) as h:
            await _started(scene, h)
            check()
            assert scene.each.readiness.tracked == set()
            blocked = [f"e{i}" for i in range(0, 40, 3)]
            for key in blocked:
                scene.gates[key] = anyio.Event()
            for i in range(40):
                state[f"e{i}"] = (f"e{i}", 1)
            for i in range(1, 40, 3):
                del state[f"e{i}"]
            await scene.commit()
            await wait_for(lambda: len(scene.each.readiness.tracked) >= len(blocked))
            check()
            for key in blocked:
                scene.gates.pop(key).set()
                await anyio.lowlevel.checkpoint()
                check()
            await scene.settled()
            check()
            await h.stop()
    assert scene.each.readiness.tracked == set() or not scene.each.alive
    assert sink.rows == _rows(state)
    assert sink.errors == []


def _churn(scene: Scene, gated: str) -> tuple[list[str], str]:
    """Delete entries e1..e20 but e5 and e12, rename e12 to n12 (its row
    passes to n12's component: a transfer), and change ``gated``, whose run
    waits for its gate: the settling waits for it while every delete is
    delivered.  Returns the rows deleted and the row transferred."""
    state = scene.state
    deleted = [f"row-e{i}" for i in range(1, 21) if i not in (5, 12)]
    for i in range(1, 21):
        if i != 5:
            del state[f"e{i}"]
    state["n12"] = ("e12", 7)
    state[gated] = (gated, 1)
    scene.gates[gated] = anyio.Event()
    return deleted, "row-e12"


@pytest.mark.parametrize("targets", [1, 2])
async def test_an_update_s_drops_are_one_batch_with_a_transfer_in_it(targets: int) -> None:
    """Many entries deleted in one commit: their rows go as one batch per
    target, owned by the ``mount_each``; a row renamed into a new entry is
    one upsert, never deleted; nothing else changes."""
    state = {f"e{i}": (f"e{i}", 0) for i in range(30)}
    sinks = [Sink(f"rows{n}") for n in range(targets)]
    scene = Scene(state, sinks)
    app = scene.app()
    with scene, anyio.fail_after(10):
        async with app.update(live=True) as h:
            await _started(scene, h)
            for sink in sinks:
                sink.batches.clear()
            deleted, moved = _churn(scene, "e25")
            await scene.commit()
            await wait_for(lambda: scene.held(len(deleted)))
            scene.gates.pop("e25").set()
            await scene.settled()
            each_path = scene.each.path
            await h.stop()
    for sink in sinks:
        assert sorted(sink.deletes) == sorted(deleted), sink.batches
        assert moved not in sink.deletes
        assert [(k, v) for ups, _, _ in sink.batches for k, v in ups] in (
            [(moved, 7), ("row-e25", 1)],
            [("row-e25", 1), (moved, 7)],
        )
        # one batch took most of them: the update's, not an entry's own
        big = [b for b in sink.batches if len(b[1]) > 1]
        assert len(big) == 1 and big[0][2] == each_path, sink.batches
        assert sink.rows == _rows(state) == dict(sink.target.items())
        assert sink.target.owner_path(moved) == (coco.Symbol("per_entry"), "n12")
        assert sink.errors == []


async def test_a_sink_raising_on_the_batch_loses_nothing() -> None:
    """The sink raises on the update's batch of drops: each entry's component
    with rows in it gets its own TargetApplyError naming the target and it;
    the target keeps the rows (as its sink does), and sends their deletes
    again with its next batch; the transfer in the same update stands."""
    state = {f"e{i}": (f"e{i}", 0) for i in range(30)}
    sink = Sink()
    scene = Scene(state, [sink])
    app = scene.app()
    with scene, anyio.fail_after(10):
        async with app.update(live=True) as h:
            await _started(scene, h)
            sink.batches.clear()
            deleted, moved = _churn(scene, "e25")
            sink.fail = lambda batch: len(batch.deletes) > 1
            await scene.commit()
            await wait_for(lambda: scene.held(len(deleted)))
            scene.gates.pop("e25").set()
            await scene.settled()
            failed = [e for e in sink.errors if isinstance(e, TargetApplyError)]
            assert len(failed) == len(sink.errors)
            # the first drop may have gone alone, before the others were held
            assert len(deleted) - 1 <= len(failed) <= len(deleted)
            paths = {e.path for e in failed}
            assert len(paths) == len(failed)
            for error in failed:
                assert error.target == "rows"
                assert isinstance(error.__cause__, OSError)
            expected = {
                format_path((coco.Symbol("per_entry"), key))
                for key in (f"e{i}" for i in range(1, 21))
                if key not in ("e5", "e12")
            }
            assert paths <= expected
            lost = [k for k in deleted if k in sink.rows]
            assert len(lost) == len(failed)
            assert dict(sink.target.items()) == sink.rows  # the target is as the sink
            assert sink.target.get(moved) == 7 == sink.rows[moved]
            # the next batch (a change of an entry) sends the deletes first
            sink.fail = None
            state["e0"] = ("e0", 9)
            await scene.commit()
            await scene.settled()
            await wait_for(lambda: sink.rows == _rows(state))
            assert dict(sink.target.items()) == sink.rows
            await h.stop()
    assert sorted(sink.deletes) == sorted(deleted)
    assert len(sink.errors) == len(failed)


async def test_an_app_stopped_with_drops_held_sends_them_as_one_batch() -> None:
    """The app run stops while the update's drops wait for a child: they
    still reach the sink, each once (in one batch, after the first)."""
    state = {f"e{i}": (f"e{i}", 0) for i in range(30)}
    sink = Sink()
    scene = Scene(state, [sink])
    app = scene.app()
    with scene, anyio.fail_after(10):
        async with app.update(live=True) as h:
            await _started(scene, h)
            sink.batches.clear()
            deleted, moved = _churn(scene, "e25")
            await scene.commit()
            await wait_for(lambda: scene.held(len(deleted)))
            await h.stop()  # e25's run is cancelled at its gate
    assert sorted(sink.deletes) == sorted(deleted), sink.batches
    assert len([b for b in sink.batches if len(b[1]) > 1]) == 1
    assert moved not in sink.deletes
    assert dict(sink.target.items()) == sink.rows
    assert sink.errors == []


async def test_a_stop_in_the_sink_of_the_batch_loses_nothing() -> None:
    """The app run stops while the sink is applying the update's batch of
    drops (an async sink, cancelled there): the batch counts as not applied,
    and the drops still reach the sink, once, before the stop is over."""
    state = {f"e{i}": (f"e{i}", 0) for i in range(30)}
    sink = Sink()
    in_sink = anyio.Event()
    plain = sink._apply

    async def apply(batch: TargetBatch[str, Any]) -> None:
        if len(batch.deletes) > 1 and not in_sink.is_set():
            in_sink.set()
            await anyio.sleep_forever()
        plain(batch)

    sink.target._apply = apply
    scene = Scene(state, [sink])
    app = scene.app()
    with scene, anyio.fail_after(10):
        async with app.update(live=True) as h:
            await _started(scene, h)
            sink.batches.clear()
            deleted, moved = _churn(scene, "e25")
            scene.gates.pop("e25").set()
            await scene.commit()
            await in_sink.wait()
            await h.stop()
    assert sorted(sink.deletes) == sorted(deleted), sink.batches
    assert moved not in sink.deletes
    assert dict(sink.target.items()) == sink.rows
    assert sink.target._table._dropping == {}
    assert sink.errors == []


async def test_a_claim_passes_in_the_update_whose_drops_go_as_a_batch() -> None:
    """Entry c2 claims the row entry c1 holds (a conflict, reported once);
    one commit deletes c1 and many others: c2 gets the row (one upsert, no
    delete, no second report) while the others' rows go as one batch."""
    state = {f"e{i}": (f"e{i}", 0) for i in range(30)}
    state["c1"] = ("shared", 1)
    state["c2"] = ("shared", 2)
    sink = Sink()
    scene = Scene(state, [sink])
    app = scene.app()
    with scene, anyio.fail_after(10):
        async with app.update(live=True) as h:
            await h.ready()
            await scene.settled()
            await wait_for(lambda: len(sink.rows) == 31)
            await wait_for(lambda: sink.errors)
            assert [type(e) for e in sink.errors] == [coco.KeyConflictError]
            first = sink.target.owner_path("row-shared")
            assert first is not None
            holder, claimant = ("c1", "c2") if first[-1] == "c1" else ("c2", "c1")
            sink.batches.clear()
            deleted, moved = _churn(scene, "e25")
            del state[holder]
            await scene.commit()
            await wait_for(lambda: scene.held(len(deleted)))
            scene.gates.pop("e25").set()
            await scene.settled()
            await h.stop()
    assert sorted(sink.deletes) == sorted(deleted), sink.batches
    assert len([b for b in sink.batches if len(b[1]) > 1]) == 1
    assert moved not in sink.deletes and "row-shared" not in sink.deletes
    assert sink.target.owner_path("row-shared") == (coco.Symbol("per_entry"), claimant)
    assert sink.rows["row-shared"] == state[claimant][1]
    assert sink.rows == dict(sink.target.items())
    assert len(sink.errors) == 1


@pytest.mark.parametrize("owners", [2, 1], ids=["merged-batch", "one-owner"])
async def test_failed_held_deletes_of_mounted_components_are_sent_again(owners: int) -> None:
    """Entries' components that stay mounted change their rows in one live
    update; the sink raises on the batch of the old rows' deletes.  Each
    component gets its ``TargetApplyError``, and the deletes go again with
    the target's next batch once the sink is back: no old row is left in
    the sink or in the target's record."""
    rows: dict[str, int] = {}
    errors: list[BaseException] = []
    fail = {"on": False}

    def apply(batch: TargetBatch[str, int]) -> None:
        if fail["on"] and batch.deletes:
            raise OSError("sink down")
        for key in batch.deletes:
            del rows[key]
        rows.update(batch.upserts)

    target: KeyedTarget[str, int] = KeyedTarget(f"alive-rows-{next(_names)}", apply)
    state = {"e1": "a", "e2": "b"}
    maps: list[LiveMap[str, str]] = []
    send, recv = anyio.create_memory_object_stream[anyio.Event](10)

    @coco.fn
    async def per_entry(value: str) -> None:
        await anyio.lowlevel.checkpoint()
        target.declare(f"row-{value}", 0)

    class Producer:
        def __init__(self, lm: LiveMap[str, str]) -> None:
            self.lm = lm

        def process(self) -> None:
            for key, value in state.items():
                self.lm.declare_entry(key, value)

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            await operator.update_full()
            await operator.mark_ready()
            async for done in recv:
                await operator.update_full()
                done.set()

    async def handler(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        errors.append(exc)

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(handler):
            lm: LiveMap[str, str] = await LiveMap.create()
            maps.append(lm)
            await coco.mount(Producer, lm)
            await coco.mount_each(per_entry, lm)

    async def commit() -> None:
        done = anyio.Event()
        await send.send(done)
        await done.wait()
        await maps[0].settle()

    app = coco.App(f"alive-drops-{next(_names)}", main)
    with anyio.fail_after(10):
        async with app.update(live=True) as h:
            await h.ready()
            await maps[0].settle()
            await wait_for(lambda: rows == {"row-a": 0, "row-b": 0})
            fail["on"] = True
            state.update(e1="a2", e2="b2") if owners == 2 else state.update(e1="a2")
            await commit()
            assert [type(e) for e in errors] == [TargetApplyError] * owners, errors
            fail["on"] = False
            state["e3"] = "c"  # the target's next batch
            await commit()
            await h.stop()
    send.close()
    recv.close()
    want = {"row-a2": 0, "row-b2" if owners == 2 else "row-b": 0, "row-c": 0}
    assert rows == want
    assert dict(target.items()) == want
