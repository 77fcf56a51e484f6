"""A component's readiness: the unready count of its subtree and its waiters.

Each component of the tree (:mod:`._component`) is one: ``Component``
subclasses :class:`Readiness`, so that a component is one object for the
garbage collector, not two.  This module knows nothing of components: only
the counter of the parent's subtree it counts into (``up``), and, at the
root, what a zero crossing wakes.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

__all__ = ["Readiness"]


class Readiness:
    """The unready count of one component's subtree, and who waits for it to
    reach zero.

    Fields:

    * ``unready``: 1 while not ``self_ready``, plus 1 per child subtree that
      is not ready.  The subtree is ready exactly when it is 0.  Only
      :meth:`adjust` changes it (and :meth:`close_at_rest`, which zeroes it);
      only its zero crossings travel up.
    * ``self_ready``: the component itself is ready (a function component:
      its latest run committed or failed for good; a live component: it
      marked itself ready and nothing holds it busy).  Changed only by
      :meth:`set_self_ready`, which keeps ``unready`` in step.
    * ``up``: the parent's readiness, which counts this one exactly while
      ``up`` is set and ``unready > 0``.  ``None`` at the root and once
      closed.  Invariant: ``up is None`` whenever ``closed``.
    * ``at_root``: at the root only, called at each zero crossing (wakes the
      app run); ``None`` elsewhere.
    * ``waiters``: callbacks for the next zero crossing (or the close),
      each called once; ``None`` when there are none.
    * ``closed``: the component left the tree (unmounted, or at rest): no
      crossing travels up any more and a new waiter is called at once.  Set
      once, never cleared.
    * ``tracked``: at a component that keeps it (a ``mount_each`` over a
      feed), the readiness of each child counted unready here, for a wait
      on the children unready at one moment without a look at every child;
      ``None`` elsewhere.  A child is in it while it counts into this
      ``unready`` (it may stay after it left the tree: a reader skips the
      ready and closed ones).
    * ``on_first``: called once (then cleared) the next time the component
      is done with a run for the first time: it turns self-ready, or (a live
      component) it marks itself ready although work holds it busy, or it
      leaves the tree.  Set by a live app run's initial catch-up
      (:meth:`AppRun.count_first_run`), ``None`` otherwise.
    * ``live_marked`` / ``live_busy`` (live components only): it marked
      itself ready (its initial catch-up is done) / the number of pieces of
      work in progress that keep it unready.  A live component is self-ready
      exactly when ``live_marked and live_busy == 0``; a new run clears both.
    """

    __slots__ = (
        "at_root",
        "closed",
        "live_busy",
        "live_marked",
        "on_first",
        "self_ready",
        "tracked",
        "unready",
        "up",
        "waiters",
    )

    def __init__(self, up: Readiness | None, at_root: Callable[[], object] | None) -> None:
        self.unready = 1
        self.self_ready = False
        self.up = up
        self.at_root = at_root
        self.waiters: list[Callable[[], object]] | None = None
        self.closed = False
        self.live_marked = False
        self.live_busy = 0
        self.on_first: Callable[[], object] | None = None
        self.tracked: set[Readiness] | None = None

    def adjust(self, delta: int) -> None:
        """Change ``unready`` by ``delta``; a zero crossing goes up (or, at the
        root, to ``at_root``) and a crossing to zero calls the waiters."""
        before = self.unready
        after = before + delta
        self.unready = after
        if before == 0:
            up = self.up
            if after > 0 and up is not None:
                if up.tracked is not None:
                    up.tracked.add(self)
                up.adjust(1)
            return
        if after == 0:
            if self.waiters:
                self.call_waiters()
            up = self.up
            if up is not None:
                if up.tracked is not None:
                    up.tracked.discard(self)
                up.adjust(-1)
            elif self.at_root is not None:
                self.at_root()

    def count_child(self, child: Readiness) -> None:
        """A new child (unready, counting into this one) joins the subtree."""
        if self.tracked is not None:
            self.tracked.add(child)
        self.adjust(1)

    def uncount_child(self, child: Readiness) -> None:
        """An unready child counted here leaves the subtree."""
        if self.tracked is not None:
            self.tracked.discard(child)
        self.adjust(-1)

    def call_waiters(self) -> None:
        """Call (and drop) every waiter."""
        waiters = self.waiters
        if waiters:
            self.waiters = None
            for callback in waiters:
                callback()

    def set_self_ready(self, ready: bool) -> None:
        if self.self_ready is not ready:
            self.self_ready = ready
            self.adjust(-1 if ready else 1)
        if ready and self.on_first is not None:
            self.first_done()

    def first_done(self) -> None:
        """Call (and clear) ``on_first``."""
        on_first, self.on_first = self.on_first, None
        if on_first is not None:
            on_first()

    def restart(self) -> None:
        """A new run begins: not self-ready, live marks cleared."""
        self.live_marked = False
        self.live_busy = 0
        self.set_self_ready(False)

    def hold(self, delta: int) -> None:
        """Live components: count work in progress that keeps them unready."""
        self.live_busy += delta
        self.set_self_ready(self.live_marked and self.live_busy == 0)

    def mark_live_ready(self) -> None:
        """A live component's initial catch-up is done."""
        if not self.live_marked:
            self.live_marked = True
            self.set_self_ready(self.live_busy == 0)
        if self.on_first is not None:
            self.first_done()

    def on_ready(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` once the subtree is ready (now, if it is), or
        when it is closed."""
        if self.unready == 0 or self.closed:
            callback()
        elif self.waiters is None:
            self.waiters = [callback]
        else:
            self.waiters.append(callback)

    async def wait_ready(self) -> None:
        """Wait until the subtree is ready (or closed)."""
        while self.unready and not self.closed:
            event = anyio.Event()
            self.on_ready(event.set)
            await event.wait()

    def close(self) -> None:
        """The component left the tree: stop counting into the parent (whose
        count the caller has already settled) and call the waiters."""
        self.closed = True
        self.up = None
        self.call_waiters()
        if self.on_first is not None:
            self.first_done()

    def close_at_rest(self) -> None:
        """The component leaves the tree as a child at rest: it counts as
        ready, the parent stops counting it and the waiters are called."""
        up = self.up
        counted = self.unready > 0 and up is not None
        self.self_ready = True
        self.unready = 0
        self.close()
        if counted:
            assert up is not None
            up.uncount_child(self)
