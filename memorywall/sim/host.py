"""What the whole process has cost its host so far: wall time since it started and CPU
time (its own and its finished children's), for "x real time" figures that cover a
command end to end (interpreter start, imports and files included), not just the engine.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

__all__ = ["HostCost", "since_start"]

# Fallback origin where /proc is absent: this module's import, early in any command.
_IMPORTED = time.perf_counter()


@dataclass(frozen=True, slots=True)
class HostCost:
    wall_s: float  # since the process started (Linux), else since this module's import
    cpu_s: float  # user + system, this process and its waited-for children (`--jobs`)
    from_start: bool  # whether `wall_s` counts from the process's start


def _age_s() -> float | None:
    """Seconds since this process started, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: ticks after boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def since_start() -> HostCost:
    own, children = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    age = _age_s()
    if age is None:
        return HostCost(wall_s=time.perf_counter() - _IMPORTED, cpu_s=cpu, from_start=False)
    return HostCost(wall_s=age, cpu_s=cpu, from_start=True)
