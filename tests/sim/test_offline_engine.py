"""The offline engine on a virtual clock, against schedules worked out by hand.

The step model costs 10 ms + 0.1 ms per token the step computes, so every time below
follows from which tokens each step carries. No test sleeps: the clock jumps.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import pytest

from memorywall.core import Batch
from memorywall.errors import ContextLengthError
from memorywall.server.engine.offline import OfflineEngine, Timeline
from memorywall.server.engine.scheduler import EngineConfig, EngineCore, ModelLimits, Request

BASE_S, PER_TOKEN_S = 0.010, 1e-4


@dataclass(frozen=True)
class _Cost:
    time_s: float
    energy_j: float


class TokenStepModel:
    def __init__(self) -> None:
        self.batches: list[Batch] = []

    def step_cost(self, batch: Batch) -> _Cost:
        self.batches.append(batch)
        tokens = len(batch.decode_contexts) + sum(c.new_tokens for c in batch.prefill)
        return _Cost(time_s=BASE_S + PER_TOKEN_S * tokens, energy_j=float(tokens))


def step_s(tokens: int) -> float:
    return BASE_S + PER_TOKEN_S * tokens


def engine(*, kv_tokens: int = 64 * 1024, fast: bool = True, **config) -> OfflineEngine:
    limits = ModelLimits(
        kv_capacity_tokens=kv_tokens,
        max_context=4096,
        vocab_size=32_000,
        eos_token_ids=frozenset({0}),
    )
    core = EngineCore(TokenStepModel(), limits, EngineConfig(**config))
    return OfflineEngine(core, fast=fast)


def request(rid: str, prompt: tuple[int, ...], max_tokens: int) -> Request:
    return Request(request_id=rid, prompt_ids=prompt, max_tokens=max_tokens, ignore_eos=True)


def prompt(first: int, n: int) -> tuple[int, ...]:
    return tuple(range(first, first + n))


def times(timeline: Timeline) -> list[float]:
    return timeline.group_times_s


@pytest.mark.parametrize("fast", [True, False])
def test_one_request(fast: bool) -> None:
    e = engine(fast=fast)
    e.submit(request("a", prompt(1, 8), 10), 0.5)  # the clock jumps to the arrival
    e.run()
    a = e.timelines["a"]
    expected = [0.5 + step_s(8)]
    for _ in range(9):
        expected.append(expected[-1] + step_s(1))
    assert times(a) == pytest.approx(expected, abs=1e-12)
    assert a.group_tokens == [1] * 10
    assert a.completion_tokens == 10
    assert a.first_scheduled_s == 0.5
    assert e.now_s == pytest.approx(expected[-1])


def test_two_requests_with_chunked_prefill() -> None:
    """Budget 10: A's 8 tokens and 2 of B's; then A decodes beside B's other 6."""
    e = engine(max_num_batched_tokens=10)
    e.submit(request("a", prompt(1, 8), 3), 0.0)
    e.submit(request("b", prompt(100, 8), 3), 0.0)
    e.run()
    t1 = step_s(10)
    t2 = t1 + step_s(1 + 6)
    t3 = t2 + step_s(2)
    t4 = t3 + step_s(1)  # a has finished
    assert times(e.timelines["a"]) == pytest.approx([t1, t2, t3])
    assert times(e.timelines["b"]) == pytest.approx([t2, t3, t4])
    batches = e.core.step_model.batches
    prefill = [[(c.new_tokens, c.cached_tokens) for c in b.prefill] for b in batches]
    assert prefill[:2] == [[(8, 0), (2, 0)], [(6, 2)]]


def test_kv_exhaustion_preempts_the_latest_and_recomputes_it() -> None:
    """Two blocks of 16 tokens. A and B (15-token prompts) each hold one; the step after
    their second token A needs a second block, so B is preempted (its cached block then
    evicted for A). B comes back when A finishes and recomputes its 17 tokens."""
    e = engine(kv_tokens=32)
    e.submit(request("a", prompt(1, 15), 10), 0.0)
    e.submit(request("b", prompt(100, 15), 10), 0.0)
    e.run()
    t1 = step_s(30)
    t2 = t1 + step_s(2)
    a_times = [t1, t2] + [t2 + k * step_s(1) for k in range(1, 9)]
    assert times(e.timelines["a"]) == pytest.approx(a_times)
    b3 = a_times[-1] + step_s(17)
    b_times = [t1, t2, b3] + [b3 + k * step_s(1) for k in range(1, 8)]
    assert times(e.timelines["b"]) == pytest.approx(b_times)
    assert (e.timelines["a"].preemptions, e.timelines["b"].preemptions) == (0, 1)
    assert e.core.counters.preemptions == 1
    assert e.core.kv.pool.free_blocks == 2


def test_prefix_hit_costs_only_the_uncached_tokens() -> None:
    shared = prompt(1, 32)
    e = engine()
    e.submit(request("a", shared + prompt(500, 8), 2), 0.0)
    e.submit(request("b", shared + prompt(900, 8), 2), 1.0)  # after a is done
    e.run()
    b = e.timelines["b"]
    assert b.cached_tokens == 32
    assert times(b) == pytest.approx([1.0 + step_s(8), 1.0 + step_s(8) + step_s(1)])
    assert e.core.prefix_cache_stats().hits == 32


def test_closed_loop_from_on_finish_arrives_at_the_finish_time() -> None:
    e = engine()
    sent = []

    def next_one(timeline: Timeline) -> None:
        if len(sent) < 3:
            rid = f"r{len(sent)}"
            sent.append(rid)
            e.submit(request(rid, prompt(10 * len(sent), 4), 2), timeline.last_token_s)

    e.on_finish = next_one
    e.submit(request("first", prompt(1, 4), 2), 0.0)
    e.run()
    order = ["first", *sent]
    for before, after in itertools.pairwise(order):
        assert e.timelines[after].arrival_s == e.timelines[before].last_token_s
        assert e.timelines[after].first_scheduled_s == e.timelines[after].arrival_s


def test_a_refused_request_finishes_at_once_with_its_error() -> None:
    e = engine()
    finished = []
    e.on_finish = finished.append
    e.submit(request("huge", prompt(1, 4000), 500), 0.25)
    e.run()
    assert [t.request_id for t in finished] == ["huge"]
    assert isinstance(finished[0].error, ContextLengthError)
    assert e.refused == finished and not e.timelines


def test_virtual_clock_does_not_wait_for_modelled_time() -> None:
    """A thousand seconds of arrivals run in host milliseconds."""
    e = engine()
    for i in range(20):
        e.submit(request(f"r{i}", prompt(10 * i, 16), 32), 50.0 * i)
    wall0 = time.perf_counter()
    e.run()
    assert e.now_s > 950.0
    assert time.perf_counter() - wall0 < 5.0  # generous for a loaded CI machine
