"""Scheduling and trying a component's runs.

:func:`launch` decides where a run happens: on the host of a ``mount_each``
child if it takes it, in a task of its own (an async function, a live
component: :func:`start`), or inline in the caller's task (a sync function).
:func:`run_once` is one try of a run: it calls the function as the
current run and commits it (:mod:`._commit`).  On a failure it asks the
host of a ``mount_each`` child whether the child is tried again (the host's
queue then holds it through its backoff and runs the try again: nothing
waits here); otherwise it records the failure (``comp.exception``) and
reports it.  A live component's ``process()`` is tried again in its own
task, after the host's delay.  A live component's task
(:func:`start`) is counted by the app run while it runs.
"""

from __future__ import annotations

import inspect
from types import CoroutineType
from typing import Any

import anyio

from livemap._paths import prefix_var
from livemap._runtime._commit import (
    commit,
    commit_rest,
    committed,
    first_targets,
    keep_held,
    settle,
    wait_mounted,
)
from livemap._runtime._component import Component, LiveBody, Run
from livemap._runtime._context import MountKind, handlers_var
from livemap._runtime._functions import Function, is_async
from livemap._runtime._hosting import RunEnded, current_run_var
from livemap._runtime._session import AppRun

__all__ = ["launch", "run_made", "run_once", "start"]


async def launch(comp: Component) -> None:
    """Run (or re-run) ``comp``.

    A child whose parent hosts it (``mount_each``) goes to the host if it
    takes it.  A live component, or an async function, gets a task of
    its own; a plain sync function runs inline, in the caller's task.
    """
    parent = comp.parent
    above = None if parent is None else parent.extra
    host = None if above is None else above.host
    if host is not None and host.take(comp):
        return
    spec = comp.spec
    processor = spec.processor
    extra = comp.extra
    if (extra is not None and extra.live_body is not None) or is_async(processor):
        start(comp)
    else:
        gen = comp.begin()
        fargs = spec.fargs
        args = comp.given if fargs is None else (comp.given, *fargs)
        await run_once(comp, gen, processor, args, spec.kwargs, raise_errors=False)


def start(comp: Component) -> None:
    """Run (or re-run) ``comp`` in a new task of the current app run."""
    gen = comp.begin()
    app_run = comp.spec.session.require_run()
    scope = comp.cancel_scope = anyio.CancelScope()
    comp.scope_run = app_run
    body = comp.live_body
    if body is not None:
        # a producer can commit at any time: a live component, also one per
        # entry of a mount_each (a child of a host); not a mount_each's watch
        parent = comp.parent
        producer = comp.mount_kind != "mount_each" or (
            parent is not None and parent.host is not None
        )
        app_run.live_started(scope, producer)
        app_run.tg.start_soon(_live_task, comp, body, app_run, scope, gen)
    else:
        app_run.tg.start_soon(_run_task, comp, scope, gen)


async def _live_task(
    comp: Component, body: LiveBody, app_run: AppRun, scope: anyio.CancelScope, gen: int
) -> None:
    """The task of a live component or of a ``mount_each`` watch: the app
    run counts it while it runs (a live run ends once none is left)."""
    try:
        if comp.current(gen):  # not superseded before it began
            await body(comp, scope, gen)
    finally:
        app_run.live_ended(scope)
        if app_run.closing and comp.current(gen):
            # ended by a catch-up run winding down: it counts as ready
            comp.mark_live_ready()


async def _run_task(comp: Component, scope: anyio.CancelScope, gen: int) -> None:
    # A run superseded before its task got going never calls the user's
    # function: a call that does not await would otherwise run to its end
    # (with the newer run's arguments) before the cancellation lands.
    if not comp.current(gen):
        return
    with scope:
        spec = comp.spec
        await run_once(comp, gen, spec.processor, comp.args, spec.kwargs, raise_errors=False)


async def run_once(
    comp: Component,
    gen: int,
    func: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    raise_errors: bool,
    kind: MountKind | None = None,
    live: bool = False,
    first: tuple[Run, Any, Exception | None] | None = None,
    again: bool = False,
) -> Any:
    """One run: call ``func`` as ``comp``, then commit.

    A run that raises commits nothing.  A run whose commit hits a failing
    sink (a ``TargetApplyError``) counts as failed too.  The failure is
    raised (with ``raise_errors``) or, once the host's retries (if any)
    are used up, reported to the handler chain.  ``first`` is a first try
    that already ran (``(run, result, error)``, made by a host that runs
    children before they have a component): it is taken from where a call
    would have left it.  ``again``: the try again of a failed run, whose
    start is counted already.
    """
    failures = 0
    if type(func) is Function:
        func = func.__wrapped__  # one call less per run
    # CocoIndex's counters (UpdateStats): a start, then one outcome; a run
    # that ends neither way (cancelled, superseded) takes its start back
    spec = comp.spec
    active = spec.session.active
    stats = slots = None
    if active is not None:
        stats = active.stats
        slots = active.slots
    if stats is not None and first is None and not again:  # (counted already)
        stats.run_started(spec.processor)
    outcome = 0  # 1: succeeded, 2: failed, 3: tried again
    while True:
        error: Exception | None
        if first is not None:
            run, result, error = first
            first = None
        else:
            run = Run(comp)
            t_run = current_run_var.set(run)
            # the handler chain and subpath prefix are usually right already
            handlers = spec.handlers
            t_handlers = handlers_var.set(handlers) if handlers_var.get() is not handlers else None
            t_prefix = prefix_var.set(()) if prefix_var.get() else None
            try:
                if slots is not None and not slots.take_now(run):
                    await slots.take(run)
                result = func(*args, **kwargs)
                if type(result) is CoroutineType or inspect.isawaitable(result):
                    result = await result
            except anyio.get_cancelled_exc_class():
                run.buffers = RunEnded(comp)  # cancelled: it commits nothing
                if slots is not None:
                    slots.give(run)
                if stats is not None:
                    stats.run_cancelled(spec.processor)
                raise
            except Exception as exc:
                error = exc
            else:
                error = None
            finally:
                current_run_var.reset(t_run)
                if t_handlers is not None:
                    handlers_var.reset(t_handlers)
                if t_prefix is not None:
                    prefix_var.reset(t_prefix)
        # the function has returned: what it declared is committed from
        # here, and a context it left behind can add nothing more to it
        buffers = run.buffers
        ended = run.buffers = RunEnded(comp, True)
        try:
            current = gen == comp.generation and comp.alive
            if error is None:
                if current:
                    extra = comp.extra
                    if (
                        buffers is None
                        and run.created is None
                        and comp.targets is None
                        and (extra is None or (extra.created is None and not extra.children))
                    ):
                        # nothing to commit: the common case of a leaf
                        parent = comp.parent
                        above = None if parent is None else parent.extra
                        host = None if above is None else above.host
                        outcome = 1
                        if host is not None:
                            if not live and host.rest(comp):
                                return result
                            host.outcome(comp, None)
                        if not live:
                            comp.set_self_ready(True)
                        return result
                    if run.mounted and (buffers or comp.targets):
                        # CocoIndex's submit order: the children this run
                        # mounted are ready before its own declarations commit
                        await wait_mounted(run)
                        if gen != comp.generation or not comp.alive:
                            return result
                    error = await commit(comp, run, buffers, gen, live)
                    if error is None:
                        outcome = 1
                        return result
                    # a sink failed: the run counts as failed (and may be retried)
                    current = gen == comp.generation and comp.alive
                else:
                    return result
            elif current and run.created:
                # What a failed run created stays ``comp``'s until its
                # next successful commit retires it with the older ones: the
                # children it mounted before raising may already use it.
                comp.created = [*(comp.created or ()), *run.created]
            if not current:
                if raise_errors:
                    raise error
                return None
            app_run = spec.session.active
            parent = comp.parent
            host = None if parent is None else parent.host
            if not raise_errors and host is not None:
                if not live:
                    if host.try_again(comp, gen):  # its queue holds the try again
                        if app_run is not None:
                            app_run.stats.retried()
                        outcome = 3
                        return None
                elif (delay := host.retry_delay(failures + 1)) is not None:
                    failures += 1
                    if app_run is not None:
                        app_run.stats.retried()
                    if slots is not None:
                        slots.give(run)  # none held while it waits
                    await anyio.sleep(delay)
                    if gen != comp.generation or not comp.alive:
                        return None
                    outcome = 3
                    continue
            comp.exception = error
            outcome = 2
            if app_run is not None:
                app_run.stats.run_failed(spec.processor)
            if host is not None:
                host.outcome(comp, error)
            if comp.settle is not None:  # the update it scoped is over all the same
                await settle(comp)
            if raise_errors:
                if not live:
                    comp.set_self_ready(True)
                raise error
            await comp.report(error, kind)
            if not live and gen == comp.generation and comp.alive:
                comp.set_self_ready(True)
            return None
        finally:
            # the run is over (a declaration reaching it raised since its
            # function returned, and still does)
            ended.committing = False
            if slots is not None:
                slots.give(run)
            if stats is not None and outcome != 2:
                if outcome == 1:
                    stats.run_succeeded(spec.processor, gen > 1)
                elif outcome == 0:
                    stats.run_cancelled(spec.processor)
                outcome = 0


async def run_made(
    comp: Component,
    run: Run,
    buffers: dict[Any, Any],
    func: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """:func:`run_once` of a per-entry child's first try that already ran
    and made ``comp`` (generation 1) to declare into ``buffers`` (not
    empty), and returned: it raised nothing and mounted and created nothing
    (the host checked; ``comp`` holds no targets and has no children).  Its
    commit is :func:`~._commit.commit` without what cannot apply (targets
    held before, children to unmount, maps to retire; unless a record made
    meanwhile, such as an escalated report, needs
    :func:`~._commit.commit_rest`).  A sink failure
    goes on as in :func:`run_once` (tried again, or recorded and
    reported), which then takes the run over (``func``, ``args`` and
    ``kwargs`` are for it)."""
    spec = comp.spec
    active = spec.session.active
    # the function has returned: what it declared is committed from here
    ended = run.buffers = RunEnded(comp, True)
    succeeded = False
    error: Exception | None = None
    handed = False  # (a sink failure: run_once takes the run over)
    try:
        if comp.generation == 1 and comp.alive:
            # (known before the first await: an unmount while this commit
            # is paused must release these targets too)
            declared = first_targets(comp, buffers)
            comp.targets = declared
            for target, buffer in buffers.items():
                failed = await target.commit_run(comp, buffer, 1)
                error = error or failed
            if comp.alive:
                keep_held(comp, declared, buffers)
                if comp.generation == 1:
                    if comp.extra is not None:
                        # (made meanwhile: a report during the commit that a
                        # handler escalated, kept on the component)
                        error = await commit_rest(comp, None, 1, False, error)
                    elif error is None:
                        committed(comp, False)
            succeeded = error is None
        handed = error is not None
    finally:
        ended.committing = False
        if not handed and active is not None:
            # (as run_once's end: the slot back, and the outcome counted)
            if succeeded:
                active.keyed_run_added(spec.processor, run)
            else:
                active.give_slot(run)
                active.stats.run_cancelled(spec.processor)
    if handed:
        # a sink failed: the run counts as failed (and may be tried again)
        await run_once(comp, 1, func, args, kwargs, raise_errors=False, first=(run, None, error))
