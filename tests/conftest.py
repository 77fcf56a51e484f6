"""Shared fixtures: every async test runs on asyncio and on trio."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _fresh_app_trees() -> Iterator[None]:
    """Each test starts with no app trees: an app's tree lives on by its name
    (a new ``App`` of that name continues it), and many tests reuse names."""
    from livemap._runtime import _app

    _app._trees.clear()
    yield
    _app._trees.clear()
