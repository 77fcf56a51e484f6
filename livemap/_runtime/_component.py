"""The component tree: runs, commits, unmounting and readiness.

A :class:`Component` is one node of an app's tree, at a :data:`StablePath`.
Each *run* calls its function with a fresh :class:`Run` as the current run;
declarations made during the run are buffered per target, and when the
function returns they are committed as one unit per target, children the run
did not mount again are unmounted, and what the component's earlier runs
created (LiveMaps) is retired.  A run that raises commits nothing.

The tree knows its neighbours only through protocols: targets and things
retired with a run (:mod:`._hosting`), the host of many children
(:class:`ChildHost`, a ``mount_each``), and the body of a live component's
task (given by whoever mounts it, :mod:`._live`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from types import CoroutineType
from typing import Any, Protocol

import anyio

from livemap._paths import ComponentPath, StablePath, format_path, prefix_var
from livemap._runtime._context import (
    ExceptionContext,
    ExceptionHandler,
    MountKind,
    dispatch,
    handlers_var,
    processor_name,
)
from livemap._runtime._functions import Function, is_async
from livemap._runtime._hosting import RetiredWithRun, RunEnded, Target, current_run_var
from livemap._runtime._session import AppRun, Session
from livemap.errors import DuplicatePathError, NotInComponentError

__all__ = [
    "ChildHost",
    "Component",
    "ComponentMountHandle",
    "LiveBody",
    "Run",
    "current_run",
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
        self.buffers: dict[Target, Any] | RunEnded | None = None
        self.mounted: dict[StablePath, Component] | None = None
        self.created: list[RetiredWithRun] | None = None


def current_run(what: str) -> Run:
    """The current component run, or :class:`NotInComponentError` naming ``what``."""
    run = current_run_var.get()
    if run is None:
        raise NotInComponentError(what)
    assert isinstance(run, Run)
    return run


class ChildHost(Protocol):
    """What a component that hosts many children (a ``mount_each``) does for
    them.  The upper layer that mounts the children sets it as the hosting
    component's :attr:`Component.host`; the tree calls it at these points of
    a child's life."""

    def take(self, child: Component) -> bool:
        """Whether the host runs ``child`` itself (it has begun the run then)."""
        ...

    def retry_delay(self, failed: int) -> float | None:
        """The wait before trying a child again after ``failed`` failed tries
        in a row, or ``None`` to give up and report the failure."""
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


LiveBody = Callable[["Component", anyio.CancelScope, int], Coroutine[Any, Any, None]]
"""The body of a live component's task: ``body(component, scope, gen)``."""


class Component:
    """One node of an app's component tree (internal; users hold
    :class:`ComponentMountHandle` objects).

    Fields (``gen`` below is a run's generation number):

    * ``session``, ``parent``, ``rel`` (the path below the parent): fixed.
    * ``processor``, ``args``, ``kwargs``, ``mount_kind``, ``handlers``: what
      the next run runs; set by the mounter before each run.
    * ``live_body``: set for a live component, the body of its task.
    * ``children``: the mounted children by relative path, ``None`` if none.
    * ``alive``: in the tree.  Cleared once, by :meth:`detach`/:meth:`stop`
      or by :meth:`leave_at_rest`, never set again.
    * ``generation``: the latest run's number; :meth:`begin` increments it.
      A run (or a commit) of an older generation changes nothing.
    * ``self_ready``: the latest run committed or failed (a live component:
      it marked itself ready and is not busy).
    * ``unready``: 1 while not self-ready, plus 1 per child whose subtree is
      not ready.  Invariant: the subtree is ready exactly when it is 0, and
      the parent counts this component exactly while it is alive and
      ``unready > 0``; only :meth:`adjust` changes it, and it tells the
      parent on the zero crossings.
    * ``cancel_scope`` / ``scope_run``: the scope of the task or worker
      running the current run and the app run it belongs to (a scope of an
      earlier app run is never cancelled: it may belong to another loop).
    * ``targets``: the targets this component holds keys of.
    * ``created``: what earlier runs created, retired by the next commit.
    * ``waiters``: callbacks for the next time the subtree is ready.
    * ``exception`` / ``escalated``: the latest run's failure, and what a
      handler re-raised for it.
    * ``live_marked`` / ``live_busy``: a live component marked itself ready
      / the work in progress that keeps it unready.
    * ``backing_off``: waiting before a retry (a newer value may cut it short).
    * ``host``: the :class:`ChildHost` of this component's children, if any.
    """

    __slots__ = (
        "alive",
        "args",
        "backing_off",
        "cancel_scope",
        "children",
        "created",
        "escalated",
        "exception",
        "generation",
        "handlers",
        "host",
        "kwargs",
        "live_body",
        "live_busy",
        "live_marked",
        "mount_kind",
        "parent",
        "processor",
        "rel",
        "scope_run",
        "self_ready",
        "session",
        "targets",
        "unready",
        "waiters",
    )

    def __init__(
        self,
        session: Session,
        parent: Component | None,
        rel: StablePath,
        processor: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        mount_kind: MountKind,
        handlers: tuple[ExceptionHandler, ...],
    ) -> None:
        self.session = session
        self.parent = parent
        self.rel = rel
        self.processor = processor
        self.args = args
        self.kwargs = kwargs or EMPTY_KWARGS
        self.mount_kind: MountKind = mount_kind
        self.handlers = handlers
        self.live_body: LiveBody | None = None
        self.children: dict[StablePath, Component] | None = None
        self.alive = True
        self.self_ready = False
        self.unready = 1
        self.generation = 0
        self.cancel_scope: anyio.CancelScope | None = None
        self.scope_run: AppRun | None = None
        self.targets: set[Target] | None = None
        self.created: list[RetiredWithRun] | None = None
        self.waiters: list[Callable[[], object]] | None = None
        self.exception: BaseException | None = None
        self.escalated: BaseException | None = None
        self.live_marked = False
        self.live_busy = 0
        self.backing_off = False
        self.host: ChildHost | None = None

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

    # -- readiness -------------------------------------------------------------

    def adjust(self, delta: int) -> None:
        """Change :attr:`unready` by ``delta``, telling the parent (or, at the
        root, the session) on the zero crossings."""
        before = self.unready
        after = before + delta
        self.unready = after
        if before == 0:
            if after > 0 and self.alive and self.parent is not None:
                self.parent.adjust(1)
            return
        if after == 0:
            self._fire_waiters()
            if self.parent is None:
                self.session.notify()
            elif self.alive:
                self.parent.adjust(-1)

    def _fire_waiters(self) -> None:
        waiters = self.waiters
        if waiters:
            self.waiters = None
            for callback in waiters:
                callback()

    def set_self_ready(self, ready: bool) -> None:
        if self.self_ready is not ready:
            self.self_ready = ready
            self.adjust(-1 if ready else 1)

    def _refresh_live_ready(self) -> None:
        self.set_self_ready(self.live_marked and self.live_busy == 0)

    def hold(self, delta: int) -> None:
        """Live components: count work in progress that keeps them unready."""
        self.live_busy += delta
        self._refresh_live_ready()

    def mark_live_ready(self) -> None:
        """A live component's initial catch-up is done."""
        if not self.live_marked:
            self.live_marked = True
            self._refresh_live_ready()

    def current(self, gen: int) -> bool:
        """Whether run generation ``gen`` is still this component's latest and
        the component is mounted: a commit checks it before changing a table."""
        return self.alive and self.generation == gen

    @property
    def subtree_ready(self) -> bool:
        return self.unready == 0

    def on_ready(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` once this subtree is ready (now, if it is), or
        when the component is unmounted."""
        if self.unready == 0 or not self.alive:
            callback()
            return
        if self.waiters is None:
            self.waiters = [callback]
        else:
            self.waiters.append(callback)

    async def wait_ready(self) -> None:
        """Wait until this component and all its descendants are ready."""
        while self.unready and self.alive:
            event = anyio.Event()
            self.on_ready(event.set)
            await event.wait()

    def first_escalated(self) -> BaseException | None:
        stack = [self]
        while stack:
            comp = stack.pop()
            if comp.escalated is not None:
                return comp.escalated
            if comp.children:
                stack.extend(comp.children.values())
        return None

    # -- mounting --------------------------------------------------------------

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
        mounted = None
        if run is not None:
            mounted = run.mounted
            if mounted is None:
                mounted = run.mounted = {}
            elif rel in mounted:
                raise DuplicatePathError(format_path(self.path + rel))
        children = self.children
        if children is None:
            children = self.children = {}
        child = children.get(rel)
        if child is None:
            child = Component(self.session, self, rel, processor, args, kwargs, kind, handlers)
            children[rel] = child
            self.adjust(1)
        else:
            child.processor = processor
            child.args = args
            child.kwargs = kwargs or EMPTY_KWARGS
            child.mount_kind = kind
            child.handlers = handlers
        child.live_body = live_body
        if mounted is not None:
            mounted[rel] = child
        return child

    def _cancel_tasks(self) -> None:
        host = self.host
        if host is not None:
            host.supersede()  # e.g. frees a map for a new consumer right away
        # A scope of an earlier app run is over (and may belong to another
        # event loop): only one of the current run is cancelled.
        scope = self.cancel_scope
        if scope is not None:
            if self.scope_run is self.session.active:
                scope.cancel()
            self.cancel_scope = None
            self.scope_run = None

    def begin(self) -> int:
        """Supersede whatever is in flight and start a new generation (a run,
        counted in the app run's stats)."""
        if self.cancel_scope is not None or self.host is not None:
            self._cancel_tasks()
        self.generation += 1
        app_run = self.session.active
        if app_run is not None:
            app_run.stats.components_run += 1
        self.exception = None
        self.escalated = None
        self.live_marked = False
        self.live_busy = 0
        self.set_self_ready(False)
        return self.generation

    async def launch(self) -> None:
        """Run (or re-run) this component.

        A child whose parent hosts it (``mount_each``) goes to the host if it
        takes it.  A live component, or an async function, gets a task of
        its own; a plain sync function runs inline, in the caller's task.
        """
        parent = self.parent
        host = None if parent is None else parent.host
        if host is not None and host.take(self):
            return
        processor = self.processor
        if self.live_body is not None or is_async(processor):
            self.start()
        else:
            gen = self.begin()
            await self.run_once(gen, processor, self.args, self.kwargs, raise_errors=False)

    def start(self) -> None:
        """Run (or re-run) this component in a new task of the current app run."""
        gen = self.begin()
        app_run = self.session.require_run()
        scope = self.cancel_scope = anyio.CancelScope()
        self.scope_run = app_run
        body = self.live_body
        if body is not None:
            app_run.live_started(scope, self.mount_kind != "mount_each")
            app_run.tg.start_soon(self._live_task, body, app_run, scope, gen)
        else:
            app_run.tg.start_soon(self._run_task, scope, gen)

    async def _live_task(
        self, body: LiveBody, app_run: AppRun, scope: anyio.CancelScope, gen: int
    ) -> None:
        """The task of a live component or of a ``mount_each`` watch: the app
        run counts it while it runs (a live run ends once none is left)."""
        try:
            if gen == self.generation and self.alive:  # not superseded before it began
                await body(self, scope, gen)
        finally:
            app_run.live_ended(scope)
            if app_run.closing and self.current(gen):
                # ended by a catch-up run winding down: it counts as ready
                self.mark_live_ready()

    async def _run_task(self, scope: anyio.CancelScope, gen: int) -> None:
        # A run superseded before its task got going never calls the user's
        # function: a call that does not await would otherwise run to its end
        # (with the newer run's arguments) before the cancellation lands.
        if gen != self.generation or not self.alive:
            return
        with scope:
            await self.run_once(gen, self.processor, self.args, self.kwargs, raise_errors=False)

    async def run_once(
        self,
        gen: int,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        raise_errors: bool,
        kind: MountKind | None = None,
        live: bool = False,
        first: tuple[Run, Any, Exception | None] | None = None,
    ) -> Any:
        """One run: call ``func`` as this component, then commit.

        A run that raises commits nothing.  A run whose commit hits a failing
        sink (a ``TargetApplyError``) counts as failed too.  The failure is
        raised (with ``raise_errors``) or, once the host's retries (if any)
        are used up, reported to the handler chain.  ``first`` is a first try
        that already ran (``(run, result, error)``, made by a host that runs
        children before they have a component): it is taken from where a call
        would have left it.
        """
        failures = 0
        if type(func) is Function:
            func = func.__wrapped__  # one call less per run
        while True:
            error: Exception | None
            if first is not None:
                run, result, error = first
                first = None
            else:
                run = Run(self)
                t_run = current_run_var.set(run)
                # the handler chain and subpath prefix are usually right already
                t_handlers = (
                    handlers_var.set(self.handlers)
                    if handlers_var.get() is not self.handlers
                    else None
                )
                t_prefix = prefix_var.set(()) if prefix_var.get() else None
                try:
                    result = func(*args, **kwargs)
                    if type(result) is CoroutineType or inspect.isawaitable(result):
                        result = await result
                except anyio.get_cancelled_exc_class():
                    run.buffers = RunEnded(self)  # cancelled: it commits nothing
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
            try:
                current = gen == self.generation and self.alive
                if error is None:
                    if current:
                        if (
                            run.buffers is None
                            and run.created is None
                            and self.targets is None
                            and self.created is None
                            and not self.children
                        ):
                            # nothing to commit: the common case of a leaf
                            parent = self.parent
                            host = None if parent is None else parent.host
                            if host is not None:
                                if not live and host.rest(self):
                                    return result
                                host.outcome(self, None)
                            if not live:
                                self.set_self_ready(True)
                            return result
                        if run.mounted and (run.buffers or self.targets):
                            # CocoIndex's submit order: the children this run
                            # mounted are ready before its own declarations commit
                            await self._wait_mounted(run)
                            if gen != self.generation or not self.alive:
                                return result
                        error = await self._commit(run, gen, live)
                        if error is None:
                            return result
                        # a sink failed: the run counts as failed (and may be retried)
                        current = gen == self.generation and self.alive
                    else:
                        return result
                elif current and run.created:
                    # What a failed run created stays this component's until its
                    # next successful commit retires it with the older ones: the
                    # children it mounted before raising may already use it.
                    self.created = [*(self.created or ()), *run.created]
                if not current:
                    if raise_errors:
                        raise error
                    return None
                app_run = self.session.active
                parent = self.parent
                host = None if parent is None else parent.host
                delay = None
                if not raise_errors and host is not None:
                    delay = host.retry_delay(failures + 1)
                if delay is not None:
                    failures += 1
                    if app_run is not None:
                        app_run.stats.retries += 1
                    self.backing_off = True  # a newer value may cut the wait short
                    try:
                        await anyio.sleep(delay)
                    finally:
                        self.backing_off = False
                    if gen != self.generation or not self.alive:
                        return None
                    continue
                self.exception = error
                if app_run is not None:
                    app_run.stats.components_failed += 1
                if host is not None:
                    host.outcome(self, error)
                if raise_errors:
                    if not live:
                        self.set_self_ready(True)
                    raise error
                await self.report(error, kind)
                if not live and gen == self.generation and self.alive:
                    self.set_self_ready(True)
                return None
            finally:
                # a declaration reaching this run from now on raises
                run.buffers = RunEnded(self)

    def leave_at_rest(self) -> None:
        """Leave the tree as a child at rest (see :meth:`ChildHost.rest`): the
        host keeps its value, a later change of its key mounts a fresh
        component (the same as re-running this one, since it holds
        nothing).  Its readiness waiters run as if it had become ready."""
        parent = self.parent
        assert parent is not None and parent.children is not None
        del parent.children[self.rel]
        self.alive = False
        self.self_ready = True
        counted = self.unready > 0
        self.unready = 0
        self._fire_waiters()
        if counted:
            parent.adjust(-1)

    async def report(self, exc: BaseException, kind: MountKind | None = None) -> None:
        """Send ``exc`` through this component's handler chain."""
        escalated = await dispatch(self.handlers, exc, self.context(kind))
        if escalated is not None:
            self.escalated = escalated
            self.session.escalations = True

    async def _wait_mounted(self, run: Run) -> None:
        """Wait until every child ``run`` mounted is ready (or unmounted)."""
        for child in list((run.mounted or {}).values()):
            if child.unready and child.alive:
                await child.wait_ready()

    async def _commit(self, run: Run, gen: int, live: bool) -> Exception | None:
        """Commit ``run``; returns the first sink failure, if any (the rest of
        the commit still happens, and the component is then left unready)."""
        buffers = run.buffers if isinstance(run.buffers, dict) else {}
        previous = self.targets
        error: Exception | None = None
        if buffers or previous:
            # Known before the first await: an unmount while this commit is
            # paused must release these targets too.
            if buffers:
                self.targets = (previous or set()) | buffers.keys()
            for target, buffer in buffers.items():
                failed = await target.commit_run(self, buffer, gen)
                error = error or failed
            if previous:
                for target in previous:
                    if target not in buffers:
                        failed = await target.release_owner(self, gen)
                        error = error or failed
            if self.alive:
                self.targets = {t for t in self.targets or () if t.holds(self)} or None
        if gen != self.generation or not self.alive:
            return error
        children = self.children
        if children:
            mounted = run.mounted or {}
            if len(mounted) != len(children):
                for child in [c for rel, c in children.items() if rel not in mounted]:
                    await child.unmount()
        retired = self.created
        self.created = run.created
        if retired:
            for item in retired:
                item.retire()
        if error is not None:
            return error
        parent = self.parent
        if parent is not None and parent.host is not None:
            parent.host.outcome(self, None)
        if not live:
            self.set_self_ready(True)
        return None

    async def unmount(self) -> None:
        """Unmount this component and its subtree, releasing what they own."""
        if self.detach():
            await self.cleanup()

    def detach(self) -> bool:
        """The synchronous half of :meth:`unmount`: leave the tree and stop the
        whole subtree at once (tasks cancelled, consumers released, readiness
        waiters woken).  False if already detached."""
        if not self.alive:
            return False
        parent = self.parent
        if parent is not None:
            assert parent.children is not None
            del parent.children[self.rel]
            if self.unready > 0:
                parent.adjust(-1)
            if parent.host is not None:
                parent.host.forget(self)
        self.stop()
        return True

    def stop(self) -> None:
        """Stop this subtree: not alive, tasks cancelled, waiters woken."""
        self.alive = False
        self._cancel_tasks()
        host = self.host
        if host is not None:
            host.stop()
        self._fire_waiters()
        if self.children:
            for child in self.children.values():
                child.stop()

    async def cleanup(self) -> None:
        """The asynchronous half of :meth:`unmount`, for a detached subtree:
        release every target entry (children first) and retire what its runs
        created.  Shielded from cancellation: a stop() or an unmount of an
        ancestor meanwhile must not leave entries owned by a component that
        is no longer in any tree."""
        with anyio.CancelScope(shield=True):
            await self._cleanup()

    async def _cleanup(self) -> None:
        children, self.children = self.children, None
        if children:
            for child in children.values():
                await child._cleanup()
        if self.targets:
            targets, self.targets = self.targets, None
            for target in targets:
                failed = await target.release_owner(self)
                if failed is not None:  # kept by the target and retried with its next batch
                    await self.report(failed)
        unmounted = 1
        if self.created:
            created, self.created = self.created, None
            for item in created:
                item.retire()
        if self.host is not None:
            unmounted += self.host.clear()
        app_run = self.session.active
        if app_run is not None:
            app_run.stats.components_unmounted += unmounted


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
        await comp.wait_ready()
        if comp.session.escalations:
            escalated = comp.first_escalated()
            if escalated is not None:
                raise escalated

    def __repr__(self) -> str:
        return f"<ComponentMountHandle {format_path(self.path)}>"
