"""Plain decode stretches (`live_decode`) against stepping every step: the same tokens at
the same modelled times, the same requests' ends, step reports, KV events, counters and
KV pool, on randomised workloads with arrivals, finishes, stop tokens, aborts, KV releases
and host stalls in the middle of stretches; never a token before its time.

On a test clock that jumps to each deadline (no wall-clock timing): readers and the
workload's own tasks run at each step's end, before the clock moves on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from memorywall.errors import ConfigError
from memorywall.server.engine.api import Finished, StepReport, TokenGroup
from memorywall.server.engine.build import build_core
from memorywall.server.engine.live import MIN_STRETCH_STEPS, STRETCH_STEPS, AsyncEngine
from memorywall.server.engine.scheduler import EngineConfig, Request

TIMEOUT_S = 60.0


class StallClock:
    """Jumps to each deadline once the ready tasks ran; the first sleep to a deadline at
    or past each of `stalls`' times (offsets from the start) wakes that much later."""

    def __init__(self, stalls: dict[float, float]) -> None:
        self.t = 1000.0
        self._stalls = sorted((1000.0 + at, s) for at, s in stalls.items())

    def now(self) -> float:
        return self.t

    async def sleep_until(self, deadline_s: float) -> None:
        await asyncio.sleep(0)
        self.t = max(self.t, deadline_s)
        if self._stalls and self._stalls[0][0] <= deadline_s:
            self.t += self._stalls.pop(0)[1]

    def close(self) -> None:
        pass


@dataclass
class Recorder:
    """An observer that keeps every step report and request end."""

    steps: list[StepReport] = field(default_factory=list)
    ends: list[Finished] = field(default_factory=list)
    wants_batch = False

    def watch(self, stats) -> None:
        pass

    def on_step(self, step: StepReport) -> None:
        self.steps.append(step)

    def on_finish(self, finished: Finished) -> None:
        self.ends.append(finished)

    def on_lag(self, lag_s: float) -> None:
        pass


@dataclass(frozen=True)
class User:
    rid: str
    arrive_s: float  # after the start
    prompt: tuple[int, ...]
    max_tokens: int
    ignore_eos: bool
    stop: frozenset[int]
    abort_s: float | None  # the client goes then
    keep_kv: bool  # released a little after it ends


def workload(seed: int) -> tuple[list[User], dict[float, float]]:
    rng = np.random.default_rng(seed)
    users, t = [], 0.0
    for i in range(int(rng.integers(2, 24))):
        t += float(rng.exponential(0.004)) if rng.random() < 0.6 else 0.0
        stops = rng.random() < 0.2
        users.append(
            User(
                rid=f"r{i}",
                arrive_s=t,
                prompt=tuple(int(x) for x in rng.integers(3, 1000, int(rng.integers(1, 300)))),
                max_tokens=int(rng.integers(1, 400)),
                ignore_eos=bool(rng.random() < 0.7),
                stop=frozenset(int(x) for x in rng.integers(3, 1000, 30)) if stops else frozenset(),
                abort_s=t + float(rng.exponential(0.05)) if rng.random() < 0.2 else None,
                keep_kv=bool(rng.random() < 0.1),
            )
        )
    stalls = {float(rng.uniform(0, 0.15)): float(rng.uniform(0.001, 0.02)) for _ in range(3)}
    return users, stalls if seed % 2 else {}


async def play(
    deployment, users, stalls, *, stretches: bool, kill: tuple[int, str] | None = None, **engine_kw
) -> dict:
    """Run `users` live; `kill` (k, request id): the first stream's k-th message aborts that
    request there and then, from inside the engine's hand-off (a front writing a message
    finds its client gone). Stretches open from one step on, unless `engine_kw` says."""
    engine_kw.setdefault("min_stretch_steps", 1)  # as many stretches as can be
    core, _ = build_core(deployment, EngineConfig(max_num_seqs=8, max_num_batched_tokens=1024))
    clock = StallClock(stalls)
    recorder = Recorder()
    engine = AsyncEngine(
        core,
        clock=clock,
        cpu_time=lambda: 0.0,
        observers=[recorder],
        decode_stretches=stretches,
        **engine_kw,
    )
    events: list = []
    engine.subscribe_kv_events(events.append)
    planned = core.schedule
    schedules = []  # steps planned one by one

    def schedule(now: float):
        schedules.append(now)
        return planned(now)

    core.schedule = schedule
    await engine.start()
    start = engine.now()

    async def until(t: float) -> None:
        while engine.now() < start + t:
            if not core.has_work():  # idle: nothing moves the clock but an arrival
                clock.t = start + t
            await asyncio.sleep(0)

    async def user(u: User) -> tuple:
        await until(u.arrive_s)
        request = Request(
            request_id=u.rid,
            prompt_ids=u.prompt,
            max_tokens=u.max_tokens,
            ignore_eos=u.ignore_eos,
            stop_token_ids=u.stop,
            keep_kv=u.keep_kv,
        )
        stream = engine.submit(request)
        arrival = engine.now()
        if kill is not None and u is users[0]:
            flush, flushes = stream._flush, []

            def killing_flush(now: float, whole: bool = False) -> None:
                flush(now, whole)
                flushes.append(now)
                if len(flushes) == kill[0]:
                    engine.abort(kill[1])

            stream._flush = killing_flush
        ids: list[int] = []
        due: list[float] = []
        final = None
        aborter = None
        if u.abort_s is not None:
            aborter = asyncio.ensure_future(until(u.abort_s))
            aborter.add_done_callback(lambda _: engine.abort(u.rid))
        async for event in stream:
            if isinstance(event, TokenGroup):
                ids += event.token_ids
                times = [arrival + t for t in event.times_s]
                assert engine.now() >= max(times)  # never early
                due += times
            else:
                final = event
        if aborter is not None:
            aborter.cancel()
        if u.keep_kv:
            await until(engine.now() - start + 0.003)
            engine.release_kv(u.rid)
        return ids, due, replace(final, max_lag_s=0.0)

    try:
        out = await asyncio.wait_for(asyncio.gather(*map(user, users)), TIMEOUT_S)
    finally:
        await engine.stop()
    pool = core.kv.pool
    return {
        "streams": out,
        "steps": recorder.steps,
        "ends": sorted(recorder.ends, key=lambda f: f.request_id),
        "events": events,
        "counters": core.counters,
        "pool": (pool.free_blocks, dict(pool.cached), list(pool.ref_counts)),
        "stalls": engine.stats().host_stall.stalls,
        "stepped": len(schedules) / max(core.counters.steps, 1),
    }


def same(a: dict, b: dict) -> bool:
    """Everything but how many steps were planned one by one."""
    return {**a, "stepped": None} == {**b, "stepped": None}


@pytest.mark.parametrize("seed", range(24))
async def test_stretches_give_what_stepping_gives(wse3_8b, seed):
    users, stalls = workload(seed)
    stepped = await play(wse3_8b, users, stalls, stretches=False, max_messages_per_s=1e6)
    stretched = await play(wse3_8b, users, stalls, stretches=True, max_messages_per_s=1e6)
    assert same(stretched, stepped)
    assert stepped["stepped"] == 1


@pytest.mark.parametrize("seed", range(6))
async def test_an_abort_inside_a_message_hand_off(wse3_8b, seed):
    users, stalls = workload(200 + seed)
    users = [
        replace(users[0], arrive_s=0.0, max_tokens=300, ignore_eos=True, stop=frozenset()),
        replace(users[0], rid="victim", arrive_s=0.0, max_tokens=300, ignore_eos=True),
        *users[1:],
    ]
    kill = (int(np.random.default_rng(seed).integers(2, 200)), "victim")
    kw = {"max_messages_per_s": 1e6, "kill": kill}
    stepped = await play(wse3_8b, users, stalls, stretches=False, **kw)
    stretched = await play(wse3_8b, users, stalls, stretches=True, **kw)
    # Stepping hands the victim none of its step's token once it is gone, though its
    # `Finished` counts it if it came before the killer in the batch; closing a stretch
    # hands over every token the request's end counts. The rest is the same.
    (ids, due, final), (ids_s, due_s, final_s) = stepped["streams"][1], stretched["streams"][1]
    assert final == final_s and final.reason.value == "abort"
    assert final.completion_tokens - 1 <= len(ids) <= len(ids_s) <= final.completion_tokens
    assert (ids_s[: len(ids)], due_s[: len(due)]) == (ids, due)
    for result in (stepped, stretched):
        del result["streams"][1]
    assert same(stretched, stepped)


@pytest.mark.parametrize("interval", [None, 3])
@pytest.mark.parametrize("seed", range(4))
async def test_grouping_keeps_the_timeline(wse3_8b, seed, interval):
    """Under a tight budget (or a fixed interval) stretches group tokens by their own rule;
    the tokens, their times and everything the engine reports stay stepping's."""
    users, stalls = workload(100 + seed)
    kw = {"max_messages_per_s": 2e3, "stream_interval": interval}
    stepped = await play(wse3_8b, users, stalls, stretches=False, **kw)
    stretched = await play(wse3_8b, users, stalls, stretches=True, **kw)
    assert same(stretched, stepped)


async def test_a_long_batch_runs_in_stretches(wse3_8b):
    """Eight readers of 300 tokens, together: only the prefill, the steps opening a stretch
    and the last step are planned one by one (stretches of `STRETCH_STEPS` at most)."""
    users = [
        User(f"r{i}", 0.0, tuple(range(3, 103)), 300, True, frozenset(), None, False)
        for i in range(8)
    ]
    kw = {"max_messages_per_s": 1e6, "min_stretch_steps": MIN_STRETCH_STEPS}
    stepped = await play(wse3_8b, users, {}, stretches=False, **kw)
    stretched = await play(wse3_8b, users, {}, stretches=True, **kw)
    assert same(stretched, stepped)
    assert stepped["counters"].steps == 300
    # The prefill step (its first tokens) and the last: 2 of 300.
    assert stretched["stepped"] == 2 / 300
    assert 2 * STRETCH_STEPS < 300


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8"])
def test_a_bad_min_stretch_steps_is_refused(wse3_8b, bad):
    core, _ = build_core(wse3_8b, EngineConfig())
    with pytest.raises(ConfigError, match="min_stretch_steps"):
        AsyncEngine(core, clock=StallClock({}), max_messages_per_s=1e4, min_stretch_steps=bad)
