"""``use_mount`` returns what the (async) function returns, awaited: an ``int``
here (with a ``str`` context no overload fits)."""

import livemap as coco


async def count(name: str) -> int:
    return len(name)


async def main() -> None:
    n: str = await coco.use_mount(count, "abc")  # E: call-overload
    print(n)
