"""``mount_each`` over ``lm.consumer(...)``: the values are still the map's."""

import livemap as coco
from livemap import LiveMap


def process_int(value: int) -> None: ...


async def main() -> None:
    lm: LiveMap[str, str] = await LiveMap.create()
    await coco.mount_each(process_int, lm.consumer(concurrency=4))  # E: call-overload
