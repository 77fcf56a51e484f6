"""The component runtime: apps, mounting, runs and commits, handlers, live components."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, Recorder, current_tasks, run_app, wait_for

import livemap as coco
from livemap import KeyedTarget, LiveMap, Symbol, TargetBatch

pytestmark = pytest.mark.anyio


class Sink:
    """An in-memory sink target recording every batch."""

    def __init__(self) -> None:
        self.rows: dict[Any, Any] = {}
        self.batches: list[TargetBatch[Any, Any]] = []
        self.fail_next = 0

    def __call__(self, batch: TargetBatch[Any, Any]) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise OSError("disk full")
        self.batches.append(batch)
        for key in batch.deletes:
            del self.rows[key]
        for key, value in batch.upserts:
            self.rows[key] = value


# -- apps and components ---------------------------------------------------------


async def test_main_runs_and_children_commit() -> None:
    sink = Sink()
    target: KeyedTarget[str, int] = KeyedTarget("rows", sink)

    @coco.fn
    async def child(n: int) -> None:
        target.declare(f"k{n}", n)

    @coco.fn
    async def main() -> None:
        for n in range(3):
            await coco.mount(coco.component_subpath(n), child, n)

    stats = await run_app(coco.App("t", main))
    assert sink.rows == {"k0": 0, "k1": 1, "k2": 2}
    assert stats.components_run == 4
    assert stats.components_failed == 0


async def test_sync_component_functions_run_inline() -> None:
    sink = Sink()
    target: KeyedTarget[str, str] = KeyedTarget("rows", sink)
    seen: list[str] = []

    @coco.fn
    def sync_child(name: str) -> None:
        seen.append(name)
        target.declare(name, name.upper())

    @coco.fn
    async def main() -> None:
        await coco.mount(coco.component_subpath("a"), sync_child, "a")
        # a sync child has run and committed by the time mount returns
        assert seen == ["a"]
        assert target.get("a") == "A"
        await coco.mount_each(sync_child, [(1, "x"), (2, "y")])

    await run_app(coco.App("t", main))
    assert sink.rows == {"a": "A", "x": "X", "y": "Y"}


async def test_fn_decorator_forms() -> None:
    @coco.fn()
    async def a() -> int:
        return 1

    @coco.fn(memo=True)
    def b() -> int:
        return 2

    assert isinstance(a, coco.Function)
    assert a.is_async
    assert not b.is_async
    assert b() == 2
    assert await a() == 1
    assert a.__name__ == "a"


async def test_default_subpath_is_function_name_and_duplicate_sibling_rejected() -> None:
    paths: list[Any] = []
    errors: list[BaseException] = []

    @coco.fn
    async def leaf() -> None:
        pass

    @coco.fn
    async def main() -> None:
        h = await coco.mount(leaf)
        paths.append(h.path)
        try:
            await coco.mount(leaf)
        except coco.DuplicatePathError as exc:
            errors.append(exc)
        h2 = await coco.mount(coco.component_subpath("other"), leaf)
        paths.append(h2.path)

    await run_app(coco.App("t", main))
    assert paths == [(Symbol("leaf"),), ("other",)]
    assert len(errors) == 1
    assert "/leaf" in str(errors[0])


async def test_component_subpath_context_manager_prefixes_mounts() -> None:
    paths: list[Any] = []

    @coco.fn
    async def leaf() -> None:
        pass

    @coco.fn
    async def main() -> None:
        with coco.component_subpath("group", 1):
            h = await coco.mount(leaf)
            h2 = await coco.mount(coco.component_subpath("x"), leaf)
        h3 = await coco.mount(leaf)
        paths.extend([h.path, h2.path, h3.path])

    await run_app(coco.App("t", main))
    assert paths == [("group", 1, Symbol("leaf")), ("group", 1, "x"), (Symbol("leaf"),)]


async def test_symbol_never_equals_a_string() -> None:
    assert Symbol("a") == Symbol("a")
    assert Symbol("a") is Symbol("a")
    assert Symbol("a") != "a"
    assert hash(Symbol("a")) == hash(Symbol("a"))


async def test_failed_run_keeps_previous_entries_and_goes_to_handler() -> None:
    sink = Sink()
    target: KeyedTarget[str, int] = KeyedTarget("rows", sink)
    state = {"fail": False, "n": 1}
    rec = Recorder()

    @coco.fn
    async def producer() -> None:
        target.declare("a", state["n"])
        if state["fail"]:
            raise RuntimeError("boom")
        target.declare("b", state["n"])

    @coco.fn
    async def sibling() -> None:
        target.declare("s", 0)

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(rec):
            await coco.mount(producer)
        await coco.mount(sibling)

    app = coco.App("t", main)
    await run_app(app)
    assert sink.rows == {"a": 1, "b": 1, "s": 0}
    state.update(fail=True, n=2)
    stats = await run_app(app)
    assert sink.rows == {"a": 1, "b": 1, "s": 0}
    assert stats.components_failed == 1
    [(exc, ctx)] = rec.calls
    assert isinstance(exc, RuntimeError)
    assert ctx.stable_path == (Symbol("producer"),)
    assert ctx.mount_kind == "mount"
    assert "producer" in ctx.processor_name
    state.update(fail=False, n=3)
    await run_app(app)
    assert sink.rows == {"a": 3, "b": 3, "s": 0}


async def test_default_handler_logs_at_error(caplog: pytest.LogCaptureFixture) -> None:
    @coco.fn
    async def bad() -> None:
        raise ValueError("nope")

    @coco.fn
    async def main() -> None:
        await coco.mount(bad)

    with caplog.at_level(logging.ERROR, logger="livemap"):
        await run_app(coco.App("t", main))
    assert any("/bad" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


async def test_unmount_releases_recursively() -> None:
    sink = Sink()
    target: KeyedTarget[str, int] = KeyedTarget("rows", sink)
    state = {"with_child": True}

    @coco.fn
    async def grandchild(n: int) -> None:
        target.declare(f"g{n}", n)

    @coco.fn
    async def child() -> None:
        target.declare("c", 1)
        for n in range(3):
            await coco.mount(coco.component_subpath(n), grandchild, n)

    @coco.fn
    async def main() -> None:
        target.declare("root", 0)
        if state["with_child"]:
            await coco.mount(child)

    app = coco.App("t", main)
    await run_app(app)
    assert sink.rows == {"root": 0, "c": 1, "g0": 0, "g1": 1, "g2": 2}
    state["with_child"] = False
    stats = await run_app(app)
    assert sink.rows == {"root": 0}
    assert stats.components_unmounted == 4


async def test_rerun_matches_paths() -> None:
    runs: list[str] = []
    sink = Sink()
    target: KeyedTarget[str, str] = KeyedTarget("rows", sink)
    names = ["a", "b"]

    @coco.fn
    async def child(name: str) -> None:
        runs.append(name)
        target.declare(name, name)

    @coco.fn
    async def main() -> None:
        for name in names:
            await coco.mount(coco.component_subpath(name), child, name)

    app = coco.App("t", main)
    await run_app(app)
    names[:] = ["b", "c"]
    stats = await run_app(app)
    assert sorted(runs) == ["a", "b", "b", "c"]
    assert sink.rows == {"b": "b", "c": "c"}
    assert stats.components_unmounted == 1
    # the component at /'b' kept its entry the whole time: no delete was sent for it
    assert all("b" not in batch.deletes for batch in sink.batches)


async def test_use_mount_returns_value_and_raises_into_caller() -> None:
    got: list[Any] = []

    @coco.fn
    async def compute(x: int) -> int:
        return x * 2

    @coco.fn
    def explode() -> None:
        raise KeyError("inner")

    @coco.fn
    async def main() -> None:
        got.append(await coco.use_mount(compute, 21))
        try:
            await coco.use_mount(explode)
        except KeyError as exc:
            got.append(exc)

    await run_app(coco.App("t", main))
    assert got[0] == 42
    assert isinstance(got[1], KeyError)


async def test_use_mount_of_live_class_is_type_error() -> None:
    class Live:
        def process(self) -> None:
            pass

        async def process_live(self, operator: coco.LiveComponentOperator) -> None:
            pass

    caught: list[BaseException] = []

    @coco.fn
    async def main() -> None:
        try:
            await coco.use_mount(Live)
        except TypeError as exc:
            caught.append(exc)

    await run_app(coco.App("t", main))
    assert len(caught) == 1
    assert "Live" in str(caught[0])


async def test_main_failure_raises_from_result() -> None:
    @coco.fn
    async def main() -> None:
        raise LookupError("main broke")

    with pytest.raises(LookupError, match="main broke"):
        await run_app(coco.App("t", main))


async def test_calls_outside_a_component_raise_not_in_component() -> None:
    sink = Sink()
    target: KeyedTarget[str, int] = KeyedTarget("rows", sink)

    async def f() -> None:
        pass

    with pytest.raises(coco.NotInComponentError, match="mount"):
        await coco.mount(f)
    with pytest.raises(coco.NotInComponentError, match="mount_each"):
        await coco.mount_each(f, [])
    with pytest.raises(coco.NotInComponentError, match="use_mount"):
        await coco.use_mount(f)
    with pytest.raises(coco.NotInComponentError, match=r"LiveMap\.create"):
        await LiveMap.create()
    with pytest.raises(coco.NotInComponentError, match="declare"):
        target.declare("a", 1)
    assert len(target) == 0


async def test_ready_waits_for_descendants() -> None:
    order: list[str] = []

    @coco.fn
    async def slow_grandchild() -> None:
        await anyio.sleep(0.05)
        order.append("grandchild")

    @coco.fn
    async def child() -> None:
        await coco.mount(slow_grandchild)
        order.append("child")

    @coco.fn
    async def main() -> None:
        h = await coco.mount(child)
        with anyio.fail_after(TIMEOUT):
            await h.ready()
        order.append("ready")

    await run_app(coco.App("t", main))
    assert order == ["child", "grandchild", "ready"]


async def test_handler_that_raises_propagates_through_ready() -> None:
    @coco.fn
    async def bad() -> None:
        raise ValueError("child failed")

    def reraise(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        raise exc

    results: list[Any] = []

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(reraise):
            h = await coco.mount(bad)
        try:
            with anyio.fail_after(TIMEOUT):
                await h.ready()
        except ValueError as exc:
            results.append(exc)
        h2 = await coco.mount(coco.component_subpath("quiet"), bad)
        with anyio.fail_after(TIMEOUT):
            await h2.ready()  # no handler raised: ready() does not raise
        results.append("quiet ok")

    await run_app(coco.App(coco.AppConfig("t", exception_handler=lambda e, c: None), main))
    assert isinstance(results[0], ValueError)
    assert results[1] == "quiet ok"


async def test_async_handler_and_global_handler_chain() -> None:
    inner: list[str] = []
    outer = Recorder()

    async def passes_on(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        await anyio.sleep(0)
        inner.append(ctx.path)
        raise exc

    @coco.fn
    async def bad() -> None:
        raise ValueError("x")

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(passes_on):
            await coco.mount(bad)

    await run_app(coco.App(coco.AppConfig("t", exception_handler=outer), main))
    assert inner == ["/bad"]
    assert len(outer.calls) == 1
    assert outer.calls[0][1].app_name == "t"


# -- targets -----------------------------------------------------------------------


async def test_sink_failure_is_reported_and_resent() -> None:
    sink = Sink()
    target: KeyedTarget[str, int] = KeyedTarget("rows", sink)
    rec = Recorder()
    values = {"a": 1, "b": 2}

    @coco.fn
    async def producer() -> None:
        for k, v in values.items():
            target.declare(k, v)

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(rec):
            await coco.mount(producer)

    app = coco.App("t", main)
    sink.fail_next = 1
    await run_app(app)
    assert sink.rows == {}
    assert len(target) == 0  # the record stays as before the batch
    [(exc, _)] = rec.calls
    assert isinstance(exc, coco.TargetApplyError)
    assert isinstance(exc.__cause__, OSError)
    assert "rows" in str(exc) and "/producer" in str(exc)
    await run_app(app)
    assert sink.rows == {"a": 1, "b": 2}


async def test_sink_failure_on_unmount_is_retried_with_next_batch() -> None:
    sink = Sink()
    target: KeyedTarget[str, int] = KeyedTarget("rows", sink)
    state = {"child": True, "n": 0}
    rec = Recorder()

    @coco.fn
    async def child() -> None:
        target.declare("c", 1)

    @coco.fn
    async def other() -> None:
        target.declare("o", state["n"])

    @coco.fn
    async def main() -> None:
        h = await coco.mount(other)
        await h.ready()
        if state["child"]:
            await coco.mount(child)

    app = coco.App(coco.AppConfig("t", exception_handler=rec), main)
    await run_app(app)
    assert sink.rows == {"c": 1, "o": 0}
    state["child"] = False
    sink.fail_next = 1  # the unmounted child's delete batch fails
    await run_app(app)
    assert sink.rows == {"c": 1, "o": 0}
    assert [type(e) for e, _ in rec.calls] == [coco.TargetApplyError]
    assert rec.calls[0][1].stable_path == (Symbol("child"),)
    state["n"] = 1  # the target's next batch sends the delete first
    await run_app(app)
    assert sink.rows == {"o": 1}


async def test_sink_failure_in_per_entry_component_is_retried_and_visible() -> None:
    sink = Sink()
    target: KeyedTarget[str, int] = KeyedTarget("rows", sink)
    holder: dict[str, Any] = {}

    @coco.fn
    async def index(value: int, key: str) -> None:
        holder["target"].declare(key, value)

    @coco.fn
    async def produce(lm: LiveMap[str, int]) -> None:
        lm.declare_entry("k", 1)

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        holder["lm"] = lm
        h = await coco.mount(produce, lm)
        await h.ready()
        policy = coco.RetryPolicy(max_attempts=3, initial_backoff=0.001)
        await coco.mount_each(index, lm.consumer(retry=policy), "k")

    holder["target"] = target
    sink.fail_next = 2  # two failures, then the third run's batch lands
    stats = await run_app(coco.App(coco.AppConfig("t", exception_handler=lambda e, c: None), main))
    assert sink.rows == {"k": 1}
    assert stats.retries == 2
    assert holder["lm"].stats().failing == {}

    sink.rows.clear()
    holder["target"] = KeyedTarget("rows2", sink)  # a second app, its own target
    sink.fail_next = 5  # keeps failing: visible, with the last error
    stats = await run_app(coco.App(coco.AppConfig("t2", exception_handler=lambda e, c: None), main))
    assert sink.rows == {}
    [(key, error)] = holder["lm"].stats().failing.items()
    assert key == "k"
    assert isinstance(error, coco.TargetApplyError)


async def test_async_sink_and_batches_in_commit_order() -> None:
    applied: list[tuple[str, ...]] = []

    async def apply(batch: TargetBatch[str, int]) -> None:
        await anyio.sleep(0)
        applied.append(tuple(k for k, _ in batch.upserts))

    target: KeyedTarget[str, int] = KeyedTarget("rows", apply)

    @coco.fn
    async def child(name: str) -> None:
        target.declare(name, 1)

    @coco.fn
    async def main() -> None:
        await coco.mount_each(child, [(n, n) for n in ["a", "b", "c"]])

    await run_app(coco.App("t", main))
    assert sorted(applied) == [("a",), ("b",), ("c",)]
    assert sorted(k for k, _ in target.items()) == ["a", "b", "c"]


async def test_mount_each_over_iterables_and_async_iterables() -> None:
    seen: list[tuple[Any, ...]] = []

    @coco.fn
    async def each(value: str, suffix: str, *, mark: str) -> None:
        seen.append((value, suffix, mark))

    async def agen() -> Any:
        for i in range(2):
            yield (i, f"v{i}")

    @coco.fn
    async def main() -> None:
        await coco.mount_each(each, [("a", "x")], "!", mark="m")
        await coco.mount_each(coco.component_subpath("async"), each, agen(), "?", mark="n")

    await run_app(coco.App("t", main))
    assert sorted(seen) == [("v0", "?", "n"), ("v1", "?", "n"), ("x", "!", "m")]


async def test_mount_each_rejects_unstable_key() -> None:
    rec = Recorder()

    @coco.fn
    async def each(value: Any) -> None:
        pass

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(rec):
            await coco.mount_each(each, [([1, 2.5], "x")])

    await run_app(coco.App("t", main))
    [(exc, ctx)] = rec.calls
    assert isinstance(exc, TypeError)
    assert "[1, 2.5]" in str(exc)
    assert ctx.mount_kind == "mount_each"


# -- live components -----------------------------------------------------------------


async def test_live_component_update_full_mark_ready_and_operator() -> None:
    sink = Sink()
    target: KeyedTarget[str, int] = KeyedTarget("rows", sink)
    events: list[str] = []

    @coco.fn
    async def leaf(n: int) -> None:
        target.declare(f"leaf{n}", n)

    class Live:
        def __init__(self, base: int) -> None:
            self.base = base

        async def process(self) -> None:
            target.declare("full", self.base)

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.update_full()
            events.append("full done")
            h = await op.update("x", leaf, 1)
            with anyio.fail_after(TIMEOUT):
                await h.ready()
            await op.update("y", leaf, 2)
            await op.delete("x")
            await op.mark_ready()
            events.append("marked")
            await anyio.sleep_forever()

    @coco.fn
    async def main() -> None:
        await coco.mount(Live, 7)

    await run_app(coco.App("t", main))
    assert events == ["full done", "marked"]
    assert sink.rows == {"full": 7, "leaf2": 2}


async def test_process_live_failure_goes_to_handler_with_kind() -> None:
    rec = Recorder()

    class Live:
        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.report_exception(KeyError("reported"))
            raise RuntimeError("live broke")

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(rec):
            await coco.mount(Live)

    await run_app(coco.App("t", main))
    kinds = [(type(e).__name__, c.mount_kind) for e, c in rec.calls]
    assert kinds == [("KeyError", "process_live"), ("RuntimeError", "process_live")]
    assert rec.calls[0][1].stable_path == (Symbol("Live"),)


async def test_catch_up_ends_at_quiescence_and_cancels_live_components() -> None:
    cancelled: list[bool] = []

    class Forever:
        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.mark_ready()
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.append(True)

    @coco.fn
    async def main() -> None:
        await coco.mount(Forever)

    await run_app(coco.App("t", main))
    assert cancelled == [True]


async def test_live_mode_runs_until_stop_and_leaves_no_task() -> None:
    ticks: list[int] = []
    sink = Sink()
    target: KeyedTarget[str, int] = KeyedTarget("rows", sink)

    def load() -> None:
        ticks.append(1)
        target.declare("n", len(ticks))

    @coco.fn
    async def main() -> None:
        await coco.mount(coco.auto_refresh(load, interval=0.01))

    app = coco.App("t", main)
    before = len(current_tasks())
    async with app.update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
            await wait_for(lambda: len(ticks) >= 3)
    after = len(current_tasks())
    assert after == before
    assert sink.rows["n"] >= 3
    n = len(ticks)
    await anyio.sleep(0.05)
    assert len(ticks) == n  # nothing runs after the block


async def test_stop_from_another_task_ends_result() -> None:
    @coco.fn
    async def main() -> None:
        await coco.mount(coco.auto_refresh(lambda: None, interval=0.01))

    handle = coco.App("t", main).update(live=True)
    async with anyio.create_task_group() as tg:

        async def stopper() -> None:
            with anyio.fail_after(TIMEOUT):
                await handle.ready()
                await handle.stop()

        tg.start_soon(stopper)
        with anyio.fail_after(TIMEOUT):
            await handle.result()


async def test_second_concurrent_update_is_rejected() -> None:
    gate = anyio.Event()

    @coco.fn
    async def main() -> None:
        await gate.wait()

    app = coco.App("t", main)
    errors: list[BaseException] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_app, app)
        await anyio.sleep(0.01)
        try:
            await run_app(app)
        except RuntimeError as exc:
            errors.append(exc)
        gate.set()
    assert len(errors) == 1


def test_update_blocking_on_both_backends() -> None:
    results: list[int] = []

    @coco.fn
    async def main(x: int) -> None:
        results.append(x)

    app = coco.App("t", main, 5)
    app.update_blocking()
    app.update_blocking(backend="trio")
    assert results == [5, 5]
