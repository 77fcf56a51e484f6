"""The update of a ``mount_each``'s children, and what waits for it to settle.

A component's run scopes an update: keys its descendants let go wait until
it has committed (``Component.settle_after``).  A ``mount_each`` over a feed
has no run while it follows the feed; its children are in an update of its
own while its scan, a delivery or a child's run is under way.
:class:`Settling` is that update: whether one is in progress, and the task
that runs what waits for it once it has settled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import Any

import anyio

from livemap._runtime._commit import run_jobs, settle_stopped
from livemap._runtime._component import Component, SettleJob
from livemap._runtime._session import AppRun

__all__ = ["Settling", "settling_host"]


settling_host: ContextVar[Settling | None] = ContextVar("livemap_settling_host", default=None)
"""The :class:`Settling` whose task runs in this context: its own wait for
the consumer to settle does not wait for itself."""


class Settling:
    """The update of a ``mount_each``'s children over a feed, and the jobs
    kept for it to settle (see ``Component.settle_after``).

    The children are in an update while the ``mount_each`` is not ready in
    the app run watching its feed: its scan, a delivery or a child's run is
    under way.  A key a child lets go meanwhile (it is swept by the scan,
    its entry is deleted, it stops declaring it) stays held, and a claim on
    a key another child holds is not reported yet: another child of the same
    update may take the key over, or let go of it.  The jobs wait on the
    ``mount_each`` component's ``settle``; a task of the app run takes them
    in batches, waits until the feed's consumer has processed what was
    committed so far and the children then unready are ready, and runs the
    batch.  The ``mount_each`` counts as busy (unready) meanwhile, so its
    handle's ``ready()``, a catch-up run's end and the map's ``settle()``
    come after the batch.

    ``settle``: how to wait for the consumer (the feed's ``settle()``), set
    by the watch, ``None`` when the feed has none; ``settle_keys``: how to
    wait for the tries of some keys waiting or under way now (see
    :meth:`_wait`), set with it; ``task``: a task takes
    batches; ``held``: the generation of the ``mount_each`` whose readiness
    it holds, ``None`` if none; ``started`` / ``done``: batches taken / run,
    and ``waiters`` for :meth:`settled`: ``(batch number, event)``.
    """

    __slots__ = (
        "component",
        "done",
        "held",
        "settle",
        "settle_keys",
        "started",
        "task",
        "waiters",
    )

    def __init__(self, component: Component) -> None:
        self.component = component
        self.settle: Callable[[], Awaitable[None]] | None = None
        self.settle_keys: Callable[[list[Any]], Awaitable[None]] | None = None
        self.task = False
        self.held: int | None = None
        self.started = 0
        self.done = 0
        self.waiters: list[tuple[int, anyio.Event]] | None = None

    def _app_run(self) -> AppRun | None:
        """The app run the ``mount_each`` follows its feed in, while its
        tasks go on (``None`` otherwise: nothing can wait for it then)."""
        comp = self.component
        run = comp.scope_run
        if run is None or run is not comp.spec.session.active or run.tasks_over:
            return None
        return run

    def in_update(self) -> bool:
        return self._app_run() is not None and self.component.readiness.unready > 0

    def later(self) -> bool:
        """A job was kept: make sure a task runs it once the update settles."""
        comp = self.component
        app_run = self._app_run()
        if app_run is None:
            return False
        if self.held != comp.generation:
            self.held = comp.generation
            comp.readiness.hold(1)
        if not self.task:
            self.task = True
            app_run.tg.start_soon(self._run)
        return True

    async def _run(self) -> None:
        comp = self.component
        batch: dict[Any, SettleJob] | None = None
        token = settling_host.set(self)
        try:
            while comp.settle:
                batch, comp.settle = comp.settle, None
                self.started += 1
                await self._wait(batch.values())
                jobs, batch = batch, None
                await run_jobs(comp, jobs.values())
                self._batch_done()
        finally:
            settling_host.reset(token)
            self.task = False
            if batch:  # the app run is ending: drops still go downstream
                await settle_stopped(comp, batch.values())
                self._batch_done()
            if self.held is not None:
                if self.held == comp.generation and comp.alive:
                    comp.readiness.hold(-1)
                self.held = None

    async def _wait(self, jobs: Iterable[SettleJob]) -> None:
        """Wait until what was under way has settled: the consumer has
        processed what its feed committed so far, and the children unready
        now are ready; then, for the keys of the children whose ``jobs``
        these are, the try waiting or under way now.  A key deleted and
        added again after the consumer's ``settle()`` began is taken over
        by its new run (a transfer), not deleted before that run declares
        it and inserted again after; a bounded wait: one try a key."""
        if self.settle is not None:
            await self.settle()
        comp = self.component
        tracked = comp.readiness.tracked
        if tracked is None:  # (the host keeps it; a fallback, not the common case)
            unready = [c.readiness for c in (comp.children or {}).values()]
        else:
            unready = list(tracked)
        for readiness in unready:
            if readiness.unready and not readiness.closed:
                await readiness.wait_ready()
        settle_keys = self.settle_keys
        if settle_keys is not None:
            keys = []
            for job in jobs:
                # the entry's child the member is, or is below
                node = job.member
                while isinstance(node, Component) and node.parent is not comp:
                    node = node.parent
                if isinstance(node, Component):
                    keys.append(node.key)
            if keys:
                await settle_keys(keys)

    def _batch_done(self) -> None:
        self.done += 1
        waiters = self.waiters
        if waiters:
            self.waiters = [w for w in waiters if w[0] > self.done] or None
            for n, event in waiters:
                if n <= self.done:
                    event.set()

    async def settled(self) -> None:
        """Wait until the jobs kept so far have run (none are: at once).  The
        task's own wait for the consumer does not wait for itself."""
        if settling_host.get() is self:
            return
        target = self.started + (1 if self.component.settle else 0)
        if self.done >= target or not (self.task or self.component.settle):
            return
        event = anyio.Event()
        if self.waiters is None:
            self.waiters = [(target, event)]
        else:
            self.waiters.append((target, event))
        await event.wait()
