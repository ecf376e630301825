"""Waiting in tests for a condition the code under test reaches on its own loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def wait_until(condition: Callable[[], bool], within_s: float, every_s: float = 0.01) -> None:
    """Return once `condition()` holds; fail the test if it does not within `within_s`."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {within_s} s"
        await asyncio.sleep(every_s)
