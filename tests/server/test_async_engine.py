"""AsyncEngine, the live driver, over the real performance core (llama-3.1-8b on wse-3).

Wall-clock bounds are generous (a loaded 2-core CI machine); modelled times are exact.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from engine_fakes import FakeClock

from memorywall.core import Batch, PrefillChunk, StepModel
from memorywall.errors import DrainingError, DuplicateRequestError, InvalidRequestError
from memorywall.server.engine.api import Finished, TokenGroup
from memorywall.server.engine.build import build_core
from memorywall.server.engine.live import AsyncEngine, RequestStream
from memorywall.server.engine.scheduler import EngineConfig, FinishReason, Request
from memorywall.server.engine.tokens import token_text

TIMEOUT_S = 10.0


def request(rid: str, max_tokens: int, prompt_len: int = 100, **kw) -> Request:
    return Request(
        request_id=rid,
        prompt_ids=tuple(range(1, prompt_len + 1)),
        max_tokens=max_tokens,
        ignore_eos=kw.pop("ignore_eos", True),
        **kw,
    )


async def collect(stream: RequestStream, timeout_s: float = TIMEOUT_S):
    async def read():
        return [event async for event in stream]

    events = await asyncio.wait_for(read(), timeout_s)
    groups = [e for e in events if isinstance(e, TokenGroup)]
    assert all(isinstance(e, TokenGroup) for e in events[:-1])
    assert isinstance(events[-1], Finished)
    return groups, events[-1]


def ids_of(groups: list[TokenGroup]) -> list[int]:
    return [t for g in groups for t in g.token_ids]


def times_of(groups: list[TokenGroup]) -> list[float]:
    return [t for g in groups for t in g.times_s]


async def make_engine(deployment, clock=None, **kw) -> AsyncEngine:
    core, _ = build_core(deployment, EngineConfig())
    engine = AsyncEngine(core, clock=clock, max_messages_per_s=kw.pop("rate", 16_000), **kw)
    await engine.start()
    return engine


@pytest.fixture
async def engine(wse3_8b) -> AsyncIterator[AsyncEngine]:
    engine = await make_engine(wse3_8b)
    yield engine
    await asyncio.wait_for(engine.drain(0.0), TIMEOUT_S)
    await asyncio.wait_for(engine.stop(), TIMEOUT_S)


@pytest.fixture
async def fake_engine(wse3_8b) -> AsyncIterator[AsyncEngine]:
    # A virtual clock against real CPU time would read as a saturated host: say idle.
    engine = await make_engine(wse3_8b, clock=FakeClock(), cpu_time=lambda: 0.0)
    yield engine
    await asyncio.wait_for(engine.drain(0.0), TIMEOUT_S)
    await asyncio.wait_for(engine.stop(), TIMEOUT_S)


async def test_stream_yields_token_groups_then_one_finished(engine):
    started = time.monotonic()
    stream = engine.submit(request("r", max_tokens=200))
    groups, final = await collect(stream, timeout_s=5.0)
    wall_s = time.monotonic() - started

    ids = ids_of(groups)
    times = times_of(groups)
    assert len(ids) == 200
    assert len(times) == 200
    assert times == sorted(times)
    assert all(len(g.token_ids) == len(g.times_s) for g in groups)
    assert "".join(g.text for g in groups) == "".join(token_text(i) for i in ids)

    assert final.request_id == "r"
    assert final.reason is FinishReason.LENGTH
    assert final.completion_tokens == 200
    assert final.prompt_tokens == 100
    assert final.ttft_s == pytest.approx(times[0])
    assert final.e2e_s == pytest.approx(times[-1])
    assert final.queue_s >= 0 and final.prefill_s > 0 and final.decode_s > 0
    assert final.queue_s + final.prefill_s == pytest.approx(final.ttft_s)
    assert final.ttft_s + final.decode_s == pytest.approx(final.e2e_s)
    # ~200 x 0.56 ms modelled; a loaded host's stalls move the timeline later, never earlier.
    assert 0.08 < final.e2e_s - final.host_stall_s < 0.2
    assert final.host_stall_s >= final.decode_host_stall_s >= 0
    assert final.energy_j > 0
    # The live driver sleeps to modelled deadlines: never faster than the model.
    assert wall_s >= 0.9 * final.e2e_s
    assert await asyncio.wait_for(stream.next_event(), 1.0) is None


async def test_two_concurrent_requests_both_finish(engine):
    a = engine.submit(request("a", max_tokens=150))
    b = engine.submit(request("b", max_tokens=100, prompt_len=300))
    (ga, fa), (gb, fb) = await asyncio.gather(collect(a), collect(b))
    assert len(ids_of(ga)) == fa.completion_tokens == 150
    assert len(ids_of(gb)) == fb.completion_tokens == 100
    assert {fa.reason, fb.reason} == {FinishReason.LENGTH}
    stats = engine.stats()
    assert stats.requests_finished == 2
    assert stats.running == stats.waiting == stats.kv_used_tokens == 0


async def test_abort_mid_stream_ends_it_with_abort_and_frees_kv(engine):
    stream = engine.submit(request("long", max_tokens=20_000))
    first = await asyncio.wait_for(stream.next_event(), TIMEOUT_S)
    assert isinstance(first, TokenGroup)
    assert engine.stats().kv_used_tokens > 0
    assert engine.abort("long") is True
    assert engine.stats().kv_used_tokens == 0
    assert engine.stats().running == 0
    rest, final = await collect(stream)
    assert final.reason is FinishReason.ABORT
    assert final.completion_tokens == len(first.token_ids) + len(ids_of(rest))
    assert final.completion_tokens < 20_000
    assert engine.abort("long") is False
    assert engine.stats().requests_aborted == 1
    # The id is free again once aborted.
    _, again = await collect(engine.submit(request("long", max_tokens=5)))
    assert again.completion_tokens == 5


async def test_drain_rejects_new_work_and_cuts_streams_past_the_grace(engine):
    long = engine.submit(request("long", max_tokens=20_000))  # ~11 s modelled
    short = engine.submit(request("short", max_tokens=20))
    await asyncio.wait_for(long.next_event(), TIMEOUT_S)
    started = time.monotonic()
    drain = asyncio.create_task(engine.drain(0.3))
    await asyncio.sleep(0)
    assert engine.draining
    with pytest.raises(DrainingError):
        engine.submit(request("late", max_tokens=5))
    _, short_final = await collect(short)
    assert short_final.completion_tokens == 20

    async def read_all():
        async for _ in long:
            pass

    with pytest.raises(DrainingError, match="shut down"):
        await asyncio.wait_for(read_all(), TIMEOUT_S)
    await asyncio.wait_for(drain, TIMEOUT_S)
    assert 0.25 <= time.monotonic() - started < 5.0
    stats = engine.stats()
    assert stats.draining
    assert stats.running == stats.waiting == stats.kv_used_tokens == 0


async def test_drain_with_nothing_live_returns_at_once(engine):
    started = time.monotonic()
    await asyncio.wait_for(engine.drain(5.0), TIMEOUT_S)
    assert time.monotonic() - started < 1.0


async def test_bad_requests_raise_and_hold_nothing(engine):
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.submit(request("bad", max_tokens=0))
    stream = engine.submit(request("dup", max_tokens=50))
    with pytest.raises(DuplicateRequestError):
        engine.submit(request("dup", max_tokens=5))
    _, final = await collect(stream)
    assert final.completion_tokens == 50
    assert engine.stats().requests_finished == 1


async def test_stats_are_consistent_after_traffic(engine, wse3_8b):
    streams = [engine.submit(request(f"r{i}", max_tokens=30 + 10 * i)) for i in range(4)]
    results = await asyncio.gather(*(collect(s) for s in streams))
    stats = engine.stats()
    assert stats.steps > 0
    assert stats.tokens_generated == sum(f.completion_tokens for _, f in results) == 30 * 4 + 60
    assert stats.requests_finished == 4
    assert stats.requests_aborted == 0
    assert stats.running == stats.waiting == stats.kv_used_tokens == 0
    assert stats.kv_total_tokens == engine.core.kv.pool.capacity_tokens
    assert 0 < wse3_8b.kv_capacity_tokens - stats.kv_total_tokens < 16
    assert stats.lag.samples >= 4
    assert stats.lag.max_s >= stats.lag.p50_s >= 0  # never handed out before it was due
    assert stats.modelled_energy_j == pytest.approx(sum(f.energy_j for _, f in results))
    assert stats.uptime_s > 0
    assert not stats.draining
    assert stats.stream_interval_s == 0


# --- on a fake clock: modelled times are exact -----------------------------------------------


async def test_fake_clock_times_match_the_step_model(fake_engine, wse3_8b):
    stream = fake_engine.submit(request("r", max_tokens=10))
    groups, final = await collect(stream)
    model = StepModel(wse3_8b)
    prefill_s = model.step_cost(Batch(prefill=[PrefillChunk(100)])).time_s
    decode_s = [model.step_cost(Batch(decode_contexts=[100 + k])).time_s for k in range(9)]
    expected = [prefill_s]
    for d in decode_s:
        expected.append(expected[-1] + d)
    assert times_of(groups) == pytest.approx(expected, rel=1e-9)
    assert final.ttft_s == pytest.approx(prefill_s, rel=1e-9)
    assert final.queue_s == 0
    lag = fake_engine.stats().lag
    assert lag.samples == len(groups)
    assert 0 <= lag.max_s < lag.threshold_s  # read at most a step or so after it was due


async def test_min_interval_groups_tokens_but_never_holds_the_first(fake_engine):
    stream = fake_engine.submit(request("r", max_tokens=300), min_interval_s=0.02)
    groups, final = await collect(stream)
    ids = ids_of(groups)
    assert len(ids) == final.completion_tokens == 300
    assert len(groups[0].token_ids) == 1
    assert times_of(groups)[0] == pytest.approx(final.ttft_s)
    # ~0.17 s modelled in 20 ms intervals: about ten messages, not 300.
    assert 3 <= len(groups) <= 20
    assert times_of(groups) == sorted(times_of(groups))


async def test_natural_length_stream_ends_with_eos_and_no_eos_text(fake_engine, wse3_8b):
    eos = set(wse3_8b.model.eos_token_ids)
    stopped = 0
    for i in range(10):
        # Each its own sampling seed: the same prompt and seed would end at the same length.
        r = request(f"r{i}", max_tokens=64, ignore_eos=False, min_tokens=2, sampling_seed=i)
        stream = fake_engine.submit(r)
        groups, final = await collect(stream)
        ids = ids_of(groups)
        assert 2 <= len(ids) == final.completion_tokens <= 64
        if final.reason is FinishReason.STOP:
            stopped += 1
            assert ids[-1] in eos
            text = "".join(g.text for g in groups)
            assert text == "".join(token_text(t) for t in ids[:-1])
        else:
            assert len(ids) == 64
    assert stopped >= 1
