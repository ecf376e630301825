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
from itertools import chain, compress

import numpy as np

from memorywall.core import Deployment
from memorywall.loadgen import sessions
from memorywall.loadgen.bench import (
    BenchConfig,
    Level,
    ServerFacts,
    levels,
    plan_level,
    prefix_figures,
    summarise,
)
from memorywall.loadgen.metrics import compute_metrics
from memorywall.loadgen.prompts import PromptSource
from memorywall.loadgen.records import MessageTimes, RequestRecord, RequestSpec
from memorywall.server.engine.build import build_core
from memorywall.server.engine.lora import LoraConfig, LoraRegistry
from memorywall.server.engine.offline import OfflineEngine, OfflineEngineLike, Timeline
from memorywall.server.engine.scheduler import EngineConfig, Request
from memorywall.sim.sessions import Releaser, SessionReleaser

__all__ = ["LevelRun", "simulate", "simulate_level"]


@dataclass(frozen=True, kw_only=True)
class LevelRun:
    """One simulated level: the bench result and records, and what simulating it cost."""

    result: dict
    records: list[RequestRecord]
    messages: MessageTimes  # the records' message times in arrays, for the per-token file
    modelled_s: float  # virtual time from the first warm-up's arrival to the last token
    wall_s: float  # host time the simulation took (not part of `result`)
    engine_s: float  # of which running the engine and releasing requests (not records, metrics)
    cpu_s: float  # this process's CPU time for it: the host's own cost, were it not shared
    engine_cpu_s: float  # of which running the engine and releasing requests
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


class _Releaser(Releaser):
    """The bench runner's release rules for one plan, driven by finish times."""

    def _load(self, specs: Iterable[RequestSpec]) -> None:
        order = sorted(specs, key=lambda s: s.due_s) if self._open_loop else list(specs)
        self._pending = deque(order)

    def release(self, now_s: float) -> None:
        """Send what may go at `now_s`: each free slot takes the next request, at its offset
        (open loop; a later one) or now (closed loop)."""
        pending = self._pending
        stop_s = self._stop_s  # `_past_stop` inlined: this runs once a request
        while self._free > 0 and pending:
            spec = pending[0]
            if self._open_loop:
                due = self._start_s + spec.due_s
                if stop_s is not None and due >= stop_s:
                    pending.clear()
                    return
                at, scheduled = max(due, now_s), due
            else:
                if stop_s is not None and now_s >= stop_s:
                    pending.clear()
                    return
                at, scheduled = now_s, None
            pending.popleft()
            self._free -= 1
            self._send(spec, at, scheduled)

    def finished(self, now_s: float, spec: RequestSpec | None = None) -> None:
        self._free += 1
        self.release(now_s)


class SentLog:
    """What the driver sent, in sending order, one list per field (columns, not an object
    a request: records and metrics read them whole); a record is made once every request
    has finished."""

    __slots__ = ("at_s", "position", "scheduled_s", "specs", "warmup")

    def __init__(self) -> None:
        self.position: dict[str, int] = {}  # request id -> its place in the columns
        self.specs: list[RequestSpec] = []
        self.at_s: list[float] = []  # when it reached the engine
        self.scheduled_s: list[float | None] = []  # open loop: its drawn offset's time
        self.warmup: list[bool] = []

    def __len__(self) -> int:
        return len(self.specs)

    def spec(self, request_id: str) -> RequestSpec:
        return self.specs[self.position[request_id]]


class _LevelDriver:
    """Joins one level's plan to an offline engine and makes a record per request."""

    def __init__(
        self,
        config: BenchConfig,
        level: Level,
        engine: OfflineEngineLike,
        lora: LoraRegistry | None = None,
    ) -> None:
        self.plan = plan_level(config, level)
        self.lora = lora  # the adapters a spec's `model` may name
        self.prompts = PromptSource(config.seed)
        self.engine = engine
        self.sent = SentLog()
        self.finished: list[Timeline] = []  # in finishing order; records made at the end
        self._warmups = deque(self.plan.warmup)
        self._main: _Releaser | SessionReleaser | None = None
        engine.on_finish = self._finished

    def start(self) -> None:
        if self._warmups:
            self._send(self._warmups.popleft(), 0.0, None, warmup=True)
        else:
            self._start_main(0.0)

    def _start_main(self, now_s: float) -> None:
        plan = self.plan
        releaser = SessionReleaser if sessions.has_sessions(plan.specs) else _Releaser
        self._main = releaser(
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
        sent = self.sent
        sent.position[request_id] = len(sent.specs)
        sent.specs.append(spec)
        sent.at_s.append(at_s)
        sent.scheduled_s.append(scheduled_s)
        sent.warmup.append(warmup)
        lora = self.lora
        request = Request(
            request_id=request_id,
            prompt_ids=self.prompts.token_ids(spec),
            max_tokens=spec.output_tokens,
            ignore_eos=True,  # as the bench targets send it
            lora=lora.get(spec.model) if lora is not None and spec.model else None,
        )
        self.engine.submit(request, at_s)

    def close(self) -> None:
        """Let go of the engine: its callback and the releaser refer back to this driver."""
        self.engine.on_finish = None
        self._main = None

    def _finished(self, timeline: Timeline) -> None:
        self.finished.append(timeline)
        times = timeline.group_times_s  # its last token's time, else its arrival's
        now_s = times[-1] if times else timeline.arrival_s
        if self._main is not None:
            self._main.finished(now_s, self.sent.spec(timeline.request_id))
        elif self._warmups:
            self._send(self._warmups.popleft(), now_s, None, warmup=True)
        else:
            self._start_main(now_s)


def make_records(
    sent: SentLog, timelines: list[Timeline]
) -> tuple[list[RequestRecord], MessageTimes]:
    """What a client would have seen of each request sent, with no transport in between,
    in sending order, and their message times in arrays.

    Every time is computed over all requests at once, with the arithmetic a record's own
    would use (float64 differences; ns as np.rint(s * 1e9), half to even as round() does);
    the loop left only assembles records. Message times are one int64 array: a record's
    `chunk_ns` is its slice (a list of Python ints per record cost more than the rest of
    the records) and its `chunk_tokens` the timeline's own list."""
    n = len(sent)
    ordered: list[Timeline] = [None] * n  # type: ignore[list-item]  # each filled below
    position = sent.position
    for t in timelines:
        ordered[position[t.request_id]] = t
    # A refused request has no messages (nor would one that emitted nothing).
    spoken = [t.error is None and len(t.group_times_s) > 0 for t in ordered]
    counts = np.fromiter(
        (len(t.group_times_s) if ok else 0 for t, ok in zip(ordered, spoken, strict=True)),
        np.int64,
        n,
    )
    ends = np.cumsum(counts)
    total = int(ends[-1]) if n else 0
    answered = list(compress(ordered, spoken))
    times = np.fromiter(chain.from_iterable(t.group_times_s for t in answered), float, total)
    tokens = _message_tokens(answered, (ends - counts)[spoken].tolist(), total)
    first_s, last_s = times[(ends - counts)[spoken]], times[ends[spoken] - 1]
    all_ns = _ns_array(times)  # in place: 10s of MB
    arrival_s = np.fromiter((t.arrival_s for t in answered), float, len(answered))
    # Per answered request: finished, received, modelled TTFT, E2E and decode span.
    answers = zip(
        all_ns[ends[spoken] - 1].tolist(),
        _ns_array(arrival_s.copy()).tolist(),
        (first_s - arrival_s).tolist(),
        (last_s - arrival_s).tolist(),
        (last_s - first_s).tolist(),
        strict=True,
    )
    sent_ns = _ns_array(np.array(sent.at_s, dtype=float)).tolist()
    records = []
    for spec, scheduled_s, warmup, t, ok, at_ns, end, count in zip(
        sent.specs, sent.scheduled_s, sent.warmup, ordered, spoken, sent_ns, ends.tolist(),
        counts.tolist(), strict=True,
    ):  # fmt: skip
        scheduled_ns = None if scheduled_s is None else _ns(scheduled_s)
        if not ok:
            error = None if t.error is None else f"{type(t.error).__name__}: {t.error}"
            records.append(
                RequestRecord(spec.index, spec.prompt_tokens, spec.output_tokens, scheduled_ns,
                              at_ns, error=error, warmup=warmup)
            )  # fmt: skip
            continue
        finished_ns, received_ns, ttft_s, e2e_s, decode_s = next(answers)
        records.append(
            RequestRecord(
                spec.index, spec.prompt_tokens, spec.output_tokens, scheduled_ns, at_ns,
                all_ns[end - count : end], t.group_tokens, finished_ns, t.prompt_tokens,
                t.completion_tokens, t.cached_tokens, ttft_s, e2e_s, decode_s, received_ns,
                warmup=warmup,
            )
        )  # fmt: skip
    index = np.fromiter((spec.index for spec in sent.specs), np.int64, n)
    return records, MessageTimes(index=index, ends=ends, ns=all_ns, tokens=tokens)


def _message_tokens(answered: list[Timeline], starts: list[int], total: int) -> np.ndarray:
    """Tokens of every message of the `answered` timelines, which start at `starts`, in
    one int64 array. Nearly every message carries one token (all but speculative
    decoding's): a timeline of ones is found by `list.count` and left as the array's
    fill, a C loop over the list where converting each int in `np.fromiter` cost ~5% of a
    simulated request's instructions."""
    tokens = np.ones(total, np.int64)
    for t, at in zip(answered, starts, strict=True):
        group = t.group_tokens
        if group.count(1) != len(group):
            tokens[at : at + len(group)] = group
    return tokens


def _ns_array(t_s: np.ndarray) -> np.ndarray:
    """`_ns` of every element, as int64; overwrites `t_s`."""
    return np.rint(np.multiply(t_s, 1e9, out=t_s), out=t_s).astype(np.int64)


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Pause Python's cycle collector: a level allocates millions of objects that live to
    its end (token lists, timelines, records), so the collector would scan them again and
    again (a quarter of the run's time) to find no garbage; reference counting frees what
    the engine and the metrics drop, and they build no cycles (the driver's, with the
    engine, it breaks itself: `_LevelDriver.close`)."""
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
    lora: LoraConfig | None = None,
) -> LevelRun:
    """Run one level of `config` on a fresh engine for `deployment`; `fast=False` steps
    every decode step one at a time (the same result, slower). `lora`: serve its adapters
    (`--lora-modules`): a request spec's `model` names one (`check_models` first)."""
    registry = (
        LoraRegistry(lora, deployment.model, deployment.model.name) if lora is not None else None
    )

    def build() -> tuple[OfflineEngine, ServerFacts]:
        max_loras = lora.max_loras if lora is not None else None
        core, card = build_core(deployment, engine_config, max_loras=max_loras)
        facts = ServerFacts(
            hardware=card.hardware, model=card.model, devices=card.devices, emulated=True
        )
        return OfflineEngine(core, fast=fast), facts

    return drive_level(build, config, level, lora=registry)


def check_models(models: Iterable[str | None], base: str, lora: LoraConfig | None) -> None:
    """ValueError unless each model a workload names is `base` or one of `lora`'s adapters
    (a live server would answer 404)."""
    served = {base, *(name for name, _ in (lora.modules if lora is not None else ()))}
    for model in models:
        if model is not None and model not in served:
            raise ValueError(
                f"the workload asks for model {model!r}: not {base!r} nor a --lora-modules "
                f"adapter ({', '.join(sorted(served - {base})) or 'none given'})"
            )


def drive_level(
    build: Callable[[], tuple[OfflineEngineLike, ServerFacts]],
    config: BenchConfig,
    level: Level,
    *,
    lora: LoraRegistry | None = None,
) -> LevelRun:
    """Release `config`'s `level` into the offline engine `build` makes and summarise it as
    bench does. `build` returns the engine and the facts the result names; `lora` the
    adapters a request spec's `model` may name."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with _no_cycle_collection():
        engine, facts = build()
        driver = _LevelDriver(config, level, engine, lora)
        driver.start()
        engine0, engine_cpu0 = time.perf_counter(), time.process_time()
        engine.run()
        engine_s = time.perf_counter() - engine0
        engine_cpu_s = time.process_time() - engine_cpu0
        records, messages = make_records(driver.sent, driver.finished)
        modelled_s, totals = engine.now_s, engine.totals()
        # The engine and all it holds freed here, by reference counting (with the cycles
        # through the driver left, the collector freed them in some later level's time).
        driver.close()
        del driver, engine
        metrics = compute_metrics(records, slo=config.slo)
        result = summarise(config, level, facts, metrics, [], simulated=True)
        result.update(prefix_figures(config, records))
    return LevelRun(
        result=result,
        records=records,
        messages=messages,
        modelled_s=modelled_s,
        wall_s=time.perf_counter() - wall0,
        engine_s=engine_s,
        cpu_s=time.process_time() - cpu0,
        engine_cpu_s=engine_cpu_s,
        steps=totals.steps,
        tokens=totals.tokens_generated,
        preemptions=totals.preemptions,
        energy_j=totals.energy_j,
    )


def simulate(
    deployment: Deployment, engine_config: EngineConfig, config: BenchConfig
) -> list[LevelRun]:
    """Every level of `config`'s sweep, in order."""
    return [simulate_level(deployment, engine_config, config, lv) for lv in levels(config)]
