"""The live engine: drives `EngineCore` on a monotonic clock and feeds per-request streams.

Steps run back to back on the modelled timeline by the engine's loop rule
(`loop.next_move`): each starts where the last ended (or when work arrives, if
idle), and the driver sleeps to each step's
absolute end before applying it, so CPU time spent here never adds to modelled
time.

Never faster than the model: when the host wakes past a deadline by more than a
small tolerance (`lag.StallTracker`), that step's tokens are stamped at the
wake-up and the next step starts from there, not from the missed deadline, so
the engine never runs steps back to back to catch up and no stream gets two
tokens closer together than their modelled gap. The lost time is counted per
request (`Finished.host_stall_s`), in `EngineStats.host_stall` and in a
"degraded" log line once per interval.

With `stream_interval=None` (`auto`, the default) each token goes to its
stream alone while the message budget (`pacing.MessageBudget`) lasts; past it a
stream's tokens wait for a message of the size the budget's rate needs, never
longer than `max_hold_s` (or one step, if longer), and the stream's reader is
woken once a message. With
`stream_interval=N` a stream's first token goes out alone at its time (TTFT is
not delayed) and the rest N per message, each message leaving when its last
token is due; the last may be shorter (SGLang's `--stream-interval`, which also
sends the first token alone). Either way every token keeps its modelled time
(`TokenGroup.times_s`) and no message leaves before its tokens are due.

Plain decode stretches (`live_decode`) cost no Python per sequence a step: while
`decode_run.plan_decode` accepts the batch, the driver sleeps from step end to step
end, tells observers each step at a fixed cost, and hands a sequence its tokens only
when its stream sends a message. `auto` then sends the streams whose tokens waited
longest, as many a step as the budget allows (and any that cannot wait another step);
a fixed interval sends each stream's message the step its Nth token comes. Modelled
times are the step-by-step ones; an arrival joins at the next step boundary, and an
abort, a KV release or a host stall closes the stretch at once (the step in progress
is then planned and completed as usual). KV events of a stretch are published when
it closes.

Transport agnostic: front ends reach it only through `api.EngineClient`, which
it implements.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace

from memorywall.errors import ConfigError, DrainingError, MemorywallError
from memorywall.server.engine.api import (
    EngineObserver,
    EngineStats,
    Event,
    EventIteration,
    Finished,
    KVEvent,
    Request,
    StreamSink,
    TokenGroup,
)
from memorywall.server.engine.clock import Clock, MonotonicClock
from memorywall.server.engine.decode_run import plan_decode
from memorywall.server.engine.faults import FaultRule, refuse_fault
from memorywall.server.engine.lag import LagTracker, StallTracker
from memorywall.server.engine.lifecycle import Lifecycle, LifecycleState
from memorywall.server.engine.live_decode import Stretch
from memorywall.server.engine.loop import next_move
from memorywall.server.engine.pacing import MessageBudget
from memorywall.server.engine.reports import batch_entries, finished, step_report
from memorywall.server.engine.scheduler import Emission, EngineCore, SeqState, Step
from memorywall.server.engine.tokens import token_text

log = logging.getLogger("memorywall.engine")

# A held token waits for its stream's next one only if that comes within this many of its
# own step times (or `max_hold_s`, if longer); a longer step (a big prefill chunk joined
# the batch) sends it first.
HOLD_STEPS = 2.0
# `auto`'s default hold: how long a token may wait for its stream's next ones when the
# budget is short. A wafer's ~0.6 ms steps group up to about 7 tokens a message (a client
# sees each token at most this late); an H100's 10 ms steps still hold one step at most.
MAX_HOLD_S = 0.004
# The most steps a stretch plans at once (`_open`): costing them takes time from its first
# step, and a long one rarely runs to its end (arrivals, finishes close it).
STRETCH_STEPS = 128
# The fewest steps a stretch opens for: opening and closing one walks the batch about as
# often as a step does, so a shorter one costs more than stepping.
MIN_STRETCH_STEPS = 8
# How often the message budget looks at this process's CPU time (see `_adapt`).
BUSY_WINDOW_S = 0.002


class TokenTexts(dict[int, str]):
    """Each token id's text, built the first time it is asked for: a message's text is then
    a lookup per token, not a call (an end-of-sequence id's text is empty). One entry at
    most per id of the vocabulary."""

    def __init__(self, eos_ids: frozenset[int]) -> None:
        super().__init__()
        self._eos = eos_ids

    def __missing__(self, token_id: int) -> str:
        text = self[token_id] = "" if token_id in self._eos else token_text(token_id)
        return text


class RequestStream(EventIteration):
    """One request's output as the front end reads it: token groups, then `Finished`."""

    def __init__(
        self,
        engine: AsyncEngine,
        seq: SeqState,
        min_interval_s: float,
        stalled_s: float,
        stream_interval: int | None = None,
    ) -> None:
        self._engine = engine
        # Fixed grouping (`stream_interval=N`): tokens per message, the sizes of the messages
        # ready to be read (oldest first) and the tokens not yet in one. None: `auto`.
        self.stream_interval = stream_interval
        self._ready: deque[int] | None = None if stream_interval is None else deque()
        self._pending = 0
        self.sequence = seq
        self.request_id = seq.request.request_id
        self.min_interval_s = min_interval_s
        self._ids: list[int] = []
        self._times: list[float] = []
        self._final: Finished | None = None
        self._error: MemorywallError | None = None
        self._waiter: asyncio.Future[None] | None = None  # the reader, while it waits
        self._sink: StreamSink | None = None  # the front's synchronous reader, if attached
        self._released = False  # the engine handed the waiting tokens over (not held)
        self._last_flush_s = -1.0
        self._done = False
        self._max_lag_s = 0.0
        self._stalled_s = 0.0  # how late the host made the tokens waiting here (re-timed)
        # The engine's stall total when the request arrived and when its first token came.
        self.stalled_at_arrival_s = stalled_s
        self.stalled_at_first_s: float | None = None
        self.stalled_at_last_s = stalled_s  # at its latest token (or arrival)

    def _push(self, ids: list[int], time_s: float, stalled_s: float) -> None:
        if stalled_s > self._stalled_s:
            self._stalled_s = stalled_s
        self._ids.extend(ids)
        self._times.extend([time_s] * len(ids))
        self._pending += len(ids)

    def _paced(self, now: float) -> bool:
        """The client's own `min_interval_s` holds its tokens now."""
        return self._last_flush_s >= 0 and now - self._last_flush_s < self.min_interval_s

    def _wake(self) -> None:
        if self._sink is not None:
            self._feed(self._sink)
            return
        self._released = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _flush(self, now: float, whole: bool = False) -> None:
        """Hand the waiting tokens over. With a fixed `stream_interval` N, only a multiple
        of N of them goes (nothing if under N), as one message, unless `whole`."""
        ready, interval = self._ready, self.stream_interval
        if ready is not None and interval is not None:  # both or neither: fixed grouping
            n = self._pending if whole else self._pending - self._pending % interval
            if not n:
                return
            ready.append(n)
            self._pending -= n
        else:
            self._pending = 0  # `auto`: the tokens since the last message
        self._last_flush_s = now
        self._wake()

    def _end(self, final: Finished | None, error: MemorywallError | None = None) -> None:
        self._final, self._error = final, error
        ready = self._ready
        if ready is not None and self._pending:
            # The rest: a multiple of N, then what is left (the last message, shorter).
            interval = self.stream_interval
            assert interval is not None  # `_ready` is kept for a fixed interval only
            if full := self._pending - self._pending % interval:
                ready.append(full)
            if rest := self._pending % interval:
                ready.append(rest)
            self._pending = 0
        self._wake()

    def _take(self) -> TokenGroup:
        """The tokens handed over so far, as one group (the hot path: one per message); with
        a fixed `stream_interval`, the oldest message's tokens."""
        ready = self._ready
        if ready is None or len(self._ids) == ready[0]:
            if ready:
                ready.popleft()
            ids, times = self._ids, self._times
            self._ids, self._times = [], []
        else:
            n = ready.popleft()
            ids, times = self._ids[:n], self._times[:n]
            self._ids, self._times = self._ids[n:], self._times[n:]
        # Lag against the deadline the tokens had before a stall moved them, if one did: the
        # first token's (`auto` holds a token only to spare the host), or with a fixed
        # interval the last one's, when the message is due (holding the others is the point).
        due_s = times[0] if ready is None else times[-1]
        lag = self._engine._record_lag(due_s - self._stalled_s)
        self._stalled_s = 0.0
        if lag > self._max_lag_s:
            self._max_lag_s = lag
        seq = self.sequence
        arrival = seq.arrival_s
        texts = self._engine.texts
        text = texts[ids[0]] if len(ids) == 1 else "".join(map(texts.__getitem__, ids))
        # The last group is read once the engine has ended the request, so it
        # carries the finish reason and the front needs no wait for `Finished`.
        return TokenGroup(
            token_ids=tuple(ids),
            text=text,
            times_s=tuple([t - arrival for t in times]),
            prompt_tokens=seq.prompt_len,
            cached_tokens=seq.cached_tokens,
            completion_tokens=len(seq.output_ids),
            finish_reason=seq.finish_reason if self._final is not None and not self._ids else None,
        )

    def attach(self, sink: StreamSink) -> bool:
        """From now on `_wake` calls `sink` with what it hands over, on the engine's loop,
        instead of waking a reader; what was handed over before goes to it now."""
        if self._sink is not None or self._done:
            return False
        self._sink = sink
        if self._ready or self._released or self.ended:
            self._released = False
            self._feed(sink)
        return True

    def _feed(self, sink: StreamSink) -> None:
        """`next_event`'s order, synchronously: every message handed over, then the end."""
        ready = self._ready
        if ready is None:
            if self._ids:  # `auto`: a flush or the end hands over every token waiting
                sink.group(self._take())
        else:
            while ready:
                sink.group(self._take())
        if self.ended and not self._done:
            self._done = True
            final = self._final
            if final is not None:
                final = replace(final, max_lag_s=self._max_lag_s)
            sink.end(final, self._error)

    async def next_event(self) -> Event | None:
        """The next group or the final summary; None once the stream is over."""
        while True:
            # Held tokens wait for their release even when the reader comes by early.
            if self._ready is not None:
                self._released = False
                if self._ready:
                    return self._take()
            elif self._ids and self._released:
                self._released = False
                return self._take()
            if self._error is not None:
                raise self._error
            if self._final is not None and not self._done:
                self._done = True
                return replace(self._final, max_lag_s=self._max_lag_s)
            if self._done:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    @property
    def ended(self) -> bool:
        return self._final is not None or self._error is not None

    def close(self) -> None:
        self._sink = None  # its front has stopped listening
        if not self.ended:
            self._engine.abort(self.request_id)


class AsyncEngine:
    """`max_messages_per_s`: the message budget's ceiling (see `pacing`). `stream_interval`:
    tokens per streamed message after a stream's first (None: `auto`, one while the budget
    lasts). `max_hold_s`: how long `auto` may hold a token for its stream's next ones when
    the budget is short (0: one step, then out). `stall_tolerance_s`: how late a wake-up may
    be before the timeline is re-anchored (or half a step, if shorter). `cpu_time`: this
    process's CPU seconds, which the budget adapts to (tests pass a fake).
    `decode_stretches`: run plain decode stretches at a fixed cost a step (see the module's
    docstring); False steps every step through `schedule` and `complete` (the reference).
    `min_stretch_steps`: the fewest steps a stretch opens for."""

    def __init__(
        self,
        core: EngineCore,
        *,
        clock: Clock | None = None,
        max_messages_per_s: float,
        stream_interval: int | None = None,
        max_hold_s: float = MAX_HOLD_S,
        lag_threshold_s: float = 0.010,
        stall_tolerance_s: float = 0.001,
        cpu_time: Callable[[], float] = time.process_time,
        observers: Iterable[EngineObserver] = (),
        load_s: float = 0.0,
        decode_stretches: bool = True,
        min_stretch_steps: int = MIN_STRETCH_STEPS,
    ) -> None:
        self.core = core
        self.clock = clock or MonotonicClock()
        if stream_interval is not None and (
            isinstance(stream_interval, bool)
            or not isinstance(stream_interval, int)
            or stream_interval < 1
        ):
            raise ConfigError(
                f"stream_interval: an int >= 1 or None (auto), got {stream_interval!r}"
            )
        if not max_hold_s >= 0:
            raise ConfigError(f"max_hold_s: a number >= 0, got {max_hold_s!r}")
        if not isinstance(min_stretch_steps, int) or min_stretch_steps < 1:
            raise ConfigError(f"min_stretch_steps: an int >= 1, got {min_stretch_steps!r}")
        self.max_messages_per_s = max_messages_per_s
        self.stream_interval = stream_interval
        self.max_hold_s = max_hold_s
        self.eos_ids = core.limits.eos_token_ids
        self.texts = TokenTexts(self.eos_ids)
        self._streams: dict[str, RequestStream] = {}
        self._by_seq: dict[SeqState, RequestStream] = {}  # the same streams, by sequence
        # Streams holding tokens for grouping (`auto`): stream -> its oldest held token's time.
        self._held: dict[RequestStream, float] = {}
        self._paced: set[RequestStream] = set()  # streams held by their own min_interval_s
        self._hold_s = 0.0  # how long a held token may wait now (0: none held yet)
        self._budget = MessageBudget(max_messages_per_s)
        self._cpu_time = cpu_time
        self._mark = (self.clock.now(), cpu_time())  # wall and CPU time at the last look
        self._steps_seen = 0  # steps since then the budget has not adapted to
        self._idle = asyncio.Event()
        self._work = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._lag = LagTracker(threshold_s=lag_threshold_s)
        self._stalls = StallTracker(tolerance_s=stall_tolerance_s)
        self._started_s = time.monotonic()
        self.observers = list(observers)
        for observer in self.observers:
            observer.watch(self.stats)
        # Per-request step records cost a list per step: built only for an observer that
        # asks (tracing), never otherwise.
        self._wants_batch = any(getattr(o, "wants_batch", False) for o in self.observers)
        self.draining = False
        self.decode_stretches = decode_stretches
        self.min_stretch_steps = min_stretch_steps
        # The stretch in progress (None: stepping), its streams by the sequences' positions,
        # and its streams in the order they send (`auto`: (position, oldest waiting token's
        # time), oldest first; fixed interval: (position, steps taken when its next message
        # is full), soonest first).
        self._stretch: Stretch | None = None
        self._stretch_streams: list[RequestStream | None] = []
        self._ring: deque[tuple[int, float]] = deque()
        self._ring_holds = False  # a stream in the ring holds tokens (`auto`)
        # The step in progress when something closed the stretch under the driver's sleep.
        self._converted: Step | None = None
        self._asleep = False  # the driver sleeps through a stretch's step
        self._behind: list[RequestStream] = []  # see `_open`
        # `load_s`: how long loading the weights takes (startup, wake-up); 0: ready at once.
        self._lifecycle = Lifecycle(load_s, self._wait_s, self.core.kv.pool.reset_prefix_cache)

    def now(self) -> float:
        return self.clock.now()

    # Lifecycle (lifecycle.py): the weights' load, sleep and wake-up, the prefix-cache reset

    @property
    def lifecycle(self) -> LifecycleState:
        return self._lifecycle.state

    async def load(self) -> None:
        """The startup load of the weights: requests are refused until it ends."""
        await self._lifecycle.load()

    async def sleep(self, level: int) -> None:
        await self._lifecycle.sleep(level, busy=bool(self._streams or self.core.has_work()))

    async def wake_up(self) -> None:
        await self._lifecycle.wake_up()

    async def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache (vLLM's); False while requests hold KV blocks."""
        return self.core.kv.pool.reset_prefix_cache()

    async def _wait_s(self, seconds: float) -> None:
        # Not `clock.sleep_until`: its one timer belongs to the step loop.
        deadline = self.clock.now() + seconds
        while (left := deadline - self.clock.now()) > 0:
            await asyncio.sleep(left)

    def subscribe_kv_events(self, callback: Callable[[KVEvent], None]) -> Callable[[], None]:
        self._interrupt()  # the stretch's events so far go out before it listens
        return self.core.kv.subscribe(callback)

    @property
    def stream_interval_s(self) -> float:
        """The longest grouping may hold a token now: 0 while every token goes out alone
        (with a fixed `stream_interval` N, N - 1 of the last step's times)."""
        holds = self._held or (self._stretch is not None and self._ring_holds)
        return self._hold_s if holds or self.stream_interval is not None else 0.0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="memorywall-engine")

    def submit(
        self,
        request: Request,
        *,
        min_interval_s: float = 0.0,
        arrival_s: float | None = None,
        fault: FaultRule | None = None,
    ) -> RequestStream:
        """Queue a request that arrived at `arrival_s` (default now).

        Raises a `MemorywallError` for bad input, holding nothing; refuses a `fault`
        (the guard in front applies them).
        """
        refuse_fault(fault)
        if self.draining:
            raise DrainingError("server is shutting down; not admitting new requests")
        self._lifecycle.check_serving()
        now = self.clock.now()
        seq = self.core.add(request, now if arrival_s is None else min(arrival_s, now))
        stream = RequestStream(
            self, seq, min_interval_s, self._stalls.stalled_s, self.stream_interval
        )
        self._streams[request.request_id] = stream
        self._by_seq[seq] = stream
        self._work.set()
        return stream

    def abort(self, request_id: str) -> bool:
        """Free the request's slot and KV now; its stream ends with reason ABORT."""
        if request_id not in self.core.live:
            return False
        self._interrupt()  # its tokens so far, and the step in progress, as step by step
        seq = self.core.abort(request_id)
        assert seq is not None
        self._work.set()  # what it held may let a waiting request in
        stream = self._streams.get(request_id)
        if stream is not None:
            self._close(stream)
            stream._end(self._report(self._finished(stream)))
        return True

    def release_kv(self, request_id: str) -> bool:
        """Free what a finished `keep_kv` request kept; waiting requests may now fit."""
        if not self.core.kv.is_kept(request_id):
            return False
        self._interrupt()  # the blocks it frees are the stretch's from its next step on
        if not self.core.kv.release_kept(request_id):
            return False
        self._work.set()
        return True

    async def drain(self, grace_s: float) -> None:
        """Stop admitting, let live requests run up to `grace_s`, end the rest with an error."""
        self.draining = True
        if self._streams:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        self._interrupt()  # the requests' tokens so far, as step by step
        for request_id, stream in list(self._streams.items()):
            seq = self.core.abort(request_id)
            self._close(stream)
            if seq is not None:
                self._report(self._finished(stream))  # metrics count it as aborted
            stream._end(None, DrainingError("server shut down before the request finished"))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.clock.close()

    def waiting(self) -> int:
        return len(self.core.waiting)

    def stats(self) -> EngineStats:
        c = self.core.counters
        steps, tokens, energy_j, blocks = (
            (0, 0, 0.0, 0) if self._stretch is None else self._stretch.applied_so_far()
        )
        return EngineStats(
            running=len(self.core.running),
            waiting=len(self.core.waiting),
            kv_used_tokens=self.core.kv_used_tokens + blocks * self.core.kv.block_size,
            kv_total_tokens=self.core.kv.capacity_tokens,
            lag=self._lag.summary(),
            host_stall=self._stalls.summary(self.clock.now()),
            uptime_s=time.monotonic() - self._started_s,
            requests_finished=c.finished,
            requests_aborted=c.aborted,
            tokens_generated=c.tokens_generated + tokens,
            preemptions=c.preemptions,
            steps=c.steps + steps,
            modelled_energy_j=c.energy_j + energy_j,
            draining=self.draining,
            stream_interval_s=self.stream_interval_s,
            prefix_cache=self.core.prefix_cache_stats(),
        )

    async def _run(self) -> None:
        last_end = 0.0
        while True:
            # Requests go to the core as they are submitted: the driver holds none back.
            move = next_move(self.core, last_end)
            if not move.step:
                self._work.clear()
                await self._work.wait()
                continue
            start = move.at_s
            lost = 0.0  # host stall that moved this step later (observers' `stalled_s`)
            if start > last_end:
                # Idle until this arrival: the step starts then, unless the host took too
                # long to get here; then it starts now (the request's TTFT shows the wait).
                now = self.clock.now()
                if self._stalls.too_late(now - start):
                    self._stall(now - start, now)
                    lost = now - start
                    start = now
            elif self.decode_stretches and (stretch := self._open(start)) is not None:
                last_end = await self._run_stretch(stretch)
                continue
            step = self.core.schedule(start)
            if step is None:
                # Work waits for KV that only a release or an abort can free: wait for one
                # (every submit, abort and release sets `_work`) instead of spinning.
                self._work.clear()
                await self._work.wait()
                continue
            if self._held and step.end_s > min(self._held.values()) + self._hold_s:
                self._flush_held(self.clock.now())  # the next step is too long to wait for
            await self.clock.sleep_until(step.end_s)
            last_end = self._completed(step, lost)

    def _completed(self, step: Step, lost: float) -> float:
        """Complete a step the driver slept to the end of (`lost`: host stall that moved its
        start): re-time it if the host woke too late, hand its tokens over, tell the
        observers. Returns its end."""
        woke = self.clock.now()
        late = woke - step.end_s
        step_s = step.end_s - step.start_s
        stalled = self._stalls.too_late(late, step_s)
        if stalled:
            # Never catch up: the step ends when the host got to it (its tokens are
            # stamped then), and the next one starts from there, not from the deadline.
            self._stall(late, woke)
            step.start_s += late
            step.end_s = woke
            lost += late
        batch = batch_entries(step) if self._wants_batch else None
        emissions = self.core.complete(step)
        in_gaps = self._deliver(emissions, woke, step_s, late if stalled else 0.0)
        if self.observers:
            preemptions = self.core.counters.preemptions
            report = step_report(
                step, emissions, preemptions, host_stalls_s=in_gaps, stalled_s=lost, batch=batch
            )
            for observer in self.observers:
                observer.on_step(report)
        self._adapt(woke, late, self._stalls.tolerance(step_s))
        return step.end_s

    # Plain decode stretches (`live_decode`): no Python per sequence a step

    def _open(self, start: float) -> Stretch | None:
        """Begin a stretch of plain decode steps at `start`, or None where stepping is due:
        `plan_decode` declines, an observer wants each step's batch, or a stream paces its
        own messages (`min_interval_s`)."""
        if self._wants_batch or self._paced:
            return None
        # Arrivals close it as they come; a stretch's cost grows with its steps.
        plan = plan_decode(self.core, start, math.inf, STRETCH_STEPS, self.min_stretch_steps)
        if plan is None:
            return None
        by_seq = self._by_seq
        streams = [by_seq.get(seq) for seq in plan.sequences]
        if any(s is not None and s.min_interval_s for s in streams):
            return None
        # Step 0's gaps, host stalls out, as `reports.step_report` finds them step by step.
        stalled = self._stalls.stalled_s
        end = plan.ends[1]
        gaps: list[tuple[float, int]] = []
        behind: list[RequestStream] = []  # streams whose last token predates a stall
        for seq, stream in zip(plan.sequences, streams, strict=True):
            stall = 0.0
            if stream is not None and stream.stalled_at_last_s != stalled:
                stall = stalled - stream.stalled_at_last_s
                behind.append(stream)
            assert seq.last_token_s is not None  # decoding: it has a token
            gap = end - seq.last_token_s - stall
            if gaps and gaps[-1][0] == gap:
                gaps[-1] = (gap, gaps[-1][1] + 1)
            else:
                gaps.append((gap, 1))
        stretch = Stretch(plan, gaps)
        self._behind = behind
        step_s = plan.times_s[0]
        now = self.clock.now()
        held = self._held
        if held and end > min(held.values()) + self._hold_s:
            self._flush_held(now)  # the next step is too long to wait for
        ring: deque[tuple[int, float]] = deque()
        interval = self.stream_interval
        if interval is None:
            # The streams holding tokens first, oldest first, then the rest in running order.
            position = {s: i for i, s in enumerate(streams) if s is not None and s in held}
            for stream in [s for s in held if s not in position]:
                stream._flush(now)  # held and out of the batch (preempted): out now
                self._budget.spend()
            for oldest, i in sorted((held[s], i) for s, i in position.items()):
                ring.append((i, oldest))
            ring += [(i, end) for i, s in enumerate(streams) if s is not None and s not in held]
            self._held = {}
            self._hold_s = max(self.max_hold_s, HOLD_STEPS * step_s)
            self._ring_holds = bool(position)
        else:
            # The step count at which each stream's waiting tokens make a full message.
            due = [(max(1, interval - s._pending), i) for i, s in enumerate(streams) if s]
            ring += [(i, float(t)) for t, i in sorted(due)]
            self._hold_s = (interval - 1) * step_s
        self._stretch = stretch
        self._stretch_streams = streams
        self._ring = ring
        return stretch

    async def _run_stretch(self, stretch: Stretch) -> float:
        """Sleep through the stretch's steps, each one's work a fixed cost plus the streams
        that send a message; returns the end of the last step taken (or completed, where
        something closed the stretch in the middle of a step)."""
        plan = stretch.plan
        ends, times = plan.ends, plan.times_s
        core = self.core
        clock = self.clock
        stalls = self._stalls
        observers = self.observers
        deliver = self._deliver_run if self.stream_interval is None else self._deliver_run_grouped
        room = len(plan.sequences) < core.config.max_num_seqs
        while True:
            j = stretch.taken
            end = ends[j + 1]
            self._asleep = True
            await clock.sleep_until(end)
            self._asleep = False
            if self._stretch is not stretch:
                # Closed under the sleep (an abort, a release): step j, planned as usual.
                step = self._converted
                assert step is not None
                self._converted = None
                return self._completed(step, 0.0)
            woke = clock.now()
            late = woke - end
            step_s = times[j]
            gaps = self._restamp(stretch, j, woke, late) if stalls.too_late(late, step_s) else None
            stretch.taken = j + 1
            if self._behind:  # their step-0 tokens count the stall in their gap
                for stream in self._behind:
                    stream.stalled_at_last_s = stalls.stalled_s
                self._behind = []
            deliver(stretch, woke, step_s)
            if observers:
                report = stretch.report(j, core.counters.preemptions)
                if gaps is not None:
                    start_s = report.start_s + late
                    report = replace(report, token_gaps=gaps, start_s=start_s, stalled_s=late)
                for observer in observers:
                    observer.on_step(report)
            self._adapt(woke, late, stalls.tolerance(step_s))
            if self._stretch is not stretch:
                return ends[j + 1]  # closed between steps (a message's client went)
            if stretch.taken == plan.steps or (room and core.waiting):
                self._close_stretch()  # an arrival joins at the next step, as step by step
                return ends[j + 1]  # re-timed, if the host stalled

    def _restamp(
        self, stretch: Stretch, j: int, woke: float, late: float
    ) -> list[tuple[float, int]]:
        """Step j of the stretch ended `late` past its deadline, a host stall: as stepping
        does, its tokens are stamped at `woke` and the steps after it start from there; each
        stream counts the stall. Returns the step's `StepReport.token_gaps`, stalls out.
        The one step of a stretch that walks its sequences."""
        self._stall(late, woke)
        plan = stretch.plan
        ends = plan.ends
        ends[j + 1 :] = itertools.accumulate(plan.times_s[j + 1 :], initial=woke)
        stalled = self._stalls.stalled_s
        gaps: list[tuple[float, int]] = []
        for seq, stream in zip(plan.sequences, self._stretch_streams, strict=True):
            stall = 0.0
            if stream is not None:
                if late > stream._stalled_s:
                    stream._stalled_s = late
                if stream.stalled_at_last_s != stalled:
                    stall = stalled - stream.stalled_at_last_s
                    stream.stalled_at_last_s = stalled
            previous_s = seq.last_token_s if j == 0 else ends[j]
            assert previous_s is not None  # decoding: it has a token
            gap = woke - previous_s - stall
            if gaps and gaps[-1][0] == gap:
                gaps[-1] = (gap, gaps[-1][1] + 1)
            else:
                gaps.append((gap, 1))
        self._behind = []
        return gaps

    def _interrupt(self) -> None:
        """Close the stretch (if one runs) at the steps slept through and, while the driver
        sleeps through a step, plan that step through `schedule`, as stepping did at its
        start: the driver completes it. Between steps the driver plans the next itself."""
        stretch = self._stretch
        if stretch is None:
            return
        self._close_stretch()
        if self._asleep:
            ends = stretch.plan.ends
            step = self.core.schedule(ends[stretch.taken])
            assert step is not None and step.end_s == ends[stretch.taken + 1]
            self._converted = step

    def _close_stretch(self) -> None:
        """Hand every sequence its tokens, apply the steps taken, and give the streams still
        holding tokens back to stepping's `_held`."""
        stretch = self._stretch
        assert stretch is not None
        self._stretch = None
        streams = self._stretch_streams
        for i, stream in enumerate(streams):
            ids, times = stretch.tokens(i)
            if stream is not None and ids:
                stream._ids += ids
                stream._times += times
                stream._pending += len(ids)
        stretch.apply(self.core)
        if self.stream_interval is None:
            self._held = {s: oldest for i, oldest in self._ring if (s := streams[i]) and s._pending}
        self._ring = deque()
        self._stretch_streams = []
        self._behind = []  # closed in its first step: stepping counts their stall

    def _deliver_run(self, stretch: Stretch, now: float, step_s: float) -> None:
        """`_deliver` for a stretch step (`auto`): the streams whose tokens waited longest
        send theirs, one message each, while the budget lasts, and any whose oldest token
        cannot wait another step (`max_hold_s`, or one step) goes regardless."""
        budget = self._budget
        budget.refill(now)
        ring, streams = self._ring, self._stretch_streams
        t = stretch.taken
        ends = stretch.plan.ends
        cap_s = self.max_hold_s if self.max_hold_s > step_s else step_s
        latest_s = ends[t] + step_s - cap_s
        following_s = ends[t + 1] if t < stretch.plan.steps else math.inf
        sent = 0
        for _ in range(len(ring)):
            i, oldest = ring[0]
            if budget.available < 1.0 and oldest >= latest_s:
                break
            budget.available -= 1.0  # `take`, or `spend` for a token that cannot wait
            ring.popleft()
            stream = streams[i]
            assert stream is not None  # the ring holds streams only
            ids, times = stretch.tokens(i)
            stream._ids += ids
            stream._times += times
            stream._pending += len(ids)
            stream._flush(now)
            ring.append((i, following_s))
            sent += 1
            if self._stretch is not stretch:
                return  # the message closed the stretch (its client went)
        self._ring_holds = sent < len(ring)

    def _deliver_run_grouped(self, stretch: Stretch, now: float, step_s: float) -> None:
        """`_deliver_grouped` for a stretch step: the streams whose Nth waiting token came
        this step send their message."""
        ring, streams = self._ring, self._stretch_streams
        t = stretch.taken
        interval = self.stream_interval
        assert interval is not None
        while ring and ring[0][1] == t:
            i, _ = ring.popleft()
            stream = streams[i]
            assert stream is not None
            ids, times = stretch.tokens(i)
            stream._ids += ids
            stream._times += times
            stream._pending += len(ids)
            stream._flush(now)
            ring.append((i, float(t + interval)))
            if self._stretch is not stretch:
                return

    def _deliver(
        self, emissions: list[Emission], now: float, step_s: float, stalled_s: float
    ) -> list[float]:
        """Hand a step's tokens to their streams, one message each while the budget lasts;
        `stalled_s`: how far past its deadline the host woke for this step. Returns the host
        stall inside each emission's gap since its last token (or arrival).

        Past the budget a stream's tokens wait for a message of `group` (the streams given a
        token this step over the messages the budget's rate allows a step), never longer
        than `max_hold_s` (or one step, if longer): the message rate falls by the factor
        the host needs, and each stream is woken once per message, not per token."""
        if self.stream_interval is not None:
            return self._deliver_grouped(emissions, now, step_s, stalled_s)
        budget = self._budget
        budget.refill(now)
        held = self._held
        streams = self._by_seq.get
        stalled = self._stalls.stalled_s
        in_gaps = [0.0] * len(emissions)
        # A held stream goes now if waiting for its next token would hold its oldest one
        # past the cap (with `max_hold_s` under a step: held one step, then out).
        cap_s = self.max_hold_s if self.max_hold_s > step_s else step_s
        # Held since before this (on the modelled timeline: this step's tokens are due at its
        # end, a step held at all is before it), it cannot wait a step more.
        end_s = emissions[0].time_s if emissions else now
        latest_s = end_s + step_s - cap_s
        allowed = budget.rate_per_s * step_s
        group = 1 if len(emissions) <= allowed else -(-len(emissions) // max(allowed, 1.0))
        for i, e in enumerate(emissions):
            stream = streams(e.sequence)
            if stream is None:
                continue
            # `_accept`, inlined: this loop runs once per generated token.
            ids = e.token_ids
            if stalled_s > stream._stalled_s:
                stream._stalled_s = stalled_s
            if len(ids) == 1:
                stream._ids.append(ids[0])
                stream._times.append(e.time_s)
                stream._pending += 1
            else:
                stream._ids += ids
                stream._times += [e.time_s] * len(ids)
                stream._pending += len(ids)
            if stream.stalled_at_last_s != stalled:
                in_gaps[i] = stalled - stream.stalled_at_last_s
                stream.stalled_at_last_s = stalled
            if e.finished:
                held.pop(stream, None)
                self._close(stream)
                stream._end(self._report(self._finished(stream)))
                budget.spend()
            elif e.previous_token_s is None:
                stream.stalled_at_first_s = stalled
                stream._flush(now)  # a first token: out now
                budget.spend()
            elif stream.min_interval_s:
                if stream._paced(now):
                    self._paced.add(stream)
                else:
                    self._paced.discard(stream)
                    stream._flush(now)
                    budget.spend()
            elif (oldest := held.get(stream)) is not None:
                if stream._pending >= group or oldest < latest_s:
                    del held[stream]
                    stream._flush(now)
                    budget.spend()
            elif budget.take():
                stream._flush(now)
            else:
                held[stream] = e.time_s
        # Held and given nothing this step (preempted): out once they cannot wait longer.
        for stream in [s for s, oldest in held.items() if oldest < latest_s]:
            del held[stream]
            stream._flush(now)
            budget.spend()
        # Before a step ends past this, the held tokens go (a long step: a prefill joined).
        self._hold_s = max(self.max_hold_s, HOLD_STEPS * step_s)
        if self._paced:
            for stream in [s for s in self._paced if not s._paced(now)]:
                self._paced.discard(stream)
                stream._flush(now)
        return in_gaps

    def _deliver_grouped(
        self, emissions: list[Emission], now: float, step_s: float, stalled_s: float
    ) -> list[float]:
        """`_deliver` with a fixed `stream_interval` N: a stream's first token goes out alone,
        then its tokens N per message (a multiple of N where its own `min_interval_s` held
        them, or one step gave it more than N), each message as its last token comes due."""
        stalled = self._stalls.stalled_s
        in_gaps = [0.0] * len(emissions)
        for i, e in enumerate(emissions):
            stream = self._accept(e, stalled, stalled_s, in_gaps, i)
            if stream is None:
                continue
            if e.finished:
                self._close(stream)
                stream._end(self._report(self._finished(stream)))
            elif e.previous_token_s is None:
                stream._flush(now, whole=True)  # the first token: out alone, now
            elif stream.min_interval_s and stream._paced(now):
                self._paced.add(stream)
            else:
                self._paced.discard(stream)
                stream._flush(now)
        interval = self.stream_interval
        assert interval is not None  # only called with a fixed interval
        self._hold_s = (interval - 1) * step_s
        for stream in [s for s in self._paced if not s._paced(now)]:
            self._paced.discard(stream)
            stream._flush(now)
        return in_gaps

    def _accept(
        self, e: Emission, stalled: float, stalled_s: float, in_gaps: list[float], i: int
    ) -> RequestStream | None:
        """Give emission `e`'s tokens to its stream (None if its client has gone) and set
        `in_gaps[i]` to the host stall inside its gap since the stream's last token: the one
        bookkeeping both delivery rules (budgeted and fixed interval) share."""
        stream = self._by_seq.get(e.sequence)
        if stream is None:
            return None
        stream._push(e.token_ids, e.time_s, stalled_s)
        in_gaps[i] = stalled - stream.stalled_at_last_s
        stream.stalled_at_last_s = stalled
        if e.previous_token_s is None:
            stream.stalled_at_first_s = stalled
        return stream

    def _adapt(self, woke: float, late_s: float, tolerance_s: float) -> None:
        """Let the message budget see how late this wake-up came and, every `BUSY_WINDOW_S`,
        how busy this process was since the last look."""
        wall_0, cpu_0 = self._mark
        self._steps_seen += 1
        if woke - wall_0 < BUSY_WINDOW_S:
            # Reading the process's CPU time is a system call (no vDSO): at a wafer's pace
            # it cost more than the step's bookkeeping. Lateness alone may back off here;
            # the window's steps count once it closes.
            if late_s > tolerance_s / 2:
                self._budget.adapt(busy=0.0, late_s=late_s, tolerance_s=tolerance_s)
                self._steps_seen -= 1
            return
        cpu = self._cpu_time()
        if woke > wall_0:
            busy = (cpu - cpu_0) / (woke - wall_0)
            self._budget.adapt(
                busy=busy, late_s=late_s, tolerance_s=tolerance_s, steps=self._steps_seen
            )
        self._mark = (woke, cpu)
        self._steps_seen = 0

    def _flush_held(self, now: float) -> None:
        for stream in self._held:
            stream._flush(now)
            self._budget.spend()
        self._held = {}

    def _close(self, stream: RequestStream) -> None:
        self._streams.pop(stream.request_id, None)
        self._by_seq.pop(stream.sequence, None)
        self._held.pop(stream, None)
        self._paced.discard(stream)
        if not self._streams:
            self._idle.set()

    def _stall(self, lost_s: float, now: float) -> None:
        if self._stalls.record(lost_s, now):
            s = self._stalls
            log.warning(
                "degraded: the host woke %.2f ms past a modelled deadline; the timeline moved "
                "later instead of catching up (%d stalls, %.1f ms lost so far). Clients see "
                "slower tokens than the model: lower the load or the message rate.",
                lost_s * 1e3,
                s.stalls,
                s.stalled_s * 1e3,
            )

    def _record_lag(self, due_s: float) -> float:
        lag = self.clock.now() - due_s
        self._lag.record(lag)
        for observer in self.observers:
            observer.on_lag(lag)
        return lag

    def _report(self, finished: Finished) -> Finished:
        for observer in self.observers:
            observer.on_finish(finished)
        return finished

    def _finished(self, stream: RequestStream) -> Finished:
        stalled = self._stalls.stalled_s
        first = stream.stalled_at_first_s
        return finished(
            stream.sequence,
            host_stall_s=stalled - stream.stalled_at_arrival_s,
            decode_host_stall_s=0.0 if first is None else stalled - first,
        )
