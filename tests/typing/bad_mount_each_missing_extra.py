"""``mount_each``: the processor needs an argument after the items."""

import livemap as coco
from livemap import LiveMap


def process(value: str, limit: int) -> None: ...


async def main() -> None:
    lm: LiveMap[str, str] = await LiveMap.create()
    await coco.mount_each(process, lm)  # E: call-overload
