"""The component tree: each node's place, identity and generation.

A :class:`Component` is one node of an app's tree, at a :data:`StablePath`.
Each *run* calls its function with a fresh :class:`Run` as the current run;
declarations made during the run are buffered per target, and when the
function returns they are committed as one unit per target.  The tree's
other rooms take a component and work on the fields it documents:

* :mod:`._readiness`: the unready count of its subtree and its waiters;
* :mod:`._unmount`: leaving the tree and releasing what a subtree owns;
* :mod:`._commit`: the commit of a run into its targets;
* :mod:`._runner`: scheduling and trying runs (task, inline or a host's),
  retries, failure records, the task of a live component.

The tree knows its neighbours only through protocols: targets and things
retired with a run (:mod:`._hosting`), the host of many children
(:class:`ChildHost`, a ``mount_each``), and the body of a live component's
task (given by whoever mounts it, :mod:`._live`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, NamedTuple, Protocol

import anyio

from livemap._paths import ComponentPath, StablePath, format_path
from livemap._runtime._context import (
    ExceptionContext,
    ExceptionHandler,
    MountKind,
    dispatch,
    processor_name,
)
from livemap._runtime._hosting import Named, RetiredWithRun, RunEnded, Target, current_run_var
from livemap._runtime._readiness import Readiness, ReadinessExtra
from livemap._runtime._session import AppRun, Session
from livemap.errors import DuplicatePathError, NotInComponentError

__all__ = [
    "ChildHost",
    "Component",
    "ComponentExtra",
    "ComponentMountHandle",
    "LiveBody",
    "MountSpec",
    "Run",
    "SettleJob",
    "current_run",
    "run_settle_call",
    "run_settle_jobs",
    "settle_calls",
]

EMPTY_KWARGS: dict[str, Any] = {}


class Run:
    """One run of one component: what it declared, mounted and created.

    ``buffers``: one buffer per target declared into (filled by
    ``livemap_core.Declarer``); ``mounted``: the children mounted, by path;
    ``created``: what the run created that is retired with it (LiveMaps).
    Each is ``None`` until first used.  ``owner`` is what the targets record
    as the owner of the run's declarations: the component.
    """

    __slots__ = ("buffers", "component", "created", "mounted", "owner")

    def __init__(self, component: Component) -> None:
        self.component = component
        self.owner = component
        component.latest_run = self
        self.buffers: dict[Target, Any] | Named | None = None
        self.mounted: dict[StablePath, Component] | None = None
        self.created: list[RetiredWithRun] | None = None


def current_run(what: str) -> Run:
    """The current component run, or :class:`NotInComponentError` naming
    ``what``: outside any run, or from a task or thread that outlived the
    run in its context (whose ``buffers`` are then the run's end marker,
    which names it)."""
    run = current_run_var.get()
    if run is None:
        raise NotInComponentError(what)
    assert isinstance(run, Run)
    buffers = run.buffers
    if buffers is not None and type(buffers) is not dict:
        raise NotInComponentError(what, buffers)
    return run


class ChildHost(Protocol):
    """What a component that hosts many children (a ``mount_each``) does for
    them.  The upper layer that mounts the children sets it as the hosting
    component's :attr:`Component.host`; the tree calls it at these points of
    a child's life."""

    fn: Any
    """What each child runs (its processor), for the stats of children the
    host keeps without a component."""

    def take(self, child: Component) -> bool:
        """Whether the host runs ``child`` itself (it has begun the run then)."""
        ...

    def try_again(self, child: Component, gen: int) -> bool:
        """Run ``gen`` of ``child`` failed: whether the host tries it again
        (after a wait it owns: a newer run of the child cuts it short), or
        ``False`` to give up and report the failure."""
        ...

    def retry_delay(self, failed: int) -> float | None:
        """For a live child's ``process()``, tried again in its own task: the
        wait before its try after ``failed`` failed ones in a row, or
        ``None`` to give up and report the failure."""
        ...

    def rest(self, child: Component) -> bool:
        """``child``'s run succeeded and left nothing behind: whether the host
        keeps it at rest without its component (it has left the tree then)."""
        ...

    def outcome(self, child: Component, error: BaseException | None) -> None:
        """``child``'s latest run ended, failed (``error``) or not."""
        ...

    def forget(self, child: Component) -> None:
        """``child`` was unmounted."""
        ...

    def supersede(self) -> None:
        """The hosting component re-runs or stops: what it started ends now."""
        ...

    def stop(self) -> None:
        """The hosting component is unmounted: cancel every child's run."""
        ...

    def clear(self) -> int:
        """The hosting component's subtree is cleaned up: drop the children
        the host keeps without a component; return how many."""
        ...

    def retire(self) -> int:
        """The hosting component is re-mounted to run something else (a plain
        function, a live component, the other kind of ``mount_each``): end
        what the host started (its consumer, the runs it queued or runs
        without a component, its workers once the releases queued on them
        are done) and drop the children it keeps without a component;
        return how many.  The host is not asked anything again."""
        ...

    def first_run(self, child: Component, done: Callable[[], object]) -> bool:
        """During a live run's initial catch-up, ``child`` (a function
        component with no record of its own, ``extra``) begins its first
        run of this update: whether the host calls ``done()`` once that run
        is done, the moment ``child.on_first`` would be called (it turns
        self-ready, or leaves the tree).  False: the child's ``on_first``
        tells instead."""
        ...

    def in_update(self) -> bool:
        """Whether work the host started on its children (a scan, a change
        being delivered, a child's run) is still under way: an update of
        the children in progress, which keys they let go wait for."""
        ...

    def settle_later(self) -> bool:
        """Jobs were kept on the hosting component's ``settle``: run them once
        the update in progress (see :meth:`in_update`) has settled; False if
        the host cannot (then the caller runs them)."""
        ...


LiveBody = Callable[["Component", anyio.CancelScope, int], Coroutine[Any, Any, None]]
"""The body of a live component's task: ``body(component, scope, gen)``."""


DropBatch = Callable[[list[Any], "Component"], Awaitable[None]]
"""``batch(members, scope)``: the jobs of one kind that waited for ``scope``'s
update to settle, run as one (a target's deferred drops, one per member)."""


class SettleJob(NamedTuple):
    """What waits for an update to settle (see :meth:`Component.settle_after`):
    ``run()``, and whether it also runs when the app run ends before the
    update settles (``on_stop``: a deferred drop, not a conflict report).
    A job with a ``batch`` runs with the others of the same ``batch``, as
    ``batch([member, ...], scope)`` (``run()`` alone does the same for its
    ``member``)."""

    run: Callable[[], Awaitable[None]]
    on_stop: bool
    batch: DropBatch | None = None
    member: Any = None


def settle_calls(jobs: Iterable[SettleJob]) -> list[list[SettleJob]]:
    """``jobs`` in the calls that run them: those of each ``batch`` together
    first, one call per batch (one commit per target for the keys the
    update let go), then each other one alone, in the order they came."""
    batches: dict[DropBatch, list[SettleJob]] = {}
    rest: list[list[SettleJob]] = []
    for job in jobs:
        if job.batch is None:
            rest.append([job])
        else:
            batches.setdefault(job.batch, []).append(job)
    return [*batches.values(), *rest]


async def run_settle_call(scope: Component, call: list[SettleJob]) -> None:
    """Run one call of :func:`settle_calls`."""
    batch = call[0].batch
    if batch is None:
        await call[0].run()
    else:
        await batch([job.member for job in call], scope)


async def run_settle_jobs(scope: Component, jobs: Iterable[SettleJob]) -> None:
    """Run ``jobs``, which waited for ``scope``'s update to settle, call by
    call (:func:`settle_calls`)."""
    for call in settle_calls(jobs):
        await run_settle_call(scope, call)


class MountSpec:
    """What a mount set for the runs of the component(s) it mounts, but their
    own arguments: the session, the processor, its keyword arguments, the
    mount kind and the handler chain; for the children of a ``mount_each``,
    ``fargs``: the positional arguments after each one's value (``None``
    for any other component).  Immutable: a re-mount with other ones sets
    another.  The children that one ``mount_each`` mounts share one (see
    :meth:`Component.child_spec`)."""

    __slots__ = ("fargs", "handlers", "kwargs", "mount_kind", "processor", "session")

    def __init__(
        self,
        session: Session,
        processor: Any,
        kwargs: dict[str, Any],
        mount_kind: MountKind,
        handlers: tuple[ExceptionHandler, ...],
        fargs: tuple[Any, ...] | None = None,
    ) -> None:
        self.session = session
        self.processor = processor
        self.kwargs = kwargs or EMPTY_KWARGS
        self.mount_kind: MountKind = mount_kind
        self.handlers = handlers
        self.fargs = fargs


class ComponentExtra(ReadinessExtra):
    """The fields of a :class:`Component` that most components never set (see
    there), with its readiness's (:class:`._readiness.ReadinessExtra`): one
    record, made the first time one of them is set."""

    __slots__ = (
        "child_spec",
        "child_targets",
        "children",
        "created",
        "escalated",
        "exception",
        "host",
        "live_body",
        "settle",
    )

    def __init__(self) -> None:
        super().__init__()
        self.children: dict[StablePath, Component] | None = None
        self.live_body: LiveBody | None = None
        self.created: list[RetiredWithRun] | None = None
        self.exception: BaseException | None = None
        self.escalated: BaseException | None = None
        self.host: ChildHost | None = None
        self.settle: dict[Any, SettleJob] | None = None
        self.child_targets: tuple[Target, ...] | None = None
        self.child_spec: MountSpec | None = None


class Component(Readiness):
    """One node of an app's component tree (internal; users hold
    :class:`ComponentMountHandle` objects).

    A ``mount_each`` over a big map has one per entry that holds anything,
    so only the fields such a child uses are slots of the object (with the
    readiness's: 136 bytes in all on 64-bit CPython); the others live in
    one record made the first time one of them is set (``extra``, a
    :class:`ComponentExtra`, never dropped once made; properties of the
    same names read them, and write the ones written from elsewhere).  A
    per-entry child that only holds target entries has no such record.
    The code that runs per entry or per run reads them through ``extra``
    (one slot read, and a test for ``None``), not through the properties.

    Fields of its own (``gen`` below is a run's generation number):

    * ``rel`` (the path below the parent): fixed.
    * the readiness fields (:class:`._readiness.Readiness`): the unready
      count of the subtree and its waiters; it counts into the parent's.
      The component is its own readiness (a subclass, one object per
      component the garbage collector tracks, not two): ``readiness`` is
      ``self``, the name kept so that the readiness fields read as such.
      Two of them are the component's too: ``parent`` (fixed; ``None`` at
      the root) and ``alive``.
    * ``alive``: in the tree.  Cleared once, by :func:`._unmount.detach` /
      :func:`._unmount.stop` or by :meth:`leave_at_rest`, never set again;
      the readiness is closed at the same moment (``closed`` is ``not
      alive``).
    * ``spec``: the :class:`MountSpec` of its runs (``session``,
      ``processor``, ``kwargs``, ``mount_kind``, ``handlers``, read through
      properties of those names; the session is fixed), and ``given``: its
      positional arguments, or (a child of a ``mount_each``, whose spec has
      ``fargs``) its entry's value alone, without a tuple of its own
      (``args`` is ``(given, *spec.fargs)`` then).  What the next run runs;
      set by the mounter before each run.
    * ``generation``: the latest run's number; :meth:`begin` increments it.
      A run (or a commit) of an older generation changes nothing.
    * ``cancel_scope`` / ``scope_run``: the scope of the task or worker
      running the current run and the app run it belongs to (a scope of an
      earlier app run is never cancelled: it may belong to another loop).
      Set together by whoever starts the run, cleared by :meth:`begin` and
      :meth:`cancel_tasks`.
    * ``targets``: the targets this component holds keys of (kept by
      :func:`._commit.commit`, emptied by :func:`._unmount.cleanup`).
    * ``latest_run``: the :class:`Run` made last for this component (set by
      ``Run()``); its run is in progress until its ``buffers`` become a
      :class:`RunEnded` that is no longer ``committing`` (:attr:`running`).

    In ``extra`` (each ``None`` until set):

    * ``children``: the mounted children by relative path, ``None`` if none.
      Invariant: a child is in its parent's ``children`` exactly while it is
      ``alive``.
    * ``live_body``: set for a live component, the body of its task.
    * ``child_targets``: the ``targets`` tuple a child of this component
      took last at its first commit, for the next child declaring into the
      same targets to share (siblings of a ``mount_each`` mostly do); never
      read otherwise.  ``child_spec``: the same for the children's
      :class:`MountSpec` (:meth:`child_spec`).
    * ``created``: what earlier runs created, retired by the next commit.
    * ``exception`` / ``escalated``: the latest run's failure, and what a
      handler re-raised for it; cleared by :meth:`begin`.
    * ``host``: the :class:`ChildHost` of this component's children, if any.
    * ``settle``: what waits for the update this component scopes to settle
      (its run in progress has committed and unmounted what it no longer
      mounts, or its host's update has settled): the deferred drops and the
      conflict reports of that update, by a key that makes each one job.
      Filled by :meth:`settle_after`, run and emptied by
      :func:`._commit.settle` (after a commit, a failure, an unmount, or by
      the host); what is left when the app run ends is dropped by
      :func:`._commit.settle_stopped` (the drops applied, the reports not).
    """

    __slots__ = (
        "cancel_scope",
        "generation",
        "given",
        "latest_run",
        "rel",
        "scope_run",
        "spec",
        "targets",
    )

    # (the slots are Readiness's)
    extra: ComponentExtra | None
    parent: Component | None

    def __init__(
        self,
        spec: MountSpec,
        parent: Component | None,
        rel: StablePath,
        given: Any,
    ) -> None:
        # (Readiness.__init__ inlined: a mount_each makes one per entry)
        self.unready = 1
        self.self_ready = False
        self.parent = parent
        self.alive = True
        self.extra = None
        self.spec = spec
        self.rel = rel
        self.given = given
        self.generation = 0
        self.cancel_scope: anyio.CancelScope | None = None
        self.scope_run: AppRun | None = None
        # (a tuple: a per-entry child holds one or two, and a set of them
        # costs three times the bytes)
        self.targets: tuple[Target, ...] | None = None
        self.latest_run: Run | None = None
        if parent is None:
            self.more().at_root = spec.session.notify

    def more(self) -> ComponentExtra:
        extra = self.extra
        if extra is None:
            extra = self.extra = ComponentExtra()
        return extra

    @property
    def readiness(self) -> Readiness:
        return self

    # -- what the spec holds ---------------------------------------------------

    @property
    def session(self) -> Session:
        return self.spec.session

    @property
    def processor(self) -> Any:
        return self.spec.processor

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.spec.kwargs

    @property
    def mount_kind(self) -> MountKind:
        return self.spec.mount_kind

    @property
    def handlers(self) -> tuple[ExceptionHandler, ...]:
        return self.spec.handlers

    @property
    def args(self) -> tuple[Any, ...]:
        """The positional arguments of the next run."""
        fargs = self.spec.fargs
        given = self.given
        return given if fargs is None else (given, *fargs)

    def child_spec(
        self,
        processor: Any,
        kwargs: dict[str, Any],
        kind: MountKind,
        handlers: tuple[ExceptionHandler, ...],
        fargs: tuple[Any, ...] | None = None,
    ) -> MountSpec:
        """The :class:`MountSpec` for a child of this component: the one the
        last child took if it holds the same (a ``mount_each``'s children
        share one), else a new one."""
        kwargs = kwargs or EMPTY_KWARGS
        extra = self.more()
        spec = extra.child_spec
        if (
            spec is None
            or spec.processor is not processor
            or spec.kwargs is not kwargs
            or spec.handlers is not handlers
            or spec.fargs is not fargs
            or spec.mount_kind != kind
        ):
            spec = MountSpec(self.spec.session, processor, kwargs, kind, handlers, fargs)
            extra.child_spec = spec
        return spec

    # -- what ``extra`` holds --------------------------------------------------

    @property
    def children(self) -> dict[StablePath, Component] | None:
        extra = self.extra
        return None if extra is None else extra.children

    @children.setter
    def children(self, value: dict[StablePath, Component] | None) -> None:
        if value is not None or self.extra is not None:
            self.more().children = value

    @property
    def live_body(self) -> LiveBody | None:
        extra = self.extra
        return None if extra is None else extra.live_body

    @property
    def host(self) -> ChildHost | None:
        extra = self.extra
        return None if extra is None else extra.host

    @host.setter
    def host(self, value: ChildHost | None) -> None:
        if value is not None or self.extra is not None:
            self.more().host = value

    @property
    def exception(self) -> BaseException | None:
        extra = self.extra
        return None if extra is None else extra.exception

    @exception.setter
    def exception(self, value: BaseException | None) -> None:
        if value is not None or self.extra is not None:
            self.more().exception = value

    @property
    def escalated(self) -> BaseException | None:
        extra = self.extra
        return None if extra is None else extra.escalated

    @property
    def created(self) -> list[RetiredWithRun] | None:
        extra = self.extra
        return None if extra is None else extra.created

    @created.setter
    def created(self, value: list[RetiredWithRun] | None) -> None:
        if value is not None or self.extra is not None:
            self.more().created = value

    @property
    def settle(self) -> dict[Any, SettleJob] | None:
        extra = self.extra
        return None if extra is None else extra.settle

    @settle.setter
    def settle(self, value: dict[Any, SettleJob] | None) -> None:
        if value is not None or self.extra is not None:
            self.more().settle = value

    @property
    def child_targets(self) -> tuple[Target, ...] | None:
        extra = self.extra
        return None if extra is None else extra.child_targets

    def __repr__(self) -> str:
        return f"<component {format_path(self.path)}>"

    @property
    def path(self) -> StablePath:
        """The component's path from the app's root."""
        parent = self.parent
        return self.rel if parent is None else parent.path + self.rel

    @property
    def path_str(self) -> str:
        return format_path(self.path)

    @property
    def key(self) -> Any:
        """The key of a ``mount_each`` child (its one-part relative path)."""
        return self.rel[0] if len(self.rel) == 1 else self.rel

    def context(self, kind: MountKind | None = None) -> ExceptionContext:
        """The context of an exception this component reports (as ``kind``,
        by default its own mount kind)."""
        parent = self.parent
        if parent is not None and parent.host is not None and self.mount_kind == "mount_each":
            # a mount_each child: its parent is the component that called mount_each
            parent = parent.parent
        return ExceptionContext(
            env_name=self.session.name,
            stable_path=ComponentPath(self.path),
            processor_name=processor_name(self.processor),
            mount_kind=kind or self.mount_kind,
            parent_stable_path=None if parent is None else ComponentPath(parent.path),
        )

    def current(self, gen: int) -> bool:
        """Whether run generation ``gen`` is still this component's latest and
        the component is mounted: a commit checks it before changing a table."""
        return self.alive and self.generation == gen

    def first_escalated(self) -> BaseException | None:
        stack = [self]
        while stack:
            comp = stack.pop()
            if comp.escalated is not None:
                return comp.escalated
            if comp.children:
                stack.extend(comp.children.values())
        return None

    @property
    def app_name(self) -> str:
        """The name of the app whose tree this component is in."""
        return self.session.name

    def adopt(self, target: Target) -> None:
        """``target`` handed this component a key it claimed (a transfer)."""
        if self.alive:
            targets = self.targets
            if targets is None:
                self.targets = (target,)
            elif target not in targets:
                self.targets = (*targets, target)

    def disown(self, target: Target) -> None:
        """``target`` holds nothing of this component any more (its deferred
        drops were applied)."""
        targets = self.targets
        if targets is not None and target in targets:
            rest = tuple(t for t in targets if t is not target)
            self.targets = rest or None

    @property
    def running(self) -> bool:
        """A run of this component is in progress: its function, or its commit
        (the unmounting of what it no longer mounts and the settling of its
        update included).  A live component runs only within
        ``update_full()``, not for all of ``process_live``."""
        run = self.latest_run
        if not self.alive or run is None:
            return False
        buffers = run.buffers
        return type(buffers) is not RunEnded or buffers.committing

    def _update_parent(self) -> Component | None:
        """The nearest ancestor still in the tree (the parent, unless this
        component is in a subtree being unmounted)."""
        up = self.parent
        while up is not None and not up.alive:
            up = up.parent
        return up

    @property
    def hosts_update(self) -> bool:
        """Whether this component scopes an update in progress through its
        host, not a run: a ``mount_each`` whose scan, deliveries or
        children's runs are under way (:meth:`ChildHost.in_update`)."""
        host = self.host
        return host is not None and self.alive and not self.running and host.in_update()

    @property
    def loop_cache(self) -> dict[object, Any] | None:
        active = self.spec.session.active
        return None if active is None else active.loop_cache

    @property
    def defers_drops(self) -> bool:
        """Whether keys this component lets go (stops declaring, or releases
        as it is unmounted) wait for the update to settle before they are
        deleted: the run of its parent (the nearest ancestor still in the
        tree) is in progress, or the parent hosts an update in progress
        (:attr:`hosts_update`), so another component of the same update may
        take them over."""
        # (asked only by a commit that can drop a key, and by a release)
        up = self._update_parent()
        if up is None:
            return False
        if up.running:
            return True
        extra = up.extra  # (up.hosts_update, up being alive and not running)
        host = None if extra is None else extra.host
        return host is not None and host.in_update()

    def settle_after(
        self,
        job_key: object,
        job: Callable[[], Awaitable[None]],
        other: object = None,
        *,
        on_stop: bool = False,
        batch: DropBatch | None = None,
    ) -> bool:
        """Keep ``job`` until the update this component's commit belongs to
        has settled; False if none is in progress (then the caller runs it).

        Without ``other`` the update is scoped by the highest ancestor whose
        runs, up from the parent, are all in progress (a deferred drop waits
        for every sibling and cousin the update may hand the key to); a
        component hosting an update of its children (:attr:`hosts_update`)
        scopes it too, and ends the climb: its update is its own, not part
        of its parent's run.  With ``other`` (the component owning a key
        this one claims) it is scoped by the two components' nearest common
        ancestor, if that one's run or hosted update is in progress.

        ``on_stop``: the job also runs if the app run ends (stopped,
        cancelled, interrupted) before the update settles — a deferred drop
        must reach the target; a conflict report is not made then.
        ``batch``: the job runs with the others of that batch kept for the
        same update, as ``batch([this component, ...], scope)`` (see
        :func:`run_settle_jobs`).
        """
        scope: Component | None = None
        # the host of a scope that hosts an update (not a run): asked to
        # settle it later
        hosted: ChildHost | None = None
        if other is None:
            up = self._update_parent()
            while up is not None:
                if up.running:
                    scope = up
                    up = up.parent
                    continue
                extra = up.extra  # (up.hosts_update, up not running)
                host = None if extra is None else extra.host
                if host is not None and up.alive and host.in_update():
                    scope = up
                    hosted = host
                break
        elif isinstance(other, Component) and other.session is self.session:
            above: set[int] = set()
            node: Component | None = other
            while node is not None:
                above.add(id(node))
                node = node.parent
            node = self
            while node is not None and id(node) not in above:
                node = node.parent
            if node is not None:
                if node.running:
                    scope = node
                elif node.hosts_update:
                    scope = node
                    hosted = node.host
        if scope is None:
            return False
        if hosted is not None and not hosted.settle_later():
            return False
        entry = SettleJob(job, on_stop, batch, self)
        if scope.settle is None:
            scope.settle = {job_key: entry}
        else:
            scope.settle.setdefault(job_key, entry)
        return True

    async def report(self, exc: BaseException, kind: MountKind | None = None) -> None:
        """Send ``exc`` through this component's handler chain."""
        escalated = await dispatch(self.handlers, exc, self.context(kind))
        if escalated is not None:
            self.more().escalated = escalated
            self.spec.session.escalations = True

    # -- the tree --------------------------------------------------------------

    def mount_child(
        self,
        run: Run | None,
        rel: StablePath,
        processor: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        kind: MountKind,
        handlers: tuple[ExceptionHandler, ...],
        live_body: LiveBody | None = None,
    ) -> Component:
        """The child at ``rel`` (made if new), set to run ``processor``; noted
        as mounted by ``run`` (a second mount at one path in one run is a
        :class:`DuplicatePathError`)."""
        spec = self.child_spec(processor, kwargs, kind, handlers)
        return self.place_child(run, rel, spec, args, live_body)

    def place_child(
        self,
        run: Run | None,
        rel: StablePath,
        spec: MountSpec,
        given: Any,
        live_body: LiveBody | None = None,
    ) -> Component:
        """:meth:`mount_child` with the child's :class:`MountSpec` (one of
        :meth:`child_spec`'s) and its ``given`` (see :class:`Component`)."""
        mounted = None
        if run is not None:
            mounted = run.mounted
            if mounted is None:
                mounted = run.mounted = {}
                active = self.spec.session.active
                if active is not None:  # its first child: the run gives its slot up
                    active.give_slot(run)
            elif rel in mounted:
                raise DuplicatePathError(format_path(self.path + rel))
        extra = self.extra or self.more()
        children = extra.children
        if children is None:
            children = extra.children = {}
        child = children.get(rel)
        if child is None:
            child = Component(spec, self, rel, given)
            children[rel] = child
            self.count_child(child)
        else:
            before = child.spec
            child.spec = spec
            child.given = given
            if before is not spec and before.processor is not spec.processor:
                below = child.extra
                if below is not None and below.host is not None:
                    child.retire_host()
        if live_body is not None:
            child.more().live_body = live_body
        else:
            below = child.extra
            if below is not None:
                below.live_body = None
        if mounted is not None:
            mounted[rel] = child
        return child

    def retire_host(self) -> None:
        """This component, the host of a ``mount_each``'s children, is
        re-mounted to run another processor: its host is retired
        (:meth:`ChildHost.retire`) and forgotten, so that the children of
        what runs here now are ordinary children (their own tasks, their own
        keys), and the children the host kept at rest count as unmounted.
        The children it mounted with a component stay until the new run
        commits, which unmounts those it does not mount again."""
        extra = self.extra
        assert extra is not None and extra.host is not None
        host, extra.host = extra.host, None
        extra.tracked = None  # (kept for the host's settling only)
        at_rest = host.retire()
        app_run = self.spec.session.active
        if at_rest and app_run is not None:
            app_run.stats.unmounted(host.fn, at_rest)

    def leave_at_rest(self) -> None:
        """Leave the tree as a child at rest (see :meth:`ChildHost.rest`): the
        host keeps its value, a later change of its key mounts a fresh
        component (the same as re-running this one, since it holds
        nothing).  Its readiness waiters run as if it had become ready."""
        parent = self.parent
        assert parent is not None and parent.children is not None
        del parent.children[self.rel]
        self.close_at_rest()  # (not alive from now on)

    # -- generations -----------------------------------------------------------

    def cancel_tasks(self) -> None:
        """End what this component has in flight: its host's work and the
        scope of its current run (if it belongs to the current app run)."""
        extra = self.extra
        host = None if extra is None else extra.host
        if host is not None:
            host.supersede()  # e.g. frees a map for a new consumer right away
        # A scope of an earlier app run is over (and may belong to another
        # event loop): only one of the current run is cancelled.
        scope = self.cancel_scope
        if scope is not None:
            if self.scope_run is self.spec.session.active:
                scope.cancel()
            self.cancel_scope = None
            self.scope_run = None

    def begin(self) -> int:
        """Supersede whatever is in flight and start a new generation (a run,
        counted in the app run's stats)."""
        extra = self.extra
        if self.cancel_scope is not None or (extra is not None and extra.host is not None):
            self.cancel_tasks()
        self.generation += 1
        app_run = self.spec.session.active
        if extra is not None:
            extra.exception = None
            extra.escalated = None
        self.restart()
        if app_run is not None:
            app_run.stats.components_run += 1
            if app_run.catching_up and not self.in_consumer() and app_run.count_first_run(self):
                done = app_run.first_run_done
                parent = self.parent
                above = None if parent is None else parent.extra
                host = None if above is None else above.host
                # (a static mount_each's host tells for its plain children,
                # which then need no record of their own: see first_run)
                if host is None or extra is not None or not host.first_run(self, done):
                    self.on_first = done
        return self.generation

    def in_consumer(self) -> bool:
        """Whether this component runs for a consumer: a per-entry child of a
        ``mount_each`` over a feed, or below one (the consumer's ``settle()``
        accounts for those)."""
        parent = self.parent
        while parent is not None:
            extra = parent.extra
            if extra is not None and extra.host is not None and extra.live_body is not None:
                return True
            parent = parent.parent
        return False


class ComponentMountHandle:
    """What ``mount`` / ``mount_each`` return."""

    __slots__ = ("_component", "_value")

    def __init__(self, component: Component, value: Any = None) -> None:
        self._component = component
        self._value = value

    @property
    def path(self) -> StablePath:
        """The mounted component's path."""
        return self._component.path

    @property
    def exception(self) -> BaseException | None:
        """The exception the component's latest run raised, if it failed."""
        return self._component.exception

    async def ready(self) -> None:
        """Wait until the component committed and all its descendants are ready.

        Does not raise for a failed component, unless an exception handler
        raised (then the first such exception in the subtree is raised here).
        """
        comp = self._component
        await comp.readiness.wait_ready()
        if comp.spec.session.escalations:
            escalated = comp.first_escalated()
            if escalated is not None:
                raise escalated

    def __repr__(self) -> str:
        return f"<ComponentMountHandle {format_path(self.path)}>"
