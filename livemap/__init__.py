"""livemap: a live, owned, in-memory keyed map between the producing and the
consuming halves of an async pipeline, and the small declarative component
runtime around it (on anyio: asyncio and trio).

The public names follow CocoIndex v1::

    import livemap as coco
    from livemap import LiveMap
"""

from livemap._feed._each import mount_each
from livemap._feed._protocols import (
    ConsumerOptions,
    LiveMapFeed,
    LiveMapSubscriber,
    LiveMapView,
    RetryPolicy,
)
from livemap._live_map import LiveMap, LiveMapConsumer, LiveMapStats
from livemap._paths import (
    ComponentPath,
    ComponentSubpath,
    StableKey,
    StablePath,
    Symbol,
    component_subpath,
)
from livemap._runtime._app import App, AppConfig, UpdateHandle
from livemap._runtime._component import ComponentMountHandle
from livemap._runtime._context import ExceptionContext, ExceptionHandler, exception_handler
from livemap._runtime._functions import Function, fn
from livemap._runtime._live import (
    LiveComponent,
    LiveComponentOperator,
    ReadyHandle,
    auto_refresh,
)
from livemap._runtime._mount import mount, use_mount
from livemap._runtime._progress import show_progress
from livemap._runtime._session import ComponentStats, UpdateSnapshot, UpdateStats, UpdateStatus
from livemap._runtime._targets import KeyedTarget, TargetBatch
from livemap._version import __version__
from livemap.errors import (
    ConsumerBusyError,
    DuplicateDeclarationError,
    DuplicatePathError,
    KeyConflictError,
    LiveMapError,
    MapRetiredError,
    NotInComponentError,
    StableKeyError,
    TargetApplyError,
    UpdateInProgressError,
    ValueComparisonError,
)

__all__ = [
    "App",
    "AppConfig",
    "ComponentMountHandle",
    "ComponentPath",
    "ComponentStats",
    "ComponentSubpath",
    "ConsumerBusyError",
    "ConsumerOptions",
    "DuplicateDeclarationError",
    "DuplicatePathError",
    "ExceptionContext",
    "ExceptionHandler",
    "Function",
    "KeyConflictError",
    "KeyedTarget",
    "LiveComponent",
    "LiveComponentOperator",
    "LiveMap",
    "LiveMapConsumer",
    "LiveMapError",
    "LiveMapFeed",
    "LiveMapStats",
    "LiveMapSubscriber",
    "LiveMapView",
    "MapRetiredError",
    "NotInComponentError",
    "ReadyHandle",
    "RetryPolicy",
    "StableKey",
    "StableKeyError",
    "StablePath",
    "Symbol",
    "TargetApplyError",
    "TargetBatch",
    "UpdateHandle",
    "UpdateInProgressError",
    "UpdateSnapshot",
    "UpdateStats",
    "UpdateStatus",
    "ValueComparisonError",
    "__version__",
    "auto_refresh",
    "component_subpath",
    "exception_handler",
    "fn",
    "mount",
    "mount_each",
    "show_progress",
    "use_mount",
]
