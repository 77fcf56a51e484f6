"""The exception-handler chain and the context a reported exception carries."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from livemap._paths import StablePath, format_path

__all__ = [
    "ExceptionContext",
    "ExceptionHandler",
    "MountKind",
    "dispatch",
    "exception_handler",
    "handler_chain",
    "handlers_var",
    "processor_name",
]

logger = logging.getLogger("livemap")

MountKind: TypeAlias = Literal["mount", "mount_each", "process_live"]


@dataclass(frozen=True)
class ExceptionContext:
    """Where a reported exception came from.

    ``stable_path`` is the component's path (a tuple of stable keys; ``path``
    is its printable form), ``mount_kind`` how the component was mounted
    (``"mount"``, ``"mount_each"``) or ``"process_live"`` for a live
    component's ``process_live``, ``processor_name`` the qualified name of the
    function or live-component class.
    """

    stable_path: StablePath
    mount_kind: MountKind
    processor_name: str
    app_name: str

    @property
    def path(self) -> str:
        """The printable path, e.g. ``/process_entry/'k1'``."""
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
    what it raised to the next handler out.  When no handler deals with it,
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
