"""``use_mount``: an argument of the wrong type for the function."""

import livemap as coco


def double(x: int) -> int:
    return 2 * x


async def main() -> None:
    print(await coco.use_mount(coco.component_subpath("d"), double, "2"))  # E: call-overload
