"""Unmounting: a subtree leaves the tree, then releases what it owns.

Unmounting has two halves.  :func:`detach` is synchronous: the component
leaves its parent's ``children`` (and the parent's unready count), and
:func:`stop` ends the whole subtree at once (not alive, readiness closed,
tasks cancelled, the host's children stopped).  :func:`cleanup` is the
asynchronous half, for a detached subtree: it releases every target entry
(children first), retires what the subtree's runs created and counts the
unmounted components.  :func:`unmount` is both.
"""

from __future__ import annotations

import anyio

from livemap._runtime._component import Component, run_settle_jobs
from livemap._runtime._session import Session

__all__ = ["cleanup", "detach", "release_owed", "stop", "unmount"]


async def unmount(comp: Component) -> None:
    """Unmount ``comp`` and its subtree, releasing what they own."""
    if detach(comp):
        await cleanup(comp)


def detach(comp: Component) -> bool:
    """The synchronous half of :func:`unmount`: leave the tree and stop the
    whole subtree at once (tasks cancelled, consumers released, readiness
    waiters woken).  False if already detached."""
    if not comp.alive:
        return False
    parent = comp.parent
    if parent is not None:
        assert parent.children is not None
        del parent.children[comp.rel]
        if comp.unready > 0:
            parent.uncount_child(comp)
        above = parent.extra
        if above is not None and above.host is not None:
            above.host.forget(comp)
    stop(comp)
    comp.spec.session.owed.add(comp)  # until cleanup() has released what it owns
    return True


def stop(comp: Component) -> None:
    """Stop ``comp``'s subtree: not alive, tasks cancelled, waiters woken."""
    comp.alive = False
    comp.cancel_tasks()
    host = comp.host
    if host is not None:
        host.stop()
    comp.close()
    extra = comp.extra
    if extra is not None and extra.children:
        for child in extra.children.values():
            stop(child)


async def cleanup(comp: Component) -> None:
    """The asynchronous half of :func:`unmount`, for a detached subtree:
    release every target entry (children first) and retire what its runs
    created.  Shielded from cancellation: a :func:`stop` or an unmount of
    an ancestor meanwhile must not leave entries owned by a component that
    is no longer in any tree."""
    with anyio.CancelScope(shield=True):
        await _release_subtree(comp)
    comp.spec.session.owed.discard(comp)


async def release_owed(session: Session) -> None:
    """Release what the detached components of ``session`` still own: their
    cleanup was queued, or cut short, when the run ended."""
    owed = session.owed
    while owed:
        comp = owed.pop()
        assert isinstance(comp, Component)
        await cleanup(comp)


async def _release_subtree(comp: Component) -> None:
    extra = comp.extra
    children = None
    if extra is not None:
        children, extra.children = extra.children, None
    if children:
        for child in children.values():
            await _release_subtree(child)
    targets = comp.targets
    if targets:
        for i, target in enumerate(targets):
            # (the ones still to release stay listed: a release cut short by
            # a BaseException is done again by release_owed)
            comp.targets = targets[i:]
            failed = await target.release_owner(comp)
            comp.targets = targets[i + 1 :] or None
            if failed is not None:  # kept by the target and retried with its next batch
                await comp.report(failed)
    at_rest = 0
    host = None
    if extra is not None:
        while extra.settle:  # what waited for an update this component scoped
            jobs, extra.settle = extra.settle, None
            await run_settle_jobs(comp, jobs.values())
        if extra.created:
            created, extra.created = extra.created, None
            for item in created:
                item.retire()
        host = extra.host
        if host is not None:
            at_rest = host.clear()
    spec = comp.spec
    app_run = spec.session.active
    if app_run is not None:
        app_run.stats.unmounted(spec.processor)
        if at_rest:
            assert host is not None
            app_run.stats.unmounted(host.fn, at_rest)
