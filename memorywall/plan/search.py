"""The plan's load search for one candidate: is the SLO held at a load, and the highest
load where it is (double while it holds, bisect once it breaks)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from memorywall.loadgen.records import RequestRecord
from memorywall.loadgen.slo import Slo

SATURATED_GAIN = 1.05  # a doubling of load that adds less goodput than this has saturated
FLOOR_FRACTION = 1 / 64  # the lightest load tried, as a share of the starting load
MAX_DOUBLINGS = 8
# Open loop: a queue that grows by more than this from the second quarter of the run to
# the last means the load was not sustained (see `kept_up`).
QUEUE_GROWTH, QUEUE_SLACK = 1.2, 8
PERCENTILE = "p99"


@dataclass(frozen=True, kw_only=True)
class Trial:
    """One simulated load level of a candidate."""

    load: float
    holds: bool
    result: dict
    peak_in_flight: int

    @property
    def goodput_tok_s(self) -> float:
        """Output tokens/s of the requests that met every bound."""
        r = self.result
        if not r.get("completed") or r.get("request_goodput") is None:
            return 0.0
        return r["request_goodput"] * r["total_output_tokens"] / r["completed"]


def slo_holds(slo: Slo, result: dict) -> bool:
    """Every request completed and every bound holds at the 99th percentile.

    A run with no TPOT (one output token per request) passes a TPOT bound, as in vLLM.
    """
    if result.get("failed") or not result.get("completed"):
        return False
    for name, bound in (("ttft", slo.ttft_s), ("tpot", slo.tpot_s), ("e2el", slo.e2el_s)):
        value = result.get(f"{PERCENTILE}_{name}_ms")
        if bound is not None and value is not None and value / 1e3 > bound:
            return False
    return True


def in_flight(records: Sequence[RequestRecord]) -> tuple[list[int], list[int], int]:
    """Sorted send and finish times of the measured requests, and the most in flight at
    once (between send and last token, queued ones included)."""
    sent = sorted(r.sent_ns for r in records if not r.warmup)
    done = sorted(
        r.finished_ns if r.finished_ns is not None else r.sent_ns for r in records if not r.warmup
    )
    peak = now = j = 0
    for t in sent:
        while j < len(done) and done[j] <= t:
            j, now = j + 1, now - 1
        now += 1
        peak = max(peak, now)
    return sent, done, peak


def kept_up(sent: Sequence[int], done: Sequence[int]) -> bool:
    """Open loop: requests in flight, averaged over the arrivals of the last quarter of the
    run, are not many more than over the second quarter. A run of finitely many requests
    can end before an overload's queue pushes TTFT past its bound; a queue still growing
    gives the overload away. Averaging over a quarter's arrivals smooths the Poisson
    swings of a steady state (single instants swing by half)."""
    n = len(sent)
    if n < 8:
        return True

    def mean_at(times: Sequence[int]) -> float:
        return sum(
            bisect.bisect_right(sent, t) - bisect.bisect_right(done, t) for t in times
        ) / len(times)

    second, last = mean_at(sent[n // 4 : n // 2]), mean_at(sent[3 * n // 4 :])
    return last <= QUEUE_GROWTH * second + QUEUE_SLACK


def search_load(run: Callable[[float], Trial], start: float, integer: bool, tol: float) -> None:
    """Find the highest load that holds: from `start`, double while it holds (and goodput
    grows), else drop to the floor; then bisect (geometrically) between held and broken."""

    def snap(x: float) -> float:
        return float(max(1, round(x))) if integer else x

    start = snap(start)
    floor = snap(start * FLOOR_FRACTION)
    held, broke = None, None
    first = run(start)
    if first.holds:
        held = first
        for _ in range(MAX_DOUBLINGS):
            nxt = run(snap(held.load * 2))
            if not nxt.holds:
                broke = nxt
                break
            saturated = nxt.goodput_tok_s < SATURATED_GAIN * held.goodput_tok_s
            held = nxt
            if saturated:
                return
        else:
            return
    else:
        broke = first
        if floor >= start:
            return
        low = run(floor)
        if not low.holds:
            return
        held = low
    while broke.load / held.load > 1 + tol:
        mid = snap(math.sqrt(held.load * broke.load))
        if mid in (held.load, broke.load):
            return
        t = run(mid)
        if t.holds:
            held = t
        else:
            broke = t
