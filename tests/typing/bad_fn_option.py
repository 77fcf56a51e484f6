"""``fn``'s options are CocoIndex's, by keyword: a misspelt one is an error."""

import livemap as coco


@coco.fn(memoize=True)  # E: call-overload
def f(x: int) -> int:
    return x
