"""Apps and their runs: catch-up mode, live mode, quiescence, stopping."""

from __future__ import annotations

import asyncio
import builtins
import importlib
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, ParamSpec

import anyio
from anyio.abc import TaskGroup

from livemap._runtime._commit import settle_tree
from livemap._runtime._component import Component, MountSpec
from livemap._runtime._context import ExceptionHandler
from livemap._runtime._runner import run_once
from livemap._runtime._session import (
    AppRun,
    Session,
    UpdateSnapshot,
    UpdateStats,
    UpdateStatus,
    is_interrupt,
)
from livemap._runtime._unmount import release_owed, unmount
from livemap.errors import UpdateInProgressError

__all__ = ["App", "AppConfig", "UpdateHandle", "app_name", "current_snapshot", "root_of"]


class _Tree:
    """The component tree of one app name: its session and root, shared by
    every ``App`` object of that name until :meth:`App.drop`."""

    __slots__ = ("root", "session")

    def __init__(self, name: str) -> None:
        self.session = Session(name)
        self.root: Component | None = None


_trees: dict[str, _Tree] = {}
"""The trees of the apps of this process, by name (made by an app's first
update, forgotten by its ``drop()``)."""

P = ParamSpec("P")


DEFAULT_MAX_INFLIGHT_COMPONENTS = 1024
"""CocoIndex's default bound on components running at once."""

MAX_INFLIGHT_ENV = "LIVEMAP_MAX_INFLIGHT_COMPONENTS"


@dataclass(frozen=True)
class AppConfig:
    """An app's settings: its ``name``, an optional app-wide
    ``exception_handler`` (the outermost handler of every component), and
    ``max_inflight_components``: how many component runs may execute at
    once in one update (``None``: the ``LIVEMAP_MAX_INFLIGHT_COMPONENTS``
    environment variable if set, else 1024).

    A run holds its slot from the call of its function until it has
    committed, and gives it back when it mounts its first child: a parent
    waiting for its children holds none, so even a bound of 1 cannot
    deadlock a tree (as in CocoIndex).  A run waiting for other work by
    other means (an event, ``lm.settle()``) keeps its slot meanwhile.  A live
    component's ``process_live`` holds none; its ``process()`` runs do, and
    so does each ``mount_each`` child's run.
    """

    name: str
    exception_handler: ExceptionHandler | None = None
    max_inflight_components: int | None = None


class App:
    """The top-level runnable: ``App(name_or_config, main_fn, *args, **kwargs)``.

    ``main_fn(*args, **kwargs)`` runs as the root component.  The component
    tree belongs to the app's name, in this process: calling :meth:`update`
    again re-runs the main function against the previous tree (components at
    the same paths are re-run, vanished ones unmounted), and so does an
    update of a new ``App`` object with the same name (it takes the keys of
    the previous one's components back, as a re-run would).  Ownership is
    scoped per app: apps of two names own keys apart, and a conflict between
    them names the owning app.  :meth:`drop` releases everything the app
    owns and forgets its tree.
    """

    def __init__(
        self,
        name_or_config: str | AppConfig,
        main_fn: Callable[P, object],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> None:
        config = (
            name_or_config
            if isinstance(name_or_config, AppConfig)
            else AppConfig(name=name_or_config)
        )
        if not isinstance(config.name, str) or not config.name:
            raise ValueError(f"an app needs a non-empty name, got {config.name!r}")
        if not callable(main_fn):
            raise TypeError(f"App main function must be callable, got {main_fn!r}")
        self.config = config
        self._max_inflight = _max_inflight(config.max_inflight_components)
        self.main_fn: Callable[..., object] = main_fn
        self.args: tuple[Any, ...] = args
        self.kwargs: dict[str, Any] = kwargs

    @property
    def _tree(self) -> _Tree:
        tree = _trees.get(self.config.name)
        if tree is None:
            tree = _trees[self.config.name] = _Tree(self.config.name)
        return tree

    @property
    def _session(self) -> Session:
        return self._tree.session

    @property
    def name(self) -> str:
        """The app's name."""
        return self.config.name

    def __repr__(self) -> str:
        return f"<App {self.name}>"

    def update(self, *, live: bool = False) -> UpdateHandle:
        """A handle for one run of the app; nothing runs until it is awaited.

        ``await app.update()`` runs to the end and returns the main
        function's value (catch-up mode: until every component is ready and
        every LiveMap change has been delivered, then live components are
        cancelled; live mode: until nothing live is left, or ``stop()``).
        ``async with app.update(live=True) as h:`` runs in live mode for the
        body of the block.
        """
        return UpdateHandle(self, live)

    def update_blocking(
        self, *, live: bool = False, backend: Literal["asyncio", "trio"] = "asyncio"
    ) -> Any:
        """:meth:`update` from synchronous code, on its own event loop.

        Returns the main function's value (the run's stats are on
        ``app.update()``'s handle); raises what ``result()`` raises, and a
        ``KeyboardInterrupt`` or ``SystemExit`` raised in the run as it is.
        A live run ends when nothing live is left in it (or the process is
        interrupted).  Called where an event loop is running (from a sync
        function called by async code), it runs the update on a helper
        thread with an event loop of its own and blocks until it ends.
        """
        handle = self.update(live=live)
        if _loop_running():
            return _run_on_helper_thread(handle, backend)
        return anyio.run(handle.result, backend=backend)

    # -- internal -----------------------------------------------------------------

    def _root_component(self) -> Component:
        tree = self._tree
        root = tree.root
        handlers = (
            (self.config.exception_handler,) if self.config.exception_handler is not None else ()
        )
        spec = MountSpec(tree.session, self.main_fn, self.kwargs, "mount", handlers)
        if root is None:
            root = tree.root = Component(spec, None, (), self.args)
        else:  # this object's main function and handler, on the name's tree
            root.spec = spec
            root.given = self.args
        return root

    async def drop(self) -> None:
        """Release everything the app owns: every component of its tree is
        unmounted, so each entry it declared is deleted downstream (a LiveMap
        it created is retired); then the tree is forgotten, and the next
        update (of this object or of a new ``App`` of the same name) starts
        from an empty one.  Raises :class:`~livemap.errors.UpdateInProgressError`
        while an update of the app is running."""
        tree = _trees.get(self.config.name)
        if tree is None:
            return
        if tree.session.active is not None:
            raise UpdateInProgressError(self.name)
        del _trees[self.config.name]
        if tree.root is not None:
            await unmount(tree.root)

    def drop_blocking(self, *, backend: Literal["asyncio", "trio"] = "asyncio") -> None:
        """:meth:`drop` from synchronous code, on its own event loop (on a
        helper thread when called where an event loop is running)."""
        if not _loop_running():
            anyio.run(self.drop, backend=backend)
            return
        failure: list[BaseException] = []

        def target() -> None:
            try:
                anyio.run(self.drop, backend=backend)
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=target, name=f"livemap drop of {self.name}")
        thread.start()
        thread.join()
        if failure:
            raise failure[0]


class UpdateHandle:
    """One run of an app.  Await it (or :meth:`result`) to run it; use it as
    ``async with`` to run it for the body of a block."""

    def __init__(self, app: App, live: bool) -> None:
        self._app = app
        self._live = live
        self._state: Literal["new", "running", "done"] = "new"
        self._run: AppRun | None = None
        self._stats = UpdateStats()
        self._value: Any = None
        self._error: BaseException | None = None
        self._stop = False
        self._ready_event: anyio.Event | None = None
        self._done_event: anyio.Event | None = None
        self._is_ready = False
        self._tg: TaskGroup | None = None

    @property
    def live(self) -> bool:
        """Whether this is a live-mode run."""
        return self._live

    def stats(self) -> UpdateStats:
        """Counters of this run (live while it runs; ``stats().copy()`` is a
        snapshot)."""
        return self._stats

    def watch(self) -> AsyncIterator[UpdateSnapshot[Any]]:
        """Progress snapshots of this run, as it goes.

        Yields an :class:`~livemap.UpdateSnapshot` whenever something changed
        since the last one (a slow loop body gets the latest state, not every
        step): status ``RUNNING`` until the initial catch-up is done,
        ``READY`` from then on; the last snapshot, once the run has ended,
        is ``READY`` and carries the main function's value as ``result``,
        and then the iteration ends.  If the main function failed, the
        iteration raises its exception instead of the last snapshot.

        Watching does not run the update: the run happens in the task that
        awaits the handle (``async with app.update() as h: async for snap
        in h.watch(): ...``, or :func:`~livemap.show_progress`).  On a handle
        not started yet it waits for the start.  Any number of tasks may
        watch one run; leaving the loop (or cancelling it) leaves the run
        alone.
        """
        return _Watch(self)

    def __await__(self) -> Generator[Any, None, Any]:
        return self.result().__await__()

    def _event(self, which: Literal["ready", "done"]) -> anyio.Event:
        if which == "ready":
            if self._ready_event is None:
                self._ready_event = anyio.Event()
                if self._is_ready:
                    self._ready_event.set()
            return self._ready_event
        if self._done_event is None:
            self._done_event = anyio.Event()
            if self._state == "done":
                self._done_event.set()
        return self._done_event

    async def result(self) -> Any:
        """Run the app here, in this task, to the end; return the main
        function's value.

        Returns when the run ends: in catch-up mode at quiescence, in live
        mode when nothing live is left or after :meth:`stop` (then it
        returns the main function's value if it had returned, else
        ``None``).  Raises only if the main function itself failed, or what
        interrupted the run (a ``KeyboardInterrupt`` or ``SystemExit`` raised
        anywhere in it, as it is).  Awaited again (or from another task), it
        waits for the same run to end.
        """
        if self._state == "new":
            self._state = "running"
            try:
                await self._execute()
            except Exception as exc:  # e.g. another update of the app is running
                self._error = exc
            except (KeyboardInterrupt, SystemExit) as exc:
                self._error = exc
            finally:
                self._state = "done"
                self._set_ready()
                self._event("done").set()
                self._stats.touch()  # watchers take their last snapshot
        else:
            await self._event("done").wait()
        if self._error is not None:
            raise self._error
        return self._value

    async def ready(self) -> None:
        """Wait until the initial catch-up is done (also in live mode), or the
        run has ended.  Raises the main function's exception if that is why
        the run ended."""
        if not self._is_ready:
            await self._event("ready").wait()
        if self._error is not None:
            raise self._error

    async def stop(self) -> None:
        """End the run: every live component is cancelled and cleaned up, and no
        task of the run is left, before this returns."""
        self._request_stop()
        if self._state == "new":
            self._state = "done"
            self._set_ready()
            self._stats.touch()
            return
        if self._state != "done":
            await self._event("done").wait()

    def _request_stop(self) -> None:
        """The synchronous half of :meth:`stop`: tell the run to end."""
        self._stop = True
        run = self._run
        if run is not None:
            run.stop_requested = True
            run.notify()

    def _set_ready(self) -> None:
        if not self._is_ready:
            self._is_ready = True
            self._stats.touch()
        if self._ready_event is not None:
            self._ready_event.set()

    async def _execute(self) -> None:
        app = self._app
        session = app._session
        if session.active is not None:
            raise UpdateInProgressError(app.name)
        if self._stop:
            return
        run = AppRun(self._live, stats=self._stats, max_inflight=app._max_inflight)
        try:
            async with anyio.create_task_group() as tg:
                run.bind(tg)
                self._run = run
                session.active = run
                root = app._root_component()
                # The root turns unready here, before anything can look at it.
                gen = root.begin()
                run.tg.start_soon(self._run_root, root, run, gen)
                await self._until_done(run, root)
                tg.cancel_scope.cancel()
        except BaseException as exc:
            # What interrupted the run's own task (on trio, wrapped in a group
            # with the cancellations of its other tasks) comes out bare.
            interrupt = _lone_interrupt(exc)
            if interrupt is None or interrupt is exc:
                raise
            raise interrupt from None
        finally:
            run.stop_requested = True
            run.tasks_over = True
            # Every task of the run has ended.  An update stopped, cancelled
            # or interrupted before it settled still deletes the keys its
            # components let go that nobody took over (no conflict is
            # reported for it any more).
            # Components unmounted during the run whose release was still
            # queued (or cut short) release what they own now.
            with anyio.CancelScope(shield=True):
                await release_owed(session)
            tree_root = app._tree.root
            if tree_root is not None:
                await settle_tree(tree_root)
            if session.active is run:
                session.active = None
            self._run = None
        if run.failure is not None:
            self._error = run.failure

    async def _run_root(self, root: Component, run: AppRun, gen: int) -> None:
        try:
            self._value = await run_once(
                root, gen, self._app.main_fn, self._app.args, self._app.kwargs, raise_errors=True
            )
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            if run.failure is None:  # (an interrupt elsewhere came first)
                run.failure = exc
            run.notify()

    async def _until_done(self, run: AppRun, root: Component) -> None:
        """Wait until the run is over: stopped, failed, or (catch-up mode)
        quiescent and its live components ended, or (live mode) inactive."""

        def over() -> bool:
            return run.stop_requested or run.failure is not None

        if self._live:
            # Live mode: ready once the initial catch-up is done, even if
            # producers keep changing things (or at quiescence, if sooner).
            caught_up = anyio.CancelScope()
            run.tg.start_soon(self._catch_up, run, caught_up)
            while not (over() or not run.catching_up or run.quiescent(not root.readiness.unready)):
                await run.wait()
            caught_up.cancel()
            run.end_catch_up()
        else:
            while not (over() or run.quiescent(not root.readiness.unready)):
                await run.wait()
        if run.failure is None:
            self._set_ready()
        if self._live:
            # A live run ends by itself once nothing in it can change any
            # more: no live task is left and every change has been delivered.
            run.waits_inactive = True
            try:
                while not (over() or run.inactive(not root.readiness.unready)):
                    await run.wait()
            finally:
                run.waits_inactive = False
            return
        # Catch-up mode: end the live components first.  A last step of one
        # may still commit (its timer fired as quiescence was reached); the
        # consumers deliver that before the run ends.
        run.close()
        while not (over() or (not run.producers and run.quiescent(not root.readiness.unready))):
            await run.wait()

    @staticmethod
    async def _catch_up(run: AppRun, scope: anyio.CancelScope) -> None:
        """A live run's initial catch-up: every component of the tree has
        finished its first run of this update (a consumer's per-entry
        children aside), and then every consumer has processed what its map
        held: its initial scan, and what the catch-up of the consumers
        upstream of it committed into it.

        The consumers are settled in passes, as many as there are consumers
        (plus one): a chain of maps, each consumed by per-entry components
        that declare into the next, is covered link by link, one link a
        pass, whatever order the passes take them in.  Each ``settle()``
        waits only for the changes committed before it was called, so the
        catch-up ends however fast producers go on changing entries.
        """
        with scope:
            while True:
                while run.first_runs > 0:
                    await run.wait()
                passes = 0
                while True:
                    settlers = dict(run.settlers)
                    for settle in settlers.values():
                        await settle()
                    passes += 1
                    if passes > len(run.settlers) and run.settlers.keys() == settlers.keys():
                        break
                if run.first_runs <= 0:
                    break
            run.catching_up = False
            run.notify()

    async def __aenter__(self) -> UpdateHandle:
        if self._state != "new":
            raise RuntimeError("this update handle has already been started")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._background, tg)
        return self

    async def _background(self, tg: TaskGroup) -> None:
        try:
            await self.result()
        except Exception:  # kept in self._error and raised by __aexit__
            pass
        except (KeyboardInterrupt, SystemExit):
            # kept in self._error: the body of the block is interrupted too,
            # and __aexit__ raises it
            tg.cancel_scope.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg = self._tg
        assert tg is not None
        self._tg = None
        try:
            with anyio.CancelScope(shield=True):
                await self.stop()
        finally:
            # The body's own exception propagates as it is (not wrapped in a
            # group): the run has ended and the task group only has to close.
            if exc_type is not None and issubclass(exc_type, anyio.get_cancelled_exc_class()):
                await tg.__aexit__(exc_type, exc, tb)
            else:
                await tg.__aexit__(None, None, None)
        error = self._error
        if error is not None and (exc_type is None or is_interrupt(error)):
            raise error
        return None


class _Watch:
    """The iterator of :meth:`UpdateHandle.watch` (a plain object, not an
    async generator: leaving the loop early leaves nothing to finalize)."""

    __slots__ = ("_ended", "_handle", "_seen")

    def __init__(self, handle: UpdateHandle) -> None:
        self._handle = handle
        self._seen = (0, False)  # (stats version, ready): nothing happened yet
        self._ended = False

    def __aiter__(self) -> _Watch:
        return self

    async def __anext__(self) -> UpdateSnapshot[Any]:
        handle = self._handle
        stats = handle._stats
        while not self._ended:
            if handle._state == "done":
                self._ended = True
                error = handle._error
                if error is not None:
                    raise error
                return UpdateSnapshot(stats.copy(), UpdateStatus.READY, handle._value)
            now = (stats.version, handle._is_ready)
            if now == self._seen:
                await stats.changed().wait()
                continue
            self._seen = now
            status = UpdateStatus.READY if handle._is_ready else UpdateStatus.RUNNING
            return UpdateSnapshot(stats.copy(), status, None)
        raise StopAsyncIteration


def current_snapshot(
    handle: UpdateHandle,
) -> tuple[UpdateSnapshot[Any], bool, BaseException | None]:
    """What ``handle``'s run shows now, without waiting: its snapshot (with
    the result once it has ended), whether it has ended, and the exception
    it ended with, if any."""
    done = handle._state == "done"
    status = UpdateStatus.READY if handle._is_ready else UpdateStatus.RUNNING
    snapshot = UpdateSnapshot(handle._stats.copy(), status, handle._value if done else None)
    return snapshot, done, handle._error if done else None


def root_of(handle: UpdateHandle) -> Component | None:
    """The root component of ``handle``'s app, once it has one."""
    return handle._app._tree.root


def app_name(handle: UpdateHandle) -> str:
    return handle._app.name


def _max_inflight(configured: int | None) -> int:
    """The bound on components running at once: ``configured``, else the
    environment's, else the default; ``ValueError`` unless a positive int."""
    source = "max_inflight_components"
    value: object = configured
    if configured is None:
        text = os.environ.get(MAX_INFLIGHT_ENV)
        if text is None or not text.strip():
            return DEFAULT_MAX_INFLIGHT_COMPONENTS
        source = MAX_INFLIGHT_ENV
        try:
            value = int(text)
        except ValueError:
            value = text
    if type(value) is not int or value < 1:
        raise ValueError(f"{source} must be a positive int, got {value!r}")
    return value


def _lone_interrupt(exc: BaseException) -> BaseException | None:
    """The ``KeyboardInterrupt`` or ``SystemExit`` that ``exc`` is, or that an
    exception group ``exc`` holds besides cancellations only; else ``None``."""
    group = getattr(builtins, "BaseExceptionGroup", None)
    if group is None:  # Python 3.10: anyio depends on the backport there
        group = importlib.import_module("exceptiongroup").BaseExceptionGroup
    cancelled = anyio.get_cancelled_exc_class()
    found: BaseException | None = None
    stack = [exc]
    while stack:
        current = stack.pop()
        if isinstance(current, group):
            stack.extend(current.exceptions)
        elif is_interrupt(current):
            found = found or current
        elif not isinstance(current, cancelled):
            return None
    return found


def _loop_running() -> bool:
    """Whether this thread is running an event loop (asyncio or trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return True
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
        else:
            return True
    return False


def _run_on_helper_thread(handle: UpdateHandle, backend: Literal["asyncio", "trio"]) -> Any:
    """Run ``handle`` on a new thread with an event loop of its own; block
    until it ends, then return its value or raise its exception.  If this
    thread is interrupted meanwhile, the run is stopped before this raises."""
    outcome: list[Any] = []
    wakers: list[Callable[[Callable[[], object]], object]] = []

    async def main() -> Any:
        if backend == "trio":
            wakers.append(sys.modules["trio"].lowlevel.current_trio_token().run_sync_soon)
        else:
            wakers.append(asyncio.get_running_loop().call_soon_threadsafe)
        return await handle.result()

    def target() -> None:
        try:
            outcome.append((True, anyio.run(main, backend=backend)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name=f"livemap update of {handle._app.name}")
    thread.start()
    try:
        thread.join()
    except BaseException:
        # interrupted while waiting: stop the run and wait for its end
        handle._stop = True  # in case the run has not started yet
        if wakers:
            try:
                wakers[0](handle._request_stop)
            except RuntimeError:  # the loop has ended already
                pass
        thread.join()
        raise
    ok, value = outcome[0]
    if ok:
        return value
    try:
        raise value
    finally:
        del value
