"""Every exception livemap raises or reports on purpose.

All of them are :class:`LiveMapError`; where a builtin exception is part of
the contract it is a base too.  Each names the offending key or component
path in its message.  Misuse raised at a call (a bad key, a duplicate
declaration, a second sibling at one path, a call outside a component)
leaves every map and component as it was.  ``docs/errors.md`` lists them.
"""

from __future__ import annotations

from livemap_core import DuplicateDeclarationError
from livemap_core._shared import LiveMapError, StableKeyError

__all__ = [
    "ConsumerBusyError",
    "DuplicateDeclarationError",
    "DuplicatePathError",
    "KeyConflictError",
    "LiveMapError",
    "MapRetiredError",
    "NotInComponentError",
    "StableKeyError",
    "TargetApplyError",
    "UpdateInProgressError",
    "ValueComparisonError",
]


class NotInComponentError(LiveMapError, RuntimeError):
    """A call that needs a running component (``declare_entry``, ``mount``,
    ``mount_each``, ``use_mount``, ``LiveMap.create()``, ``declare``) was made
    outside one, or from a task or thread that outlived the run it was
    started in (``ended`` then names that run: its ``str()`` is the
    component's path; ``target`` the map or target declared into)."""

    def __init__(self, what: str, ended: object = None, *, target: str | None = None) -> None:
        if ended is None:
            message = (
                f"{what} must be called inside a component run (an app's main function or a "
                "function mounted from it)"
            )
        else:
            into = "" if target is None else f" into {target}"
            message = (
                f"{what}{into} was called from a task or thread that outlived its component "
                f"run (component {ended}): that run's function has returned and its commit "
                "takes nothing more; the call did nothing (no declaration, map or child "
                "was made)"
            )
        super().__init__(message)
        self.what = what
        self.ended = ended
        self.target = target


class KeyConflictError(LiveMapError):
    """A component keeps declaring a key that another component owns and
    still declares.

    The first owner keeps the key and its value; the conflicting declaration
    is not applied, but it is remembered as a claim while the declaring
    component keeps declaring the key: when the owner lets the key go (stops
    declaring it or is unmounted), the claimant gets it with the value it
    declared last, without declaring it again.  Reported to the declaring
    component's exception-handler chain (not raised at the call) once the
    update that made the claim has settled with the claim still pending.
    ``owner_app`` / ``declarer_app`` name the apps of the two components.
    """

    def __init__(
        self,
        key: object,
        target: str,
        owner_path: str,
        declarer_path: str,
        *,
        owner_app: str | None = None,
        declarer_app: str | None = None,
    ) -> None:
        owner = f"component {owner_path}"
        if owner_app is not None:
            owner += f" of app {owner_app!r}"
        declarer = f"component {declarer_path}"
        if declarer_app is not None and declarer_app != owner_app:
            declarer += f" of app {declarer_app!r}"
        super().__init__(
            f"key {key!r} of {target} is owned by {owner}; the declaration by {declarer} "
            "was not applied (it is kept as a claim while that component declares it)"
        )
        self.key = key
        self.target = target
        self.owner_path = owner_path
        self.declarer_path = declarer_path
        self.owner_app = owner_app
        self.declarer_app = declarer_app


class DuplicatePathError(LiveMapError, ValueError):
    """Two components were mounted at one path during one run of their parent.

    Raised by the second ``mount``; the first stays mounted.
    """

    def __init__(self, path: str) -> None:
        super().__init__(f"a component is already mounted at {path} during this run")
        self.path = path


class MapRetiredError(LiveMapError, RuntimeError):
    """A declaration into a LiveMap whose creating run has been superseded or
    whose creating component was unmounted."""

    def __init__(self, target: str) -> None:
        super().__init__(f"{target} is retired: the run that created it has been superseded")
        self.target = target


class TargetApplyError(LiveMapError, RuntimeError):
    """A target's apply callback raised.

    The batch counts as not applied: the target's record stays as before it,
    so the owner's next commit sends the same changes again.  The original
    exception is ``__cause__``.
    """

    def __init__(self, target: str, path: str, upserts: int, deletes: int) -> None:
        super().__init__(
            f"applying a batch of {upserts} upserts and {deletes} deletes to {target} "
            f"for component {path} failed; it will be sent again"
        )
        self.target = target
        self.path = path


class ConsumerBusyError(LiveMapError, RuntimeError):
    """A second consumer of a LiveMap while one is watching it.

    Raised by ``watch()``; a second ``mount_each`` reports it to its handler
    chain (``mount_kind="mount_each"``) without disturbing the first.
    """

    def __init__(self, target: str) -> None:
        super().__init__(
            f"{target} already has an active consumer; a LiveMap supports one at a time"
        )
        self.target = target


class ValueComparisonError(LiveMapError, ValueError):
    """Comparing a newly declared value with the held one (``==``) raised.

    Reported to the declaring component's handler chain; the held value
    stays.  The original exception is ``__cause__``.
    """

    def __init__(self, key: object, target: str, error: BaseException | None) -> None:
        super().__init__(
            f"comparing the new value of key {key!r} of {target} with the held one raised "
            f"{error!r}; the held value stays"
        )
        self.key = key
        self.target = target


class UpdateInProgressError(LiveMapError, RuntimeError):
    """``app.update()`` was started while another update of the same app runs."""

    def __init__(self, app: str) -> None:
        super().__init__(f"app {app!r} is already running an update")
        self.app = app
