"""The live engine's clock: absolute-deadline sleeps that never return early."""

from __future__ import annotations

import asyncio

import pytest

from memorywall.server.engine.clock import MonotonicClock


async def _sleeps(clock: MonotonicClock, n: int, step_s: float) -> list[float]:
    """How late each of `n` back-to-back sleeps to deadlines `step_s` apart woke."""
    deadline = clock.now()
    late = []
    for _ in range(n):
        deadline += step_s
        await clock.sleep_until(deadline)
        late.append(clock.now() - deadline)
    return late


def test_sleeps_never_wake_before_their_deadline_on_any_loop():
    clock = MonotonicClock()
    try:
        # Two event loops in turn: the timerfd moves to the second one's epoll set.
        for _ in range(2):
            late = asyncio.run(_sleeps(clock, 50, 0.0005))
            assert min(late) >= 0
    finally:
        clock.close()
    clock.close()  # twice: a no-op


async def test_a_cancelled_sleep_leaves_the_clock_usable():
    clock = MonotonicClock()
    try:
        sleeper = asyncio.ensure_future(clock.sleep_until(clock.now() + 10.0))
        await asyncio.sleep(0)
        sleeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeper
        deadline = clock.now() + 0.002
        await asyncio.wait_for(clock.sleep_until(deadline), 5.0)
        assert clock.now() >= deadline
    finally:
        clock.close()
