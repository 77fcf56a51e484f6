"""``mount``: an argument of the wrong type for the function."""

import livemap as coco


def takes_str(name: str) -> None: ...


async def main() -> None:
    await coco.mount(takes_str, 42)  # E: call-overload
