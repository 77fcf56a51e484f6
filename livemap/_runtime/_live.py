"""Live components: ``process()`` for a full pass, ``process_live(operator)``
for the long-running part, the operator that connects the two, and the body
of a live component's task (:func:`run_live`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, ParamSpec, Protocol, runtime_checkable

import anyio

from livemap._paths import ComponentSubpath, StableKey, StablePath, normalize_key
from livemap._runtime._args import child_path
from livemap._runtime._component import Component, ComponentMountHandle
from livemap._runtime._context import handler_chain, handlers_var
from livemap._runtime._functions import is_live_class
from livemap._runtime._hosting import current_run_var
from livemap._runtime._runner import launch, run_once
from livemap._runtime._unmount import cleanup, detach

__all__ = [
    "LiveComponent",
    "LiveComponentOperator",
    "ReadyHandle",
    "auto_refresh",
    "delete_child",
    "live_run",
    "live_task_context",
    "run_live",
]

P = ParamSpec("P")


@runtime_checkable
class LiveComponent(Protocol):
    """A component class that keeps itself up to date.

    ``mount(MyLive, *args, **kwargs)`` instantiates ``MyLive(*args,
    **kwargs)`` and runs ``process_live(operator)`` in its own task.
    ``process()`` is what ``operator.update_full()`` runs as the component's
    run: its declarations and mounts are committed like a function
    component's.  Returning from ``process_live`` marks the component ready.
    """

    def process(self) -> Awaitable[None] | None: ...

    async def process_live(self, operator: LiveComponentOperator) -> None: ...


class ReadyHandle:
    """A handle whose ``ready()`` waits for an event (or returns at once).

    What ``operator.delete()`` returns: ``ready()`` returns once the unmount
    is done (its entries released downstream); at once if there was nothing
    to do.  Like ``ComponentMountHandle.ready()``, it raises when a failure
    of the unmount (a sink that failed to apply its deletes: a
    :class:`~livemap.errors.TargetApplyError`) was reported to a handler that
    raised: then it raises what the handler raised.  A hand-written
    :class:`~livemap.LiveMapSubscriber` may return ``ReadyHandle()`` from
    ``update`` / ``delete`` when a change is processed by the time the call
    returns."""

    __slots__ = ("_done", "_escalated")

    def __init__(self, done: anyio.Event | None = None) -> None:
        self._done = done
        self._escalated: BaseException | None = None

    async def ready(self) -> None:
        """Wait until the unmount is complete; raise what a handler raised for
        a failure of it, if one did."""
        if self._done is not None:
            await self._done.wait()
        if self._escalated is not None:
            raise self._escalated

    @property
    def exception(self) -> BaseException | None:
        """What ``ready()`` raises once the unmount is complete (what a handler
        raised for a failure of it), else ``None``."""
        return self._escalated


def _subtree(comp: Component) -> list[Component]:
    found = [comp]
    i = 0
    while i < len(found):
        children = found[i].children
        if children:
            found.extend(children.values())
        i += 1
    return found


def _subpath(subpath: StableKey | ComponentSubpath | StablePath | list[Any]) -> StablePath:
    if isinstance(subpath, ComponentSubpath):
        return subpath.parts
    if type(subpath) is list:  # a list is the equal tuple: a path of parts
        subpath = normalize_key(subpath)
    parts = subpath if type(subpath) is tuple else (subpath,)
    return tuple(normalize_key(part) for part in parts)


class LiveComponentOperator:
    """What ``process_live`` uses to change its component.

    Every method is async.  ``update_full()`` runs ``process()`` and returns
    when it has committed and its children are ready (a failure goes to the
    exception-handler chain with ``mount_kind="process_live"``, it is not
    raised).  ``update()`` (re)mounts one
    child and returns its handle without waiting for it; ``delete()``
    unmounts one and returns once it is gone.
    """

    __slots__ = ("_component", "_gen", "_instance")

    def __init__(self, component: Component, instance: Any, gen: int) -> None:
        self._component = component
        self._instance = instance
        self._gen = gen

    @property
    def stable_path(self) -> StablePath:
        """The live component's path."""
        return self._component.path

    def _current(self) -> bool:
        return self._component.current(self._gen)

    async def update_full(self) -> None:
        """Run ``process()`` as the component's run and wait for its children."""
        comp = self._component
        if not self._current():
            return
        comp.hold(1)
        try:
            await run_once(
                comp,
                self._gen,
                self._instance.process,
                (),
                {},
                raise_errors=False,
                kind="process_live",
                live=True,
            )
            for child in list((comp.children or {}).values()):
                await child.readiness.wait_ready()
        finally:
            if self._current():
                comp.hold(-1)

    async def update(
        self,
        subpath: StableKey | ComponentSubpath | StablePath,
        fn: Callable[P, object],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> ComponentMountHandle:
        """(Re)mount the child at ``subpath`` running ``fn(*args, **kwargs)``.

        Its failures reach the handler chain with ``mount_kind="process_live"``.
        """
        comp = self._component
        rel = _subpath(subpath)
        child_path(rel, fn, "update")
        child = comp.mount_child(
            None,
            rel,
            fn,
            args,
            kwargs,
            "process_live",
            handler_chain(),
            run_live if is_live_class(fn) else None,
        )
        if self._current():
            await launch(child)
        return ComponentMountHandle(child)

    async def delete(self, subpath: StableKey | ComponentSubpath | StablePath) -> ReadyHandle:
        """Unmount the child at ``subpath`` (if any): it leaves the tree at once;
        releasing what it owned goes on in the background (the live component
        counts as busy meanwhile), and the handle's ``ready()`` waits for it
        (and raises if a handler raised for a failure of the release)."""
        return delete_child(self, _subpath(subpath))

    async def mark_ready(self) -> None:
        """Mark the live component ready (its initial catch-up is done)."""
        if self._current():
            self._component.mark_live_ready()

    async def report_exception(self, exc: BaseException) -> None:
        """Send ``exc`` to the component's exception-handler chain."""
        await self._component.report(exc, "process_live")


def delete_child(
    operator: LiveComponentOperator,
    rel: StablePath,
    start: Callable[[Component, Callable[[], Awaitable[None]]], None] | None = None,
) -> ReadyHandle:
    """:meth:`LiveComponentOperator.delete` of the child at ``rel``: detach it
    now; ``start(child, job)`` starts ``job``, the release of what it owned
    (by default in a task of the app run; a ``mount_each`` runs it where
    its key's runs take turns)."""
    comp = operator._component
    children = comp.children
    child = None if children is None else children.get(rel)
    if child is None or not detach(child):
        return ReadyHandle()
    done = anyio.Event()
    handle = ReadyHandle(done)
    comp.hold(1)

    async def finish() -> None:
        subtree = _subtree(child)
        before = [c.escalated for c in subtree]
        try:
            await cleanup(child)
        finally:
            # what a handler raised for a release that failed meanwhile
            for c, old in zip(subtree, before, strict=True):
                if c.escalated is not None and c.escalated is not old:
                    handle._escalated = c.escalated
                    break
            done.set()
            if operator._current():  # a re-run has reset the count already
                comp.hold(-1)

    if start is None:
        comp.spec.session.require_run().tg.start_soon(finish)
    else:
        start(child, finish)
    return handle


def auto_refresh(
    fn: Callable[P, object], *, interval: float | timedelta
) -> Callable[P, LiveComponent]:
    """A live-component class that runs ``fn(*args, **kwargs)`` as its
    ``process()`` and, in live mode, again ``interval`` after each run ends
    (a fixed delay: runs never overlap).

    ``interval`` is in seconds or a :class:`datetime.timedelta`; zero or
    less is a ``ValueError``.  ``mount(auto_refresh(load, interval=5.0),
    path)`` mounts it; the class takes ``fn``'s arguments (typed as a
    callable with ``fn``'s parameters).  A failing run goes to the handler
    chain (``mount_kind="process_live"``) and the next one still comes.
    """
    if isinstance(interval, timedelta):
        seconds = interval.total_seconds()
    elif isinstance(interval, (int, float)):
        seconds = float(interval)
    else:
        raise TypeError(f"auto_refresh interval must be seconds or a timedelta, got {interval!r}")
    if not seconds > 0:  # also NaN
        raise ValueError(f"auto_refresh interval must be positive, got {interval!r}")
    name = getattr(fn, "__name__", "refresh")

    class AutoRefresh:
        def __init__(self, *args: P.args, **kwargs: P.kwargs) -> None:
            self._args = args
            self._kwargs = kwargs

        async def process(self) -> None:
            result = fn(*self._args, **self._kwargs)
            if hasattr(result, "__await__"):
                await result

        async def process_live(self, operator: LiveComponentOperator) -> None:
            await operator.update_full()
            await operator.mark_ready()
            while True:
                await anyio.sleep(seconds)
                await operator.update_full()

    AutoRefresh.__name__ = name
    AutoRefresh.__qualname__ = f"auto_refresh({getattr(fn, '__qualname__', name)})"
    return AutoRefresh


@contextmanager
def live_task_context(comp: Component) -> Iterator[None]:
    """The context a live component's task runs in: no current run (its
    ``process()`` runs get their own, through ``update_full()``), and the
    component's exception-handler chain."""
    t_run = current_run_var.set(None)
    t_handlers = handlers_var.set(comp.handlers)
    try:
        yield
    finally:
        current_run_var.reset(t_run)
        handlers_var.reset(t_handlers)


async def run_live(comp: Component, scope: anyio.CancelScope, gen: int) -> None:
    """The task of a live component: :func:`live_run` in the task's scope."""
    with scope:
        await live_run(comp, gen)


async def live_run(comp: Component, gen: int) -> None:
    """What a live component's task runs (generation ``gen``): make the
    instance from the component's arguments as they are now, run
    ``process_live``; its return marks the component ready.  A failure goes
    to the handler chain (``mount_kind="process_live"``; a constructor's
    failure with the kind the component was mounted with)."""
    with live_task_context(comp):
        try:
            instance = comp.processor(*comp.args, **comp.kwargs)
        except Exception as exc:
            comp.exception = exc
            app_run = comp.spec.session.active
            if app_run is not None:
                app_run.stats.run_failed(comp.processor, start=True)
            await comp.report(exc)  # as mounted: "mount", or "process_live"
            comp.mark_live_ready()
            return
        operator = LiveComponentOperator(comp, instance, gen)
        try:
            await instance.process_live(operator)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            if comp.current(gen):
                comp.exception = exc
                app_run = comp.spec.session.active
                if app_run is not None:
                    app_run.stats.run_failed(comp.processor, start=True)
                await comp.report(exc, "process_live")
        if comp.current(gen):
            comp.mark_live_ready()
