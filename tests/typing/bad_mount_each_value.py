"""``mount_each``: the processor's first parameter does not take the map's values."""

import livemap as coco
from livemap import LiveMap


def process_int(value: int) -> None: ...


async def main() -> None:
    lm: LiveMap[str, str] = await LiveMap.create()
    await coco.mount_each(process_int, lm)  # E: call-overload
