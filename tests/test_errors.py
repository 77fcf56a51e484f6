"""One error hierarchy: everything livemap raises or reports on purpose is a
``LiveMapError``, with the builtin the contract names as a second base."""

from __future__ import annotations

import pathlib
from types import ModuleType
from typing import Any

import anyio
import pytest
from _cores import core_fixture  # noqa: F401  (the ``core`` fixture)
from helpers import TIMEOUT, Recorder, run_app

import livemap as coco
import livemap.errors
from livemap import LiveMap

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"

BUILTIN_BASE: dict[str, type[Exception] | None] = {
    "ConsumerBusyError": RuntimeError,
    "DuplicateDeclarationError": ValueError,
    "DuplicatePathError": ValueError,
    "KeyConflictError": None,
    "LiveMapError": None,
    "MapRetiredError": RuntimeError,
    "NotInComponentError": RuntimeError,
    "StableKeyError": TypeError,
    "TargetApplyError": RuntimeError,
    "UpdateInProgressError": RuntimeError,
    "ValueComparisonError": ValueError,
}


def test_the_table_above_lists_every_error() -> None:
    assert set(BUILTIN_BASE) == set(livemap.errors.__all__)


@pytest.mark.parametrize("name", sorted(BUILTIN_BASE))
def test_every_error_is_a_livemap_error_and_its_builtin(name: str) -> None:
    cls = getattr(livemap.errors, name)
    assert issubclass(cls, livemap.errors.LiveMapError)
    base = BUILTIN_BASE[name]
    if base is not None:
        assert issubclass(cls, base)


@pytest.mark.parametrize("name", sorted(BUILTIN_BASE))
def test_every_error_is_documented(name: str) -> None:
    assert f"`{name}`" in (DOCS / "errors.md").read_text(encoding="utf-8")


def test_the_core_raises_into_the_hierarchy(core: ModuleType) -> None:
    table = core.Table("t", track_undo=False)
    buffer = core.Buffer(table, "owner")
    buffer.declare("k", 1)
    with pytest.raises(livemap.errors.DuplicateDeclarationError) as caught:
        buffer.declare("k", 2)
    assert isinstance(caught.value, livemap.errors.LiveMapError)
    assert "'k'" in str(caught.value)


class _Subscriber:
    async def update_all(self) -> None:
        return None

    async def mark_ready(self) -> None:
        return None

    async def update(self, key: Any, value: Any) -> Any:
        raise AssertionError("no change is made")

    async def delete(self, key: Any) -> Any:
        raise AssertionError("no change is made")


@pytest.mark.anyio
async def test_a_second_watch_is_consumer_busy() -> None:
    seen: list[BaseException] = []

    @coco.fn
    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lm.watch, _Subscriber())
            await anyio.sleep(0.01)
            try:
                await lm.watch(_Subscriber())
            except coco.ConsumerBusyError as exc:
                seen.append(exc)
            tg.cancel_scope.cancel()

    await run_app(coco.App("busy", main))
    assert len(seen) == 1
    assert isinstance(seen[0], RuntimeError)
    assert "LiveMap#" in str(seen[0])


class _RaisingEq:
    def __init__(self, n: int) -> None:
        self.n = n

    def __eq__(self, other: object) -> bool:
        raise ArithmeticError("no comparing")

    __hash__ = None  # type: ignore[assignment]


@pytest.mark.anyio
async def test_a_raising_eq_is_reported_as_a_value_comparison_error() -> None:
    recorder = Recorder()
    target: coco.KeyedTarget[str, Any] = coco.KeyedTarget("t", lambda batch: None)

    @coco.fn
    async def main(n: int) -> None:
        target.declare("a", _RaisingEq(n))

    app = coco.App(coco.AppConfig("eq", exception_handler=recorder), main, 1)
    await run_app(app)
    app.args = (2,)
    await run_app(app)
    reported = recorder.of_type(coco.ValueComparisonError)
    assert len(reported) == 1
    error = reported[0][0]
    assert isinstance(error, coco.ValueComparisonError)
    assert error.key == "a"
    assert isinstance(error.__cause__, ArithmeticError)
    assert target.get("a").n == 1  # the held value stays


@pytest.mark.anyio
async def test_a_second_update_is_update_in_progress() -> None:
    started = anyio.Event()
    release = anyio.Event()

    @coco.fn
    async def main() -> None:
        started.set()
        await release.wait()

    app = coco.App("twice", main)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_app, app)
            await started.wait()
            with pytest.raises(coco.UpdateInProgressError, match="'twice'"):
                await app.update()
            release.set()
