"""The one interface between the engine and its front ends and observers.

Front ends (memorywall.v1 gRPC, SGLang's worker service, OpenAI HTTP) and
observers (Prometheus metrics) import from here and nowhere else in the
engine: they submit `Request`s, each with its own fault rule if its
`x-memorywall-fault` header asks for one (`fault_from_header`), read
`EventStream`s of `TokenGroup`s ending in `Finished`, abort, drain, take
`EngineStats` snapshots and subscribe to prefix-cache `KVEvent`s. They
describe what they serve from the `ModelCard` and write token text with the
helpers of `tokens.py` re-exported here. The live engine (`live.AsyncEngine`),
the guard in front of it (`guard.GuardedEngine`, the only one that applies
faults), a front process's view of the engine process (`multi.remote.RemoteEngine`)
and the in-memory twin that front tests run against (`twin.TwinEngine`) all
implement `EngineClient`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from memorywall.errors import MemorywallError
from memorywall.server.engine.build import ModelCard
from memorywall.server.engine.faults import FaultKind, FaultRule, fault_from_header
from memorywall.server.engine.kv import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    PrefixCacheStats,
)
from memorywall.server.engine.lag import LagSummary, StallSummary
from memorywall.server.engine.lifecycle import SLEEP_LEVELS, LifecycleState, Phase, check_serving
from memorywall.server.engine.lora import LoraAdapter, LoraError, LoraRegistry, lora_state
from memorywall.server.engine.scheduler import FinishReason, Request, check_request
from memorywall.server.engine.tokens import (
    CHARS_PER_TOKEN,
    digest,
    synthetic_prompt,
    text_token_ids,
    token_text,
)

__all__ = [
    "CHARS_PER_TOKEN",
    "SLEEP_LEVELS",
    "AllBlocksCleared",
    "BatchEntry",
    "BlockRemoved",
    "BlockStored",
    "EngineClient",
    "EngineObserver",
    "EngineStats",
    "Event",
    "EventIteration",
    "EventStream",
    "FaultKind",
    "FaultRule",
    "FinishReason",
    "Finished",
    "KVEvent",
    "LagSummary",
    "LifecycleState",
    "LoraAdapter",
    "LoraError",
    "LoraRegistry",
    "ModelCard",
    "Phase",
    "PrefixCacheStats",
    "Request",
    "StallSummary",
    "StepReport",
    "StreamSink",
    "TokenGroup",
    "check_request",
    "check_serving",
    "digest",
    "fault_from_header",
    "lora_state",
    "synthetic_prompt",
    "text_token_ids",
    "token_text",
]


@dataclass(slots=True)
class TokenGroup:
    """Tokens handed over together, with what a front needs to write them out.

    Read-only by convention; not frozen, since one is built per message on the hot path
    and a frozen dataclass's `__init__` costs several times as much.
    """

    token_ids: tuple[int, ...]
    text: str
    times_s: tuple[float, ...]  # modelled emission times, seconds after arrival
    prompt_tokens: int
    cached_tokens: int  # prompt tokens found in the prefix cache
    completion_tokens: int  # generated so far, this group included
    finish_reason: FinishReason | None  # set on the request's last group


@dataclass(frozen=True, slots=True)
class Finished:
    """A request's end: usage and its modelled timing summary."""

    request_id: str
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queue_s: float
    prefill_s: float
    decode_s: float
    ttft_s: float
    e2e_s: float
    preemptions: int
    energy_j: float
    last_token_id: int | None  # the matched stop token when `reason` is STOP
    # Host stalls while the request was live moved its timeline this much later than the
    # model alone would (in total, and between its first and last token): the timing above
    # includes them, so the model's own decode time is `decode_s - decode_host_stall_s`.
    host_stall_s: float = 0.0
    decode_host_stall_s: float = 0.0
    max_lag_s: float = 0.0  # the latest any of its tokens reached the front after its time
    fault: str | None = None  # an injected fault that shaped the request (`stall:0.5`)
    # Disaggregated decode: the KV transfer's share of `ttft_s` (from the prefill's end to
    # the KV landing here) and its size; `ttft_s` and `e2e_s` then count from when this
    # half reached the decode worker, the remote prefill included.
    kv_transfer_s: float = 0.0
    kv_transfer_bytes: float = 0.0
    # When the engine received the request, on its clock (CLOCK_MONOTONIC seconds when live,
    # so a client on the same host can replay the arrivals the engine saw); None: unknown.
    received_s: float | None = None
    protocol: str = ""  # the request's `Request.protocol`: the wire a front received it on
    lora: str | None = None  # the LoRA adapter it ran with, by its served name; None: base

    @property
    def received_monotonic_ns(self) -> int:
        """`received_s` as the wire carries it: integer ns, 0 when unknown."""
        return 0 if self.received_s is None else round(self.received_s * 1e9)


Event = TokenGroup | Finished


class EventStream(Protocol):
    """One request's output: token groups, then `Finished`, then None."""

    request_id: str

    @property
    def ended(self) -> bool:
        """The engine has finished or aborted the request (its slot and KV are free)."""
        ...

    async def next_event(self) -> Event | None: ...

    def __aiter__(self) -> AsyncIterator[Event]: ...

    def attach(self, sink: StreamSink) -> bool:
        """Hand every event from now on to `sink`, synchronously, as the engine hands it
        over, instead of to `next_event`; False (nothing changes) where the stream cannot.
        Called once, before the first `next_event`; `close` detaches the sink."""
        ...

    def close(self) -> None:
        """Abort the request unless it has ended: a front calls this when it stops
        reading for any reason (done, cancelled, client gone)."""
        ...


class StreamSink(Protocol):
    """A front's synchronous reader of one stream (`EventStream.attach`).

    A streamed message then costs a call, not a wake-up of the request's handler task and a
    resumption of its `await next_event()`: the live engine calls the sink from its own
    step, in order, as it hands each group over. So a sink must be quick, must never raise,
    and must not call back into the engine (`close`, `abort`, `submit`): it runs in the
    middle of the engine's delivery of a step.
    """

    def group(self, group: TokenGroup) -> None:
        """One message's tokens (what `next_event` would have returned)."""
        ...

    def end(self, final: Finished | None, error: MemorywallError | None) -> None:
        """The stream is over: its `Finished`, or the error `next_event` would have raised
        (the server drained). Called once, after the last group."""
        ...


class EventIteration:
    """`async for` over a stream's `next_event()` until it gives None: the one iteration
    every `EventStream` implementation inherits, and `attach`'s default (no sink: a
    wrapper that reworks events, such as the guard's faults, is read with `next_event`)."""

    async def next_event(self) -> Event | None:
        raise NotImplementedError

    def attach(self, sink: StreamSink) -> bool:
        return False

    def __aiter__(self) -> EventIteration:
        return self

    async def __anext__(self) -> Event:
        event = await self.next_event()
        if event is None:
            raise StopAsyncIteration
        return event


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_used_tokens: int
    kv_total_tokens: int
    lag: LagSummary
    host_stall: StallSummary
    uptime_s: float
    requests_finished: int
    requests_aborted: int
    tokens_generated: int
    preemptions: int
    steps: int
    modelled_energy_j: float
    draining: bool
    stream_interval_s: float  # the longest a token is held for grouping now (0: none held)
    prefix_cache: PrefixCacheStats

    @property
    def kv_usage(self) -> float:
        """Fraction of KV capacity held by live requests."""
        return self.kv_used_tokens / self.kv_total_tokens if self.kv_total_tokens else 0.0

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)


@dataclass(frozen=True, slots=True)
class StepReport:
    """What one engine step did, as observers count it.

    `first_tokens` holds (prompt tokens, TTFT) of each request that got its
    first token; `token_gaps` holds (gap per token, tokens) runs for the
    others: a request given k tokens after a gap g contributes (g / k, k).

    `start_s` is when the step began on the engine's clock (its end: `start_s + time_s`)
    and `stalled_s` the host stall that moved it later just before it began. `batch` is
    built only for an engine whose observers ask for it (`wants_batch = True`, tracing):
    one `BatchEntry` per request the step ran; None otherwise, at no cost.
    """

    time_s: float
    energy_j: float
    tokens: int  # run through the model: prefill chunks plus decode queries
    generated: int  # tokens sampled
    preemptions_total: int
    first_tokens: list[tuple[int, float]]
    token_gaps: list[tuple[float, int]]
    start_s: float = 0.0
    stalled_s: float = 0.0
    batch: list[BatchEntry] | None = None


class BatchEntry(NamedTuple):
    """One request's part of a step: `tokens` from its token `position` on (prompt and
    output counted together), as a prefill chunk or a decode query (`decoding`). A position
    below where the request's last part ended means it was preempted in between."""

    request_id: str
    position: int
    tokens: int
    decoding: bool


class EngineObserver(Protocol):
    """Receives what the engine does, for metrics; called on the engine's loop, must not block.

    An observer with a true `wants_batch` attribute (tracing's recorder) gets each step's
    `StepReport.batch`; the engine builds none for the others.
    """

    def watch(self, stats: Callable[[], EngineStats]) -> None:
        """Called once by the engine it observes: read current gauges from `stats`."""
        ...

    def on_step(self, step: StepReport) -> None: ...

    def on_finish(self, finished: Finished) -> None: ...

    def on_lag(self, lag_s: float) -> None: ...


class EngineClient(Protocol):
    """What a front end may ask of the engine."""

    @property
    def draining(self) -> bool: ...

    def now(self) -> float:
        """The engine clock, seconds: stamp a request's arrival with it."""
        ...

    def submit(
        self,
        request: Request,
        *,
        min_interval_s: float = 0.0,
        arrival_s: float | None = None,
        fault: FaultRule | None = None,
    ) -> EventStream:
        """Queue a request; raises a `MemorywallError` for bad input, holding nothing.

        `fault`: the request's own fault rule (its `x-memorywall-fault` header). The guard
        applies it; an engine that injects no faults refuses the request with
        InvalidRequestError (`faults.refuse_fault`).
        """
        ...

    def abort(self, request_id: str) -> bool: ...

    def release_kv(self, request_id: str) -> bool:
        """Free the KV a finished `Request.keep_kv` request kept; False if none."""
        ...

    def stats(self) -> EngineStats: ...

    def waiting(self) -> int:
        """Requests queued for admission; cheap enough to read on every submit."""
        ...

    def subscribe_kv_events(self, callback: Callable[[KVEvent], None]) -> Callable[[], None]:
        """Call `callback` for each prefix-cache event from now on; returns an unsubscribe."""
        ...

    async def drain(self, grace_s: float) -> None: ...

    # Lifecycle (vLLM's dev endpoints; `lifecycle.py`)

    @property
    def lifecycle(self) -> LifecycleState:
        """Loading, ready, asleep (and how deeply) or waking."""
        ...

    async def sleep(self, level: int) -> None:
        """Free the KV (1) and the weights (2); LifecycleError while requests run."""
        ...

    async def wake_up(self) -> None:
        """Load the weights back, taking the core's load time; returns once serving."""
        ...

    async def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix block; False (nothing changed) while requests hold KV."""
        ...
