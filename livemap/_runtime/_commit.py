"""The commit step: a run that returned goes into its targets.

:func:`commit` hands each target the run's buffer for it, releases the
targets the component held keys of but did not declare into this time,
unmounts the children the run did not mount again and retires what the
component's previous run created.  It writes only the component's
``targets`` and ``created`` (and its readiness, once committed).

Then the update the run scopes has *settled*: :func:`settle` runs what its
descendants' commits left for that moment (``comp.settle``): the keys they
stopped declaring that no one took over are deleted (one commit per target
for them all), and the claims still pending are reported as conflicts.  An
app run that ends before an update
settles (stopped, cancelled, interrupted) applies the drops and makes no
report (:func:`settle_stopped`, :func:`settle_tree`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import anyio

from livemap._runtime._component import (
    Component,
    Run,
    SettleJob,
    run_settle_call,
    run_settle_jobs,
    settle_calls,
)
from livemap._runtime._hosting import Named, Target
from livemap._runtime._unmount import unmount

__all__ = [
    "commit",
    "commit_rest",
    "committed",
    "first_targets",
    "keep_held",
    "run_jobs",
    "settle",
    "settle_stopped",
    "settle_tree",
    "wait_mounted",
]


_NO_BUFFERS: dict[Target, object] = {}  # (a run that declared nothing; never written)


async def wait_mounted(run: Run) -> None:
    """Wait until every child ``run`` mounted is ready (or unmounted)."""
    for child in list((run.mounted or {}).values()):
        if child.unready and child.alive:
            await child.wait_ready()


async def commit(
    comp: Component, run: Run, buffers: dict[Target, Any] | Named | None, gen: int, live: bool
) -> Exception | None:
    """Commit ``run`` of ``comp`` (generation ``gen``), whose function left
    ``buffers`` (the run's ``buffers`` are its marker by then); returns the
    first sink failure, if any (the rest of the commit still happens, and
    the component is then left unready).  ``live``: the run is a live
    component's, whose readiness its own task decides."""
    if type(buffers) is not dict:
        buffers = _NO_BUFFERS
    targets = comp.targets
    error: Exception | None = None
    if buffers or targets:
        # the targets held before and not declared into this time (loops,
        # not comprehensions: a re-run declares into the same ones, mostly)
        gone: list[Target] | None = None
        if targets is not None:
            for target in targets:
                if target not in buffers:
                    if gone is None:
                        gone = [target]
                    else:
                        gone.append(target)
        # Known before the first await: an unmount while this commit is
        # paused must release these targets too.
        declared = targets
        if buffers:
            if targets is None:
                declared = first_targets(comp, buffers)
            elif gone is not None or len(targets) != len(buffers):
                declared = _with(targets, buffers)
            # (else every target held is declared into and nothing else:
            # ``targets`` as it is)
            comp.targets = declared
        for target, buffer in buffers.items():
            failed = await target.commit_run(comp, buffer, gen)
            error = error or failed
        if gone:
            for target in gone:
                failed = await target.release_owner(comp, gen)
                error = error or failed
        if comp.alive:
            # (the buffers' targets too: a deferred drop applied while this
            # commit waited may have disowned one that it has declared into)
            keep_held(comp, declared, buffers)
    if gen != comp.generation or not comp.alive:
        return error
    if comp.extra is not None or run.created is not None:
        return await commit_rest(comp, run, gen, live, error)
    # (no children to unmount, nothing retired or created, no settle jobs)
    if error is None:
        committed(comp, live)
    return error


def keep_held(
    comp: Component, declared: tuple[Target, ...] | None, buffers: dict[Target, Any]
) -> None:
    """After a commit of ``buffers`` into ``declared`` (what ``comp.targets``
    was set to before its first await; :func:`commit`'s step, for the first
    run of a per-entry child, :func:`~._runner.run_made`): ``comp.targets`` are the targets it
    holds or claims keys of (a deferred drop applied while the commit
    waited may have disowned one that it has declared into)."""
    now = comp.targets
    if now is None or now is not declared:
        now = _with(now, buffers)
    targets = now
    for target in now:
        if not target.holds(comp):
            targets = tuple(t for t in now if t.holds(comp))
            break
    comp.targets = targets or None


def committed(comp: Component, live: bool) -> None:
    """The commit of ``comp``'s run is in: the host of a ``mount_each``
    child records its success, and a function component is self-ready."""
    parent = comp.parent
    above = None if parent is None else parent.extra
    if above is not None:
        host = above.host
        if host is not None:
            host.outcome(comp, None)
    if not live:
        comp.set_self_ready(True)


async def commit_rest(
    comp: Component, run: Run | None, gen: int, live: bool, error: Exception | None
) -> Exception | None:
    """The rest of :func:`commit` (of ``run``, or of a run of
    :func:`~._runner.run_made`, which mounted and created nothing: ``None``) for a component that
    has children, maps or settle jobs, or whose run created maps."""
    extra = comp.extra
    children = None if extra is None else extra.children
    if children:
        mounted = (None if run is None else run.mounted) or {}
        if len(mounted) != len(children):
            if mounted:
                # the children mounted instead are ready first (their commits
                # are in): a key passing from an unmounted child to one of
                # them is a transfer, not a delete and an insert
                assert run is not None
                await wait_mounted(run)
                if gen != comp.generation or not comp.alive:
                    return error
                children = comp.children or {}
            for child in [c for rel, c in children.items() if rel not in mounted]:
                await unmount(child)
            if gen != comp.generation or not comp.alive:
                # superseded while a release waited: what ``comp.settle`` holds
                # now may be the newer run's update, which that run settles
                return error
    created = None if run is None else run.created
    extra = comp.extra  # (again: a settle job kept meanwhile may have made it)
    if extra is not None:
        retired = extra.created
        extra.created = created
        if retired:
            for item in retired:
                item.retire()
        if extra.settle is not None:
            await settle(comp)
    elif created is not None:
        comp.more().created = created
    if error is not None:
        return error
    committed(comp, live)
    return None


def _with(targets: tuple[Target, ...] | None, more: Iterable[Target]) -> tuple[Target, ...]:
    """``targets`` and those of ``more`` not among them, in that order (the
    same tuple if there are none)."""
    if targets is None:
        return tuple(more)
    extra = [t for t in more if t not in targets]
    return (*targets, *extra) if extra else targets


def first_targets(comp: Component, buffers: dict[Target, object]) -> tuple[Target, ...]:
    """The targets of ``comp``'s first commit into ``buffers``: the tuple a
    sibling took last, if it is the same (one tuple for the many children of
    a ``mount_each``, not one each)."""
    targets = tuple(buffers)
    parent = comp.parent
    if parent is not None:
        extra = parent.extra or parent.more()
        shared = extra.child_targets
        if shared == targets:
            return shared
        extra.child_targets = targets
    return targets


async def settle(comp: Component) -> None:
    """Run what waits for ``comp``'s update to settle (see
    :meth:`Component.settle_after`), jobs added meanwhile included."""
    while comp.settle:
        jobs, comp.settle = comp.settle, None
        await run_jobs(comp, jobs.values())


async def run_jobs(scope: Component, jobs: Iterable[SettleJob]) -> None:
    """Run ``jobs``, which waited for ``scope``'s update to settle: each
    batch's as one call, then the others (:func:`run_settle_jobs`).  If one
    is interrupted (cancelled, or a ``BaseException``), the drops among it
    and the ones not run yet are still applied (:func:`settle_stopped`)
    before the interruption goes on: a batch taken out of ``comp.settle`` is
    nobody else's to finish."""
    pending = list(jobs)
    try:
        await run_settle_jobs(scope, pending)
    except BaseException:
        # (all of them again: a drop is applied once, a second call finds
        # nothing deferred any more)
        try:
            await settle_stopped(scope, pending)
        except BaseException:
            # a sink interrupted again: the target keeps those deletes
            # listed for its next batch, and the first interruption goes on
            pass
        raise


async def settle_stopped(scope: Component, jobs: Iterable[SettleJob]) -> None:
    """The app run ended (stopped, cancelled, interrupted) before the update
    of ``scope`` these ``jobs`` waited for settled: the deferred drops among
    them are applied (their deletes reach the targets), the conflict reports
    are not made.  Shielded: it runs while the run is being torn down.  A
    ``BaseException`` from one target's sink does not keep the others' drops
    back: it is raised once they have been applied (the first, if several)."""
    first: BaseException | None = None
    with anyio.CancelScope(shield=True):
        for call in settle_calls(job for job in jobs if job.on_stop):
            try:
                await run_settle_call(scope, call)
            except BaseException as exc:  # (the target keeps them for its next batch)
                if first is None:
                    first = exc
    if first is not None:
        try:
            raise first
        finally:
            first = None  # (no cycle through this frame)


async def settle_tree(root: Component) -> None:
    """:func:`settle_stopped` for every job left in ``root``'s tree (the app
    run is over: no update in it will settle any more)."""
    stack = [root]
    while stack:
        comp = stack.pop()
        extra = comp.extra
        if extra is None:  # (a per-entry child mostly: none of either)
            continue
        while extra.settle:
            jobs, extra.settle = extra.settle, None
            await settle_stopped(comp, jobs.values())
        if extra.children:
            stack.extend(extra.children.values())
