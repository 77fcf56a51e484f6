"""``mount`` of a live-component class: ``__init__``'s parameters are checked."""

import livemap as coco


class Watcher:
    def __init__(self, path: str) -> None:
        self.path = path

    def process(self) -> None: ...

    async def process_live(self, operator: coco.LiveComponentOperator) -> None: ...


async def main() -> None:
    await coco.mount(Watcher, 3)  # E: call-overload
