"""Fault specs, seeded fates and the guard around the live engine (real core, jumping clock):
each fault kind's effect on the stream, reproducibility, and the waiting-queue bound."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest
from engine_fakes import FakeClock

from memorywall.errors import (
    ConfigError,
    InjectedInternalError,
    InjectedUnavailableError,
    InvalidRequestError,
    OverloadedError,
)
from memorywall.server.engine.api import Finished, TokenGroup
from memorywall.server.engine.build import build_core
from memorywall.server.engine.faults import (
    Fault,
    FaultKind,
    FaultPlan,
    FaultStatus,
    fault_from_header,
    parse_rule,
    parse_spec,
)
from memorywall.server.engine.guard import GuardConfig, GuardedEngine
from memorywall.server.engine.live import AsyncEngine
from memorywall.server.engine.scheduler import EngineConfig, Request
from memorywall.server.engine.twin import TwinEngine

TIMEOUT_S = 10.0


class Counts:
    def __init__(self) -> None:
        self.faults: list[FaultKind] = []
        self.rejected: list[str] = []

    def on_fault(self, kind: FaultKind) -> None:
        self.faults.append(kind)

    def on_rejected(self, reason: str) -> None:
        self.rejected.append(reason)


def request(rid: str, max_tokens: int = 20) -> Request:
    return Request(
        request_id=rid, prompt_ids=tuple(range(1, 101)), max_tokens=max_tokens, ignore_eos=True
    )


@pytest.fixture
async def engine(wse3_8b) -> AsyncIterator[AsyncEngine]:
    # No prefix cache: requests with one prompt then cost the same, faulted or not.
    core, _ = build_core(wse3_8b, EngineConfig(enable_prefix_caching=False))
    engine = AsyncEngine(core, clock=FakeClock(), max_messages_per_s=1e9)
    await engine.start()
    yield engine
    await asyncio.wait_for(engine.drain(0.0), TIMEOUT_S)
    await asyncio.wait_for(engine.stop(), TIMEOUT_S)


class Sleeps:
    """The guard's clock in these tests: records each deadline and returns at once, so
    the engine's jumping clock moves only with the engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.deadlines: list[float] = []

    def now(self) -> float:
        return self.engine.now()

    async def sleep_until(self, deadline_s: float) -> None:
        self.deadlines.append(deadline_s)
        await asyncio.sleep(0)

    def close(self) -> None:
        pass


def guard(engine: AsyncEngine, counts: Counts, **config) -> GuardedEngine:
    return GuardedEngine(
        engine,
        GuardConfig(**config),
        clock=Sleeps(engine),
        observers=[counts],
    )


async def read(stream) -> tuple[list[TokenGroup], Finished]:
    async def go():
        return [e async for e in stream]

    events = await asyncio.wait_for(go(), TIMEOUT_S)
    assert isinstance(events[-1], Finished)
    return events[:-1], events[-1]


def times(groups: list[TokenGroup]) -> list[float]:
    return [t for g in groups for t in g.times_s]


# --- specs ---------------------------------------------------------------------------------


def test_spec_parses_each_kind_with_its_argument_and_default():
    rules = parse_spec("error:0.1:resource_exhausted,abort:0.05:7,stall:0.2:1.5,slow:0.1:3")
    assert [r.rate for r in rules] == pytest.approx([0.1, 0.05, 0.2, 0.1])
    assert rules[0].fault == Fault(kind=FaultKind.ERROR, status=FaultStatus.RESOURCE_EXHAUSTED)
    assert rules[1].fault == Fault(kind=FaultKind.ABORT, after_tokens=7)
    assert rules[2].fault == Fault(kind=FaultKind.STALL, stall_s=1.5)
    assert rules[3].fault == Fault(kind=FaultKind.SLOW, slowdown=3.0)
    defaults = parse_spec("error:1")[0].fault, parse_rule("slow:0.5").fault
    assert defaults == (
        Fault(kind=FaultKind.ERROR, status=FaultStatus.UNAVAILABLE),
        Fault(kind=FaultKind.SLOW, slowdown=2.0),
    )
    assert str(rules[2].fault) == "stall:1.5"


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("", "no KIND:RATE"),
        ("boom:0.1", "unknown kind 'boom'"),
        ("error", "expected KIND:RATE"),
        ("error:1.5", "must be in [0, 1]"),
        ("error:nan", "finite"),
        ("error:-0.1", ">= 0"),
        ("error:0.1:teapot", "unknown status 'teapot'"),
        ("abort:0.1:-1", ">= 0"),
        ("abort:0.1:2.5", "expected a number"),
        ("stall:0.1:0", "> 0"),
        ("slow:0.1:0.5", ">= 1"),
        ("error:0.6,slow:0.6", "add up to 1.2"),
        ("a:b:c:d", "expected KIND:RATE"),
    ],
)
def test_bad_specs_are_config_errors_that_say_what_is_wrong(spec, says):
    with pytest.raises(ConfigError, match=None) as e:
        parse_spec(spec)
    assert says in str(e.value)


def test_a_bad_header_is_an_invalid_request():
    assert fault_from_header(None) is None
    assert fault_from_header("abort:1:5").fault.after_tokens == 5
    with pytest.raises(InvalidRequestError, match="x-memorywall-fault"):
        fault_from_header("abort:1:five")


async def test_only_the_guard_applies_a_requests_fault(engine):
    # Every EngineClient takes a request's fault in `submit`; the engines under the guard
    # refuse one, holding nothing, rather than serve the request without its fault.
    twin = TwinEngine()
    for inner in (engine, twin):
        with pytest.raises(InvalidRequestError, match="does not inject faults"):
            inner.submit(request("r"), fault=parse_rule("stall:1:0.5"))
        assert inner.stats().running == inner.stats().waiting == 0
    guarded = GuardedEngine(twin, GuardConfig(allow_fault_headers=True))
    with pytest.raises(InjectedUnavailableError):
        guarded.submit(request("r"), fault=parse_rule("error:1"))
    assert twin.submitted == []


def test_fates_follow_the_seed_and_arrival_order_at_their_rates():
    rules = parse_spec("error:0.1,stall:0.2")
    a = [FaultPlan(rules, seed=7).draw() for _ in range(1)]
    plan_a, plan_b, plan_c = FaultPlan(rules, 7), FaultPlan(rules, 7), FaultPlan(rules, 8)
    fates_a = [plan_a.draw() for _ in range(4000)]
    fates_b = [plan_b.draw() for _ in range(4000)]
    fates_c = [plan_c.draw() for _ in range(4000)]
    assert fates_a == fates_b
    assert fates_a != fates_c
    assert a[0] == fates_a[0]
    errors = sum(f is not None and f.kind is FaultKind.ERROR for f in fates_a)
    stalls = sum(f is not None and f.kind is FaultKind.STALL for f in fates_a)
    # Binomial(4000, p): 5 standard deviations.
    assert abs(errors - 400) < 5 * (4000 * 0.1 * 0.9) ** 0.5
    assert abs(stalls - 800) < 5 * (4000 * 0.2 * 0.8) ** 0.5


def test_a_request_rule_replaces_the_spec_for_its_arrival_only():
    rules = parse_spec("stall:0.5")
    plain, mixed = FaultPlan(rules, 3), FaultPlan(rules, 3)
    expected = [plain.draw() for _ in range(50)]
    own = parse_rule("abort:1:2")
    got = [mixed.draw(own if i == 10 else None) for i in range(50)]
    assert got[10] == own.fault
    assert got[:10] == expected[:10] and got[11:] == expected[11:]


# --- the guard around the live engine -------------------------------------------------------


async def test_error_fault_refuses_before_the_engine_sees_the_request(engine):
    counts = Counts()
    g = guard(engine, counts, faults=parse_spec("error:1:internal"))
    with pytest.raises(InjectedInternalError) as e:
        g.submit(request("a"))
    assert e.value.fault == "error:internal"
    assert not engine.core.live and counts.faults == [FaultKind.ERROR]


async def test_abort_fault_cuts_the_stream_after_n_tokens_and_frees_the_request(engine):
    counts = Counts()
    g = guard(engine, counts, faults=parse_spec("abort:1:3"))
    stream = g.submit(request("a", max_tokens=50))
    got: list[int] = []
    with pytest.raises(InjectedUnavailableError, match="after 3 tokens") as e:
        async for event in stream:
            got.extend(event.token_ids)
    assert len(got) == 3 and e.value.fault == "abort:3"
    assert counts.faults == [FaultKind.ABORT]
    s = engine.stats()
    assert (s.running, s.waiting, s.kv_used_tokens, s.requests_aborted) == (0, 0, 0, 1)


async def test_abort_after_more_tokens_than_the_request_has_changes_nothing(engine):
    counts = Counts()
    g = guard(engine, counts, faults=parse_spec("abort:1:100"))
    groups, done = await read(g.submit(request("a", max_tokens=5)))
    assert sum(len(x.token_ids) for x in groups) == 5
    assert done.fault is None and counts.faults == []


async def test_stall_delays_every_token_by_its_argument(engine):
    counts = Counts()
    plain = GuardedEngine(engine, GuardConfig())
    groups_a, done_a = await read(plain.submit(request("a")))
    g = guard(engine, counts, faults=parse_spec("stall:1:0.25"))
    groups_b, done_b = await read(g.submit(request("b")))
    assert times(groups_b) == pytest.approx([t + 0.25 for t in times(groups_a)], abs=1e-9)
    assert done_b.ttft_s == pytest.approx(done_a.ttft_s + 0.25, abs=1e-9)
    assert done_b.decode_s == pytest.approx(done_a.decode_s, abs=1e-9)
    assert done_b.e2e_s == pytest.approx(done_a.e2e_s + 0.25, abs=1e-9)
    assert done_b.fault == "stall:0.25" and counts.faults == [FaultKind.STALL]
    # Each group was handed over at its stalled time: the first 0.25 s after its token.
    deadlines = g.clock.deadlines
    assert len(deadlines) == len(groups_b)
    arrival = deadlines[0] - groups_b[0].times_s[-1]
    assert [d - arrival for d in deadlines] == pytest.approx(
        [x.times_s[-1] for x in groups_b], abs=1e-9
    )


async def test_slow_stretches_the_cores_gaps_by_its_factor(engine):
    counts = Counts()
    plain = GuardedEngine(engine, GuardConfig())
    groups_a, done_a = await read(plain.submit(request("a")))
    g = guard(engine, counts, faults=parse_spec("slow:1:3"))
    groups_b, done_b = await read(g.submit(request("b")))
    ta, tb = times(groups_a), times(groups_b)
    assert tb[0] == pytest.approx(ta[0], abs=1e-9)
    gaps_a = [y - x for x, y in itertools.pairwise(ta)]
    gaps_b = [y - x for x, y in itertools.pairwise(tb)]
    assert min(gaps_a) > 0
    assert gaps_b == pytest.approx([3 * gap for gap in gaps_a], rel=1e-9)
    assert done_b.decode_s == pytest.approx(3 * done_a.decode_s, rel=1e-9)
    assert done_b.fault == "slow:3"


async def test_max_waiting_refuses_beyond_the_bound_with_a_retry_hint(engine):
    counts = Counts()
    g = guard(engine, counts, max_waiting=2, retry_after_s=0.5)
    streams = [g.submit(request(f"r{i}")) for i in range(2)]  # the engine has not run yet
    with pytest.raises(OverloadedError, match="2 requests waiting") as e:
        g.submit(request("r2"))
    assert e.value.retry_after_s == 0.5 and counts.rejected == ["max_waiting"]
    for stream in streams:
        await read(stream)
    await read(g.submit(request("r3")))  # admitted again once the queue drained


async def test_request_faults_need_the_flag(engine):
    g = guard(engine, Counts())
    with pytest.raises(InvalidRequestError, match="--allow-fault-headers"):
        g.submit(request("a"), fault=parse_rule("abort:1:1"))
    assert not engine.core.live
