"""What the runtime hosts, as protocols it declares itself.

The component tree commits into *targets*, retires what a run *created* when
the next run commits, and lets a component *host* many children (a
``mount_each``).  The runtime knows these only through the protocols below;
the implementations (keyed targets in :mod:`._targets`, LiveMap and the
``mount_each`` host in upper layers) are found at run time, through the
objects a run hands it.  The host of children is declared next to the
component (:class:`livemap._runtime._component.ChildHost`), since it speaks
of components.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Protocol

from livemap._paths import StablePath
from livemap._runtime._context import MountKind

__all__ = [
    "Named",
    "Owner",
    "RetiredWithRun",
    "RunEnded",
    "RunState",
    "Target",
    "current_run_var",
]


class Owner(Protocol):
    """What a target needs of a component that declares into it."""

    @property
    def path(self) -> StablePath: ...

    @property
    def path_str(self) -> str: ...

    @property
    def alive(self) -> bool:
        """Whether the component is still in its app's tree."""
        ...

    def current(self, gen: int) -> bool:
        """Whether run ``gen`` is still the component's latest, and it is mounted."""
        ...

    @property
    def app_name(self) -> str:
        """The name of the app whose tree the component is in."""
        ...

    @property
    def defers_drops(self) -> bool:
        """Whether keys the component stops declaring wait for its update to
        settle (another component of that update may take them over)."""
        ...

    @property
    def loop_cache(self) -> dict[object, Any] | None:
        """Objects of the running event loop that the component's app run
        keeps for the run's length (a target's lock), or ``None`` outside
        a run in progress.  The run belongs to one loop: what it keeps here
        goes with it."""
        ...

    def adopt(self, target: Target) -> None:
        """``target`` handed the component a key it claimed (a transfer)."""
        ...

    def disown(self, target: Target) -> None:
        """``target`` holds nothing of the component any more."""
        ...

    def settle_after(
        self,
        job_key: object,
        job: Callable[[], Awaitable[None]],
        other: object = None,
        *,
        on_stop: bool = False,
        batch: Callable[[list[Any], Any], Awaitable[None]] | None = None,
    ) -> bool:
        """Keep ``job`` until the component's update has settled (with
        ``other``, the owner of a key it claims: the update of their nearest
        common ancestor); False if no such update is in progress.
        ``on_stop``: it also runs if the app run ends first.  ``batch``: it
        runs then with the others of that batch, as ``batch([component,
        ...], scope)``, ``scope`` the component whose update settled."""
        ...

    async def report(self, exc: BaseException, kind: MountKind | None = None) -> None:
        """Send ``exc`` through the component's exception-handler chain."""
        ...


class Named(Protocol):
    """What names a run that has ended: its component, or the path it had.

    A run's ``buffers`` that are neither ``None`` nor a dict are such a
    marker (a :class:`RunEnded`, or a run that is its own marker)."""

    @property
    def path_str(self) -> str: ...


class RunEnded:
    """What a run's ``buffers`` become once its function has returned.

    A task or a thread that the run started keeps the run in its context; a
    declaration it makes afterwards finds this marker instead of a dict and
    raises :class:`~livemap.errors.NotInComponentError` naming the component
    (its ``str()``), instead of going into a buffer being committed, or that
    nobody commits.  ``committing``: the run's commit is still under way (the
    run is in progress: its children's drops wait for it); the same marker
    then stays, with ``committing`` false, once the run is over."""

    __slots__ = ("committing", "owner")

    def __init__(self, owner: Named, committing: bool = False) -> None:
        self.owner = owner
        self.committing = committing

    @property
    def path_str(self) -> str:
        return self.owner.path_str

    def __str__(self) -> str:
        return self.owner.path_str


class RunState(Protocol):
    """What a declaration needs of the current run: its buffers (one per
    target it declared into, filled by ``livemap_core.Declarer``) and the
    owner its declarations are recorded for."""

    buffers: dict[Any, Any] | Named | None

    @property
    def owner(self) -> object: ...


current_run_var: ContextVar[RunState | None] = ContextVar("livemap_current_run", default=None)
"""The run of the component whose code is executing (``None`` outside one).

Set by the component tree around each run; read by every call that needs a
run (declarations read it in ``livemap_core``, without a Python call)."""


class Target(Protocol):
    """A keyed collection of owned target states that runs commit into."""

    async def commit_run(self, owner: Owner, buffer: Any, gen: int) -> Exception | None:
        """Commit one run's buffer (unless run ``gen`` of ``owner`` has been
        superseded or unmounted meanwhile); return a sink failure, if any."""
        ...

    async def release_owner(self, owner: Owner, gen: int | None = None) -> Exception | None:
        """Delete everything ``owner`` holds (for the commit of run ``gen``:
        unless it has been superseded); return a sink failure, if any."""
        ...

    def holds(self, owner: Owner) -> bool:
        """Whether ``owner`` holds any key of this target."""
        ...


class RetiredWithRun(Protocol):
    """Something a run creates that lives until the component's next run
    commits or the component is unmounted (a LiveMap)."""

    def retire(self) -> None: ...
