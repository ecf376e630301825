"""`stream_interval`: a stream's tokens N per message after its first, never early.

On the stepping test clock of `test_engine_pacing` (no wall-clock timing): readers run at
the time each step's tokens were handed out, then the clock jumps to the next deadline.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

import pytest
from engine_fakes import SteppingClock

from memorywall.errors import ConfigError
from memorywall.server.engine.api import Finished, FinishReason, TokenGroup
from memorywall.server.engine.build import build_core
from memorywall.server.engine.live import AsyncEngine
from memorywall.server.engine.scheduler import EngineConfig, Request

TIMEOUT_S = 10.0


@dataclass
class Received:
    """One stream as its reader saw it, message by message (engine clock)."""

    due_s: list[list[float]] = field(default_factory=list)  # each token's modelled time
    got_s: list[float] = field(default_factory=list)  # when each message was read
    reasons: list[FinishReason | None] = field(default_factory=list)
    final: Finished | None = None

    @property
    def sizes(self) -> list[int]:
        return [len(d) for d in self.due_s]


async def read(engine: AsyncEngine, rid: str, max_tokens: int, abort_after: int = 0) -> Received:
    arrival = engine.now()
    request = Request(
        request_id=rid, prompt_ids=tuple(range(1, 101)), max_tokens=max_tokens, ignore_eos=True
    )
    stream = engine.submit(request)
    out = Received()
    async for event in stream:
        if isinstance(event, TokenGroup):
            out.due_s.append([arrival + t for t in event.times_s])
            out.got_s.append(engine.now())
            out.reasons.append(event.finish_reason)
            if abort_after and len(out.due_s) == abort_after:
                engine.abort(rid)
        else:
            out.final = event
    return out


async def run(deployment, clock, reads, *, interval: int | None, rate: float = 1e6):
    core, _ = build_core(deployment, EngineConfig())
    engine = AsyncEngine(
        core,
        clock=clock,
        max_messages_per_s=rate,
        stream_interval=interval,
        cpu_time=lambda: 0.0,  # an idle process: the budget stays at its ceiling
    )
    await engine.start()
    try:
        results = await asyncio.wait_for(asyncio.gather(*(r(engine) for r in reads)), TIMEOUT_S)
        return engine, results
    finally:
        await asyncio.wait_for(engine.stop(), TIMEOUT_S)


def streams(n: int, max_tokens: int):
    return [lambda e, i=i: read(e, f"r{i}", max_tokens) for i in range(n)]


@pytest.mark.parametrize(("interval", "max_tokens"), [(4, 30), (4, 29), (1, 12), (7, 7)])
async def test_groups_of_n_after_the_first_token_never_early(wse3_8b, interval, max_tokens):
    engine, results = await run(wse3_8b, SteppingClock(), streams(6, max_tokens), interval=interval)
    rest = (max_tokens - 1) % interval
    for r in results:
        # The first token alone (TTFT not delayed), then N a message; the last may be shorter.
        expected = [1] + [interval] * ((max_tokens - 1) // interval) + ([rest] if rest else [])
        assert r.sizes == expected
        assert r.reasons[:-1] == [None] * (len(expected) - 1)
        assert r.reasons[-1] == FinishReason.LENGTH
        for due, got in zip(r.due_s, r.got_s, strict=True):
            assert got >= max(due) - 1e-9  # never before any of its tokens is due
            assert got == pytest.approx(max(due), abs=1e-9)  # out as its last one is due
            assert all(b > a for a, b in itertools.pairwise(due))  # each token's time
        assert r.final.completion_tokens == max_tokens
        assert r.final.max_lag_s == pytest.approx(0, abs=1e-9)  # held by design, not late
    assert engine.stats().stream_interval_s > 0 or interval == 1


async def test_a_fixed_interval_ignores_the_message_budget(wse3_8b):
    # A budget far too small for 8 streams: `auto` groups them, N=1 sends every token alone.
    _, auto = await run(wse3_8b, SteppingClock(), streams(8, 40), interval=None, rate=2e3)
    assert any(n > 1 for r in auto for n in r.sizes)
    _, ones = await run(wse3_8b, SteppingClock(), streams(8, 40), interval=1, rate=2e3)
    assert all(r.sizes == [1] * 40 for r in ones)


async def test_auto_sends_every_token_alone_while_the_budget_lasts(wse3_8b):
    engine, results = await run(wse3_8b, SteppingClock(), streams(8, 40), interval=None)
    assert all(r.sizes == [1] * 40 for r in results)
    assert engine.stats().stream_interval_s == 0


async def test_a_stalled_host_never_makes_a_group_early(wse3_8b):
    clock = SteppingClock(stalls={15: 0.030, 33: 0.010})
    engine, results = await run(wse3_8b, clock, streams(4, 50), interval=4)
    for r in results:
        assert r.sizes == [1] + [4] * 12 + [1]
        for due, got in zip(r.due_s, r.got_s, strict=True):
            assert got >= max(due) - 1e-9
    assert engine.stats().host_stall.stalls == 2


async def test_an_aborted_stream_gets_its_tokens_then_the_abort(wse3_8b):
    reader = [lambda e: read(e, "a", 100, abort_after=3)]  # after 1 + 4 + 4 tokens
    _, (r,) = await run(wse3_8b, SteppingClock(), reader, interval=4)
    assert r.sizes[:3] == [1, 4, 4]
    assert all(n <= 4 for n in r.sizes)
    assert r.final.reason == FinishReason.ABORT
    assert sum(r.sizes) == r.final.completion_tokens


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "4"])
def test_a_bad_interval_is_refused(wse3_8b, bad):
    core, _ = build_core(wse3_8b, EngineConfig())
    with pytest.raises(ConfigError, match="stream_interval"):
        AsyncEngine(core, max_messages_per_s=1e4, stream_interval=bad)
