"""``mount_each`` over an async iterable of pairs: the values are checked."""

from collections.abc import AsyncIterator

import livemap as coco


def process_int(value: int) -> None: ...


async def pairs() -> AsyncIterator[tuple[str, str]]:
    yield "a", "1"


async def main() -> None:
    await coco.mount_each(process_int, pairs())  # E: call-overload
