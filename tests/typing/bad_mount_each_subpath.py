"""``mount_each`` with a leading subpath: the values are checked too."""

import livemap as coco
from livemap import LiveMap


def process_int(value: int) -> None: ...


async def main() -> None:
    lm: LiveMap[str, str] = await LiveMap.create()
    await coco.mount_each(coco.component_subpath("each"), process_int, lm)  # E: call-overload
