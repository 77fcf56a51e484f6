"""``mount_each`` over a feed of one's own: its subscriber's value type is checked."""

import livemap as coco


def process_int(value: int) -> None: ...


class Feed:
    async def watch(self, subscriber: coco.LiveMapSubscriber[str, str]) -> None: ...


async def main() -> None:
    await coco.mount_each(process_int, Feed())  # E: call-overload
