"""A level's load plan: which requests, how they are released, and when to stop.

Its own module so that planning a level (`bench.plan_level`, which `simulate` uses)
does not import the runner's asyncio and process-pool machinery.
"""

from __future__ import annotations

from dataclasses import dataclass

from memorywall.loadgen.records import RequestSpec

__all__ = ["LoadPlan"]


@dataclass(frozen=True, kw_only=True)
class LoadPlan:
    """One run: which requests, how they are released, and when to stop."""

    specs: tuple[RequestSpec, ...]  # measured requests; open loop: each has offset_s
    warmup: tuple[RequestSpec, ...] = ()  # sent first, one user each, excluded from results
    concurrency: int | None = None  # closed loop: users; open loop: optional cap
    open_loop: bool = False
    duration_s: float | None = None  # stop releasing new requests after this long
    timeout_s: float | None = None  # per request
