"""``mount`` of ``auto_refresh(fn, ...)``: the class takes ``fn``'s arguments."""

import livemap as coco


def load(path: str) -> None: ...


async def main() -> None:
    await coco.mount(coco.auto_refresh(load, interval=5.0), 42)  # E: call-overload
