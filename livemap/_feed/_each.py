"""``mount_each``: one child component per entry of a collection or a feed.

The ``mount_each`` component is the
:class:`~livemap._runtime._component.ChildHost` of its children: an
:class:`EachHost` keeps the children that need no component (at rest, queued,
or running without one), runs them on its :class:`Pool`, keeps the record of
failing keys and applies the retry policy.  Over a feed, the component is
live: its task (:func:`run_each`) watches the feed with an
:class:`EachSubscriber`, which (re)mounts and unmounts children as entries
change.  A LiveMap's consumer (:mod:`._consumer`) skips the subscriber's
deliveries: its changes wait in the host's work-queue, the one queue of
each key, and the pool's workers run them.
"""

from __future__ import annotations

import inspect
from collections.abc import (
    AsyncIterable,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Iterator,
)
from functools import partial
from types import CoroutineType
from typing import Any, Concatenate, ParamSpec, Protocol, TypeAlias, TypeVar, cast, overload

import anyio
import anyio.lowlevel

from livemap._feed._protocols import (
    ConsumerOptions,
    LiveMapFeed,
    ReadyLike,
    RetryPolicy,
    is_feed,
)
from livemap._feed._queue import DELIVER, DELIVER_WORK, Kind, Work, WorkQueue
from livemap._feed._settling import Settling
from livemap._paths import ComponentSubpath, StableKey, format_path, normalize_key, prefix_var
from livemap._runtime._args import child_path, split_args
from livemap._runtime._component import (
    EMPTY_KWARGS,
    Component,
    ComponentMountHandle,
    LiveBody,
    MountSpec,
    Run,
    current_run,
)
from livemap._runtime._context import (
    ExceptionHandler,
    handler_chain,
    handlers_var,
)
from livemap._runtime._functions import Function, is_async, is_live_class
from livemap._runtime._hosting import current_run_var
from livemap._runtime._live import (
    LiveComponentOperator,
    ReadyHandle,
    delete_child,
    live_run,
    live_task_context,
)
from livemap._runtime._runner import launch, run_made, run_once, start
from livemap._runtime._session import AppRun
from livemap._runtime._unmount import unmount

__all__ = [
    "EachHost",
    "EachLive",
    "EachSubscriber",
    "KeyWatcher",
    "KeyedRun",
    "Pool",
    "RUN_CHILD",
    "RUN_KEYED",
    "CLEANUP",
    "TURN",
    "WAIT",
    "event_class",
    "mount_each",
    "run_each",
]

P = ParamSpec("P")
V = TypeVar("V")

_Pairs: TypeAlias = Iterable[tuple[Any, V]] | AsyncIterable[tuple[Any, V]]
EachItems: TypeAlias = _Pairs[V] | LiveMapFeed[Any, V]
"""What ``mount_each`` takes as its items: ``(key, value)`` pairs of values
``V``, as an iterable, an async iterable (a :class:`~livemap.LiveMapView`,
such as a LiveMap or ``lm.consumer(...)``, is one), or a feed of ``V``."""


def unzipped(pairs: list[tuple[Any, V]]) -> Iterator[tuple[Any, V]]:
    """The pairs of ``pairs`` in order, the list emptied before the first.

    A scan's snapshot holds one pair per entry while the scan makes the
    entries' components and records; pairs freed only at its end would
    leave a hole each among those (about 50 bytes an entry of a fill's
    resident memory).  Two flat lists instead, the pairs freed at once:
    the fill reuses their room.  ``pairs`` must be the caller's own."""
    keys = [key for key, _ in pairs]
    values = [value for _, value in pairs]
    pairs.clear()
    return zip(keys, values, strict=True)


def _no_processor(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("EachHost.configure() was not called")


class KeyWatcher(Protocol):
    """The consumer feeding a host: a map's consumer."""

    def resolve(self, key: Any) -> Work | None:
        """A worker took ``key`` for a change (a :data:`~._queue.DELIVER`):
        what its try runs now, if anything (see ``Consumer.resolve``)."""
        ...

    def went_idle(self) -> None:
        """The host's queue went idle."""
        ...

    def supersede(self) -> None:
        """The ``mount_each`` re-runs, stops or is taken over: end the
        consumer now (its next one waits for the runs cancelled here if it
        is fed by another host)."""
        ...


class EndedKeyedRun:
    """What an ended :class:`KeyedRun`'s ``buffers`` become: it names the
    key's path (and holds no reference back to the run)."""

    __slots__ = ("key", "parent")

    def __init__(self, parent: Component, key: Any) -> None:
        self.parent = parent
        self.key = key

    @property
    def path_str(self) -> str:
        return format_path((*self.parent.path, self.key))

    def __str__(self) -> str:
        return self.path_str


class KeyedRun(Run):
    """A run of a ``mount_each`` child that has no component yet (see
    :class:`EachHost`).  Its component is made the first time the run needs
    one: to declare (the component is the owner), to mount, or to create a
    map.  A run that never does is over once its function returns."""

    __slots__ = ("dropped", "host", "key", "made", "scope", "value")

    def __init__(self, host: EachHost, scope: anyio.CancelScope) -> None:
        self.buffers = None
        self.mounted = None
        self.created = None
        # the component, once the run made it (see component)
        self.made: Component | None = None
        self.host = host
        # what it runs (set by EachHost.run_keyed)
        self.key: Any = None
        self.value: Any = None
        # the scope of the worker running it, while it does
        self.scope: anyio.CancelScope | None = scope
        # the host let go of it while it ran (a re-scan, a newer value, a
        # delete): it commits nothing
        self.dropped = False

    def forget(self) -> None:
        """A run that will not commit lets go of the component it made (a
        re-scan mounts the key's component anew, or unmounts it), which
        must not keep the worker's scope (soon another key's)."""
        made = self.made
        if made is not None:
            self.made = None
            if made.cancel_scope is self.scope:
                made.cancel_scope = None

    def end(self) -> None:
        """The run is over: a task or thread it started keeps it in its
        context, and a declaration from there raises
        :class:`~livemap.errors.NotInComponentError` naming the key's path
        (a worker runs its next key as a new KeyedRun, in the same scope:
        the run lets go of it)."""
        self.buffers = EndedKeyedRun(self.host.component, self.key)
        self.scope = None

    @property
    def component(self) -> Component:
        made = self.made
        if made is None:
            made = self.host.materialize(self)
        return made

    @component.setter
    def component(self, value: Component) -> None:
        self.made = value

    owner = component  # what livemap_core.Declarer records as the owner


class EachHost:
    """What a ``mount_each`` over a feed keeps of its children beyond their
    components.

    Most per-entry runs leave nothing behind: no target entries, children or
    maps.  Such a child needs no component.  ``leaves`` holds the value of
    each child at rest without one; the pool's queue holds the value of each
    key whose run is queued without one (a :data:`RUN_KEYED` work: the key is
    *pending*), and, while a worker runs it, the :class:`KeyedRun` (in the
    key's work in flight, ``(RUN_KEYED, value, gen, run)``).  A run that
    needs its component (see :class:`KeyedRun`), or fails, gets one, which
    then stays in the tree like any other child until a later run leaves
    nothing behind (:meth:`rest`).  A key is in at most one of ``leaves``,
    pending and running without a component, and is in the component's
    children only while in none of them, or while running once its run made
    its component.  Once a worker's part of a run is over, the child's
    component (if it has one) is an ordinary child of the tree, whose
    readiness the tree keeps: a change to it while its subtree is busy
    waits for it in the queue (:data:`WAIT`).

    From a key's first run without a component until no run waits in the
    pool's queue and none without a component is under way (``keyed``
    counts those), the ``mount_each`` component counts one unready child for
    them all (``counted``).

    Over a list (not ``keeps_leaves``), during a live run's initial
    catch-up: ``first`` holds the children (with no record of their own)
    whose first run of the update the catch-up waits for and that is not
    done yet, and ``first_done`` what to call for each once it is (see
    :meth:`first_run`); ``first`` is ``None`` when it would be empty.
    """

    __slots__ = (
        "call",
        "component",
        "consumer",
        "counted",
        "failures",
        "fargs",
        "first",
        "first_done",
        "fn",
        "handlers",
        "keeps_leaves",
        "keyed",
        "kwargs",
        "leaves",
        "pool",
        "retry",
        "settling",
        "spec",
    )

    def __init__(
        self,
        component: Component,
        concurrency: int,
        retry: RetryPolicy | None,
        *,
        keeps_leaves: bool,
    ) -> None:
        self.component = component
        # the workers that run the children
        self.pool = Pool(concurrency)
        self.pool.host = self
        # a failing child is tried again by this policy
        self.retry = retry
        # over a feed: children at rest are kept as their value alone, and
        # the keys whose latest run failed are recorded (key -> last error)
        self.keeps_leaves = keeps_leaves
        self.failures: dict[Any, BaseException] | None = {} if keeps_leaves else None
        # the consumer feeding this host, while one watches (of a function:
        # its changes turn into runs here; of either kind: supersede() ends it)
        self.consumer: KeyWatcher | None = None
        self.leaves: dict[Any, Any] = {}
        # keyed runs a worker runs now that were not dropped (each in its
        # key's work in flight)
        self.keyed = 0
        self.counted = False
        self.fn: Any = None  # the processor, and what calling it calls
        self.call: Callable[..., Any] = _no_processor
        self.fargs: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = EMPTY_KWARGS
        self.handlers: tuple[ExceptionHandler, ...] = ()
        # what the children's components run (their shared MountSpec)
        self.spec: MountSpec | None = None
        # the update of the children and what waits for it to settle
        self.settling = Settling(component)
        self.first: set[Component] | None = None
        self.first_done: Callable[[], object] | None = None
        if keeps_leaves and component.readiness.tracked is None:
            # which children are unready, for the settling's wait
            component.readiness.tracked = {
                c.readiness for c in (component.children or {}).values() if c.readiness.unready
            }

    def configure(
        self,
        fn: Any,
        fargs: tuple[Any, ...],
        kwargs: dict[str, Any],
        handlers: tuple[ExceptionHandler, ...],
    ) -> None:
        """What each child runs: ``fn(value, *fargs, **kwargs)``, under ``handlers``."""
        self.fn = fn
        self.call = fn.__wrapped__ if type(fn) is Function else fn
        self.fargs = fargs
        self.kwargs = kwargs or EMPTY_KWARGS
        self.handlers = handlers
        self.spec = self.component.child_spec(fn, self.kwargs, "mount_each", handlers, fargs)

    def mount_entry(self, key: Any, value: Any, live_body: LiveBody | None = None) -> Component:
        """The component of ``key``'s child, (re)mounted to run with ``value``
        (a live component per entry: with ``live_body``, :func:`run_entry`)."""
        spec = self.spec
        assert spec is not None  # (configured before the first run)
        return self.component.place_child(None, (key,), spec, value, live_body)

    def hold(self) -> None:
        if not self.counted:
            self.counted = True
            self.component.adjust(1)

    def pending_keys(self) -> list[Any]:
        """The keys whose run without a component is queued."""
        return list(self.pool.queue.keys_waiting(RUN_KEYED))

    def release_if_idle(self) -> None:
        if self.counted and not self.pool.queue.waiting and not self.keyed:
            self.counted = False
            self.component.adjust(-1)

    def materialize(self, run: KeyedRun) -> Component:
        """The component of ``run``'s key, made now, in the run's generation."""
        comp = self.component
        rel = (run.key,)  # (one tuple for the path and the children's key)
        spec = self.spec
        assert spec is not None  # (configured before the first run)
        child = Component(spec, comp, rel, run.value)
        run.made = child
        child.generation = 1
        child.cancel_scope = run.scope
        child.scope_run = spec.session.active
        extra = comp.extra or comp.more()
        children = extra.children
        if children is None:
            children = extra.children = {}
        children[rel] = child
        comp.count_child(child)
        return child

    async def run_keyed(
        self, key: Any, value: Any, gen: int, run: KeyedRun
    ) -> tuple[Any, Exception | None] | None:
        """Run ``key``'s child on ``value`` (queued by a run of generation
        ``gen`` of the ``mount_each`` component) as ``run``, which the pool
        worker made the current run; without a component unless the run
        needs one.

        ``None``: the run is over (or was not needed); the worker ends
        ``run`` (:meth:`KeyedRun.end`).  Otherwise the run made its component
        or failed: the worker makes ``run`` no longer current and calls
        :meth:`finish_keyed` with the ``(result, error)`` returned.
        """
        comp = self.component
        if not comp.alive or comp.generation != gen:
            return None  # queued by an earlier run of the mount_each: it reset us
        extra = comp.extra  # (its children: a read per keyed run)
        children = None if extra is None else extra.children
        if children is not None and (key,) in children:
            # an earlier run of the key, dropped while it ran (a re-scan
            # reset us), made the key's component: that component runs it
            self.pool.queue_run(self.mount_entry(key, value))  # (after this one)
            return None
        run.key = key
        run.value = value
        app_run = comp.spec.session.active
        slotted = app_run is None or app_run.keyed_run_begins(self.fn, run)
        handlers = self.handlers
        t_handlers = handlers_var.set(handlers) if handlers_var.get() is not handlers else None
        t_prefix = prefix_var.set(()) if prefix_var.get() else None
        result: Any = None
        try:
            if not slotted:
                assert app_run is not None and app_run.slots is not None
                await app_run.slots.take(run)
            fargs = self.fargs
            kwargs = self.kwargs
            result = self.call(value, *fargs, **kwargs) if fargs or kwargs else self.call(value)
            # (None first: most per-entry functions are sync and return
            # nothing, and isawaitable's ABC check costs more than the run)
            if result is not None and (
                type(result) is CoroutineType or inspect.isawaitable(result)
            ):
                result = await result
        except anyio.get_cancelled_exc_class():
            run.scope = None
            if app_run is not None:
                app_run.give_slot(run)
                app_run.stats.run_cancelled(self.fn)
            raise
        except Exception as exc:
            error: Exception | None = exc
        else:
            error = None
        finally:
            if t_handlers is not None:
                handlers_var.reset(t_handlers)
            if t_prefix is not None:
                prefix_var.reset(t_prefix)
        if run.dropped:
            # dropped while it ran (a re-scan reset the host): it commits
            # nothing, and the worker's next keyed run starts clean
            if app_run is not None:
                app_run.give_slot(run)
                app_run.stats.run_cancelled(self.fn)
            run.forget()
            return None
        if (
            error is None
            and run.made is None
            and run.buffers is None
            and run.created is None
            and run.mounted is None
        ):
            # at rest at once: the common case
            if app_run is not None:
                app_run.keyed_run_added(self.fn, run)
            self.leaves[key] = value
            failures = self.failures
            if failures:
                failures.pop(key, None)
            return None
        return result, error  # its slot, if any, goes with it to finish_keyed

    async def finish_keyed(self, run: KeyedRun, result: Any, error: Exception | None) -> None:
        """The rest of a keyed run that made its component or failed: the
        component (made now if the run did not) takes the run over as a
        first try that already ran."""
        scope = run.scope
        child = run.made
        fargs = self.fargs
        if child is not None and error is None:
            buffers = run.buffers
            if (
                type(buffers) is dict
                and buffers
                and run.mounted is None
                and run.created is None
                and child.targets is None
                and child.extra is None
            ):
                # the common case: it made its component to declare, and did
                # nothing else (no mounts, no maps); run_made gives its slot
                # back (or run_once, which it hands a sink failure to)
                try:
                    await run_made(
                        child,
                        run,
                        buffers,
                        self.fn,
                        (run.value, *fargs) if fargs else (run.value,),
                        self.kwargs,
                    )
                finally:
                    if child.cancel_scope is scope:
                        child.cancel_scope = None
                    run.scope = None  # the worker's part is over
                return
        try:
            if child is None:
                child = self.materialize(run)
            await run_once(
                child,
                1,
                self.fn,
                (run.value, *fargs) if fargs else (run.value,),
                self.kwargs,
                raise_errors=False,
                first=(run, result, error),
            )
        finally:
            app_run = self.component.spec.session.active
            if app_run is not None:
                app_run.give_slot(run)  # (run_once gave it back, unless it never began)
            if child is not None and child.cancel_scope is scope:
                child.cancel_scope = None
            run.scope = None  # the worker's part is over

    def _keyed_run(self, key: Any) -> KeyedRun | None:
        """``key``'s keyed run a worker runs now, if any."""
        work = self.pool.queue.in_flight.get(key)
        if work is not None and work[0] is RUN_KEYED and len(work) > 3:
            run: KeyedRun = work[3]
            return run
        return None

    def drop(self, key: Any) -> None:
        """Forget ``key``'s run without a component (cancelled if under way)."""
        self.pool.queue.discard(key)
        run = self._keyed_run(key)
        if run is not None and not run.dropped:
            self._drop_run(run)
        self.release_if_idle()
        self.pool.dropped()

    def reset(self) -> None:
        """Cancel every run without a component, and drop the changes an
        earlier consumer left waiting (a new scan follows)."""
        pool = self.pool
        pool.queue.discard_where(_is_keyed_or_change)
        for run in self._keyed_runs():
            if not run.dropped:
                self._drop_run(run)
        pool.end_waits()
        self.release_if_idle()
        pool.dropped()

    def _drop_run(self, run: KeyedRun) -> None:
        """``run`` (under way) commits nothing and is cancelled; the
        ``mount_each`` waits for it no more (its key stays in flight until
        it has ended)."""
        run.dropped = True
        self.keyed -= 1
        if run.scope is not None:
            run.scope.cancel()

    def _keyed_runs(self) -> list[KeyedRun]:
        in_flight = self.pool.queue.in_flight.values()
        return [w[3] for w in in_flight if w[0] is RUN_KEYED and len(w) > 3]

    def stop_runs(self) -> None:
        """Cancel every run without a component that is under way, and drop
        every run still waiting (a try again in its backoff too; cleanups
        stay): nothing runs here again until new work comes."""
        self._cancel_running()
        pool = self.pool
        pool.queue.cancel_backoff()
        pool.queue.discard_where(_any_run)
        pool.end_waits()
        pool.dropped()

    def _cancel_running(self) -> None:
        for run in self._keyed_runs():
            if run.scope is not None:
                run.scope.cancel()

    # -- ChildHost: what the component tree asks of the host --------------------

    def take(self, child: Component) -> bool:
        """Async children (and all of them under a retry policy) run on the
        pool; plain sync ones inline, in the caller's task; live components
        in a task of their own."""
        extra = child.extra
        if extra is not None and extra.live_body is not None:
            return False
        if self.retry is not None or is_async(child.spec.processor):
            self.pool.queue_run(child)
            return True
        return False

    def try_again(self, child: Component, gen: int) -> bool:
        """Run ``gen`` of ``child`` failed: the pool's queue tries it again
        after the policy's wait, while the policy has tries left."""
        return self.pool.try_again(child, gen)

    def retry_delay(self, failed: int) -> float | None:
        policy = self.retry
        if policy is None or failed >= policy.max_attempts:
            return None
        return policy.delay(failed)

    def rest(self, child: Component) -> bool:
        """A child whose run left nothing behind (no target entries, children
        or maps) is done: over a feed, it leaves the tree and only its value
        stays, in :attr:`leaves`."""
        if not self.keeps_leaves:
            return False
        key = child.rel[0]
        self.leaves[key] = child.given  # (its value: a child of a mount_each)
        failures = self.failures
        if failures:
            failures.pop(key, None)
        child.leave_at_rest()
        return True

    def first_run(self, child: Component, done: Callable[[], object]) -> bool:
        """Over a list, the host tells when ``child``'s first run of a live
        catch-up is done (at :meth:`outcome`, :meth:`forget`, :meth:`stop`),
        so that the child needs no ``on_first`` (no record of its own: a
        child per entry).  Over a feed its children are the consumer's,
        which the catch-up does not count this way."""
        if self.keeps_leaves:
            return False
        first = self.first
        if first is None or self.first_done != done:
            # (what an earlier app run counted is over with it)
            first = self.first = set()
            self.first_done = done
        first.add(child)
        return True

    def _first_over(self, child: Component, error: BaseException | None) -> None:
        """``child``'s run ended (failed: ``error``) or it left the tree: if
        its first run of the catch-up was pending, it is done now; a failed
        one once it is self-ready (its failure reported: it has a record
        now, which holds its ``on_first``)."""
        first = self.first
        done = self.first_done
        if first is None or child not in first:
            return
        assert done is not None
        first.discard(child)
        if not first:
            self.first = None
        if error is None:
            done()
        else:
            child.on_first = done

    def _first_handed_over(self, *, done: bool) -> None:
        """Every pending first run is over (``done``: the children stop) or
        its child tells from now on (its ``on_first``: the host retires)."""
        first, self.first = self.first, None
        call = self.first_done
        if first and call is not None:
            for child in first:
                if done:
                    call()
                else:
                    child.on_first = call

    def outcome(self, child: Component, error: BaseException | None) -> None:
        if self.first is not None:
            self._first_over(child, error)
        failures = self.failures
        if failures is None:
            return
        if error is None:
            if failures:
                failures.pop(child.key, None)
        else:
            failures[child.key] = error

    def forget(self, child: Component) -> None:
        if self.first is not None:
            self._first_over(child, None)
        failures = self.failures
        if failures:
            failures.pop(child.key, None)
        self.pool.forget(child)

    def supersede(self) -> None:
        consumer = self.consumer
        if consumer is not None:
            consumer.supersede()  # frees the map for a new consumer right away

    def stop(self) -> None:
        if self.first is not None:
            self._first_handed_over(done=True)
        self.stop_runs()
        self.pool.close()

    def clear(self) -> int:
        unmounted = len(self.leaves)
        self.leaves.clear()
        self.reset()
        return unmounted

    async def settle_keys(self, keys: list[Any]) -> None:
        """Wait until the try of each of ``keys`` waiting or under way now
        (if any) is done (one try a key: not the ones after it).  A key held
        by a per-entry live component (a :data:`TURN`, for the component's
        whole life) is not waited for."""
        queue = self.pool.queue
        in_flight, waiting = queue.in_flight, queue.waiting
        runs = [
            key
            for key in keys
            if (key in in_flight or key in waiting)
            and not _held(in_flight.get(key))
            and not _held(waiting.get(key))
            and not any(map(_held, queue.later.get(key, ())))
        ]
        if runs:
            await queue.settle(queue.outstanding_of(runs))

    def retire(self) -> int:
        if self.first is not None:
            self._first_handed_over(done=False)
        self.supersede()
        self.stop_runs()
        unmounted = self.clear()
        self.pool.close()
        return unmounted

    def in_update(self) -> bool:
        return self.keeps_leaves and self.settling.in_update()

    def settle_later(self) -> bool:
        return self.keeps_leaves and self.settling.later()


def _held(work: Work | None) -> bool:
    return work is not None and work[0] is TURN


def _is_keyed_or_change(work: Work) -> bool:
    return work[0] is RUN_KEYED or work[0] is DELIVER


def _any_run(work: Work) -> bool:
    return True


def event_class() -> Callable[[], anyio.Event]:
    """The running backend's event class.  Calling it makes an event like
    ``anyio.Event()`` does, without looking the backend up each time: for a
    task that parks on a fresh event over and over."""
    return type(anyio.Event())


RUN_CHILD = Kind("run")
"""``(RUN_CHILD, child, gen, again)``: a run of ``child``'s generation ``gen``
(``again``: the try again of a failed one, whose start is counted already)."""

RUN_KEYED = Kind("keyed run")
"""``(RUN_KEYED, value, gen)``: a run of a child without a component (see
:class:`EachHost`) on ``value`` (``gen``: the run of the ``mount_each`` that
queued it).  In flight, ``(RUN_KEYED, value, gen, run)``: ``run`` is its
:class:`KeyedRun`."""

CLEANUP = Kind("cleanup", replaceable=False)
"""``(CLEANUP, job)``: ``job()`` releases what a detached child held (it must
happen, whatever newer work comes for the key)."""

TURN = Kind("turn", replaceable=False)
"""``(TURN, turn)``: a task outside the workers (a per-entry live
component's) waits to hold the key (see :meth:`Pool.hold`)."""

WAIT = Kind("wait")
"""``(WAIT, child)``: what a change turns into when the key's child is busy
with runs of its own (its subtree is not ready): the key stays in flight,
holding no worker, until the child is ready; then the change waits again
(its try covered nothing) and is taken as any other."""


_IN_A_ROW = 64
"""How many keys a worker takes in a row before it lets the other tasks of
the event loop have a turn (runs that never wait would hold it otherwise)."""


class _Turn:
    """A task outside the workers waiting to hold a key (see :meth:`Pool.hold`).

    ``state``: ``WAITING`` while it is queued behind the key's run under
    way; ``HOLDING`` once the key was handed to it (``event`` is set then);
    ``GAVE_UP`` if the task stopped waiting first (cancelled): the pool
    skips it.  Changes only from ``WAITING``, once.
    """

    __slots__ = ("event", "state")

    WAITING = 0
    HOLDING = 1
    GAVE_UP = 2

    def __init__(self) -> None:
        self.state = _Turn.WAITING
        self.event = anyio.Event()


class Pool:
    """Worker tasks that run a parent's children, ``limit`` at a time.

    ``mount_each`` mounts thousands of children: a task each would cost far
    more than most runs.  A pool starts at most ``limit`` worker tasks, each
    running queued children one after another in its own task.  An idle
    worker parks until there is work again (waking a parked worker is
    cheaper than starting a task); workers end with the app run or when the
    pool is closed.  A run is cancelled by cancelling the scope of the worker
    running it (the worker then opens a fresh scope).

    What to run, by key, is :attr:`queue`'s (a :class:`~._queue.WorkQueue`,
    also the queue of the consumer feeding the host): it hands out a key
    only while no try of it is under way (also when a re-mount or a newer
    value cancelled that run), keeps only the latest run of a key waiting,
    and holds failed tries waiting out their backoff.  A worker is ``take,
    run, done``; a change (:data:`~._queue.DELIVER`) turns into the run it
    needs when it is taken (``Consumer.resolve``); :meth:`try_again` asks
    the queue whether a failed try goes again.

    Workers are woken one at a time: a new item wakes (or starts) a worker
    only when none is free, and a worker that starts a run while more items
    wait makes sure another one is free to take them.  Runs that never
    suspend are then run back to back by one worker, while runs that wait
    on I/O spread over up to ``limit`` workers.  A parked worker also wakes
    when the first backoff ends.
    """

    __slots__ = (
        "_room",
        "app_run",
        "closed",
        "free",
        "high",
        "host",
        "idle_waiters",
        "limit",
        "parked",
        "queue",
        "workers",
    )

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # crowded(): several rounds of work queued for every worker
        self.high = max(8 * limit, 1024)
        # every key with work, and where it stands
        self.queue: WorkQueue[Any] = WorkQueue()
        # the host whose children it runs (its keyed runs, its retry policy)
        self.host: EachHost | None = None
        # events set once no key is in flight (see :meth:`wait_idle`)
        self.idle_waiters: list[anyio.Event] | None = None
        self.workers = 0
        self.free = 0  # workers started or woken that are not in a run
        self.parked: list[anyio.Event] = []
        self.app_run: AppRun | None = None
        self.closed = False
        self._room: anyio.Event | None = None

    def resize(self, limit: int) -> None:
        """Run at most ``limit`` items at once from now on."""
        self.limit = limit
        self.high = max(8 * limit, 1024)

    def crowded(self) -> bool:
        """Whether the queue holds several rounds of work for every worker."""
        return len(self.queue.order) >= self.high

    async def room(self) -> None:
        """Wait until the queue is down to about one round of work per
        worker: a bulk producer (a scan of a big map) paces itself on it, so
        that queued runs do not pile up in memory."""
        while len(self.queue.order) > self.limit and not self.closed:
            if self._room is None:
                self._room = anyio.Event()
            await self._room.wait()

    # -- work in ---------------------------------------------------------------

    def join(self, app_run: AppRun) -> WorkQueue[Any]:
        """The queue, for a consumer of ``app_run`` (a new app run starts
        with an empty one)."""
        if self.app_run is not app_run:
            self._new_run(app_run)
        return self.queue

    def wake(self, app_run: AppRun) -> None:
        """Work was added to the queue: make sure a worker is free to take it."""
        if self.free <= 0 and self.app_run is app_run:
            self._add_worker(app_run)

    def queue_run(self, child: Component) -> None:
        """Run (or re-run) ``child`` here: a new generation of it, queued."""
        gen = child.begin()
        self._add(child.spec.session.require_run(), child.rel[0], (RUN_CHILD, child, gen, False))

    def submit_keyed(self, app_run: AppRun, gen: int, key: Any, value: Any) -> None:
        """Queue ``host.run_keyed`` of ``key`` on ``value`` (for run ``gen``
        of the ``mount_each``)."""
        # (_add, inline: the scan of a big map queues one per entry)
        if self.app_run is not app_run:
            self._new_run(app_run)
        self.queue.add(key, (RUN_KEYED, value, gen))
        if self.free <= 0:
            self._add_worker(app_run)

    def cleanup(self, child: Component, job: Callable[[], Awaitable[None]]) -> None:
        """Queue ``job()``, the release of detached ``child``'s holdings."""
        self._add(child.spec.session.require_run(), child.rel[0], (CLEANUP, job))

    def _add(self, app_run: AppRun, key: Any, work: Work) -> None:
        if self.app_run is not app_run:
            self._new_run(app_run)
        self.queue.add(key, work)
        if self.free <= 0:
            self._add_worker(app_run)

    # -- after a failed try ------------------------------------------------------

    def try_again(self, child: Component, gen: int) -> bool:
        """Run ``gen`` of ``child`` failed: whether it is tried again, after
        the host's retry policy's wait (the queue holds it meanwhile)."""
        host = self.host
        policy = None if host is None else host.retry
        if policy is None:
            return False
        return self.queue.retry(
            child.rel[0], (RUN_CHILD, child, gen, True), policy.max_attempts, policy.delay
        )

    def forget(self, child: Component) -> None:
        """``child`` is unmounted: its try again, if it waits, is dropped."""
        key = child.rel[0]
        again = self.queue.backing_off(key)
        if again is not None and again[0] is RUN_CHILD and again[1] is child:
            self.queue.forget(key)
            self.dropped()

    # -- workers -----------------------------------------------------------------

    def _new_run(self, app_run: AppRun) -> None:
        """A new app run (maybe on another event loop): the old workers are
        gone, and nothing made on the old loop (parking and room events) is
        used again."""
        self.app_run = app_run
        self.queue.clear()
        if self.host is not None:
            self.host.keyed = 0
        self.idle_waiters = None  # (of an earlier app run, maybe another loop)
        self.parked.clear()
        self._room = None
        self.workers = 0
        self.free = 0
        self.closed = False

    def _add_worker(self, app_run: AppRun) -> None:
        if self.parked:
            self.free += 1
            self.parked.pop().set()
        elif self.workers < self.limit:
            self.workers += 1
            self.free += 1
            app_run.tg.start_soon(self._work, app_run)

    def close(self) -> None:
        """Let the workers end once the queue is empty (no try again waits)."""
        self.closed = True
        self.queue.cancel_backoff()
        parked, self.parked = self.parked, []
        self.free += len(parked)
        for event in parked:
            event.set()
        self._wake_room()

    def _wake_room(self) -> None:
        room, self._room = self._room, None
        if room is not None:
            room.set()

    async def hold(self, app_run: AppRun, key: Any) -> None:
        """Wait until no run of ``key`` is under way (its ``finally``
        included), then hold the key for a run outside the workers (the task
        of a per-entry live component) until :meth:`let_go`: the key is in
        flight meanwhile.  Runs of the key queued meanwhile wait for it, in
        turn.  Cancelled while it waits, it holds nothing."""
        if self.app_run is not app_run:
            self._new_run(app_run)
        turn = _Turn()
        if self.queue.claim(key, (TURN, turn)):
            return
        self._add(app_run, key, (TURN, turn))
        try:
            await turn.event.wait()
        except BaseException:
            if turn.state == _Turn.HOLDING:  # handed over as it was cancelled
                self.let_go(app_run, key)
            else:
                turn.state = _Turn.GAVE_UP
            raise

    def let_go(self, app_run: AppRun, key: Any) -> None:
        """The run that :meth:`hold` let start is over: the key is done, and
        the work waiting for it goes first."""
        if self.app_run is not app_run:
            return  # (a new app run forgot the old keys)
        self._done(key)
        if self.queue.order and self.free <= 0:
            self._add_worker(app_run)

    def _done(self, key: Any, *, covers: bool = True) -> None:
        """``key``'s try is over: the queue decides what follows
        (:meth:`~._queue.WorkQueue.done`); who waits for the host's runs to
        be over hears of it."""
        queue = self.queue
        queue.done(key, covers=covers)
        host = self.host
        if host is not None and host.counted:
            host.release_if_idle()
        if not queue.in_flight:
            if self.idle_waiters:
                self._wake_idle()
            if host is not None and host.consumer is not None and queue.idle():
                host.consumer.went_idle()

    def dropped(self) -> None:
        """Work was dropped from the queue: the consumer may be idle now."""
        host = self.host
        if host is not None and host.consumer is not None and self.queue.idle():
            host.consumer.went_idle()

    def end_waits(self) -> None:
        """The changes waiting, in flight, for their child to be ready
        (:data:`WAIT`) wait no more: the host re-runs or stops."""
        queue = self.queue
        for key in [k for k, w in queue.in_flight.items() if w[0] is WAIT]:
            self._done(key, covers=False)
        app_run = self.app_run
        if queue.order and self.free <= 0 and app_run is not None:
            self._add_worker(app_run)  # (a cleanup waited behind one)

    def _wait(self, app_run: AppRun, key: Any, child: Component) -> None:
        """A change to ``key`` waits, in flight, until ``child`` is ready
        (see :data:`WAIT`)."""
        waiting: Work = (WAIT, child)
        self.queue.in_flight[key] = waiting
        child.on_ready(partial(self._waited, app_run, key, waiting))

    def _waited(self, app_run: AppRun, key: Any, waiting: Work) -> None:
        queue = self.queue
        if self.app_run is not app_run or queue.in_flight.get(key) is not waiting:
            return
        queue.add(key, DELIVER_WORK)
        self._done(key, covers=False)
        if self.free <= 0:
            self._add_worker(app_run)

    async def wait_idle(self) -> None:
        """Wait until no run of this pool's current app run is under way."""
        while self.queue.in_flight:
            event = anyio.Event()
            if self.idle_waiters is None:
                self.idle_waiters = [event]
            else:
                self.idle_waiters.append(event)
            await event.wait()

    def _wake_idle(self) -> None:
        waiters, self.idle_waiters = self.idle_waiters, None
        for event in waiters or ():
            event.set()

    async def _work(self, app_run: AppRun) -> None:
        """A worker: take a key, run its work, mark it done; park when no
        key can be taken (until the first backoff ends, if one waits).  The
        queue hands out no key in flight, so a key never runs twice at once,
        and decides what follows a try (:meth:`_done`, and :meth:`try_again`
        from a failed one)."""
        queue = self.queue
        take = queue.take
        in_flight = queue.in_flight
        run_child, run_keyed, cleanup, deliver = RUN_CHILD, RUN_KEYED, CLEANUP, DELIVER
        new_event = event_class()
        checkpoint = anyio.lowlevel.checkpoint
        taken_in_a_row = 0
        try:
            while True:
                # one scope for the worker's keys and parks until a run in it
                # is cancelled: a key taken after a park opens none (the
                # references to it, a child's cancel_scope and a keyed run's
                # scope, end with each run)
                with anyio.CancelScope() as scope:
                    while not scope.cancel_called:
                        # -- take a key ----------------------------------
                        taken_in_a_row += 1
                        if taken_in_a_row > _IN_A_ROW:
                            # runs that never wait, back to back: let the
                            # other tasks have a turn now and then
                            taken_in_a_row = 0
                            await checkpoint()
                        if queue.backoff:
                            self._due()
                        taken = take()
                        if taken is None:
                            if self.closed or self.app_run is not app_run:
                                return
                            taken_in_a_row = 0
                            await self._park(new_event)
                            continue
                        key, work = taken
                        if self._room is not None and len(queue.order) <= self.limit:
                            self._wake_room()
                        kind = work[0]
                        if kind is deliver:  # a change: what its try runs
                            consumer = None if self.host is None else self.host.consumer
                            resolved = None if consumer is None else consumer.resolve(key)
                            if resolved is None:
                                self._done(key)  # nothing to do
                                continue
                            kind = resolved[0]
                            if kind is WAIT:
                                self._wait(app_run, key, resolved[1])
                                continue
                            work = in_flight[key] = resolved
                        elif kind is TURN:  # a task outside the workers waits for the key
                            turn = work[1]
                            if turn.state == _Turn.WAITING:
                                turn.state = _Turn.HOLDING  # it is done at its let_go()
                                turn.event.set()
                            else:
                                self._done(key)  # it gave up
                            continue
                        if kind is run_child and (
                            work[2] != work[1].generation or not work[1].alive
                        ):
                            self._done(key)  # superseded or unmounted
                            continue
                        self.free -= 1
                        if queue.order and self.free <= 0:
                            self._add_worker(app_run)  # in case this run waits
                        # -- run it --------------------------------------
                        each = self.host
                        keyed = kind is run_keyed
                        try:
                            if keyed:
                                assert each is not None
                                run = KeyedRun(each, scope)
                                in_flight[key] = (run_keyed, work[1], work[2], run)
                                each.keyed += 1
                                token = current_run_var.set(run)
                                try:
                                    outcome = await each.run_keyed(key, work[1], work[2], run)
                                except BaseException:
                                    run.end()
                                    raise
                                finally:
                                    current_run_var.reset(token)
                                if outcome is None:
                                    # it is over (a context it left
                                    # behind must not reach another run)
                                    run.end()
                                else:
                                    # it made its component or failed: the
                                    # rest runs with no keyed run current
                                    await each.finish_keyed(run, *outcome)
                            elif kind is cleanup:
                                await work[1]()
                            else:
                                await self._run_child(app_run, scope, work)
                        # -- mark it done: the queue decides what follows -
                        finally:
                            if self.app_run is app_run:  # (else a new run cleared it)
                                self.free += 1
                                if keyed and not run.dropped:
                                    assert each is not None
                                    each.keyed -= 1
                                self._done(key)
        finally:
            if self.app_run is app_run:
                self.workers -= 1
                self.free -= 1

    def _due(self) -> bool:
        """Move the tries again whose backoff is over to the waiting work;
        whether a key can be taken now."""
        queue = self.queue
        if queue.backoff:
            now = anyio.current_time()
            if now >= queue.first_due:
                queue.due(now)
        return bool(queue.order)

    async def _park(self, new_event: Callable[[], anyio.Event]) -> None:
        """Wait to be woken for new work, or until the first backoff ends."""
        event = new_event()
        self.parked.append(event)
        self.free -= 1
        try:
            if not self.queue.backoff:
                await event.wait()
                return
            with anyio.move_on_at(self.queue.first_due):
                await event.wait()
        except BaseException:
            self._unpark(event)  # (cancelled while parked)
            raise
        self._unpark(event)  # (woken by the end of a backoff, if not set)

    def _unpark(self, event: anyio.Event) -> None:
        if not event.is_set() and event in self.parked:
            self.parked.remove(event)
            self.free += 1

    @staticmethod
    async def _run_child(app_run: AppRun, scope: anyio.CancelScope, work: Work) -> None:
        """A run of a child's component, as the worker's scope."""
        _, child, gen, again = work
        child.cancel_scope = scope
        child.scope_run = app_run
        spec = child.spec
        try:
            await run_once(
                child,
                gen,
                spec.processor,
                child.args,
                spec.kwargs,
                raise_errors=False,
                again=again,
            )
        finally:
            if child.cancel_scope is scope:
                child.cancel_scope = None


class EachSubscriber:
    """``mount_each``'s subscriber: one child component per key (internal).

    ``update_all()`` opens an epoch and mounts a child for every entry of a
    view's snapshot; ``mark_ready()`` closes it, unmounting the children of
    keys the epoch did not see.  ``update`` / ``delete`` then follow changes.
    A LiveMap's consumer skips ``update`` / ``delete``: its changes wait in
    the host's queue, and ``Consumer.resolve`` turns each into a run when a
    worker takes it (:meth:`child`, :attr:`gen`, :meth:`drop_leaf`).
    """

    def __init__(
        self, operator: LiveComponentOperator, component: Component, gen: int, source: Any
    ) -> None:
        # the mount_each component's operator: its mark_ready and delete
        self.operator = operator
        self.component = component
        self.gen = gen
        self.source = source
        host = component.host
        assert isinstance(host, EachHost)
        # the children without a component of their own, and the pool
        self.host = host
        self.pool = host.pool
        self.app_run = component.spec.session.require_run()
        self._epoch: set[Hashable] | None = None

    def drop_leaf(self, key: Any) -> None:
        """Unmount the child of ``key`` while it is at rest: nothing to release."""
        del self.host.leaves[key]
        app_run = self.component.spec.session.active
        if app_run is not None:
            app_run.stats.unmounted(self.host.fn)

    def child(self, key: Any, value: Any) -> Component:
        """The component of ``key``'s child, (re)mounted with ``value``."""
        if self._epoch is not None:
            self._epoch.add(key)
        host = self.host
        if host.leaves:
            host.leaves.pop(key, None)
        if host.counted:
            host.drop(key)
        return host.mount_entry(key, value)

    def submit(self, key: Any, value: Any) -> None:
        """Run ``key``'s child with ``value`` on the pool: as a run without a
        component (see EachHost) unless the child has one already."""
        extra = self.component.extra  # (its children: a read per change)
        children = None if extra is None else extra.children
        if children is not None and (key,) in children:
            self.pool.queue_run(self.child(key, value))
            return
        if self.host.leaves:
            self.host.leaves.pop(key, None)
        self.submit_keyed(key, value)

    def submit_keyed(self, key: Any, value: Any) -> None:
        """:meth:`submit` for a key known to have neither a component nor a
        value at rest."""
        if self._epoch is not None:
            self._epoch.add(key)
        host = self.host
        if not host.counted:
            host.hold()
        self.pool.submit_keyed(self.app_run, self.gen, key, value)

    async def update_all(self) -> None:
        # an epoch is only needed to sweep children that were there before
        host = self.host
        self._epoch = (
            set()
            if self.component.children or host.leaves or host.counted or host.failures
            else None
        )
        source = self.source
        if callable(getattr(source, "__aiter__", None)):
            # a LiveMap hands its table's items over without an await per item
            snapshot_of = getattr(source, "snapshot", None)
            snapshot = snapshot_of() if snapshot_of is not None else [pair async for pair in source]
            # sync processors too: a keyed run on a pool worker costs less
            # than a component mounted inline
            pool = self.pool
            queue, high = pool.queue.order, pool.high
            # the common first scan: no child yet, so no lookups per key
            fresh = not self.component.children and not host.leaves
            submit = self.submit_keyed if fresh else self.submit
            for key, value in unzipped(snapshot):
                submit(key, value)
                if len(queue) >= high:  # pool.crowded(), inline
                    await pool.room()

    async def mark_ready(self) -> None:
        epoch = self._epoch
        if epoch is not None:
            self._epoch = None
            host = self.host
            for key in [k for k in host.pending_keys() if k not in epoch]:
                host.drop(key)
            for key in [k for k in host.leaves if k not in epoch]:
                self.drop_leaf(key)
            failures = host.failures
            if failures:  # a key that failed and is gone: it fails no more
                for key in [k for k in failures if k not in epoch]:
                    del failures[key]
            children = self.component.children or {}
            for child in [c for rel, c in children.items() if rel[0] not in epoch]:
                await unmount(child)
        await self.operator.mark_ready()

    async def update(self, key: Any, value: Any) -> ReadyLike:
        child = self.child(key, value)
        await launch(child)
        return ComponentMountHandle(child)

    async def delete(self, key: Any) -> ReadyLike:
        if self._epoch is not None:
            self._epoch.discard(key)
        host = self.host
        if host.counted:
            host.drop(key)
        if key in host.leaves:
            self.drop_leaf(key)
            return ReadyHandle()
        return await self.operator.delete((key,))


class EachLiveSubscriber:
    """``mount_each``'s subscriber when its processor is a live-component
    class (internal): one live component per key, made with the key's value
    (``cls(value, *args, **kwargs)``), made again when the value changes (the
    old one is cancelled; the new one starts once it has ended, see
    :func:`run_entry`), unmounted with its key.  A change counts as
    processed once the key's live component has been (re)started: the next
    change of the key is delivered at once, even to a component that has not
    marked itself ready yet (it is superseded); the components' readiness is
    the tree's, counted by the ``mount_each`` component.  The consumer's
    ordinary deliveries drive it (no children at rest, no runs on the
    pool).

    A live run's initial catch-up waits for more: each key's live component
    started meanwhile has marked itself ready (or left the tree, or was
    superseded by the key's next one, which then counts instead), so that
    the app's ``ready()`` comes after the per-entry components' own
    catch-ups.  ``_first`` holds, per key, the event of the component the
    catch-up waits for (``None`` once it is over).
    """

    def __init__(self, operator: LiveComponentOperator, component: Component, source: Any) -> None:
        self.operator = operator
        self.component = component
        self.source = source
        host = component.host
        assert isinstance(host, EachHost)
        self.host = host
        self._epoch: set[Hashable] | None = None
        app_run = component.spec.session.active
        catching_up = app_run is not None and app_run.catching_up
        self._first: dict[Hashable, anyio.Event] | None = {} if catching_up else None

    def _mount(self, key: Any, value: Any) -> Component:
        if self._epoch is not None:
            self._epoch.add(key)
        return self.host.mount_entry(key, value, run_entry)

    async def _start(self, key: Any, value: Any) -> None:
        """(Re)mount and start ``key``'s live component."""
        child = self._mount(key, value)
        await launch(child)
        first = self._first
        if first is None:
            return
        app_run = child.spec.session.active
        if app_run is None or not app_run.catching_up:
            self._first = None
            for event in first.values():  # nobody waits any more
                event.set()
            return
        earlier = first.pop(key, None)
        if earlier is not None:
            earlier.set()  # superseded: its successor counts instead
        event = anyio.Event()
        first[key] = event

        def done() -> None:
            if first.get(key) is event:
                del first[key]
            event.set()

        child.readiness.on_first = done

    async def caught_up(self, settle: Callable[[], Awaitable[None]]) -> None:
        """The catch-up's wait for this consumer: ``settle()`` (what the feed
        committed so far was delivered), then until the live components
        started by then have marked themselves ready, left the tree or been
        superseded (see above)."""
        await settle()
        first = self._first
        if first:
            for event in list(first.values()):
                await event.wait()

    async def update_all(self) -> None:
        self._epoch = set() if self.component.children else None
        source = self.source
        if callable(getattr(source, "__aiter__", None)):
            # the snapshot is taken before the first await (the seam)
            snapshot_of = getattr(source, "snapshot", None)
            snapshot = snapshot_of() if snapshot_of is not None else [pair async for pair in source]
            for key, value in unzipped(snapshot):
                await self._start(key, value)

    async def mark_ready(self) -> None:
        epoch = self._epoch
        if epoch is not None:
            self._epoch = None
            children = self.component.children or {}
            for child in [c for rel, c in children.items() if rel[0] not in epoch]:
                await unmount(child)
        await self.operator.mark_ready()

    async def update(self, key: Any, value: Any) -> ReadyLike:
        await self._start(key, value)
        return ReadyHandle()  # started: the next change need not wait for it

    async def delete(self, key: Any) -> ReadyLike:
        """Unmount ``key``'s live component; the release of what it owned runs
        on the pool, after its task (its ``finally`` included) and before the
        key's next component."""
        if self._epoch is not None:
            self._epoch.discard(key)
        return delete_child(self.operator, (key,), self._release_in_turn)

    def _release_in_turn(self, child: Component, job: Callable[[], Awaitable[None]]) -> None:
        self.host.pool.cleanup(child, job)


async def run_entry(comp: Component, scope: anyio.CancelScope, gen: int) -> None:
    """The task of a per-entry live component (a ``mount_each`` of a
    live-component class): once no earlier run of its key is under way (the
    key's previous live component, cancelled by this one's start or by an
    unmount, has ended, its ``finally`` included; or a run of the key on the
    pool), it runs as any live component does, its instance made with the
    key's latest value.  It holds the key on the host's pool meanwhile, so
    a run of the key, or its next live component, waits for it in turn, and
    a take-over waits for it like for the pool's runs."""
    host = comp.parent.host if comp.parent is not None else None
    assert isinstance(host, EachHost)
    pool = host.pool
    key = comp.rel[0]
    app_run = comp.spec.session.require_run()
    with scope:
        await pool.hold(app_run, key)
        try:
            if comp.current(gen):  # (superseded while it waited: the newer one runs)
                await live_run(comp, gen)
        finally:
            pool.let_go(app_run, key)


class EachLive:
    """What a ``mount_each`` over a view or a feed runs: the processor, the
    source and the processor's own arguments (its task is :func:`run_each`)."""

    __slots__ = ("args", "fn", "kwargs", "options", "source")

    def __init__(self, fn: Any, source: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.fn = fn
        self.source = source
        self.args = args
        self.kwargs = kwargs
        options = getattr(source, "options", None)
        self.options = options if isinstance(options, ConsumerOptions) else ConsumerOptions()


async def run_each(comp: Component, scope: anyio.CancelScope, gen: int) -> None:
    """The task of a ``mount_each`` over a feed: configure the host of its
    children, then watch the feed until it ends (its component is ready once
    the initial scan is done and every child it mounted is ready)."""
    with scope, live_task_context(comp):
        each = EachLive(*comp.args, **comp.kwargs)
        options = each.options
        host = comp.host
        if not isinstance(host, EachHost):
            host = comp.host = EachHost(comp, options.concurrency, options.retry, keeps_leaves=True)
        else:
            # the same host and pool: runs of the earlier run of this
            # mount_each that are still winding down hold their keys (an
            # earlier app run's ended with it: the queue starts empty then)
            host.pool.join(comp.spec.session.require_run())
            host.reset()  # runs queued by an earlier run of this mount_each
            host.retry = options.retry
            host.pool.resize(options.concurrency)
        host.configure(each.fn, each.args, each.kwargs, comp.handlers)
        settle = getattr(each.source, "settle", None)
        host.settling.settle = settle if callable(settle) else None
        host.settling.settle_keys = host.settle_keys
        operator = LiveComponentOperator(comp, each, gen)
        subscriber: EachSubscriber | EachLiveSubscriber = (
            EachLiveSubscriber(operator, comp, each.source)
            if is_live_class(each.fn)
            else EachSubscriber(operator, comp, gen, each.source)
        )
        take_over(each.source, comp)
        app_run = comp.spec.session.active
        if app_run is not None and app_run.catching_up:
            # a live run's initial catch-up waits for this consumer's too
            settle_source = settler(each.source, comp)
            if isinstance(subscriber, EachLiveSubscriber):
                settle_source = partial(subscriber.caught_up, settle_source)
            app_run.settlers[subscriber] = settle_source
        try:
            await each.source.watch(subscriber)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            await comp.report(exc, "mount_each")
        finally:
            if app_run is not None:
                app_run.settlers.pop(subscriber, None)
        if comp.current(gen):
            comp.readiness.mark_live_ready()


class _Watched(Protocol):
    """A consumer as :func:`take_over` sees it: the host of the ``mount_each``
    it feeds, if it feeds one."""

    host: EachHost | None


def take_over(source: Any, comp: Component) -> None:
    """A ``mount_each`` that replaces another over the same map (its parent's
    latest run mounted this one and no longer mounts the one holding the
    map: another processor, or another subpath) takes the map over: the old
    one's consumer is superseded and its runs (per-entry live components
    included) are cancelled now; this one's consumer starts once they have
    ended (their ``finally`` included: a key never runs in both at once;
    see :meth:`~._consumer.Consumer.run`), also if this one is itself
    replaced meanwhile.  The one replaced is unmounted when the parent's run
    commits; until then it would make this one's watch a second consumer."""
    active = getattr(source, "active_consumer", None)
    if active is None:
        return
    consumer = cast("_Watched | None", active())
    held = None if consumer is None else consumer.host
    if held is None:
        return
    old = held.component
    parent = comp.parent
    if old is comp or parent is None or old.parent is not parent:
        return
    run = parent.latest_run
    mounted = None if run is None else run.mounted
    if mounted is None or mounted.get(comp.rel) is not comp or old.rel in mounted:
        return
    host = old.host
    if not isinstance(host, EachHost):
        return
    host.supersede()  # this one's consumer waits for the runs cancelled here
    host.stop_runs()
    for child in list((old.children or {}).values()):
        child.cancel_tasks()


def settler(source: Any, comp: Component) -> Callable[[], Awaitable[None]]:
    """How to wait for what ``source`` has committed so far to be processed:
    its ``settle()`` (a :class:`~livemap.LiveMap`, or a view of one with
    consumer options); for a view without one, the ``mount_each``'s subtree
    being ready once."""
    settle = getattr(source, "settle", None)
    if callable(settle):
        return cast("Callable[[], Awaitable[None]]", settle)
    return comp.readiness.wait_ready


# As for ``mount``: one overload with the optional subpath, one without.  The
# processor's first parameter takes the items' values; the rest of its
# parameters (a ParamSpec) type the arguments after the items.


@overload
async def mount_each(
    subpath: ComponentSubpath,
    processor: Callable[Concatenate[V, P], object],
    items: EachItems[V],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> ComponentMountHandle: ...
@overload
async def mount_each(
    processor: Callable[Concatenate[V, P], object],
    items: EachItems[V],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> ComponentMountHandle: ...
async def mount_each(*args: Any, **kwargs: Any) -> ComponentMountHandle:
    """``mount_each([subpath,] fn, items, *args, **kwargs)``: one child per entry.

    ``items`` is an iterable or async iterable of ``(key, value)`` pairs, a
    :class:`~livemap.LiveMapView` (a :class:`~livemap.LiveMap`) or a
    :class:`~livemap.LiveMapFeed` (for example ``lm.consumer(...)``).
    Each child runs ``fn(value, *args, **kwargs)`` at path ``.../key``.  Over
    a view or feed the children follow the entries live.
    """
    run = current_run("mount_each()")
    subpath, processor, rest = split_args(args, "mount_each")
    if not rest:
        raise TypeError("mount_each() needs the items to mount after the function")
    items, fargs = rest[0], rest[1:]
    rel = child_path(subpath, processor, "mount_each")
    if is_feed(items):
        child = run.component.mount_child(
            run,
            rel,
            EachLive,
            (processor, items, fargs, kwargs),
            {},
            "mount_each",
            handler_chain(),
            run_each,
        )
    elif isinstance(items, (Iterable, AsyncIterable)):
        child = run.component.mount_child(
            run,
            rel,
            _each_static,
            (processor, items, fargs, kwargs),
            {},
            "mount_each",
            handler_chain(),
        )
    else:
        raise TypeError(
            f"mount_each(): items must be an iterable, an async iterable, a LiveMapView or "
            f"a LiveMapFeed, got {type(items).__name__}"
        )
    start(child)
    return ComponentMountHandle(child)


async def _each_static(
    processor: Any,
    items: Iterable[tuple[Any, Any]] | AsyncIterable[tuple[Any, Any]],
    fargs: tuple[Any, ...],
    fkwargs: dict[str, Any],
) -> None:
    run = current_run("mount_each()")
    comp = run.component
    if comp.host is None:
        comp.host = EachHost(comp, ConsumerOptions().concurrency, None, keeps_leaves=False)
    handlers = handler_chain()
    live_body = run_entry if is_live_class(processor) else None

    spec = comp.child_spec(processor, fkwargs, "mount_each", handlers, fargs)

    async def one(pair: Any) -> None:
        key, value = _pair(pair)
        child = comp.place_child(run, (key,), spec, value, live_body)
        await launch(child)

    if isinstance(items, AsyncIterable):
        async for pair in items:
            await one(pair)
    else:
        for pair in items:
            await one(pair)


def _pair(pair: Any) -> tuple[StableKey, Any]:
    try:
        key, value = pair
    except (TypeError, ValueError):
        raise TypeError(
            f"mount_each(): each item must be a (key, value) pair, got {pair!r}"
        ) from None
    return normalize_key(key), value
