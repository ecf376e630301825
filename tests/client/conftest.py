"""Fixtures: a fresh fake engine per test, on the test's own loop or in a thread."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from fake_engine import FakeServer, ThreadedFake, start_fake


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    """A fake served on the test's event loop (function scope, like the tests)."""
    server = await start_fake()
    yield server
    await server.stop()


@pytest.fixture
def threaded_fake() -> Iterator[ThreadedFake]:
    """A fake on its own loop in a background thread, for the blocking client."""
    server = ThreadedFake()
    yield server
    server.close()
