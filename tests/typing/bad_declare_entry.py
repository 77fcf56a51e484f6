"""``lm.declare_entry(key, value)``: the value must be the map's value type."""

from livemap import LiveMap


async def main() -> None:
    lm: LiveMap[str, int] = await LiveMap.create()
    lm.declare_entry("k", "1")  # E: arg-type
