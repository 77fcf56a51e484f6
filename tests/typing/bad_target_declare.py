"""``target.declare(key, value)``: the key must be the target's key type."""

from livemap import KeyedTarget, TargetBatch


def apply(batch: TargetBatch[str, int]) -> None: ...


target: KeyedTarget[str, int] = KeyedTarget("t", apply)


async def main() -> None:
    target.declare(1, 1)  # E: arg-type
