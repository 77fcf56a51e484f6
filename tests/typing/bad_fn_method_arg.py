"""A method made with ``@fn``: bound, it takes the method's arguments after ``self``."""

import livemap as coco


class Handler:
    @coco.fn
    def run(self, x: int) -> int:
        return x


async def main() -> None:
    await coco.mount(Handler().run, "not an int")  # E: call-overload
