"""Pacing in the live engine: never faster than the model when the host stalls, and token
grouping only under the message budget, never later than `max_hold_s` (or one step).

On a stepping test clock (no wall-clock timing): readers run at the time each step's
tokens were handed out, then the clock jumps to the next deadline, or past it where the
test stalls the host.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from dataclasses import dataclass, field

import pytest
from engine_fakes import SteppingClock

from memorywall.errors import ConfigError
from memorywall.server.engine.api import Finished, TokenGroup
from memorywall.server.engine.build import build_core
from memorywall.server.engine.live import HOLD_STEPS, MAX_HOLD_S, AsyncEngine
from memorywall.server.engine.pacing import FLOOR_PER_S, MessageBudget
from memorywall.server.engine.scheduler import EngineConfig, Request
from memorywall.server.fronts.metrics import PrometheusMetrics

TIMEOUT_S = 10.0


@dataclass
class Received:
    """One stream as a reader saw it: each token's due time and hand-off time (engine clock)."""

    due_s: list[float] = field(default_factory=list)
    got_s: list[float] = field(default_factory=list)
    group_sizes: list[int] = field(default_factory=list)
    final: Finished | None = None


async def read(engine: AsyncEngine, rid: str, max_tokens: int) -> Received:
    arrival = engine.now()
    request = Request(
        request_id=rid, prompt_ids=tuple(range(1, 101)), max_tokens=max_tokens, ignore_eos=True
    )
    stream = engine.submit(request)
    out = Received()
    async for event in stream:
        if isinstance(event, TokenGroup):
            out.due_s += [arrival + t for t in event.times_s]
            out.got_s += [engine.now()] * len(event.token_ids)
            out.group_sizes.append(len(event.token_ids))
        else:
            out.final = event
    return out


async def run(deployment, clock, streams: int, max_tokens: int, rate: float, metrics=None, **kw):
    core, _ = build_core(deployment, EngineConfig())
    kw.setdefault("cpu_time", lambda: 0.0)  # an idle process: the budget stays at its ceiling
    engine = AsyncEngine(
        core,
        clock=clock,
        max_messages_per_s=rate,
        observers=[metrics] if metrics is not None else (),
        **kw,
    )
    await engine.start()
    try:
        reads = (read(engine, f"r{i}", max_tokens) for i in range(streams))
        results = await asyncio.wait_for(asyncio.gather(*reads), TIMEOUT_S)
        return engine, results
    finally:
        await asyncio.wait_for(engine.stop(), TIMEOUT_S)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


# --- never faster than the model --------------------------------------------------------------

STALL_S = 0.030  # the host wakes 30 ms late once: ~50 wafer decode steps


async def test_a_stalled_host_moves_the_timeline_instead_of_bursting(wse3_8b, caplog):
    caplog.set_level(logging.WARNING, logger="memorywall.engine")
    clock = SteppingClock(stalls={40: STALL_S})
    engine, results = await run(wse3_8b, clock, streams=4, max_tokens=120, rate=1e6)
    decode_step_s = min(min(gaps(r.due_s)) for r in results)
    assert decode_step_s > 1e-4  # the wafer's decode steps, ~0.56 ms
    for r in results:
        assert len(r.got_s) == 120
        # No catch-up: tokens of a stream reach the reader no closer together than a
        # modelled decode step (back-to-back steps would hand several out at one time).
        assert min(g for g in gaps(r.got_s) if g > 0) >= decode_step_s * 0.999
        assert all(g > 0 for g in gaps(r.got_s))
        # Every token went out at its modelled time: the stalled step's are stamped when
        # the host got to them, and the timeline runs on from there.
        late = [got - due for got, due in zip(r.got_s, r.due_s, strict=True)]
        assert max(abs(x) for x in late) < 1e-9
        assert max(gaps(r.due_s)) == pytest.approx(decode_step_s + STALL_S, rel=0.05)
        # The request says how much later the host made it, all of it while decoding.
        f = r.final  # its lag: against the deadline the stall moved
        assert f.host_stall_s == pytest.approx(STALL_S, rel=1e-6)
        assert f.decode_host_stall_s == pytest.approx(STALL_S, rel=1e-6)
        assert f.max_lag_s == pytest.approx(STALL_S, rel=0.01)
        # Client TPOT is the model's plus the stall: never under the model.
        client_tpot = (r.got_s[-1] - r.got_s[0]) / 119
        model_tpot = (f.decode_s - f.decode_host_stall_s) / 119
        assert client_tpot == pytest.approx(model_tpot + STALL_S / 119, rel=1e-6)
    stall = engine.stats().host_stall
    assert stall.stalls == 1
    assert stall.stalled_s == pytest.approx(STALL_S)
    assert stall.degraded
    degraded_lines = [r for r in caplog.records if "degraded" in r.getMessage()]
    assert len(degraded_lines) == 1


async def test_small_wakeup_jitter_is_not_a_stall(wse3_8b):
    # 0.1 ms late now and then: inside the tolerance, the timeline holds.
    clock = SteppingClock(stalls={i: 1e-4 for i in range(5, 60, 7)})
    engine, results = await run(wse3_8b, clock, streams=2, max_tokens=60, rate=1e6)
    assert engine.stats().host_stall.stalls == 0
    assert not engine.stats().host_stall.degraded
    assert all(r.final.host_stall_s == 0 for r in results)


def scrape(metrics: PrometheusMetrics) -> dict[str, float]:
    text = metrics.render()[0].decode()
    out = {}
    for name in (
        "memorywall:degraded",
        "memorywall:host_stalls_total",
        "memorywall:host_stall_seconds_total",
        "memorywall:emulation_lag_seconds_count",
        "memorywall:emulation_lag_seconds_sum",
        "vllm:inter_token_latency_seconds_sum",
        "vllm:time_to_first_token_seconds_sum",
        "vllm:e2e_request_latency_seconds_sum",
        "vllm:request_decode_time_seconds_sum",
    ):
        m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
        out[name] = float(m.group(1))
    return out


def new_metrics() -> PrometheusMetrics:
    return PrometheusMetrics(
        model_name="m", max_model_len=4096, idle_power_w=1.0, rated_power_w=2.0
    )


async def test_stall_metrics_move_when_the_engine_is_starved(wse3_8b):
    steady = new_metrics()
    await run(wse3_8b, SteppingClock(), 2, 40, 1e6, metrics=steady)
    before = scrape(steady)
    assert before["memorywall:degraded"] == 0
    assert before["memorywall:host_stalls_total"] == 0
    assert before["memorywall:emulation_lag_seconds_count"] > 0
    assert before["memorywall:emulation_lag_seconds_sum"] == pytest.approx(0, abs=1e-9)

    starved = new_metrics()
    await run(wse3_8b, SteppingClock(stalls={10: 0.05, 20: 0.02}), 2, 40, 1e6, metrics=starved)
    after = scrape(starved)
    assert after["memorywall:degraded"] == 1
    assert after["memorywall:host_stalls_total"] == 2
    assert after["memorywall:host_stall_seconds_total"] == pytest.approx(0.07)
    # Each stream got one group 50 ms late and one 20 ms late.
    assert after["memorywall:emulation_lag_seconds_sum"] == pytest.approx(2 * 0.07, rel=0.01)
    # vLLM's series stay in the model's own time: the same batches, the same figures.
    for name in (
        "vllm:inter_token_latency_seconds_sum",
        "vllm:time_to_first_token_seconds_sum",
        "vllm:e2e_request_latency_seconds_sum",
        "vllm:request_decode_time_seconds_sum",
    ):
        assert after[name] == pytest.approx(before[name], rel=1e-9), name


# --- grouping: one token per message while the budget lasts ------------------------------------


async def test_ample_budget_sends_every_token_alone(wse3_8b):
    engine, results = await run(wse3_8b, SteppingClock(), streams=8, max_tokens=80, rate=1e5)
    for r in results:
        assert set(r.group_sizes) == {1}
        assert r.got_s == pytest.approx(r.due_s, abs=1e-9)
    assert engine.stats().stream_interval_s == 0


async def test_a_tight_budget_groups_but_never_a_step_late(wse3_8b):
    # 16 streams decoding every ~0.6 ms want ~27k messages/s; the budget is 10k. With no
    # `max_hold_s` a held token waits one step at most.
    engine, results = await run(
        wse3_8b, SteppingClock(), streams=16, max_tokens=100, rate=1e4, max_hold_s=0.0
    )
    grouped = 0
    for r in results:
        assert len(r.got_s) == 100
        assert max(r.group_sizes) <= 2  # held one step at most, then out with the next
        grouped += sum(1 for n in r.group_sizes if n > 1)
        late = [got - due for got, due in zip(r.got_s, r.due_s, strict=True)]
        assert min(late) >= 0
        next_gap = gaps(r.due_s)
        for i, lag in enumerate(late[:-1]):
            # No later than the stream's own next token: one modelled step.
            assert lag <= next_gap[i] + 1e-9
        prev_gap = [next_gap[0], *next_gap]
        assert all(lag <= HOLD_STEPS * g + 1e-9 for lag, g in zip(late, prev_gap, strict=True))
        # Grouping never moves the timeline: the reader's span is the model's.
        assert r.got_s[-1] == pytest.approx(r.due_s[-1], abs=1e-9)
    messages = sum(len(r.group_sizes) for r in results)
    assert grouped > 0
    assert messages < 16 * 100
    assert engine.stats().host_stall.stalls == 0


async def test_a_tight_budget_groups_deeper_up_to_max_hold_never_early(wse3_8b):
    # The same 16 streams and 10k budget with `auto`'s default hold: a stream's tokens wait
    # for a message of the size the budget needs, never past `MAX_HOLD_S` and never early.
    _, one_step = await run(
        wse3_8b, SteppingClock(), streams=16, max_tokens=100, rate=1e4, max_hold_s=0.0
    )
    engine, results = await run(wse3_8b, SteppingClock(), streams=16, max_tokens=100, rate=1e4)
    for r in results:
        assert len(r.got_s) == 100
        late = [got - due for got, due in zip(r.got_s, r.due_s, strict=True)]
        assert min(late) >= 0
        assert max(late) <= MAX_HOLD_S + 1e-9
        assert r.got_s[-1] == pytest.approx(r.due_s[-1], abs=1e-9)
        assert r.group_sizes[0] == 1  # the first token goes alone, at its time
    assert max(n for r in results for n in r.group_sizes) > 2
    # 16 streams x ~1,800 tokens/s over a 10k budget: groups of ~3, a third of the messages.
    messages = sum(len(r.group_sizes) for r in results)
    assert messages < 0.75 * sum(len(r.group_sizes) for r in one_step)
    assert messages < 16 * 100 / 2.5
    assert engine.stats().host_stall.stalls == 0


async def test_a_saturated_host_groups_up_to_max_hold_and_no_further(wse3_8b):
    clock = SteppingClock()
    _, results = await run(
        wse3_8b, clock, streams=8, max_tokens=120, rate=1e6, cpu_time=lambda: clock.t * 0.97
    )
    step_s = min(min(gaps(r.due_s)) for r in results)
    deepest = int(MAX_HOLD_S / step_s) + 1  # tokens a hold of MAX_HOLD_S spans
    sizes = [n for r in results for n in r.group_sizes]
    assert max(sizes) == deepest
    for r in results:
        late = [got - due for got, due in zip(r.got_s, r.due_s, strict=True)]
        assert min(late) >= 0 and max(late) <= MAX_HOLD_S + 1e-9


def test_a_negative_max_hold_is_refused(wse3_8b):
    core, _ = build_core(wse3_8b, EngineConfig())
    with pytest.raises(ConfigError, match="max_hold_s"):
        AsyncEngine(core, clock=SteppingClock(), max_messages_per_s=1e4, max_hold_s=-1.0)


def test_message_budget_refills_on_the_clock_and_bounds_debt():
    b = MessageBudget(1000.0)
    b.refill(0.0)
    assert b.take()  # one message's worth to start
    assert not b.take()
    b.refill(0.005)  # 5 ms: five messages
    assert sum(b.take() for _ in range(10)) == 5
    for _ in range(100):
        b.spend()  # forced messages run it into debt, but only one interval deep
    b.refill(0.010)
    assert b.available == pytest.approx(-5.0)
    b.refill(0.012)  # the allowance (and the debt) is the rate over the time since the last
    assert b.available == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="ceiling_per_s"):
        MessageBudget(0)


def test_message_budget_backs_off_when_busy_or_late_and_recovers():
    b = MessageBudget(10_000.0)
    tol = 0.0003
    b.adapt(busy=0.5, late_s=0.0001, tolerance_s=tol)  # time to spare, on time
    assert b.rate_per_s == 10_000.0
    b.adapt(busy=0.95, late_s=0.0, tolerance_s=tol)  # this process uses up its core
    assert b.rate_per_s == pytest.approx(8_000.0)
    b.adapt(busy=0.3, late_s=0.0002, tolerance_s=tol)  # the machine is short of CPU
    assert b.rate_per_s == pytest.approx(6_400.0)
    for _ in range(100):
        b.adapt(busy=1.2, late_s=0.0, tolerance_s=tol)  # a poller thread adds to the loop's
    assert b.rate_per_s == FLOOR_PER_S
    for _ in range(1000):
        b.adapt(busy=0.3, late_s=0.0, tolerance_s=tol)
    assert b.rate_per_s == 10_000.0  # back to the ceiling, never past it


@pytest.mark.parametrize(
    ("busy", "late_s", "grouped"), [(0.5, 0.0001, False), (0.97, 0.0, True), (0.5, 0.0002, True)]
)
async def test_grouping_starts_when_the_host_is_saturated_not_before(
    wse3_8b, busy, late_s, grouped
):
    # A wafer step is ~0.56 ms, so its stall tolerance is ~0.28 ms: waking 0.1 ms late with
    # CPU to spare is jitter; a process busy all the time, or 0.2 ms late every step, is a
    # host that cannot carry a message per token (group, before it has to stall).
    clock = SteppingClock(stalls={i: late_s for i in range(10_000)})
    engine, results = await run(
        wse3_8b,
        clock,
        streams=8,
        max_tokens=60,
        rate=1e6,
        cpu_time=lambda: clock.t * busy,
        max_hold_s=0.0,
    )
    sizes = {n for r in results for n in r.group_sizes}
    assert (max(sizes) > 1) is grouped
    assert max(sizes) <= 2
    assert engine.stats().host_stall.stalls == 0


async def test_a_reader_that_comes_by_early_does_not_take_a_held_token(wse3_8b):
    core, _ = build_core(wse3_8b, EngineConfig())
    engine = AsyncEngine(core, clock=SteppingClock(), max_messages_per_s=1e6)
    request = Request(request_id="r", prompt_ids=(1, 2, 3), max_tokens=8, ignore_eos=True)
    stream = engine.submit(request)  # the engine is not running: the test hands tokens over
    stream._push([5], engine.now(), 0.0)  # given to the stream, held for grouping
    reader = asyncio.ensure_future(stream.next_event())
    await asyncio.sleep(0)
    assert not reader.done()
    stream._flush(engine.now())
    group = await asyncio.wait_for(reader, TIMEOUT_S)
    assert group.token_ids == (5,)
    assert engine.abort("r")
