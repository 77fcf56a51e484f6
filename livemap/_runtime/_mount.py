"""``mount`` and ``use_mount``: a component mounting a child in its run.

(``mount_each``, which mounts one child per entry of a collection or a live
feed, is the feed layer's bridge into the tree: :mod:`livemap._feed._each`.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, overload

from livemap._paths import ComponentSubpath
from livemap._runtime._args import child_path, split_args
from livemap._runtime._component import ComponentMountHandle, current_run
from livemap._runtime._context import handler_chain, processor_name
from livemap._runtime._functions import is_live_class
from livemap._runtime._live import run_live
from livemap._runtime._runner import launch, run_once

__all__ = ["mount", "use_mount"]

P = ParamSpec("P")
R = TypeVar("R")

# The optional subpath first is one overload with it and one without: the
# processor's parameters (a ParamSpec) then type the rest of the call.


@overload
async def mount(
    subpath: ComponentSubpath,
    processor: Callable[P, object],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> ComponentMountHandle: ...
@overload
async def mount(
    processor: Callable[P, object], /, *args: P.args, **kwargs: P.kwargs
) -> ComponentMountHandle: ...
async def mount(*args: Any, **kwargs: Any) -> ComponentMountHandle:
    """``mount([subpath,] fn_or_live_class, *args, **kwargs)``: mount a child.

    The child's path is the current component's path / ``subpath`` (default
    ``Symbol(fn.__name__)``).  Returns at once with a handle; ``await
    handle.ready()`` waits for the child.  Raises
    :class:`~livemap.errors.DuplicatePathError` when a sibling is already
    mounted at that path during this run.
    """
    run = current_run("mount()")
    subpath, processor, fargs = split_args(args, "mount")
    rel = child_path(subpath, processor, "mount")
    child = run.component.mount_child(
        run,
        rel,
        processor,
        fargs,
        kwargs,
        "mount",
        handler_chain(),
        run_live if is_live_class(processor) else None,
    )
    await launch(child)
    return ComponentMountHandle(child)


@overload
async def use_mount(
    subpath: ComponentSubpath,
    processor: Callable[P, Awaitable[R]],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> R: ...
@overload
async def use_mount(
    subpath: ComponentSubpath,
    processor: Callable[P, R],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> R: ...
@overload
async def use_mount(
    processor: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
) -> R: ...
@overload
async def use_mount(processor: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R: ...
async def use_mount(*args: Any, **kwargs: Any) -> Any:
    """``use_mount([subpath,] fn, *args, **kwargs)``: mount, wait until ready,
    return the function's value.

    The child runs in the calling task; its failure raises here, into the
    caller.  A live-component class is a ``TypeError``.
    """
    run = current_run("use_mount()")
    subpath, processor, fargs = split_args(args, "use_mount")
    if is_live_class(processor):
        raise TypeError(
            f"use_mount() cannot mount the live component {processor_name(processor)}: "
            "it has no single value; use mount()"
        )
    rel = child_path(subpath, processor, "use_mount")
    child = run.component.mount_child(run, rel, processor, fargs, kwargs, "mount", handler_chain())
    gen = child.begin()
    value = await run_once(child, gen, processor, fargs, kwargs, raise_errors=True)
    await ComponentMountHandle(child).ready()
    return value
