"""Waiting in tests for a condition the code under test reaches on its own: poll it, never
sleep a fixed time and hope. One helper for the tests that wait on their event loop
(`wait_until`) and one for plain threads and processes (`block_until`)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def _failure(within_s: float, why: Callable[[], object] | None) -> str:
    message = f"condition not met within {within_s} s"
    return f"{message}: {why()}" if why is not None else message


async def wait_until(
    condition: Callable[[], T | Awaitable[T]],
    within_s: float,
    every_s: float = 0.01,
    why: Callable[[], object] | None = None,
) -> T:
    """Return `condition()`'s first truthy value (awaited, when it is a coroutine function:
    a server's state read over RPC); fail the test if none comes within `within_s`, saying
    `why()` (the state the test waited on) when given."""
    deadline = time.monotonic() + within_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]  # not an awaitable once awaited
        assert time.monotonic() < deadline, _failure(within_s, why)
        await asyncio.sleep(every_s)


def block_until(
    condition: Callable[[], T],
    within_s: float,
    every_s: float = 0.01,
    why: Callable[[], object] | None = None,
) -> T:
    """`wait_until` for code outside an event loop: the same, sleeping the thread."""
    deadline = time.monotonic() + within_s
    while not (value := condition()):
        assert time.monotonic() < deadline, _failure(within_s, why)
        time.sleep(every_s)
    return value
