"""``mount`` with a leading subpath: an argument of the wrong type."""

import livemap as coco


def takes_str(name: str) -> None: ...


async def main() -> None:
    await coco.mount(coco.component_subpath("x"), takes_str, 42)  # E: call-overload
