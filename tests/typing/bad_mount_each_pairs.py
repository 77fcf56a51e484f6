"""``mount_each`` over a list of ``(key, value)`` pairs: the values are checked."""

import livemap as coco


def process_int(value: int) -> None: ...


async def main() -> None:
    await coco.mount_each(process_int, [("a", "1"), ("b", "2")])  # E: call-overload
