"""Waking at absolute monotonic deadlines with sub-millisecond precision.

asyncio's epoll loop rounds timer waits up to whole milliseconds, which would
stretch a wafer's 0.5 ms steps. On Linux a timerfd armed at the absolute
deadline joins the loop's epoll set instead, so the loop wakes when the
kernel timer fires. Elsewhere: sleep to just short of the deadline, then yield
until it passes.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import sys
import time
from typing import Protocol

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep_until(self, deadline_s: float) -> None: ...

    def close(self) -> None: ...


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.timerfd_create  # noqa: B018 - probe for the symbol
        return libc
    except (OSError, AttributeError):
        return None


class MonotonicClock:
    """`time.monotonic()` (CLOCK_MONOTONIC on Linux) with precise absolute-deadline sleeps."""

    def __init__(self) -> None:
        self._libc = _libc()
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop watching the timerfd
        self._waiter: asyncio.Future[None] | None = None  # the sleep in progress
        self._spec = _Itimerspec()  # one deadline buffer, rewritten each sleep
        self._spec_ref = ctypes.byref(self._spec)
        if self._libc is not None:
            fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
            self._fd = fd if fd >= 0 else -1
            self._settime = self._libc.timerfd_settime

    @property
    def precise(self) -> bool:
        return self._fd >= 0

    def now(self) -> float:
        return time.monotonic()

    async def sleep_until(self, deadline_s: float) -> None:
        if deadline_s <= time.monotonic():
            return
        if self._fd < 0:
            await self._sleep_and_yield(deadline_s)
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        spec = self._spec
        spec.it_value.tv_sec = int(deadline_s)
        spec.it_value.tv_nsec = int((deadline_s - int(deadline_s)) * 1e9)
        if self._settime(self._fd, _TFD_TIMER_ABSTIME, self._spec_ref, None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")
        if self._loop is not loop:
            # The timerfd stays in the loop's epoll set between sleeps: adding and removing
            # it each step cost two system calls a step.
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._fd)
            loop.add_reader(self._fd, self._fired)
            self._loop = loop
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def _fired(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @staticmethod
    async def _sleep_and_yield(deadline_s: float) -> None:
        remaining = deadline_s - time.monotonic()
        if remaining > 0.002:
            await asyncio.sleep(remaining - 0.0015)
        while time.monotonic() < deadline_s:
            await asyncio.sleep(0)

    def close(self) -> None:
        if self._fd >= 0:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._fd)
            self._loop = None
            os.close(self._fd)
            self._fd = -1
