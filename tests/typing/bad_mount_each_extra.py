"""``mount_each``: an argument after the items of the wrong type for the processor."""

import livemap as coco
from livemap import LiveMap


def process(value: str, limit: int) -> None: ...


async def main() -> None:
    lm: LiveMap[str, str] = await LiveMap.create()
    await coco.mount_each(process, lm, "10")  # E: call-overload
