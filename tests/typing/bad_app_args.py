"""``App``: arguments for a main function that takes none."""

import livemap as coco


async def main() -> None: ...


app = coco.App("x", main, 1, 2)  # E: Too many arguments
