"""An in-memory `EngineClient` with no scheduler, no KV pool and no core: what front-end
tests run against.

Each request gets `max_tokens` tokens (a function of prompt length, position and
sampling seed), one per group, the first `ttft_s` after
arrival and the rest `itl_s` apart (modelled times, not waited for), unless
`ignore_eos` is off and a stop token comes up. Streams hand tokens over as fast
as the reader takes them, or hold while `gate` is cleared, so a test can
cancel mid-stream. Observers see one `StepReport` per token group and
`Finished` per request; each prompt's full blocks are published as
`BlockStored` events, so KV-event subscribers have something to read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

from memorywall.errors import DrainingError, DuplicateRequestError, InvalidRequestError
from memorywall.server.engine.api import (
    AllBlocksCleared,
    BlockStored,
    EngineObserver,
    EngineStats,
    Event,
    EventIteration,
    Finished,
    FinishReason,
    KVEvent,
    LagSummary,
    LifecycleState,
    PrefixCacheStats,
    Request,
    StallSummary,
    StepReport,
    TokenGroup,
)
from memorywall.server.engine.faults import FaultRule, refuse_fault
from memorywall.server.engine.kv import hash_block_tokens
from memorywall.server.engine.lifecycle import Lifecycle
from memorywall.server.engine.tokens import token_text

BLOCK_SIZE = 16


class TwinStream(EventIteration):
    def __init__(self, twin: TwinEngine, request: Request, arrival_s: float) -> None:
        self._twin = twin
        self.request = request
        self.request_id = request.request_id
        self.arrival_s = arrival_s
        self.produced: list[int] = []
        self._reason: FinishReason | None = None
        self._error: Exception | None = None
        self._final_sent = False
        self._changed = asyncio.Event()

    @property
    def ended(self) -> bool:
        return self._reason is not None or self._error is not None

    def close(self) -> None:
        if not self.ended:
            self._twin.abort(self.request_id)

    async def next_event(self) -> Event | None:
        while True:
            if self._error is not None:
                raise self._error
            if self._reason is not None:
                if self._final_sent:
                    return None
                self._final_sent = True
                return self._twin._finished(self)
            if self._twin.gate.is_set():
                return self._twin._next_group(self)
            self._changed.clear()
            gate = asyncio.ensure_future(self._twin.gate.wait())
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait((gate, changed), return_when=asyncio.FIRST_COMPLETED)
            finally:
                gate.cancel()
                changed.cancel()

    def _end(self, reason: FinishReason | None, error: Exception | None = None) -> None:
        self._reason, self._error = reason, error
        self._changed.set()


class TwinEngine:
    """`EngineClient` with scripted timing; `submitted` keeps every request in order."""

    def __init__(
        self,
        *,
        ttft_s: float = 0.02,
        itl_s: float = 0.01,
        energy_per_token_j: float = 1.0,
        kv_total_tokens: int = 1 << 20,
        observers: Iterable[EngineObserver] = (),
        load_s: float = 0.0,
    ) -> None:
        self.ttft_s = ttft_s
        self.itl_s = itl_s
        self.energy_per_token_j = energy_per_token_j
        self.kv_total_tokens = kv_total_tokens
        self.gate = asyncio.Event()
        self.gate.set()
        self.submitted: list[Request] = []
        self.aborted: list[str] = []
        self.released: list[str] = []  # release_kv calls (the twin keeps no KV)
        self._clock_s = 0.0
        self._live: dict[str, TwinStream] = {}
        self._subscribers: list[Callable[[KVEvent], None]] = []
        self._draining = False
        self._done = self._aborted = self._tokens = self._steps = 0
        self._cache = PrefixCacheStats()
        self.observers = list(observers)
        for observer in self.observers:
            observer.watch(self.stats)
        self.prefix_resets = 0  # reset_prefix_cache calls that cleared the cache
        self._lifecycle = Lifecycle(load_s, asyncio.sleep, self._clear_cache)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def lifecycle(self) -> LifecycleState:
        return self._lifecycle.state

    async def load(self) -> None:
        await self._lifecycle.load()

    async def sleep(self, level: int) -> None:
        await self._lifecycle.sleep(level, busy=bool(self._live))

    async def wake_up(self) -> None:
        await self._lifecycle.wake_up()

    async def reset_prefix_cache(self) -> bool:
        return self._clear_cache()

    def _clear_cache(self) -> bool:
        """As the live pool: refused while a request is live; else subscribers hear it."""
        if self._live:
            return False
        self.prefix_resets += 1
        for callback in list(self._subscribers):
            callback(AllBlocksCleared())
        return True

    def now(self) -> float:
        return self._clock_s

    def submit(
        self,
        request: Request,
        *,
        min_interval_s: float = 0.0,
        arrival_s: float | None = None,
        fault: FaultRule | None = None,
    ) -> TwinStream:
        """Refuses a `fault`, as the live engine does: wrap the twin in a `GuardedEngine`
        to apply one."""
        refuse_fault(fault)
        if self._draining:
            raise DrainingError("server is shutting down; not admitting new requests")
        self._lifecycle.check_serving()
        if request.request_id in self._live:
            raise DuplicateRequestError(f"request_id {request.request_id!r} is already in flight")
        if request.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens: must be >= 1, got {request.max_tokens}")
        if not request.prompt_ids:
            raise InvalidRequestError("prompt: empty")
        self.submitted.append(request)
        stream = TwinStream(self, request, self._clock_s if arrival_s is None else arrival_s)
        self._live[request.request_id] = stream
        self._cache.requests += 1
        self._cache.queries += len(request.prompt_ids)
        self._publish(request.prompt_ids)
        return stream

    def release_kv(self, request_id: str) -> bool:
        self.released.append(request_id)
        return False

    def abort(self, request_id: str) -> bool:
        stream = self._live.pop(request_id, None)
        if stream is None:
            return False
        self.aborted.append(request_id)
        self._aborted += 1
        stream._end(FinishReason.ABORT)
        self._report(stream)
        return True

    def waiting(self) -> int:
        return 0  # every stream runs at once

    def stats(self) -> EngineStats:
        used = sum(len(s.request.prompt_ids) + len(s.produced) for s in self._live.values())
        return EngineStats(
            running=len(self._live),
            waiting=0,
            kv_used_tokens=used,
            kv_total_tokens=self.kv_total_tokens,
            lag=LagSummary(0, 0.0, 0.0, 0.0, 0.0, 0, 0.010),
            host_stall=StallSummary(0, 0.0, False, 5.0),
            uptime_s=self._clock_s,
            requests_finished=self._done,
            requests_aborted=self._aborted,
            tokens_generated=self._tokens,
            preemptions=0,
            steps=self._steps,
            modelled_energy_j=self._tokens * self.energy_per_token_j,
            draining=self._draining,
            stream_interval_s=0.0,
            prefix_cache=PrefixCacheStats(**vars(self._cache)),
        )

    def subscribe_kv_events(self, callback: Callable[[KVEvent], None]) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    async def drain(self, grace_s: float) -> None:
        self._draining = True
        deadline = asyncio.get_running_loop().time() + grace_s
        while self._live and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.001)
        for stream in list(self._live.values()):
            del self._live[stream.request_id]
            self._aborted += 1
            stream._end(None, DrainingError("server shut down before the request finished"))

    # What a stream reads

    def _next_group(self, stream: TwinStream) -> TokenGroup:
        r = stream.request
        i = len(stream.produced)
        token = (7 + 31 * (len(r.prompt_ids) + i) + 13 * (r.sampling_seed or 0)) % 1000
        stream.produced.append(token)
        due = self.ttft_s + i * self.itl_s
        self._clock_s = max(self._clock_s, stream.arrival_s + due)
        self._tokens += 1
        self._steps += 1
        reason = None
        if not r.ignore_eos and token in r.stop_token_ids and i + 1 >= r.min_tokens:
            reason = FinishReason.STOP
        elif i + 1 == r.max_tokens:
            reason = FinishReason.LENGTH
        report = StepReport(
            time_s=self.ttft_s if i == 0 else self.itl_s,
            energy_j=self.energy_per_token_j,
            tokens=len(r.prompt_ids) if i == 0 else 1,
            generated=1,
            preemptions_total=0,
            first_tokens=[(len(r.prompt_ids), due)] if i == 0 else [],
            token_gaps=[] if i == 0 else [(self.itl_s, 1)],
        )
        for observer in self.observers:
            observer.on_step(report)
        if reason is not None:
            del self._live[r.request_id]
            self._done += 1
            stream._end(reason)
            self._report(stream)
        return TokenGroup(
            token_ids=(token,),
            text=token_text(token),
            times_s=(due,),
            prompt_tokens=len(r.prompt_ids),
            cached_tokens=0,
            completion_tokens=i + 1,
            finish_reason=reason,
        )

    def _finished(self, stream: TwinStream) -> Finished:
        n = len(stream.produced)
        ttft = self.ttft_s if n else 0.0
        decode = (n - 1) * self.itl_s if n else 0.0
        return Finished(
            request_id=stream.request_id,
            reason=stream._reason or FinishReason.ABORT,
            prompt_tokens=len(stream.request.prompt_ids),
            completion_tokens=n,
            cached_tokens=0,
            queue_s=0.0,
            prefill_s=ttft,
            decode_s=decode,
            ttft_s=ttft,
            e2e_s=ttft + decode,
            preemptions=0,
            energy_j=n * self.energy_per_token_j,
            last_token_id=stream.produced[-1] if n else None,
            protocol=stream.request.protocol,
        )

    def _report(self, stream: TwinStream) -> None:
        finished = self._finished(stream)
        for observer in self.observers:
            observer.on_finish(finished)

    def _publish(self, prompt: tuple[int, ...]) -> None:
        if not self._subscribers:
            return
        full = len(prompt) // BLOCK_SIZE
        if not full:
            return
        hashes: list[int] = []
        for b in range(full):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, prompt[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE]))
        event = BlockStored(tuple(hashes), None, prompt[: full * BLOCK_SIZE], BLOCK_SIZE)
        for callback in list(self._subscribers):
            callback(event)
