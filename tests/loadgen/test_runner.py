"""The runner against an in-memory target: who is sent, when, and how many at once.

No server: `FakeTarget` fills each record the way `GrpcTarget` does (perf_counter_ns
times, one token per message, usage at the end) after an optional asyncio delay, and
keeps a log of what it was asked to send and how many requests were in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time

import pytest

from memorywall.loadgen.records import RequestRecord, RequestSpec
from memorywall.loadgen.runner import LoadPlan, WorkerResult, run_plan, split_plan

MS = 1_000_000  # ns


class FakeTarget:
    """Implements the `Target` protocol in memory."""

    def __init__(self, delay_s: float = 0.0, chunks: int = 2) -> None:
        self.delay_s = delay_s
        self.chunks = chunks
        self.connected = False
        self.closed = False
        self.log: list[tuple[int, int, bool]] = []  # (index, sent_ns, warmup) in send order
        self.in_flight = 0
        self.max_in_flight = 0
        self.max_in_flight_warmup = 0

    async def connect(self) -> None:
        self.connected = True

    async def send(self, spec: RequestSpec, record: RequestRecord) -> None:
        assert self.connected, "send before connect"
        record.sent_ns = time.perf_counter_ns()
        self.log.append((spec.index, record.sent_ns, record.warmup))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if record.warmup:
            self.max_in_flight_warmup = max(self.max_in_flight_warmup, self.in_flight)
        try:
            for _ in range(self.chunks):
                await asyncio.sleep(self.delay_s / self.chunks)
                record.chunk_ns.append(time.perf_counter_ns())
                record.chunk_tokens.append(1)
        finally:
            self.in_flight -= 1
        record.finished_ns = time.perf_counter_ns()
        record.usage_prompt_tokens = spec.prompt_tokens
        record.usage_completion_tokens = self.chunks
        record.usage_cached_tokens = 0

    async def aclose(self) -> None:
        self.closed = True

    def sent(self, *, warmup: bool = False) -> list[int]:
        return [i for i, _, w in self.log if w == warmup]


def specs(n: int, offsets: list[float] | None = None) -> tuple[RequestSpec, ...]:
    return tuple(RequestSpec(i, 16, 2, None if offsets is None else offsets[i]) for i in range(n))


def indices(records: list[RequestRecord]) -> list[int]:
    """Indices of the measured records (warm-ups come back too, marked)."""
    return sorted(r.index for r in records if not r.warmup)


# ---- closed loop ----------------------------------------------------------------------------


@pytest.mark.parametrize("users", [1, 3, 5])
async def test_closed_loop_keeps_at_most_concurrency_in_flight(users):
    target = FakeTarget(delay_s=0.02)
    plan = LoadPlan(specs=specs(12), concurrency=users)
    result = await run_plan(target, plan, worker=3)
    assert isinstance(result, WorkerResult)
    assert target.max_in_flight == users  # reached, never exceeded
    assert sorted(target.sent()) == list(range(12))  # every spec exactly once
    assert indices(result.records) == list(range(12))
    assert all(r.ok and r.scheduled_ns is None and not r.warmup for r in result.records)
    assert {r.worker for r in result.records} == {3}
    assert result.wall_s >= -(-12 // users) * 0.02 * 0.9  # waves of users, 20 ms each
    # CPU time was measured, in seconds (not ns): above zero, below the threads' wall time.
    assert 0 < result.cpu_s < result.wall_s * (os.cpu_count() or 1)


async def test_closed_loop_without_concurrency_is_one_user():
    target = FakeTarget(delay_s=0.005)
    result = await run_plan(target, LoadPlan(specs=specs(5)))
    assert target.max_in_flight == 1
    assert [r.index for r in result.records] == list(range(5))  # one user sends in order


async def test_closed_loop_more_users_than_specs_sends_each_once():
    target = FakeTarget(delay_s=0.01)
    result = await run_plan(target, LoadPlan(specs=specs(3), concurrency=8))
    assert sorted(target.sent()) == [0, 1, 2]
    assert indices(result.records) == [0, 1, 2]
    assert target.max_in_flight == 3


async def test_closed_loop_user_sends_next_request_only_after_the_last_finishes():
    target = FakeTarget(delay_s=0.01)
    result = await run_plan(target, LoadPlan(specs=specs(4), concurrency=1))
    recs = sorted(result.records, key=lambda r: r.sent_ns)
    for prev, nxt in itertools.pairwise(recs):
        assert nxt.sent_ns >= prev.finished_ns


async def test_on_done_called_once_per_measured_record():
    target = FakeTarget()
    done: list[RequestRecord] = []
    plan = LoadPlan(specs=specs(6), warmup=specs(2), concurrency=2)
    result = await run_plan(target, plan, on_done=done.append)
    assert sorted(r.index for r in done) == list(range(6))
    assert all(not r.warmup for r in done)
    assert {id(r) for r in done} == {id(r) for r in result.records if not r.warmup}


async def test_closed_loop_duration_stops_releasing_new_requests():
    target = FakeTarget(delay_s=0.03)
    start = time.perf_counter_ns() + 5 * MS
    plan = LoadPlan(specs=specs(100), concurrency=1, duration_s=0.1)
    result = await run_plan(target, plan, start_ns=start)
    sent = len(result.records)
    assert 1 <= sent < 100  # ~4 fit in 0.1 s at 30 ms each; a loaded machine fits fewer
    assert sent <= 5
    assert sorted(target.sent()) == indices(result.records)
    stop = start + 100 * MS
    assert all(r.sent_ns < stop + 5 * MS for r in result.records)
    assert all(r.ok for r in result.records)  # the ones released run to completion


# ---- open loop ------------------------------------------------------------------------------


async def test_open_loop_sends_each_request_no_earlier_than_scheduled():
    offsets = [0.0, 0.02, 0.04, 0.06, 0.08, 0.10]
    target = FakeTarget(delay_s=0.005)
    start = time.perf_counter_ns() + 20 * MS
    plan = LoadPlan(specs=specs(6, offsets), open_loop=True)
    result = await run_plan(target, plan, start_ns=start, worker=1)
    assert indices(result.records) == list(range(6))
    for r in result.records:
        assert r.scheduled_ns == start + int(offsets[r.index] * 1e9)
        assert r.sent_ns >= r.scheduled_ns
        assert r.sent_ns - r.scheduled_ns < 50 * MS  # generous: loaded CI
        assert r.worker == 1


async def test_open_loop_does_not_wait_for_earlier_requests():
    # Requests last 200 ms but arrive every 10 ms: they overlap.
    offsets = [0.01 * i for i in range(5)]
    target = FakeTarget(delay_s=0.2)
    start = time.perf_counter_ns() + 10 * MS
    plan = LoadPlan(specs=specs(5, offsets), open_loop=True)
    result = await run_plan(target, plan, start_ns=start)
    assert target.max_in_flight == 5
    assert all(r.sent_ns - r.scheduled_ns < 100 * MS for r in result.records)


async def test_open_loop_sends_in_offset_order_whatever_the_spec_order():
    offsets = [0.06, 0.0, 0.03]
    target = FakeTarget()
    start = time.perf_counter_ns() + 10 * MS
    plan = LoadPlan(specs=specs(3, offsets), open_loop=True)
    result = await run_plan(target, plan, start_ns=start)
    assert target.sent() == [1, 2, 0]
    for r in result.records:
        assert r.scheduled_ns == start + int(offsets[r.index] * 1e9) <= r.sent_ns


async def test_open_loop_start_defaults_to_now():
    target = FakeTarget()
    before = time.perf_counter_ns()
    result = await run_plan(target, LoadPlan(specs=specs(2, [0.0, 0.01]), open_loop=True))
    after = time.perf_counter_ns()
    starts = {r.scheduled_ns - int([0.0, 0.01][r.index] * 1e9) for r in result.records}
    assert len(starts) == 1  # one shared start
    assert before <= starts.pop() <= after


async def test_open_loop_duration_stops_releasing_new_requests():
    offsets = [0.05 * i for i in range(20)]  # 0 .. 0.95 s
    target = FakeTarget(delay_s=0.005)
    start = time.perf_counter_ns() + 10 * MS
    plan = LoadPlan(specs=specs(20, offsets), open_loop=True, duration_s=0.175)
    t0 = time.perf_counter()
    result = await run_plan(target, plan, start_ns=start)
    assert indices(result.records) == [0, 1, 2, 3]  # offsets 0, .05, .10, .15 < .175
    assert sorted(target.sent()) == [0, 1, 2, 3]
    assert time.perf_counter() - t0 < 0.6  # did not wait for the later offsets


async def test_open_loop_max_concurrency_caps_requests_in_flight():
    target = FakeTarget(delay_s=0.03)
    start = time.perf_counter_ns() + 5 * MS
    plan = LoadPlan(specs=specs(6, [0.0] * 6), open_loop=True, concurrency=2)
    result = await run_plan(target, plan, start_ns=start)
    assert target.max_in_flight == 2
    assert indices(result.records) == list(range(6))
    assert all(r.scheduled_ns == start for r in result.records)
    # Held back by the cap, the later ones leave late, and the record keeps the lag.
    lags = sorted(r.sent_ns - r.scheduled_ns for r in result.records)
    assert lags[-1] >= 2 * 25 * MS


async def test_open_loop_without_cap_sends_a_burst_at_once():
    target = FakeTarget(delay_s=0.03)
    plan = LoadPlan(specs=specs(6, [0.0] * 6), open_loop=True)
    await run_plan(target, plan)
    assert target.max_in_flight == 6


# ---- warm-up --------------------------------------------------------------------------------


@pytest.mark.parametrize("open_loop", [False, True])
async def test_warmup_is_sent_first_one_at_a_time_and_returned_marked(open_loop):
    target = FakeTarget(delay_s=0.005)
    warm = tuple(RequestSpec(-1 - i, 16, 2) for i in range(3))
    measured = specs(4, [0.0, 0.0, 0.01, 0.01] if open_loop else None)
    plan = LoadPlan(specs=measured, warmup=warm, concurrency=4, open_loop=open_loop)
    result = await run_plan(target, plan)
    assert [w for _, _, w in target.log] == [True] * 3 + [False] * 4  # warm-ups first
    assert target.sent(warmup=True) == [-1, -2, -3]
    assert target.max_in_flight_warmup == 1
    # Warm-ups come back marked, so metrics can count them and leave them out.
    assert indices(result.records) == [0, 1, 2, 3]
    assert sorted(r.index for r in result.records if r.warmup) == [-3, -2, -1]
    # Measurement starts after the warm-ups: every measured send is after the last warm-up.
    last_warm = max(ns for _, ns, w in target.log if w)
    assert all(r.sent_ns > last_warm for r in result.records if not r.warmup)


# ---- split_plan -----------------------------------------------------------------------------


def _union(parts: list[LoadPlan], attr: str = "specs") -> list[RequestSpec]:
    return sorted((s for p in parts for s in getattr(p, attr)), key=lambda s: s.index)


def _assert_dealt(parts: list[LoadPlan], plan: LoadPlan) -> None:
    """Union equals the input, no spec twice, settings kept."""
    assert _union(parts) == sorted(plan.specs, key=lambda s: s.index)
    assert sum(len(p.specs) for p in parts) == len(plan.specs)
    assert _union(parts, "warmup") == sorted(plan.warmup, key=lambda s: s.index)
    for p in parts:
        assert p.specs, "a worker with nothing to send"
        assert p.open_loop == plan.open_loop
        assert p.duration_s == plan.duration_s and p.timeout_s == plan.timeout_s


def test_split_closed_loop_shares_users_and_specs():
    plan = LoadPlan(specs=specs(10), concurrency=5, duration_s=3.0, timeout_s=2.0)
    parts = split_plan(plan, 2)
    assert len(parts) == 2
    _assert_dealt(parts, plan)
    assert sorted(p.concurrency for p in parts) == [2, 3]


@pytest.mark.parametrize("users, workers, expected", [(2, 4, 2), (1, 3, 1), (3, 3, 3)])
def test_split_closed_loop_with_fewer_users_than_workers_uses_fewer_workers(
    users, workers, expected
):
    plan = LoadPlan(specs=specs(9), concurrency=users)
    parts = split_plan(plan, workers)
    assert len(parts) == expected
    _assert_dealt(parts, plan)
    assert all(p.concurrency == 1 for p in parts)
    assert sum(p.concurrency for p in parts) == users


def test_split_closed_loop_without_concurrency_is_one_worker():
    plan = LoadPlan(specs=specs(5))
    parts = split_plan(plan, 3)
    assert len(parts) == 1
    _assert_dealt(parts, plan)


def test_split_closed_loop_fewer_specs_than_workers():
    plan = LoadPlan(specs=specs(2), concurrency=4)
    parts = split_plan(plan, 4)
    assert len(parts) == 2
    _assert_dealt(parts, plan)


def test_split_open_loop_keeps_absolute_offsets():
    offsets = [0.01 * i for i in range(7)]
    plan = LoadPlan(specs=specs(7, offsets), open_loop=True)
    parts = split_plan(plan, 3)
    assert len(parts) == 3
    _assert_dealt(parts, plan)
    for p in parts:
        assert all(s.offset_s == offsets[s.index] for s in p.specs)
        assert p.concurrency is None
        assert [s.index for s in p.specs] == sorted(s.index for s in p.specs)


def test_split_open_loop_fewer_specs_than_workers():
    plan = LoadPlan(specs=specs(2, [0.0, 0.1]), open_loop=True)
    parts = split_plan(plan, 4)
    assert len(parts) == 2
    _assert_dealt(parts, plan)


def test_split_open_loop_shares_the_cap():
    plan = LoadPlan(specs=specs(8, [0.0] * 8), open_loop=True, concurrency=5)
    parts = split_plan(plan, 2)
    _assert_dealt(parts, plan)
    assert sum(p.concurrency for p in parts) == 5


def test_split_deals_warmup_too():
    warm = tuple(RequestSpec(-1 - i, 8, 2) for i in range(5))
    plan = LoadPlan(specs=specs(6), warmup=warm, concurrency=3)
    parts = split_plan(plan, 3)
    _assert_dealt(parts, plan)


def test_split_one_worker_is_the_plan():
    plan = LoadPlan(specs=specs(4, [0, 0.1, 0.2, 0.3]), open_loop=True, concurrency=2)
    assert split_plan(plan, 1) == [plan]


@pytest.mark.parametrize("cap, workers", [(1, 2), (2, 4)])
def test_split_open_loop_cap_below_workers_loses_no_spec(cap, workers):
    plan = LoadPlan(specs=specs(8, [0.01 * i for i in range(8)]), open_loop=True, concurrency=cap)
    parts = split_plan(plan, workers)
    _assert_dealt(parts, plan)
