"""``fn(batching=True)``: a caller passes one input, not the list."""

import livemap as coco


@coco.fn(batching=True)
async def embed(texts: list[str]) -> list[int]:
    return [len(t) for t in texts]


async def main() -> None:
    await embed(["a", "b"])  # E: arg-type
