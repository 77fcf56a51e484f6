"""``mount`` and ``use_mount``: forms that must type-check under ``mypy --strict``."""

from __future__ import annotations

from typing_extensions import assert_type

import livemap as coco


def takes_str(name: str) -> None: ...


async def takes_str_async(name: str, *, flag: bool = False) -> None: ...


def returns_int(x: int) -> int:
    return x


async def returns_int_async(x: int) -> int:
    return x


@coco.fn
def decorated(name: str, count: int = 1) -> str:
    return name * count


@coco.fn
async def decorated_async(name: str) -> int:
    return len(name)


class Live:
    def __init__(self, path: str, *, every: float = 1.0) -> None:
        self.path = path
        self.every = every

    def process(self) -> None: ...

    async def process_live(self, operator: coco.LiveComponentOperator) -> None:
        await operator.update_full()
        await operator.update("child", takes_str, "x")
        await operator.update(coco.component_subpath("a", 1), decorated, "y", count=2)
        await operator.update(("a", 2), Live, "sub", every=2.0)
        await operator.update(subpath="k", fn=returns_int, x=3)
        await operator.delete("child")


async def main() -> None:
    h1: coco.ComponentMountHandle = await coco.mount(takes_str, "a")
    await h1.ready()
    await coco.mount(takes_str, name="a")
    await coco.mount(takes_str_async, "a", flag=True)
    await coco.mount(decorated, "a", 2)
    await coco.mount(decorated_async, "a")
    await coco.mount(Live, "p")
    await coco.mount(Live, "p", every=0.5)
    await coco.mount(coco.component_subpath("x"), takes_str, "a")
    await coco.mount(coco.component_subpath("x") / 2, Live, path="p")
    await coco.mount(coco.auto_refresh(takes_str, interval=1.0), "a")
    await coco.mount(coco.auto_refresh(returns_int_async, interval=1.0), x=1)

    a: int = await coco.use_mount(returns_int, 1)
    b: int = await coco.use_mount(returns_int_async, 1)
    c: str = await coco.use_mount(decorated, "a", count=3)
    d: int = await coco.use_mount(decorated_async, "a")
    e: int = await coco.use_mount(coco.component_subpath("x"), returns_int_async, x=1)
    f: str = await coco.use_mount(coco.component_subpath("y"), decorated, "a")
    await coco.use_mount(takes_str_async, "a")
    print(a, b, c, d, e, f)
    assert_type(await coco.use_mount(returns_int_async, 1), int)
    assert_type(await coco.use_mount(decorated, "a"), str)
    assert_type(await coco.use_mount(decorated_async, "a"), int)


def main_with_args(name: str, *, limit: int = 10) -> None: ...


app = coco.App("good", main)
app2 = coco.App(coco.AppConfig("good2"), main_with_args, "n", limit=3)
app3 = coco.App("good3", main_with_args, name="n")
app4 = coco.App(name_or_config="good4", main_fn=main)
