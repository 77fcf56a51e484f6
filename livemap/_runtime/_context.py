"""The exception-handler chain and the context a reported exception carries."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeAlias

from livemap._paths import ComponentPath, format_path

__all__ = [
    "ExceptionContext",
    "ExceptionHandler",
    "ExceptionSource",
    "MountKind",
    "dispatch",
    "exception_handler",
    "handler_chain",
    "handlers_var",
    "processor_name",
]

logger = logging.getLogger("livemap")

MountKind: TypeAlias = Literal["mount", "mount_each", "process_live"]


ExceptionSource: TypeAlias = Literal["component", "handler"]


@dataclass(frozen=True, slots=True)
class ExceptionContext:
    """Where a reported exception came from: what a handler gets with it.

    The fields are CocoIndex's:

    * ``env_name``: the app's name (``app_name`` is the same).
    * ``stable_path``: the failing component's path, a
      :class:`~livemap.ComponentPath` (equal to the tuple of its stable keys;
      ``str()`` gives ``/process_entry/'k1'``, as does ``path``).
    * ``processor_name``: the qualified name of the function or
      live-component class.
    * ``mount_kind``: how the component was mounted (``"mount"``,
      ``"mount_each"``), or ``"process_live"`` for a live component's own
      failures (``process_live``, ``update_full()``, ``report_exception()``)
      and for the children ``operator.update()`` mounted.
    * ``parent_stable_path``: the path of the component that mounted it (for
      a ``mount_each`` child: the component that called ``mount_each``);
      ``None`` for the root.
    * ``is_background``: always ``True``: handlers see failures of work that
      runs apart from its caller (``use_mount`` raises into its caller
      instead).
    * ``source``: ``"component"`` when the exception is the component's own;
      ``"handler"`` when a handler further in raised it (its own exception,
      or the one it got) and passed it on.
    * ``original_exception``: with ``source="handler"``, the component's own
      exception; else ``None``.
    """

    env_name: str
    stable_path: ComponentPath
    processor_name: str
    mount_kind: MountKind
    parent_stable_path: ComponentPath | None
    is_background: bool = True
    source: ExceptionSource = "component"
    original_exception: BaseException | None = None

    @property
    def app_name(self) -> str:
        """The app's name: the same as ``env_name``."""
        return self.env_name

    @property
    def path(self) -> str:
        """The printable path, e.g. ``/process_entry/'k1'``: ``str(stable_path)``."""
        return format_path(self.stable_path)


ExceptionHandler: TypeAlias = Callable[[BaseException, ExceptionContext], "Awaitable[None] | None"]
"""``handler(exc, ctx)``: returns (or its awaitable returns) to handle the
exception; raises to pass it (or another exception) on to the next handler
out, and to make ``handle.ready()`` of the failing component raise it."""

handlers_var: ContextVar[tuple[ExceptionHandler, ...]] = ContextVar("livemap_handlers", default=())


@asynccontextmanager
async def exception_handler(handler: ExceptionHandler) -> AsyncIterator[None]:
    """Scope ``handler`` over the components mounted inside the block.

    Failures of those components (and of their descendants, unless a closer
    handler deals with them) are passed to ``handler(exc, ctx)`` before any
    handler further out.  ``handler`` may be a plain or an async function.
    """
    token = handlers_var.set((*handlers_var.get(), handler))
    try:
        yield
    finally:
        handlers_var.reset(token)


def handler_chain() -> tuple[ExceptionHandler, ...]:
    return handlers_var.get()


async def dispatch(
    chain: tuple[ExceptionHandler, ...], exc: BaseException, ctx: ExceptionContext
) -> BaseException | None:
    """Pass ``exc`` through ``chain``, innermost handler first.

    A handler that returns deals with the exception; one that raises hands
    what it raised to the next handler out (whose context then has
    ``source="handler"`` and ``original_exception=exc``).  When no handler deals with it,
    it is logged at ERROR.  Returns the exception to *escalate* (what
    ``handle.ready()`` of the failing component raises): the first exception
    a handler raised, if any, whether or not a handler further out dealt
    with it; else ``None``.
    """
    escalated: BaseException | None = None
    current = exc
    for handler in reversed(chain):
        try:
            outcome = handler(current, ctx)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception as raised:
            if escalated is None:
                escalated = raised
                ctx = replace(ctx, source="handler", original_exception=exc)
            current = raised
            continue
        return escalated
    logger.error(
        "livemap: component %s (%s, %s) failed: %r",
        ctx.path,
        ctx.mount_kind,
        ctx.processor_name,
        current,
        exc_info=current,
    )
    return escalated


def processor_name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
