"""A one-key commit into a KeyedTarget skips the steps it has no use for
(no sink call for a commit that changed nothing, no step for transfers
and held drops it did not make): hostile checks that the commit still
behaves as it must — commits piling up at a busy gate from several app
runs on one loop, a sink that raises a ``BaseException`` (the gate is
passed on, the record goes back), a re-run that changes nothing (no
batch)."""

from __future__ import annotations

import itertools

import anyio
import pytest
from helpers import TIMEOUT, wait_for

import livemap as coco
from livemap import KeyedTarget, TargetBatch

pytestmark = pytest.mark.anyio

_names = itertools.count()


def unique(name: str) -> str:
    return f"commit-fast-{name}-{next(_names)}"


class Boom(BaseException):
    pass


def has(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` is ``kind`` or a group holding one, at any depth."""
    if isinstance(exc, kind):
        return True
    return any(has(inner, kind) for inner in getattr(exc, "exceptions", ()))


async def update(app: coco.App) -> None:
    await app.update()


async def test_commits_of_many_app_runs_queue_at_a_busy_gate_in_order() -> None:
    inside: list[int] = []
    batches: list[TargetBatch[int, int]] = []

    async def apply(batch: TargetBatch[int, int]) -> None:
        inside.append(1)
        assert len(inside) == 1  # never two batches at once
        batches.append(batch)
        await anyio.sleep(0.001)  # the gate stays busy meanwhile
        inside.pop()

    target: KeyedTarget[int, int] = KeyedTarget(unique("busy"), apply)

    @coco.fn
    def main(n: int) -> None:
        target.declare(n, n * 10)

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            for n in range(8):  # each app run finds the gate on the loop
                tg.start_soon(update, coco.App(unique(f"app{n}"), main, n))
    assert sorted(key for b in batches for key, _ in b.upserts) == list(range(8))
    assert all(len(b) == 1 and not b.deletes for b in batches)
    seqs = [b.first_seq for b in batches]
    assert seqs == sorted(seqs)  # in commit order
    assert dict(target.items()) == {n: n * 10 for n in range(8)}
    gate = target._get_lock()
    assert not gate.busy and not gate.waiters


async def test_a_sink_that_raises_a_base_exception_passes_the_gate_on() -> None:
    fail = [True]
    batches: list[TargetBatch[str, int]] = []

    async def apply(batch: TargetBatch[str, int]) -> None:
        await anyio.sleep(0.001)
        if fail[0] and batch.upserts and batch.upserts[0][0] == "a":
            fail[0] = False
            await wait_for(lambda: target._get_lock().waiters)  # "b" waits at the gate
            raise Boom
        batches.append(batch)

    target: KeyedTarget[str, int] = KeyedTarget(unique("boom"), apply)

    @coco.fn
    def main(key: str) -> None:
        target.declare(key, 1)

    with anyio.fail_after(TIMEOUT):
        raised: list[BaseException] = []

        async def failing() -> None:
            try:
                await coco.App(unique("a"), main, "a").update()
            except BaseException as exc:  # (Boom, kept apart from the other run)
                raised.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(failing)  # holds the gate first ...
            await anyio.sleep(0)
            tg.start_soon(update, coco.App(unique("b"), main, "b"))  # ... this one waits
        assert len(raised) == 1 and has(raised[0], Boom)
        # the record went back with the failed batch; the other commit got through
        assert "a" not in target
        gate = target._get_lock()
        assert not gate.busy and not gate.waiters
        await coco.App(unique("a2"), main, "a").update()
    assert dict(target.items()) == {"a": 1, "b": 1}
    assert sorted(b.upserts[0][0] for b in batches) == ["a", "b"]


async def test_a_commit_that_changes_nothing_sends_no_batch() -> None:
    batches: list[TargetBatch[str, int]] = []
    plan: dict[str, int] = {"x": 1, "y": 2}

    def apply(batch: TargetBatch[str, int]) -> None:
        batches.append(batch)

    target: KeyedTarget[str, int] = KeyedTarget(unique("same"), apply)

    @coco.fn
    def main() -> None:
        for key, value in plan.items():
            target.declare(key, value)

    app = coco.App(unique("same"), main)
    with anyio.fail_after(TIMEOUT):
        await app.update()
        assert len(batches) == 1
        await app.update()  # the same declarations: nothing to send
        assert len(batches) == 1
        plan["x"] = 1.0  # type: ignore[assignment]  # == the held value: suppressed
        await app.update()
        assert len(batches) == 1
        del plan["y"]
        await app.update()
    assert len(batches) == 2
    assert batches[1].upserts == [] and batches[1].deletes == ["y"]
    assert dict(target.items()) == {"x": 1}
    gate = target._get_lock()
    assert not gate.busy and not gate.waiters
