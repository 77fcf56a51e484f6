"""``mount_each`` of a live-component class: its constructor's arguments are checked."""

import livemap as coco
from livemap import LiveMap


class PerEntry:
    def __init__(self, value: str, scale: int) -> None: ...

    def process(self) -> None: ...

    async def process_live(self, operator: coco.LiveComponentOperator) -> None: ...


async def main() -> None:
    lm: LiveMap[str, str] = await LiveMap.create()
    await coco.mount_each(PerEntry, lm, "not an int")  # E: call-overload
