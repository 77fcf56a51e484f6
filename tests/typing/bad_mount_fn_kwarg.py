"""``mount`` of an ``@coco.fn`` function: a keyword argument it does not take."""

import livemap as coco


@coco.fn
async def load(path: str, *, retries: int = 3) -> None: ...


async def main() -> None:
    await coco.mount(load, "a.toml", timeout=1.0)  # E: Unexpected keyword argument "timeout"
