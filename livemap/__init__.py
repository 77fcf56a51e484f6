"""livemap: a live, owned, in-memory keyed map between the producing and the
consuming halves of an async pipeline, and the small declarative component
runtime around it (on anyio: asyncio and trio).

The public names follow CocoIndex v1::

    import livemap as coco
    from livemap import LiveMap
"""

from livemap._version import __version__
from livemap.app import App, AppConfig, UpdateHandle, UpdateStats
from livemap.component import (
    ComponentMountHandle,
    Function,
    fn,
    mount,
    mount_each,
    use_mount,
)
from livemap.context import ExceptionContext, ExceptionHandler, exception_handler
from livemap.errors import (
    DuplicateDeclarationError,
    DuplicatePathError,
    KeyConflictError,
    LiveMapError,
    MapRetiredError,
    NotInComponentError,
    TargetApplyError,
)
from livemap.feed import (
    ConsumerOptions,
    LiveMapFeed,
    LiveMapSubscriber,
    LiveMapView,
    RetryPolicy,
)
from livemap.live import LiveComponent, LiveComponentOperator, auto_refresh
from livemap.live_map import LiveMap, LiveMapConsumer, LiveMapStats
from livemap.paths import ComponentSubpath, StableKey, StablePath, Symbol, component_subpath
from livemap.targets import KeyedTarget, TargetBatch

__all__ = [
    "App",
    "AppConfig",
    "ComponentMountHandle",
    "ComponentSubpath",
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
    "RetryPolicy",
    "StableKey",
    "StablePath",
    "Symbol",
    "TargetApplyError",
    "TargetBatch",
    "UpdateHandle",
    "UpdateStats",
    "__version__",
    "auto_refresh",
    "component_subpath",
    "exception_handler",
    "fn",
    "mount",
    "mount_each",
    "use_mount",
]
