"""A bench sweep on the serving engine, on a virtual clock: no sleeping, no sockets.

Each load level gets a fresh engine (`build_core`, as `memorywall serve` builds
it) driven by `OfflineEngine`. Requests are released as the bench runner
releases them (`loadgen/runner.py`): warm-ups one at a time first; then closed
loop, each user sending its next request the moment its last one finishes; or
open loop, each request at its drawn offset, queued first-come first-served
behind `max_concurrency` when one is set; nothing new after `duration_s`.
The client is ideal: a request reaches the engine the instant it is sent and
tokens reach the client the instant a step ends.

Each request becomes the same `RequestRecord` the bench fills from a server,
with integer-nanosecond times on the virtual clock: sent at its arrival, one
token-carrying message per step that emitted tokens for it. The same metrics
code then writes the same result keys, marked `"simulated": true`.

Prompts are token ids from `loadgen.prompts.PromptSource` seeded with the
sweep's seed (a group's prefix as the OpenAI targets build it), so shared-prefix
workloads hit the prefix cache; the engine's synthetic tokens use the same seed.
Same seed, same results, on every machine.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from memorywall.core import Deployment
from memorywall.loadgen.bench import BenchConfig, Level, ServerFacts, levels, plan_level, summarise
from memorywall.loadgen.metrics import compute_metrics
from memorywall.loadgen.prompts import PromptSource
from memorywall.loadgen.records import RequestRecord, RequestSpec
from memorywall.server.engine.build import build_core
from memorywall.server.engine.offline import OfflineEngine, Timeline
from memorywall.server.engine.scheduler import EngineConfig, Request

__all__ = ["LevelRun", "simulate", "simulate_level"]


@dataclass(frozen=True, kw_only=True)
class LevelRun:
    """One simulated level: the bench result and records, and what simulating it cost."""

    result: dict
    records: list[RequestRecord]
    modelled_s: float  # virtual time from the first warm-up's arrival to the last token
    wall_s: float  # host time the simulation took (not part of `result`)
    engine_s: float  # of which running the engine and releasing requests (not records, metrics)
    cpu_s: float  # this process's CPU time for it: the host's own cost, were it not shared
    steps: int
    tokens: int  # generated, warm-ups included
    preemptions: int
    energy_j: float  # modelled energy of every step, warm-ups included

    @property
    def speedup(self) -> float:
        """Modelled time per second of host time."""
        return self.modelled_s / self.wall_s if self.wall_s > 0 else math.inf


def _ns(t_s: float) -> int:
    return round(t_s * 1e9)


class _Releaser:
    """The bench runner's release rules for one plan, driven by finish times."""

    def __init__(
        self,
        specs: Iterable[RequestSpec],
        *,
        open_loop: bool,
        slots: int | None,
        start_s: float,
        stop_s: float | None,
        send: Callable[[RequestSpec, float, float | None], None],
    ) -> None:
        order = sorted(specs, key=lambda s: s.offset_s) if open_loop else list(specs)
        self._pending = deque(order)
        self._open_loop = open_loop
        self._free = math.inf if slots is None else slots
        self._start_s = start_s
        self._stop_s = stop_s
        self._send = send

    def release(self, now_s: float) -> None:
        """Send what may go at `now_s`: each free slot takes the next request, at its offset
        (open loop; a later one) or now (closed loop)."""
        pending, stop = self._pending, self._stop_s
        while self._free > 0 and pending:
            spec = pending[0]
            if self._open_loop:
                due = self._start_s + spec.offset_s
                if stop is not None and due >= stop:
                    pending.clear()
                    return
                at, scheduled = max(due, now_s), due
            else:
                if stop is not None and now_s >= stop:
                    pending.clear()
                    return
                at, scheduled = now_s, None
            pending.popleft()
            self._free -= 1
            self._send(spec, at, scheduled)

    def finished(self, now_s: float) -> None:
        self._free += 1
        self.release(now_s)


class _LevelDriver:
    """Joins one level's plan to an offline engine and fills a record per request."""

    def __init__(self, config: BenchConfig, level: Level, engine: OfflineEngine) -> None:
        self.plan = plan_level(config, level)
        self.prompts = PromptSource(config.seed)
        self.engine = engine
        self.records: dict[str, RequestRecord] = {}
        self.finished: list[Timeline] = []  # in finishing order; records filled at the end
        self._warmups = deque(self.plan.warmup)
        self._main: _Releaser | None = None
        engine.on_finish = self._finished

    def start(self) -> None:
        if self._warmups:
            self._send(self._warmups.popleft(), 0.0, None, warmup=True)
        else:
            self._start_main(0.0)

    def _start_main(self, now_s: float) -> None:
        plan = self.plan
        self._main = _Releaser(
            plan.specs,
            open_loop=plan.open_loop,
            slots=plan.concurrency if plan.concurrency else (None if plan.open_loop else 1),
            start_s=now_s,
            stop_s=None if plan.duration_s is None else now_s + plan.duration_s,
            send=self._send,
        )
        self._main.release(now_s)

    def _send(
        self, spec: RequestSpec, at_s: float, scheduled_s: float | None, warmup: bool = False
    ) -> None:
        request_id = str(spec.index)
        self.records[request_id] = RequestRecord(
            index=spec.index,
            prompt_tokens=spec.prompt_tokens,
            output_tokens=spec.output_tokens,
            scheduled_ns=None if scheduled_s is None else _ns(scheduled_s),
            sent_ns=_ns(at_s),
            warmup=warmup,
        )
        request = Request(
            request_id=request_id,
            prompt_ids=self.prompts.token_ids(spec),
            max_tokens=spec.output_tokens,
            ignore_eos=True,  # as the bench targets send it
        )
        self.engine.submit(request, at_s)

    def _finished(self, timeline: Timeline) -> None:
        self.finished.append(timeline)
        now_s = timeline.arrival_s if timeline.last_token_s is None else timeline.last_token_s
        if self._main is not None:
            self._main.finished(now_s)
        elif self._warmups:
            self._send(self._warmups.popleft(), now_s, None, warmup=True)
        else:
            self._start_main(now_s)


def fill_records(records: dict[str, RequestRecord], timelines: list[Timeline]) -> None:
    """What a client would have seen of each timeline, with no transport in between: its
    record (by request id) filled in, message times in integer ns (one numpy pass for all,
    np.rint rounding half to even as round() does)."""
    times: list[float] = []
    for t in timelines:
        times += t.group_times_s
    all_ns = np.rint(np.asarray(times) * 1e9).astype(np.int64).tolist()
    at = 0
    for timeline in timelines:
        record = records[timeline.request_id]
        if timeline.error is not None:
            record.error = f"{type(timeline.error).__name__}: {timeline.error}"
            continue
        n = len(timeline.group_times_s)
        record.chunk_ns = all_ns[at : at + n]
        at += n
        first, last = timeline.group_times_s[0], timeline.group_times_s[-1]
        record.chunk_tokens = list(timeline.group_tokens)
        record.finished_ns = record.chunk_ns[-1]
        record.usage_prompt_tokens = timeline.prompt_tokens
        record.usage_completion_tokens = timeline.completion_tokens
        record.usage_cached_tokens = timeline.cached_tokens
        record.modelled_ttft_s = first - timeline.arrival_s
        record.modelled_e2e_s = last - timeline.arrival_s
        record.modelled_decode_s = last - first


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Pause Python's cycle collector: a level allocates millions of objects that live to
    its end (token lists, timelines, records), so the collector would scan them again and
    again (a quarter of the run's time) to find no garbage; reference counting frees what
    the engine and the metrics drop, and they build no cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def simulate_level(
    deployment: Deployment,
    engine_config: EngineConfig,
    config: BenchConfig,
    level: Level,
    *,
    fast: bool = True,
) -> LevelRun:
    """Run one level of `config` on a fresh engine for `deployment`; `fast=False` steps
    every decode step one at a time (the same result, slower)."""

    def build() -> tuple[OfflineEngine, ServerFacts, Callable[[], tuple[int, int, int, float]]]:
        core, card = build_core(deployment, engine_config)
        facts = ServerFacts(
            hardware=card.hardware, model=card.model, devices=card.devices, emulated=True
        )
        c = core.counters
        return (
            OfflineEngine(core, fast=fast),
            facts,
            lambda: (c.steps, c.tokens_generated, c.preemptions, c.energy_j),
        )

    return drive_level(build, config, level)


def drive_level(build: Callable[[], tuple], config: BenchConfig, level: Level) -> LevelRun:
    """Release `config`'s `level` into the offline engine `build` makes and summarise it as
    bench does. `build` returns the engine (anything with `submit`, `run`, `now_s`), the
    facts the result names, and a function giving (steps, tokens, preemptions, energy_j)."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with _no_cycle_collection():
        engine, facts, counters = build()
        driver = _LevelDriver(config, level, engine)
        driver.start()
        engine0 = time.perf_counter()
        engine.run()
        engine_s = time.perf_counter() - engine0
        fill_records(driver.records, driver.finished)
        records = list(driver.records.values())
        metrics = compute_metrics(records, slo=config.slo)
        result = summarise(config, level, facts, metrics, [], simulated=True)
    steps, tokens, preemptions, energy_j = counters()
    return LevelRun(
        result=result,
        records=records,
        modelled_s=engine.now_s,
        wall_s=time.perf_counter() - wall0,
        engine_s=engine_s,
        cpu_s=time.process_time() - cpu0,
        steps=steps,
        tokens=tokens,
        preemptions=preemptions,
        energy_j=energy_j,
    )


def simulate(
    deployment: Deployment, engine_config: EngineConfig, config: BenchConfig
) -> list[LevelRun]:
    """Every level of `config`'s sweep, in order."""
    return [simulate_level(deployment, engine_config, config, lv) for lv in levels(config)]
