"""``mount``: a required argument of the function left out."""

import livemap as coco


def takes_str(name: str) -> None: ...


async def main() -> None:
    await coco.mount(takes_str)  # E: call-overload
