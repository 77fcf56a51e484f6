"""CocoIndex's API shapes: ``ExceptionContext``'s fields, the live operator's
mount kinds and delete handle, ``auto_refresh`` intervals, and ``fn``
(``fn.as_async``, its options, methods)."""

from __future__ import annotations

import inspect
import threading
from datetime import timedelta
from functools import partial
from typing import Any

import anyio
import pytest
from helpers import TIMEOUT, Recorder, run_app

import livemap as coco
from livemap import ComponentPath, KeyedTarget, LiveMap, Symbol, TargetBatch

pytestmark = pytest.mark.anyio


class Sink:
    """A sink that fails its batches that delete while ``fail_deletes`` is set."""

    def __init__(self) -> None:
        self.rows: dict[Any, Any] = {}
        self.fail_deletes = False

    def __call__(self, batch: TargetBatch[Any, Any]) -> None:
        if self.fail_deletes and batch.deletes:
            raise OSError("cannot delete")
        for key in batch.deletes:
            del self.rows[key]
        for key, value in batch.upserts:
            self.rows[key] = value


# -- ComponentPath --------------------------------------------------------------------


def test_component_path_is_the_tuple_and_prints_as_a_path() -> None:
    path = ComponentPath((Symbol("process"), "k1", 2))
    assert path == (Symbol("process"), "k1", 2)
    assert hash(path) == hash((Symbol("process"), "k1", 2))
    assert {path: 1}[(Symbol("process"), "k1", 2)] == 1
    assert isinstance(path, tuple)
    assert str(path) == "/process/'k1'/2"
    assert f"{path}" == "/process/'k1'/2"
    assert path[0] == Symbol("process")
    assert path[:2] == (Symbol("process"), "k1")
    assert str(ComponentPath(())) == "/"


# -- ExceptionContext -----------------------------------------------------------------


async def test_context_fields_of_a_failed_mount() -> None:
    rec = Recorder()

    @coco.fn
    async def child() -> None:
        raise ValueError("boom")

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(rec):
            await coco.mount(coco.component_subpath("a", 1), child)

    await run_app(coco.App("ctx-app", main))
    [(exc, ctx)] = rec.calls
    assert isinstance(exc, ValueError)
    assert isinstance(ctx.stable_path, ComponentPath)
    assert ctx.stable_path == ("a", 1)
    assert str(ctx.stable_path) == "/'a'/1" == ctx.path
    assert ctx.parent_stable_path == ()
    assert isinstance(ctx.parent_stable_path, ComponentPath)
    assert str(ctx.parent_stable_path) == "/"
    assert ctx.env_name == "ctx-app" == ctx.app_name
    assert ctx.mount_kind == "mount"
    assert ctx.processor_name == child.__qualname__
    assert ctx.is_background is True
    assert ctx.source == "component"
    assert ctx.original_exception is None


async def test_parent_stable_path_is_the_mounting_component() -> None:
    rec = Recorder()

    @coco.fn
    async def grandchild() -> None:
        raise ValueError("deep")

    @coco.fn
    async def child() -> None:
        await coco.mount(coco.component_subpath("g"), grandchild)

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(rec):
            await coco.mount(child)

    await run_app(coco.App("t", main))
    [(_, ctx)] = rec.calls
    assert ctx.stable_path == (Symbol("child"), "g")
    assert ctx.parent_stable_path == (Symbol("child"),)
    assert str(ctx.parent_stable_path) == "/child"


@pytest.mark.parametrize("source", ["list", "livemap"])
async def test_mount_each_child_parent_is_the_caller(source: str) -> None:
    """As in CocoIndex, a mount_each child's parent is the component that
    called mount_each, not the component hosting the children."""
    rec = Recorder()

    @coco.fn
    async def item(value: int) -> None:
        if value == 2:
            raise ValueError("two")

    @coco.fn
    async def caller() -> None:
        async with coco.exception_handler(rec):
            if source == "list":
                await coco.mount_each(item, [("a", 1), ("b", 2)])
            else:
                lm: LiveMap[str, int] = await LiveMap.create()
                lm.declare_entry("a", 1)
                lm.declare_entry("b", 2)
                await coco.mount_each(item, lm)

    @coco.fn
    async def main() -> None:
        await coco.mount(caller)

    await run_app(coco.App("t", main))
    [(_, ctx)] = rec.calls
    assert ctx.mount_kind == "mount_each"
    assert ctx.stable_path == (Symbol("caller"), Symbol("item"), "b")
    assert ctx.parent_stable_path == (Symbol("caller"),)


async def test_mount_each_host_failure_has_the_caller_as_parent() -> None:
    rec = Recorder()

    @coco.fn
    async def item(value: int) -> None:
        pass

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(rec):
            await coco.mount_each(item, [("a", 1), "not a pair"])

    await run_app(coco.App("t", main))
    [(exc, ctx)] = rec.calls
    assert isinstance(exc, TypeError)
    assert ctx.mount_kind == "mount_each"
    assert ctx.stable_path == (Symbol("item"),)
    assert ctx.parent_stable_path == ()


async def test_source_and_original_exception_along_the_chain() -> None:
    seen: list[tuple[str, str, str, BaseException | None]] = []
    original = ValueError("component")

    def innermost(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        seen.append(("innermost", type(exc).__name__, ctx.source, ctx.original_exception))
        raise RuntimeError("innermost handler failed")

    async def middle(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        seen.append(("middle", type(exc).__name__, ctx.source, ctx.original_exception))
        raise KeyError("middle handler failed")

    def outer(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        seen.append(("outer", type(exc).__name__, ctx.source, ctx.original_exception))

    @coco.fn
    async def child() -> None:
        raise original

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(middle), coco.exception_handler(innermost):
            await coco.mount(child)

    await run_app(coco.App(coco.AppConfig("t", exception_handler=outer), main))
    assert seen == [
        ("innermost", "ValueError", "component", None),
        ("middle", "RuntimeError", "handler", original),
        ("outer", "KeyError", "handler", original),
    ]


async def test_operator_update_children_report_process_live() -> None:
    rec = Recorder()
    raised: list[BaseException] = []

    @coco.fn
    async def bad(n: int) -> None:
        raise ValueError(f"bad {n}")

    def reraise(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        rec(exc, ctx)
        raise exc

    class Live:
        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            h = await op.update("child", bad, 1)
            try:
                with anyio.fail_after(TIMEOUT):
                    await h.ready()
            except ValueError as exc:
                raised.append(exc)
            await op.mark_ready()

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(reraise):
            await coco.mount(coco.component_subpath("live"), Live)

    await run_app(coco.App(coco.AppConfig("t", exception_handler=lambda e, c: None), main))
    [(exc, ctx)] = rec.calls
    assert ctx.mount_kind == "process_live"
    assert ctx.stable_path == ("live", "child")
    assert ctx.parent_stable_path == ("live",)
    assert ctx.processor_name == bad.__qualname__
    assert raised == [exc]


async def test_live_class_constructor_failure_reports_its_mount_kind() -> None:
    rec = Recorder()

    class Broken:
        def __init__(self) -> None:
            raise ValueError("no")

        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            pass

    class Live:
        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            h = await op.update("inner", Broken)
            with anyio.fail_after(TIMEOUT):
                await h.ready()
            await op.mark_ready()

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(rec):
            await coco.mount(Broken)
            await coco.mount(Live)

    await run_app(coco.App("t", main))
    kinds = sorted((str(c.stable_path), c.mount_kind) for _, c in rec.calls)
    assert kinds == [("/Broken", "mount"), ("/Live/'inner'", "process_live")]


async def test_update_full_failure_reports_process_live() -> None:
    rec = Recorder()

    class Live:
        def process(self) -> None:
            raise ValueError("full pass failed")

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.update_full()
            await op.mark_ready()

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(rec):
            await coco.mount(Live)

    await run_app(coco.App("t", main))
    [(exc, ctx)] = rec.calls
    assert isinstance(exc, ValueError)
    assert ctx.mount_kind == "process_live"
    assert ctx.stable_path == (Symbol("Live"),)
    assert ctx.parent_stable_path == ()
    assert ctx.processor_name == Live.__qualname__


async def test_auto_refresh_cycle_failure_reports_process_live() -> None:
    rec = Recorder()
    calls: list[int] = []

    def load() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("second cycle failed")

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(rec):
            await coco.mount(coco.component_subpath("cfg"), coco.auto_refresh(load, interval=0.001))

    async with coco.App("t", main).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
            while len(calls) < 3:  # the cycle after the failing one still comes
                await anyio.sleep(0.001)
    [(exc, ctx)] = rec.calls
    assert isinstance(exc, ValueError)
    assert ctx.mount_kind == "process_live"
    assert ctx.stable_path == ("cfg",)
    assert ctx.parent_stable_path == ()


# -- operator.delete() ----------------------------------------------------------------


def _deleting_live(
    target: KeyedTarget[str, int], sink: Sink, out: list[Any]
) -> type[coco.LiveComponent]:
    @coco.fn
    def leaf(n: int) -> None:
        target.declare(f"k{n}", n)

    class Live:
        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            h = await op.update("c", leaf, 1)
            with anyio.fail_after(TIMEOUT):
                await h.ready()
            sink.fail_deletes = True
            dh = await op.delete("c")
            try:
                with anyio.fail_after(TIMEOUT):
                    await dh.ready()
            except Exception as exc:
                out.append(exc)
            out.append(dh.exception)
            sink.fail_deletes = False
            await op.mark_ready()

    return Live


async def test_delete_handle_raises_what_a_handler_raised() -> None:
    sink = Sink()
    target: KeyedTarget[str, int] = KeyedTarget("rows", sink)
    rec = Recorder()
    out: list[Any] = []

    def reraise(exc: BaseException, ctx: coco.ExceptionContext) -> None:
        rec(exc, ctx)
        raise exc

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(reraise):
            await coco.mount(coco.component_subpath("live"), _deleting_live(target, sink, out))

    await run_app(coco.App(coco.AppConfig("t", exception_handler=lambda e, c: None), main))
    [(exc, ctx)] = rec.calls
    assert isinstance(exc, coco.TargetApplyError)
    assert ctx.mount_kind == "process_live"
    assert ctx.stable_path == ("live", "c")
    assert out == [exc, exc]  # ready() raised it; exception is it


async def test_delete_handle_does_not_raise_for_a_handled_failure() -> None:
    sink = Sink()
    target: KeyedTarget[str, int] = KeyedTarget("rows", sink)
    rec = Recorder()
    out: list[Any] = []

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(rec):
            await coco.mount(_deleting_live(target, sink, out))

    await run_app(coco.App("t", main))
    [(exc, ctx)] = rec.calls
    assert isinstance(exc, coco.TargetApplyError)
    assert ctx.mount_kind == "process_live"
    assert out == [None]  # ready() returned; nothing to raise


async def test_delete_handle_of_a_missing_child_and_a_plain_handle() -> None:
    out: list[Any] = []

    class Live:
        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            dh = await op.delete("nothing here")
            with anyio.fail_after(TIMEOUT):
                await dh.ready()
            out.append(dh.exception)
            await op.mark_ready()

    @coco.fn
    async def main() -> None:
        await coco.mount(Live)

    await run_app(coco.App("t", main))
    assert out == [None]
    handle = coco.ReadyHandle()
    with anyio.fail_after(TIMEOUT):
        await handle.ready()
    assert handle.exception is None


# -- auto_refresh(interval=...) -------------------------------------------------------


@pytest.mark.parametrize("interval", [timedelta(milliseconds=1), 0.001, 1])
async def test_auto_refresh_takes_seconds_or_a_timedelta(interval: float | timedelta) -> None:
    calls: list[float] = []

    def load(tag: str) -> None:
        calls.append(anyio.current_time())

    refresh = coco.auto_refresh(load, interval=interval)

    @coco.fn
    async def main() -> None:
        await coco.mount(refresh, "x")

    async with coco.App("t", main).update(live=True) as handle:
        with anyio.fail_after(TIMEOUT):
            await handle.ready()
            if interval == 1:
                return  # a one-second interval: the first run is enough
            while len(calls) < 3:
                await anyio.sleep(0.001)
    assert calls[2] - calls[1] >= 0.001 * 0.9


def test_auto_refresh_rejects_a_timedelta_interval_of_zero_or_less() -> None:
    for bad in (timedelta(0), timedelta(seconds=-1), timedelta(microseconds=-1)):
        with pytest.raises(ValueError, match="positive"):
            coco.auto_refresh(lambda: None, interval=bad)
    for bad_seconds in (0, 0.0, -1.5, float("nan")):
        with pytest.raises(ValueError, match="positive"):
            coco.auto_refresh(lambda: None, interval=bad_seconds)
    with pytest.raises(TypeError, match="timedelta"):
        coco.auto_refresh(lambda: None, interval="5")  # type: ignore[arg-type]


# -- fn on methods --------------------------------------------------------------------


class Scaler:
    def __init__(self, factor: int, target: KeyedTarget[Any, int] | None = None) -> None:
        self.factor = factor
        self.target = target

    @coco.fn
    def run(self, x: int) -> int:
        if self.target is not None:
            self.target.declare(("run", x), x * self.factor)
        return x * self.factor

    @coco.fn
    async def run_async(self, x: int, *, offset: int = 0) -> int:
        await anyio.sleep(0)
        if self.target is not None:
            self.target.declare(("run_async", x), x * self.factor + offset)
        return x * self.factor + offset

    @coco.fn
    def fail(self, x: int) -> None:
        raise ValueError(f"fail {x}")

    @staticmethod
    @coco.fn
    def static(x: int) -> int:
        return -x

    @classmethod
    @coco.fn
    def klass(cls, x: int) -> str:
        return f"{cls.__name__}:{x}"


def test_fn_on_a_method_binds_self() -> None:
    s = Scaler(2)
    assert s.run(21) == 42
    assert Scaler.run(s, 21) == 42
    assert Scaler.static(3) == -3
    assert Scaler.klass(3) == "Scaler:3"
    assert s.klass(4) == "Scaler:4"
    bound = s.run
    assert isinstance(bound, coco.Function)
    assert type(bound) is coco.Function  # what the runtime's hot path unwraps
    assert bound.__self__ is s
    assert bound.__func__ is Scaler.__dict__["run"]
    assert bound.__name__ == "run"
    assert bound.__qualname__ == "Scaler.run"
    assert bound.__wrapped__.__self__ is s
    assert bound.is_async is False
    assert s.run_async.is_async is True
    assert bound.__get__(Scaler(5)) is bound  # bound once, stays bound
    assert Scaler.run.__get__(None, Scaler) is Scaler.__dict__["run"]
    assert "Scaler.run of" in repr(bound)


async def test_fn_on_an_async_method_binds_self() -> None:
    s = Scaler(3)
    assert await s.run_async(2, offset=1) == 7
    assert await Scaler.run_async(s, 2) == 6


async def test_mount_and_use_mount_of_bound_methods() -> None:
    rows: dict[Any, Any] = {}
    target: KeyedTarget[Any, int] = KeyedTarget("rows", lambda b: rows.update(b.upserts))
    s = Scaler(10, target)
    paths: list[Any] = []
    values: list[int] = []

    @coco.fn
    async def main() -> None:
        h1 = await coco.mount(s.run, 1)
        h2 = await coco.mount(s.run_async, 2, offset=5)
        h3 = await coco.mount(coco.component_subpath("explicit"), s.run, 3)
        with anyio.fail_after(TIMEOUT):
            for h in (h1, h2, h3):
                await h.ready()
        paths.extend([h1.path, h2.path, h3.path])
        values.append(await coco.use_mount(coco.component_subpath("u"), s.run, 4))
        values.append(await coco.use_mount(coco.component_subpath("v"), s.run_async, 5))

    await run_app(coco.App("t", main))
    assert paths == [(Symbol("run"),), (Symbol("run_async"),), ("explicit",)]
    assert values == [40, 50]
    assert rows == {
        ("run", 1): 10,
        ("run_async", 2): 25,
        ("run", 3): 30,
        ("run", 4): 40,
        ("run_async", 5): 50,
    }


@pytest.mark.parametrize("method", ["run", "run_async"])
@pytest.mark.parametrize("source", ["list", "livemap"])
async def test_mount_each_of_a_bound_method(method: str, source: str) -> None:
    rows: dict[Any, Any] = {}
    target: KeyedTarget[Any, int] = KeyedTarget("rows", lambda b: rows.update(b.upserts))
    s = Scaler(7, target)
    bound = getattr(s, method)

    @coco.fn
    async def main() -> None:
        if source == "list":
            h = await coco.mount_each(bound, [("a", 1), ("b", 2)])
        else:
            lm: LiveMap[str, int] = await LiveMap.create()
            lm.declare_entry("a", 1)
            lm.declare_entry("b", 2)
            h = await coco.mount_each(bound, lm)
        assert h.path == (Symbol(method),)

    await run_app(coco.App("t", main))
    assert rows == {(method, 1): 7, (method, 2): 14}


async def test_operator_update_of_a_bound_method_and_its_failure() -> None:
    rows: dict[Any, Any] = {}
    target: KeyedTarget[Any, int] = KeyedTarget("rows", lambda b: rows.update(b.upserts))
    s = Scaler(2, target)
    rec = Recorder()

    class Live:
        def process(self) -> None:
            pass

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            h = await op.update("a", s.run_async, 4)
            h2 = await op.update("b", s.fail, 1)
            with anyio.fail_after(TIMEOUT):
                await h.ready()
                await h2.ready()
            await op.mark_ready()

    @coco.fn
    async def main() -> None:
        async with coco.exception_handler(rec):
            await coco.mount(Live)

    await run_app(coco.App("t", main))
    assert rows == {("run_async", 4): 8}
    [(exc, ctx)] = rec.calls
    assert isinstance(exc, ValueError)
    assert ctx.processor_name == "Scaler.fail"
    assert ctx.stable_path == (Symbol("Live"), "b")


async def test_a_live_component_may_decorate_its_methods() -> None:
    rows: dict[Any, Any] = {}
    target: KeyedTarget[str, int] = KeyedTarget("rows", lambda b: rows.update(b.upserts))

    class Live:
        def __init__(self, n: int) -> None:
            self.n = n

        @coco.fn
        def process(self) -> None:
            target.declare("n", self.n)

        async def process_live(self, op: coco.LiveComponentOperator) -> None:
            await op.update_full()
            await op.mark_ready()

    @coco.fn
    async def main() -> None:
        await coco.mount(Live, 3)

    await run_app(coco.App("t", main))
    assert rows == {"n": 3}


# -- fn.as_async ----------------------------------------------------------------------


def _loop_thread() -> int:
    return threading.get_ident()


async def test_fn_as_async_runs_a_sync_function_in_a_worker_thread() -> None:
    threads: list[int] = []

    @coco.fn.as_async
    def double(x: int) -> int:
        threads.append(threading.get_ident())
        return 2 * x

    @coco.fn.as_async()
    def triple(x: int, *, plus: int = 0) -> int:
        threads.append(threading.get_ident())
        return 3 * x + plus

    assert double.is_async and triple.is_async
    assert isinstance(double, coco.Function)
    assert double.__name__ == "double"
    coro = double(4)
    assert inspect.iscoroutine(coro)
    assert await coro == 8
    assert await triple(2, plus=1) == 7
    assert threads and _loop_thread() not in threads


async def test_fn_as_async_of_an_async_function_is_fn() -> None:
    @coco.fn.as_async
    async def f(x: int) -> int:
        return x + 1

    assert type(f) is coco.Function  # the same as @fn: nothing to adapt
    assert f.is_async
    assert await f(1) == 2


async def test_mounting_an_as_async_function_runs_it_in_a_worker_thread() -> None:
    rows: dict[Any, Any] = {}
    target: KeyedTarget[Any, Any] = KeyedTarget("rows", lambda b: rows.update(b.upserts))
    threads: list[int] = []
    loop_thread: list[int] = []
    got: list[Any] = []

    @coco.fn.as_async
    def load(name: str) -> str:
        threads.append(threading.get_ident())
        target.declare(name, len(name))  # declarations work from the thread
        return name.upper()

    @coco.fn.as_async
    def each(value: int, lm: LiveMap[int, int]) -> None:
        threads.append(threading.get_ident())
        lm.declare_entry(value, value * value)

    @coco.fn
    async def main() -> None:
        loop_thread.append(threading.get_ident())
        lm: LiveMap[int, int] = await LiveMap.create()
        h = await coco.mount(load, "abc")
        h2 = await coco.mount_each(each, [(1, 1), (2, 2)], lm)
        with anyio.fail_after(TIMEOUT):
            await h.ready()
            await h2.ready()
        got.append(await coco.use_mount(coco.component_subpath("u"), load, "de"))
        got.append(dict(lm.items()))

    await run_app(coco.App("t", main))
    assert rows == {"abc": 3, "de": 2}
    assert got == ["DE", {1: 1, 2: 4}]
    assert len(threads) == 4 and loop_thread[0] not in threads


async def test_fn_as_async_on_a_method() -> None:
    class H:
        def __init__(self) -> None:
            self.seen: list[int] = []

        @coco.fn.as_async
        def blocking(self, x: int) -> int:
            self.seen.append(threading.get_ident())
            return x * 10

    h = H()
    assert await h.blocking(2) == 20
    assert h.seen and _loop_thread() not in h.seen
    out: list[int] = []

    @coco.fn
    async def main() -> None:
        out.append(await coco.use_mount(h.blocking, 3))

    await run_app(coco.App("t", main))
    assert out == [30]


async def test_function_as_async_method_calls_from_async_code() -> None:
    threads: list[int] = []

    @coco.fn
    def sync(x: int) -> int:
        threads.append(threading.get_ident())
        return x - 1

    @coco.fn
    async def asynchronous(x: int) -> int:
        threads.append(threading.get_ident())
        return x + 1

    assert await sync.as_async(5) == 4
    assert threads[-1] != _loop_thread()
    assert await asynchronous.as_async(5) == 6
    assert threads[-1] == _loop_thread()
    assert await Scaler(3).run.as_async(2) == 6  # bound, too
    assert sync(5) == 4  # the primary call stays sync


def test_fn_takes_functions_only() -> None:
    with pytest.raises(TypeError, match="decorates a function"):
        coco.fn(42)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="decorates a function"):
        coco.fn.as_async()(42)  # type: ignore[call-overload]


# -- fn's options ---------------------------------------------------------------------


def test_fn_accepts_cocoindex_options_it_ignores() -> None:
    @coco.fn(memo=True, memo_key={"x": None}, version=3, logic_tracking="self", deps="prompt")
    def f(x: int) -> int:
        return x + 1

    @coco.fn(logic_tracking=None)
    async def g(x: int) -> int:
        return x

    @coco.fn(runner=object())  # an async function: the runner is ignored
    async def h(x: int) -> int:
        return x

    @coco.fn.as_async(memo=True, runner=object(), version=1)
    def k(x: int) -> int:
        return x

    assert type(f) is coco.Function and f(1) == 2
    assert g.is_async and h.is_async and k.is_async


def test_fn_rejects_what_cocoindex_rejects() -> None:
    with pytest.raises(TypeError):
        coco.fn(memoize=True)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="logic_tracking"):
        coco.fn(logic_tracking=None, deps="prompt")
    with pytest.raises(ValueError, match="logic_tracking"):
        coco.fn.as_async(logic_tracking=None, deps=("a", 1))
    with pytest.raises(ValueError, match=r"fn\.as_async\(batching=\.\.\.\)"):

        @coco.fn(batching=True)
        def sync_batch(xs: list[int]) -> list[int]:
            return xs

    with pytest.raises(ValueError, match=r"fn\.as_async\(runner=\.\.\.\)"):

        @coco.fn(runner=object())
        def sync_runner(x: int) -> int:
            return x

    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="max_batch_size"):
            coco.fn.as_async(batching=True, max_batch_size=bad)  # type: ignore[arg-type]


# -- fn(batching=True) ----------------------------------------------------------------


@coco.fn.as_async(batching=True)
def _double_sync(xs: list[int]) -> list[int]:
    return [2 * x for x in xs]


@coco.fn(batching=True)
async def _double_async(xs: list[int]) -> list[int]:
    await anyio.sleep(0)
    return [2 * x for x in xs]


async def test_batching_single_calls() -> None:
    assert await _double_sync(5) == 10
    assert await _double_async(6) == 12
    assert _double_sync.is_async and _double_async.is_async
    assert await _double_async.as_async(7) == 14


class Gate:
    """A batching function whose batches wait for ``release``; records them."""

    def __init__(self, max_batch_size: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.release = anyio.Event()

        @coco.fn.as_async(batching=True, max_batch_size=max_batch_size)
        async def gated(xs: list[int]) -> list[int]:
            self.batches.append(list(xs))
            await self.release.wait()
            return [10 * x for x in xs]

        self.fn = gated


async def _gather(fn: Any, inputs: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
    results: dict[int, Any] = {}

    async def one(i: int, x: Any) -> None:
        results[i] = await fn(x, *args, **kwargs)

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            for i, x in enumerate(inputs):
                tg.start_soon(one, i, x)
    return [results[i] for i in range(len(inputs))]


async def test_batching_gathers_the_calls_made_while_a_batch_runs() -> None:
    gate = Gate()
    results: dict[int, int] = {}

    async def call(x: int) -> None:
        results[x] = await gate.fn(x)

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 1)
            while not gate.batches:
                await anyio.sleep(0.001)
            for x in (2, 3, 4, 5):
                tg.start_soon(call, x)
            await anyio.sleep(0.01)
            assert gate.batches == [[1]]  # the first call ran at once, alone
            gate.release.set()
    assert sorted(map(sorted, gate.batches)) == [[1], [2, 3, 4, 5]]
    assert results == {x: 10 * x for x in (1, 2, 3, 4, 5)}


async def test_batching_respects_max_batch_size() -> None:
    gate = Gate(max_batch_size=2)
    gate.release.set()
    results = await _gather(gate.fn, list(range(7)))
    assert results == [10 * x for x in range(7)]
    assert all(len(b) <= 2 for b in gate.batches)
    assert sorted(x for b in gate.batches for x in b) == list(range(7))
    assert any(len(b) == 2 for b in gate.batches)


async def test_batching_keeps_calls_with_other_arguments_or_instances_apart() -> None:
    batches: list[tuple[Any, list[int]]] = []

    class Embedder:
        def __init__(self, name: str) -> None:
            self.name = name

        @coco.fn.as_async(batching=True)
        async def embed(self, xs: list[int], scale: int = 1, *, tag: Any = "") -> list[str]:
            batches.append(((self.name, scale, tag), list(xs)))
            await anyio.sleep(0.01)
            return [f"{self.name}{x * scale}{tag}" for x in xs]

    a, b = Embedder("a"), Embedder("b")
    results: list[Any] = []

    async def run(f: Any, *args: Any, **kwargs: Any) -> None:
        results.extend(await _gather(f, [1, 2, 3], *args, **kwargs))

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, a.embed)
            tg.start_soon(run, b.embed)
            tg.start_soon(run, a.embed, 10)
            tg.start_soon(partial(run, a.embed, tag=["unhashable"]))
    assert sorted(results) == sorted(
        ["a1", "a2", "a3", "b1", "b2", "b3", "a10", "a20", "a30"]
        + [f"a{x}['unhashable']" for x in (1, 2, 3)]
    )
    for (name, _scale, tag), xs in batches:
        # each batch holds the calls of one instance with one set of arguments
        assert name in ("a", "b") and xs
        if tag:
            assert len(xs) == 1  # unhashable further arguments: a batch of one
    by_args = {(n, s, str(t)) for (n, s, t), _ in batches}
    assert by_args == {("a", 1, ""), ("b", 1, ""), ("a", 10, ""), ("a", 1, "['unhashable']")}


async def test_a_failing_batch_fails_every_call_in_it_and_not_the_next() -> None:
    release = anyio.Event()
    batches: list[list[int]] = []

    @coco.fn(batching=True)
    async def flaky(xs: list[int]) -> list[int]:
        batches.append(list(xs))
        await release.wait()
        if 2 in xs:
            raise OSError("batch with 2 failed")
        if 9 in xs:
            return []  # the wrong number of outputs
        return list(xs)

    outcomes: dict[int, Any] = {}

    async def call(x: int) -> None:
        try:
            outcomes[x] = await flaky(x)
        except Exception as exc:
            outcomes[x] = exc

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 1)
            while not batches:
                await anyio.sleep(0.001)
            tg.start_soon(call, 2)
            tg.start_soon(call, 3)
            await anyio.sleep(0.01)
            release.set()
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 4)
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 9)
    assert outcomes[1] == 1 and outcomes[4] == 4
    assert isinstance(outcomes[2], OSError) and outcomes[3] is outcomes[2]
    assert isinstance(outcomes[9], ValueError) and "0 outputs" in str(outcomes[9])


async def test_batching_survives_cancelled_callers() -> None:
    gate = Gate()
    results: dict[int, Any] = {}

    async def call(x: int, scope: anyio.CancelScope | None = None) -> None:
        if scope is None:
            results[x] = await gate.fn(x)
            return
        with scope:
            results[x] = await gate.fn(x)
        results.setdefault(x, "cancelled")

    leader, waiter = anyio.CancelScope(), anyio.CancelScope()
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 1, leader)
            while not gate.batches:
                await anyio.sleep(0.001)
            tg.start_soon(call, 2, waiter)
            tg.start_soon(call, 3)
            tg.start_soon(call, 4)
            await anyio.sleep(0.01)
            waiter.cancel()  # a call waiting for the next batch leaves
            await anyio.sleep(0.01)
            leader.cancel()  # the call running the batch leaves: the rest go on
            await anyio.sleep(0.01)
            gate.release.set()
    assert results == {1: "cancelled", 2: "cancelled", 3: 30, 4: 40}
    assert gate.batches[0] == [1]
    assert sorted(gate.batches[-1]) == [3, 4]
    # nothing is left behind: a new call runs at once
    assert await _gather(gate.fn, [5]) == [50]


async def test_batching_across_mount_each_children() -> None:
    sizes: list[int] = []

    @coco.fn.as_async(batching=True, max_batch_size=8)
    def embed(texts: list[str]) -> list[int]:
        sizes.append(len(texts))
        return [len(t) for t in texts]

    rows: dict[Any, Any] = {}
    target: KeyedTarget[str, int] = KeyedTarget("rows", lambda b: rows.update(b.upserts))

    @coco.fn
    async def child(text: str) -> None:
        target.declare(text, await embed(text))

    items = [(f"k{i}", "x" * i) for i in range(40)]

    @coco.fn
    async def main() -> None:
        await coco.mount_each(child, items)

    await run_app(coco.App("t", main))
    assert rows == {text: len(text) for _, text in items}
    assert sum(sizes) == 40 and max(sizes) > 1 and max(sizes) <= 8


async def test_batching_reruns_a_cancelled_leaders_batch_for_the_others() -> None:
    events = [anyio.Event() for _ in range(3)]  # what the n-th batch waits for
    batches: list[list[int]] = []

    @coco.fn(batching=True)
    async def gated(xs: list[int]) -> list[int]:
        n = len(batches)
        batches.append(list(xs))
        await events[n].wait()
        return [10 * x for x in xs]

    results: dict[int, Any] = {}
    scopes = {x: anyio.CancelScope() for x in (1, 2, 3, 4)}

    async def call(x: int) -> None:
        with scopes[x]:
            results[x] = await gated(x)
        results.setdefault(x, "cancelled")

    async def until(n: int) -> None:
        while len(batches) < n:
            await anyio.sleep(0.001)

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 1)
            await until(1)
            for x in (2, 3, 4):
                tg.start_soon(call, x)
            await anyio.sleep(0.01)
            events[0].set()
            await until(2)  # 2, 3 and 4, run by the call that came first
            first, other, last = batches[1]
            scopes[other].cancel()  # a call in the running batch leaves
            await anyio.sleep(0.01)
            scopes[first].cancel()  # then the call running it: the last goes on alone
            await until(3)
            events[2].set()
    assert batches[0] == [1] and sorted(batches[1]) == [2, 3, 4]
    assert batches[2] == [last]
    assert results == {1: 10, first: "cancelled", other: "cancelled", last: 10 * last}
