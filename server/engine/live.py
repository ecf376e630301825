"""The live engine: drives `EngineCore` on a monotonic clock and feeds per-request streams.

Steps run back to back on the modelled timeline: each starts where the last
ended (or when work arrives, if idle), and the driver sleeps to each step's
absolute end before applying it, so CPU time spent here never adds to modelled
time. Tokens due together are handed to a stream as one group; under load the
driver widens the grouping interval so the front end's message rate stays in
budget, and every token keeps its modelled time. Transport agnostic: front
ends reach it only through `api.EngineClient`, which it implements.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable

from memorywall.errors import DrainingError, MemorywallError
from memorywall.server.engine.api import (
    EngineObserver,
    EngineStats,
    Event,
    Finished,
    KVEvent,
    Request,
    StepReport,
    TokenGroup,
)
from memorywall.server.engine.clock import Clock, MonotonicClock
from memorywall.server.engine.lag import LagTracker
from memorywall.server.engine.scheduler import Emission, EngineCore, Sequence, Step
from memorywall.server.engine.tokens import token_text

log = logging.getLogger("memorywall.engine")

LAG_WARNING_INTERVAL_S = 5.0


class RequestStream:
    """One request's output as the front end reads it: token groups, then `Finished`."""

    def __init__(self, engine: AsyncEngine, seq: Sequence, min_interval_s: float) -> None:
        self._engine = engine
        self.sequence = seq
        self.request_id = seq.request.request_id
        self.min_interval_s = min_interval_s
        self._ids: list[int] = []
        self._times: list[float] = []
        self._final: Finished | None = None
        self._error: MemorywallError | None = None
        self._ready = asyncio.Event()
        self._last_flush_s = -1.0
        self._done = False

    def _push(self, ids: tuple[int, ...], time_s: float) -> None:
        self._ids.extend(ids)
        self._times.extend([time_s] * len(ids))

    def _due(self, now: float, interval_s: float) -> bool:
        first = self._last_flush_s < 0
        return first or now - self._last_flush_s >= max(interval_s, self.min_interval_s)

    def _flush(self, now: float) -> None:
        self._last_flush_s = now
        self._ready.set()

    def _end(self, final: Finished | None, error: MemorywallError | None = None) -> None:
        self._final, self._error = final, error
        self._ready.set()

    async def next_event(self) -> Event | None:
        """The next group or the final summary; None once the stream is over."""
        while True:
            if self._ids:
                ids, times = tuple(self._ids), self._times
                self._ids, self._times = [], []
                self._engine._record_lag(times[0])
                seq = self.sequence
                arrival = seq.arrival_s
                text = "".join("" if i in self._engine.eos_ids else token_text(i) for i in ids)
                # The last group is read once the engine has ended the request, so it
                # carries the finish reason and the front needs no wait for `Finished`.
                return TokenGroup(
                    token_ids=ids,
                    text=text,
                    times_s=tuple(t - arrival for t in times),
                    prompt_tokens=seq.prompt_len,
                    cached_tokens=seq.cached_tokens,
                    completion_tokens=len(seq.output_ids),
                    finish_reason=seq.finish_reason if self._final is not None else None,
                )
            if self._error is not None:
                raise self._error
            if self._final is not None and not self._done:
                self._done = True
                return self._final
            if self._done:
                return None
            self._ready.clear()
            await self._ready.wait()

    async def __aiter__(self) -> AsyncIterator[Event]:
        while (event := await self.next_event()) is not None:
            yield event

    @property
    def ended(self) -> bool:
        return self._final is not None or self._error is not None

    def close(self) -> None:
        if not self.ended:
            self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(
        self,
        core: EngineCore,
        *,
        clock: Clock | None = None,
        max_messages_per_s: float,
        lag_threshold_s: float = 0.010,
        observers: Iterable[EngineObserver] = (),
    ) -> None:
        self.core = core
        self.clock = clock or MonotonicClock()
        self.max_messages_per_s = max_messages_per_s
        self.eos_ids = core.limits.eos_token_ids
        self._streams: dict[str, RequestStream] = {}
        self._held: set[RequestStream] = set()  # streams with tokens waiting for their interval
        self._idle = asyncio.Event()
        self._work = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._lag = LagTracker(threshold_s=lag_threshold_s)
        self._started_s = time.monotonic()
        self.observers = list(observers)
        for observer in self.observers:
            observer.watch(self.stats)
        self._last_warning_s = 0.0
        self.draining = False

    def now(self) -> float:
        return self.clock.now()

    def subscribe_kv_events(self, callback: Callable[[KVEvent], None]) -> Callable[[], None]:
        return self.core.pool.subscribe(callback)

    @property
    def stream_interval_s(self) -> float:
        """Grouping interval that keeps messages per second within budget."""
        return len(self._streams) / self.max_messages_per_s

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="memorywall-engine")

    def submit(
        self, request: Request, *, min_interval_s: float = 0.0, arrival_s: float | None = None
    ) -> RequestStream:
        """Queue a request that arrived at `arrival_s` (default now).

        Raises a `MemorywallError` for bad input, holding nothing.
        """
        if self.draining:
            raise DrainingError("server is shutting down; not admitting new requests")
        now = self.clock.now()
        seq = self.core.add(request, now if arrival_s is None else min(arrival_s, now))
        stream = RequestStream(self, seq, min_interval_s)
        self._streams[request.request_id] = stream
        self._work.set()
        return stream

    def abort(self, request_id: str) -> bool:
        """Free the request's slot and KV now; its stream ends with reason ABORT."""
        seq = self.core.abort(request_id)
        if seq is None:
            return False
        stream = self._streams.get(request_id)
        if stream is not None:
            self._close(stream)
            stream._end(self._report(self._finished(seq)))
        return True

    async def drain(self, grace_s: float) -> None:
        """Stop admitting, let live requests run up to `grace_s`, end the rest with an error."""
        self.draining = True
        if self._streams:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        for request_id, stream in list(self._streams.items()):
            seq = self.core.abort(request_id)
            self._close(stream)
            if seq is not None:
                self._report(self._finished(seq))  # metrics count it as aborted
            stream._end(None, DrainingError("server shut down before the request finished"))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.clock.close()

    def stats(self) -> EngineStats:
        c = self.core.counters
        return EngineStats(
            running=len(self.core.running),
            waiting=len(self.core.waiting),
            kv_used_tokens=self.core.kv_used_tokens,
            kv_total_tokens=self.core.pool.capacity_tokens,
            lag=self._lag.summary(),
            uptime_s=time.monotonic() - self._started_s,
            requests_finished=c.finished,
            requests_aborted=c.aborted,
            tokens_generated=c.tokens_generated,
            preemptions=c.preemptions,
            steps=c.steps,
            modelled_energy_j=c.energy_j,
            draining=self.draining,
            stream_interval_s=self.stream_interval_s,
            prefix_cache=self.core.prefix_cache_stats(),
        )

    async def _run(self) -> None:
        last_end = 0.0
        while True:
            if not self.core.has_work():
                self._work.clear()
                await self._work.wait()
                continue
            # Back to back on the modelled timeline. An idle engine starts at the
            # arrival that woke it: the time Python took to get here is not modelled.
            step = self.core.schedule(max(last_end, self.core.next_arrival_s()))
            if step is None:
                await asyncio.sleep(0)
                continue
            await self.clock.sleep_until(step.end_s)
            emissions = self.core.complete(step)
            self._deliver(emissions, self.clock.now())
            if self.observers:
                report = step_report(step, emissions, self.core.counters.preemptions)
                for observer in self.observers:
                    observer.on_step(report)
            last_end = step.end_s

    def _deliver(self, emissions: list[Emission], now: float) -> None:
        interval = self.stream_interval_s
        for e in emissions:
            stream = self._streams.get(e.sequence.request.request_id)
            if stream is None:
                continue
            stream._push(e.token_ids, e.time_s)
            if e.finished:
                self._close(stream)
                stream._end(self._report(self._finished(e.sequence)))
            elif stream._due(now, interval):
                stream._flush(now)
            else:
                self._held.add(stream)
        for stream in [s for s in self._held if s._due(now, interval)]:
            self._held.discard(stream)
            stream._flush(now)

    def _close(self, stream: RequestStream) -> None:
        self._streams.pop(stream.request_id, None)
        self._held.discard(stream)
        if not self._streams:
            self._idle.set()

    def _record_lag(self, due_s: float) -> None:
        now = self.clock.now()
        lag = now - due_s
        self._lag.record(lag)
        for observer in self.observers:
            observer.on_lag(lag)
        if lag > self._lag.threshold_s and now - self._last_warning_s > LAG_WARNING_INTERVAL_S:
            self._last_warning_s = now
            s = self._lag.summary()
            log.warning(
                "emulation lagging: tokens handed out %.1f ms after their modelled time "
                "(p99 %.1f ms over %d groups; %d late steps). Modelled time is kept, so "
                "clients see late tokens: lower the load or the message rate.",
                lag * 1e3,
                s.p99_s * 1e3,
                s.samples,
                s.late_steps,
            )

    def _report(self, finished: Finished) -> Finished:
        for observer in self.observers:
            observer.on_finish(finished)
        return finished

    def _finished(self, seq: Sequence) -> Finished:
        arrival = seq.arrival_s
        first_sched = seq.first_scheduled_s if seq.first_scheduled_s is not None else arrival
        first = seq.first_token_s if seq.first_token_s is not None else first_sched
        last = seq.last_token_s if seq.last_token_s is not None else first
        return Finished(
            request_id=seq.request.request_id,
            reason=seq.finish_reason,
            prompt_tokens=len(seq.request.prompt_ids),
            completion_tokens=len(seq.output_ids),
            cached_tokens=seq.cached_tokens,
            queue_s=first_sched - arrival,
            prefill_s=first - first_sched,
            decode_s=last - first,
            ttft_s=first - arrival,
            e2e_s=last - arrival,
            preemptions=seq.preemptions,
            energy_j=seq.energy_j,
            last_token_id=seq.output_ids[-1] if seq.output_ids else None,
        )


def step_report(step: Step, emissions: list[Emission], preemptions_total: int) -> StepReport:
    """What observers count of a completed step and the tokens it gave."""
    first_tokens: list[tuple[int, float]] = []
    gaps: list[tuple[float, int]] = []
    generated = 0
    for e in emissions:
        k = len(e.token_ids)
        generated += k
        seq = e.sequence
        if e.previous_token_s is None:
            first_tokens.append((seq.prompt_len, e.time_s - seq.arrival_s))
            continue
        gap = (e.time_s - e.previous_token_s) / k
        # Sequences decoded together share a gap: one run each.
        if gaps and gaps[-1][0] == gap:
            gaps[-1] = (gap, gaps[-1][1] + k)
        else:
            gaps.append((gap, k))
    cost = step.cost
    return StepReport(
        time_s=cost.time_s,
        energy_j=cost.energy_j,
        tokens=cost.tokens,
        generated=generated,
        preemptions_total=preemptions_total,
        first_tokens=first_tokens,
        token_gaps=gaps,
    )
