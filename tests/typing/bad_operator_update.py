"""``LiveComponentOperator.update``: an argument of the wrong type for the child."""

import livemap as coco


def takes_str(name: str) -> None: ...


class Live:
    def process(self) -> None: ...

    async def process_live(self, operator: coco.LiveComponentOperator) -> None:
        await operator.update("child", takes_str, 42)  # E: arg-type
