"""A component's readiness: the unready count of its subtree and its waiters.

Each component of the tree (:mod:`._component`) is one: ``Component``
subclasses :class:`Readiness`, so that a component is one object for the
garbage collector, not two.  This module knows nothing of components: only
the counter of the parent's subtree it counts into (``parent``), and, at the
root, what a zero crossing wakes.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

__all__ = ["Readiness", "ReadinessExtra"]


class ReadinessExtra:
    """The fields of a :class:`Readiness` that most records never set (see
    there), in a record of their own made the first time one is set: a
    per-entry child of a ``mount_each`` has none of them, and each field
    on the readiness itself would cost it 8 bytes."""

    __slots__ = ("at_root", "live_busy", "live_marked", "on_first", "tracked", "waiters")

    def __init__(self) -> None:
        self.at_root: Callable[[], object] | None = None
        self.waiters: list[Callable[[], object]] | None = None
        self.live_marked = False
        self.live_busy = 0
        self.on_first: Callable[[], object] | None = None
        self.tracked: set[Readiness] | None = None


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
    * ``parent``: the parent's readiness, which counts this one exactly
      while it is ``alive`` and ``unready > 0``; ``None`` at the root.
      Fixed (a component's parent is this field: one field, not two).
    * ``alive``: the record is in the tree; cleared once, by :meth:`close`
      (or before it, by whoever stops a component), never set again.  Once
      it is clear no crossing travels up and a new waiter is called at once
      (``closed`` is ``not alive``).
    * ``extra``: the :class:`ReadinessExtra` holding the fields below, made
      the first time one of them is set (:meth:`more`), never dropped;
      ``None`` until then, when each of them has the default given.  Read
      them here (properties) or, on a path that runs per entry, through
      ``extra`` directly.

    In ``extra``:

    * ``at_root``: at the root only, called at each zero crossing (wakes the
      app run); ``None`` elsewhere.
    * ``waiters``: callbacks for the next zero crossing (or the close),
      each called once; ``None`` when there are none.
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

    __slots__ = ("alive", "extra", "parent", "self_ready", "unready")

    def __init__(self, parent: Readiness | None, at_root: Callable[[], object] | None) -> None:
        self.unready = 1
        self.self_ready = False
        self.parent = parent
        self.alive = True
        self.extra: ReadinessExtra | None = None
        if at_root is not None:
            self.more().at_root = at_root

    def more(self) -> ReadinessExtra:
        """:attr:`extra`, made now if there is none yet (a subclass makes a
        subclass of :class:`ReadinessExtra`, with fields of its own)."""
        extra = self.extra
        if extra is None:
            extra = self.extra = ReadinessExtra()
        return extra

    # -- the fields in ``extra``, for readers off the per-entry paths -----------

    @property
    def at_root(self) -> Callable[[], object] | None:
        extra = self.extra
        return None if extra is None else extra.at_root

    @property
    def waiters(self) -> list[Callable[[], object]] | None:
        extra = self.extra
        return None if extra is None else extra.waiters

    @property
    def tracked(self) -> set[Readiness] | None:
        extra = self.extra
        return None if extra is None else extra.tracked

    @tracked.setter
    def tracked(self, value: set[Readiness] | None) -> None:
        if value is not None or self.extra is not None:
            self.more().tracked = value

    @property
    def on_first(self) -> Callable[[], object] | None:
        extra = self.extra
        return None if extra is None else extra.on_first

    @on_first.setter
    def on_first(self, value: Callable[[], object] | None) -> None:
        if value is not None or self.extra is not None:
            self.more().on_first = value

    @property
    def live_marked(self) -> bool:
        extra = self.extra
        return extra is not None and extra.live_marked

    @property
    def live_busy(self) -> int:
        extra = self.extra
        return 0 if extra is None else extra.live_busy

    @property
    def closed(self) -> bool:
        """The record left the tree (unmounted, or at rest): ``not alive``."""
        return not self.alive

    # -- the count -------------------------------------------------------------

    def adjust(self, delta: int) -> None:
        """Change ``unready`` by ``delta``; a zero crossing goes up (or, at the
        root, to ``at_root``) and a crossing to zero calls the waiters."""
        before = self.unready
        after = before + delta
        self.unready = after
        if before == 0:
            if after > 0 and self.alive:
                up = self.parent
                if up is not None:
                    above = up.extra
                    if above is not None and above.tracked is not None:
                        above.tracked.add(self)
                    up.adjust(1)
            return
        if after == 0:
            extra = self.extra
            if extra is not None and extra.waiters:
                self.call_waiters()
            if self.alive:
                up = self.parent
                if up is not None:
                    above = up.extra
                    if above is not None and above.tracked is not None:
                        above.tracked.discard(self)
                    up.adjust(-1)
                elif extra is not None and extra.at_root is not None:
                    extra.at_root()

    def count_child(self, child: Readiness) -> None:
        """A new child (unready, counting into this one) joins the subtree."""
        extra = self.extra
        if extra is not None and extra.tracked is not None:
            extra.tracked.add(child)
        if self.unready > 0:
            self.unready += 1  # adjust(1), inline: no crossing (a child per entry)
        else:
            self.adjust(1)

    def uncount_child(self, child: Readiness) -> None:
        """An unready child counted here leaves the subtree."""
        extra = self.extra
        if extra is not None and extra.tracked is not None:
            extra.tracked.discard(child)
        self.adjust(-1)

    def call_waiters(self) -> None:
        """Call (and drop) every waiter."""
        extra = self.extra
        waiters = None if extra is None else extra.waiters
        if waiters:
            assert extra is not None
            extra.waiters = None
            for callback in waiters:
                callback()

    def set_self_ready(self, ready: bool) -> None:
        if self.self_ready is not ready:
            self.self_ready = ready
            if ready and self.unready == 1 and self.extra is None and self.alive:
                # adjust(-1) and the parent's adjust(-1), inline, where the
                # parent stays unready (a per-entry child's commit): no
                # waiters here, and no crossing there
                up = self.parent
                if up is not None and up.unready > 1:
                    self.unready = 0
                    above = up.extra
                    if above is not None and above.tracked is not None:
                        above.tracked.discard(self)
                    up.unready -= 1
                    return  # (no extra: no on_first)
            self.adjust(-1 if ready else 1)
        if ready:
            extra = self.extra
            if extra is not None and extra.on_first is not None:
                self.first_done()

    def first_done(self) -> None:
        """Call (and clear) ``on_first``."""
        extra = self.extra
        if extra is not None:
            on_first, extra.on_first = extra.on_first, None
            if on_first is not None:
                on_first()

    def restart(self) -> None:
        """A new run begins: not self-ready, live marks cleared."""
        extra = self.extra
        if extra is not None:
            extra.live_marked = False
            extra.live_busy = 0
        self.set_self_ready(False)

    def hold(self, delta: int) -> None:
        """Live components: count work in progress that keeps them unready."""
        extra = self.more()
        extra.live_busy += delta
        self.set_self_ready(extra.live_marked and extra.live_busy == 0)

    def mark_live_ready(self) -> None:
        """A live component's initial catch-up is done."""
        extra = self.more()
        if not extra.live_marked:
            extra.live_marked = True
            self.set_self_ready(extra.live_busy == 0)
        if extra.on_first is not None:
            self.first_done()

    def on_ready(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` once the subtree is ready (now, if it is), or
        when it is closed."""
        if self.unready == 0 or self.closed:
            callback()
            return
        extra = self.more()
        if extra.waiters is None:
            extra.waiters = [callback]
        else:
            extra.waiters.append(callback)

    async def wait_ready(self) -> None:
        """Wait until the subtree is ready (or closed)."""
        while self.unready and not self.closed:
            event = anyio.Event()
            self.on_ready(event.set)
            await event.wait()

    def close(self) -> None:
        """The component left the tree: stop counting into the parent (whose
        count the caller has already settled) and call the waiters."""
        self.alive = False
        extra = self.extra
        if extra is not None:
            self.call_waiters()
            if extra.on_first is not None:
                self.first_done()

    def close_at_rest(self) -> None:
        """The component leaves the tree as a child at rest: it counts as
        ready, the parent stops counting it and the waiters are called."""
        up = self.parent
        counted = self.unready > 0 and self.alive and up is not None
        self.self_ready = True
        self.unready = 0
        self.close()
        if counted:
            assert up is not None
            up.uncount_child(self)
