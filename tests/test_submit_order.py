"""CocoIndex's submit order: a component's own declarations commit after the
children it mounted in that run are ready; then the children it no longer
mounts are unmounted.  So a parent's sink sees its children's effects first."""

from __future__ import annotations

import anyio
import pytest
from helpers import Recorder, run_app

import livemap as coco
from livemap import KeyedTarget, TargetBatch

pytestmark = pytest.mark.anyio


def recording_target(batches: list[tuple[list[str], list[str]]]) -> KeyedTarget[str, int]:
    def apply(batch: TargetBatch[str, int]) -> None:
        batches.append(([k for k, _ in batch.upserts], list(batch.deletes)))

    return KeyedTarget("rows", apply)


async def test_a_parent_commits_after_its_children_are_ready() -> None:
    batches: list[tuple[list[str], list[str]]] = []
    target = recording_target(batches)

    @coco.fn
    async def child(key: str) -> None:
        await anyio.sleep(0.01)
        target.declare(key, 1)

    @coco.fn
    async def main() -> None:
        target.declare("parent", 1)
        await coco.mount(coco.component_subpath("a"), child, "a")
        await coco.mount(coco.component_subpath("b"), child, "b")

    await run_app(coco.App("order", main))
    assert batches[-1] == (["parent"], [])
    assert sorted(batches[:-1]) == [(["a"], []), (["b"], [])]


async def test_a_failing_child_does_not_hold_back_its_parent() -> None:
    batches: list[tuple[list[str], list[str]]] = []
    target = recording_target(batches)
    recorder = Recorder()

    @coco.fn
    async def child() -> None:
        await anyio.sleep(0.005)
        raise RuntimeError("child failed")

    @coco.fn
    async def main() -> None:
        target.declare("parent", 1)
        await coco.mount(child)

    await run_app(coco.App(coco.AppConfig("fail", exception_handler=recorder), main))
    assert batches == [(["parent"], [])]
    assert len(recorder.of_type(RuntimeError)) == 1


async def test_stale_children_are_unmounted_after_the_parent_commits() -> None:
    batches: list[tuple[list[str], list[str]]] = []
    target = recording_target(batches)
    which = {"keys": ["a", "b"], "n": 0}

    @coco.fn
    async def child(key: str) -> None:
        await anyio.sleep(0.005)
        target.declare(key, 1)

    @coco.fn
    async def main() -> None:
        which["n"] += 1
        target.declare("parent", which["n"])
        for key in which["keys"]:
            await coco.mount(coco.component_subpath(key), child, key)

    app = coco.App("stale", main)
    await run_app(app)
    batches.clear()
    which["keys"] = ["a", "c"]
    await run_app(app)
    # c's effects, then the parent's, then b's deletion
    assert batches == [(["c"], []), (["parent"], []), ([], ["b"])]
