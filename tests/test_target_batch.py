"""TargetBatch: what a sink receives.  Read-only fields, equality by fields,
and an ``owner`` that is the committing component's path however the batch
was made (the runtime fills it in only when a sink reads it)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from helpers import run_app

import livemap as coco
from livemap import KeyedTarget, TargetBatch

pytestmark = pytest.mark.anyio

_names = itertools.count()


def test_fields_read_only_and_equality() -> None:
    batch: TargetBatch[str, int] = TargetBatch([("a", 1)], ["b"], ("x", 1), 4, 5)
    assert (batch.upserts, batch.deletes, batch.owner) == ([("a", 1)], ["b"], ("x", 1))
    assert (batch.first_seq, batch.last_seq, len(batch)) == (4, 5, 2)
    for name in ("upserts", "deletes", "owner", "first_seq", "last_seq"):
        with pytest.raises(AttributeError):
            setattr(batch, name, None)
    assert batch == TargetBatch([("a", 1)], ["b"], ("x", 1), 4, 5)
    assert batch != TargetBatch([("a", 1)], ["b"], ("x", 2), 4, 5)
    assert batch != (batch.upserts, batch.deletes)
    with pytest.raises(TypeError):
        hash(batch)
    assert repr(batch) == (
        "TargetBatch(upserts=[('a', 1)], deletes=['b'], owner=('x', 1), first_seq=4, last_seq=5)"
    )
    # the generic alias's constructor works too (it cannot tag the instance)
    assert TargetBatch[str, int]([], [], (), 0, 0) == TargetBatch([], [], (), 0, 0)


async def test_owner_is_the_committing_component_path_read_late_or_early() -> None:
    """A sink that keeps batches and reads ``owner`` only after the run is
    over, and one that reads it at once, see the same paths: each
    per-entry child's, in the order of the commits."""
    kept: list[TargetBatch[str, int]] = []
    read_at_once: list[Any] = []

    def apply(batch: TargetBatch[str, int]) -> None:
        kept.append(batch)

    def apply_and_read(batch: TargetBatch[str, int]) -> None:
        read_at_once.append(batch.owner)

    late = KeyedTarget[str, int]("late", apply)
    early = KeyedTarget[str, int]("early", apply_and_read)

    @coco.fn
    async def child(name: str) -> None:
        late.declare(name, 1)
        early.declare(name, 1)

    @coco.fn
    async def main() -> None:
        for name in ("p", "q"):
            await coco.mount(coco.component_subpath("part", name), child, name)

    await run_app(coco.App(f"batch-{next(_names)}", main))
    # (the two children commit in either order; each target gets them in
    # the same one)
    owners = [batch.owner for batch in kept]
    assert owners == read_at_once
    assert sorted(owner[-1] for owner in owners) == ["p", "q"]
    assert all(owner[:-1] == owners[0][:-1] for owner in owners)
    assert [batch.upserts for batch in kept] == [[(owner[-1], 1)] for owner in owners]
