"""What a consumer talks to: the view, feed and subscriber protocols, and
the options of a map's consumer (concurrency and retries)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

__all__ = [
    "ConsumerOptions",
    "LiveMapFeed",
    "LiveMapSubscriber",
    "LiveMapView",
    "ReadyLike",
    "RetryPolicy",
    "is_feed",
]

K_contra = TypeVar("K_contra", contravariant=True)
V_contra = TypeVar("V_contra", contravariant=True)
K_co = TypeVar("K_co", covariant=True)
V_co = TypeVar("V_co", covariant=True)


@runtime_checkable
class ReadyLike(Protocol):
    """Something whose ``ready()`` can be awaited."""

    async def ready(self) -> None: ...


@runtime_checkable
class LiveMapSubscriber(Protocol[K_contra, V_contra]):
    """What a feed talks to.

    A feed calls ``update_all()`` (the subscriber re-reads everything: for a
    view, it scans it), then ``mark_ready()``, then ``update(key, value)`` /
    ``delete(key)`` for each later change.  ``update`` and ``delete`` return a
    handle whose ``ready()`` says the change has been processed.
    """

    async def update_all(self) -> None: ...

    async def mark_ready(self) -> None: ...

    async def update(self, key: K_contra, value: V_contra) -> ReadyLike: ...

    async def delete(self, key: K_contra) -> ReadyLike: ...


@runtime_checkable
class LiveMapFeed(Protocol[K_co, V_co]):
    """A source of live changes: ``await feed.watch(subscriber)`` runs until
    the feed ends (or the watching task is cancelled).

    A ``LiveMapFeed[K, V]`` delivers keys of type ``K`` and values of type
    ``V``: its subscriber is a ``LiveMapSubscriber[K, V]``.
    """

    async def watch(self, subscriber: LiveMapSubscriber[K_co, V_co]) -> None: ...


@runtime_checkable
class LiveMapView(LiveMapFeed[K_co, V_co], Protocol[K_co, V_co]):
    """A feed that can also be scanned: ``async for key, value in view``."""

    def __aiter__(self) -> AsyncIterator[tuple[K_co, V_co]]: ...


def is_feed(obj: object) -> bool:
    """Whether ``obj`` is a :class:`LiveMapFeed` (anything with ``watch``)."""
    return callable(getattr(obj, "watch", None)) and not isinstance(obj, (list, tuple, dict))


@dataclass(frozen=True)
class RetryPolicy:
    """Retry a failing per-entry component with exponential backoff.

    A per-entry run that raises is run again after ``initial_backoff``
    seconds, then ``multiplier`` times longer each time (at most
    ``max_backoff``), up to ``max_attempts`` runs in all; the component stays
    unready (and its key in flight) meanwhile.  Only the last failure goes to
    the exception-handler chain.  A key still failing after that stays
    visible in ``LiveMap.stats().failing`` (with its last error) until a
    later run of it succeeds or it is deleted.  A change to a key that waits
    to retry cuts the wait short: a new value runs at once, with a fresh
    count of attempts, instead of the old one, and a delete unmounts the
    child at once.  A change that arrives while a try is running waits until
    that try is over.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.05
    multiplier: float = 2.0
    max_backoff: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("RetryPolicy backoffs must be >= 0 and the multiplier >= 1")

    def delay(self, failures: int) -> float:
        """The wait before the try after ``failures`` failed ones."""
        return float(
            min(self.max_backoff, self.initial_backoff * self.multiplier ** (failures - 1))
        )


@dataclass(frozen=True)
class ConsumerOptions:
    """How a LiveMap's consumer processes changes.

    ``concurrency``: how many keys are processed at once (one key is never
    processed twice at once); ``retry``: a :class:`RetryPolicy` for failing
    per-entry components, or ``None`` to try each change once.
    """

    concurrency: int = 64
    retry: RetryPolicy | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
