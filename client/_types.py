"""What the client hands back and takes in: frozen dataclasses, SI units in the names."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class FinishReason(enum.Enum):
    """Why a request stopped."""

    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # end of sequence or a stop token
    ABORT = "abort"  # aborted


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Sampling settings; the emulator echoes them and they do not change timing."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class TokenChunk:
    """One streamed message: tokens, their text, and each token's modelled time.

    `modelled_times_s[i]` is seconds after the server received the request;
    `received_ns` is `time.perf_counter_ns()` when the client received the message.
    """

    token_ids: tuple[int, ...]
    text: str
    modelled_times_s: tuple[float, ...]
    received_ns: int


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class RequestTiming:
    """The request's modelled timeline, seconds (see the proto for each span)."""

    queue_s: float
    prefill_s: float
    decode_s: float
    ttft_s: float
    e2e_s: float
    preemptions: int
    # The server's CLOCK_MONOTONIC (ns) when it received the request: on the same host,
    # the clock of `sent_ns` and `received_ns`; None when the server did not say.
    received_monotonic_ns: int | None = None


@dataclass(frozen=True)
class RequestLag:
    """Host lag the server reported for one request (see the proto's `RequestLag`): when its
    host woke late the server moved the request's timeline later, never caught up faster.
    The model's own decode time is `RequestTiming.decode_s - decode_host_stall_s`."""

    host_stall_s: float
    decode_host_stall_s: float
    max_lag_s: float


@dataclass(frozen=True, kw_only=True)
class GenerateResult:
    """A finished request: the server's `Finished` summary plus everything streamed.

    `sent_ns` and `finished_ns` are `time.perf_counter_ns()` on the client, taken
    just before the call started and when `Finished` arrived.
    """

    request_id: str
    finish_reason: FinishReason
    usage: Usage
    timing: RequestTiming
    energy_j: float
    sampling: dict[str, Any]  # the fields the server echoed as set
    token_ids: tuple[int, ...]
    text: str
    chunks: tuple[TokenChunk, ...]
    sent_ns: int
    finished_ns: int
    fault: str | None = None  # a fault the server injected on purpose ("stall:0.5")
    lag: RequestLag | None = None  # None: the server reported none


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    model: str
    context_window: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    hardware: str
    devices: int
    tensor_parallel: int
    pipeline_parallel: int
    weight_precision: str
    kv_precision: str
    placement: str
    deployment: str
    kv_capacity_tokens: int
    max_num_seqs: int
    max_num_batched_tokens: int
    predicted_tokens_per_s_per_user: float


@dataclass(frozen=True, kw_only=True)
class LagStats:
    """Emission lag (actual hand-off minus modelled time), seconds.

    The statistics are None while `samples` is 0: no data is not a lag of 0.
    """

    samples: int
    mean_s: float | None
    p50_s: float | None
    p99_s: float | None
    max_s: float | None
    late_steps: int
    threshold_s: float


@dataclass(frozen=True, kw_only=True)
class HostStall:
    """Times the server's host woke past a modelled deadline, so the server moved its
    timeline later rather than send tokens faster than the model; `degraded`: one came
    within the last `window_s` (mark a benchmark run taken now)."""

    stalls: int
    stalled_s: float  # modelled time the stalls added, in total
    degraded: bool
    window_s: float


@dataclass(frozen=True, kw_only=True)
class ServerInfo:
    running: int
    waiting: int
    kv_used_tokens: int
    kv_total_tokens: int
    kv_usage_fraction: float  # share of the KV capacity in use, 0..1
    lag: LagStats
    uptime_s: float
    requests_finished: int
    requests_aborted: int
    tokens_generated: int
    preemptions: int
    steps: int
    modelled_energy_j: float
    draining: bool
    stream_interval_s: float
    server_version: str
    host_stall: HostStall
