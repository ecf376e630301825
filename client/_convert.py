"""Proto -> dataclass for both clients: info messages, a Generate stream's chunks and result."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from memorywall.client import _errors as errors
from memorywall.client._types import (
    FinishReason,
    GenerateResult,
    HostStall,
    LagStats,
    ModelInfo,
    RequestLag,
    RequestTiming,
    ServerInfo,
    TokenChunk,
    Usage,
)
from memorywall.v1 import engine_pb2 as pb

_FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_STOP: FinishReason.STOP,
    pb.FINISH_REASON_ABORT: FinishReason.ABORT,
}


def _plain(value: Any) -> Any:
    """Proto scalars as Python values; repeated fields as tuples."""
    return value if isinstance(value, str | bytes | int | float | bool) else tuple(value)


def model_info_from_proto(msg: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(**{f.name: _plain(getattr(msg, f.name)) for f in fields(ModelInfo)})


def lag_from_proto(msg: pb.LagStats) -> LagStats:
    stat = (lambda v: v) if msg.samples else (lambda v: None)  # no samples: no statistic
    return LagStats(
        samples=msg.samples,
        mean_s=stat(msg.mean_s),
        p50_s=stat(msg.p50_s),
        p99_s=stat(msg.p99_s),
        max_s=stat(msg.max_s),
        late_steps=msg.late_steps,
        threshold_s=msg.threshold_s,
    )


def server_info_from_proto(msg: pb.ServerInfo) -> ServerInfo:
    nested = ("lag", "host_stall")
    values = {f.name: getattr(msg, f.name) for f in fields(ServerInfo) if f.name not in nested}
    stall = HostStall(**{f.name: getattr(msg.host_stall, f.name) for f in fields(HostStall)})
    return ServerInfo(lag=lag_from_proto(msg.lag), host_stall=stall, **values)


def sampling_to_dict(msg: pb.SamplingParams) -> dict[str, Any]:
    """The sampling fields the server echoed as set, repeated ones as lists."""
    return {f.name: list(v) if f.is_repeated else v for f, v in msg.ListFields()}


class StreamAssembler:
    """Turns Generate responses into TokenChunks and, at `Finished`, a GenerateResult."""

    def __init__(self, request_id: str, sent_ns: int) -> None:
        self.request_id = request_id
        self.sent_ns = sent_ns
        self.chunks: list[TokenChunk] = []
        self.result: GenerateResult | None = None

    def feed(self, msg: pb.GenerateResponse, received_ns: int) -> TokenChunk | None:
        """The chunk in `msg`, or None when `msg` is the Finished summary."""
        if self.result is not None:
            raise errors.ProtocolError(f"request {self.request_id}: message after Finished")
        kind = msg.WhichOneof("kind")
        if kind == "chunk":
            c = msg.chunk
            if len(c.modelled_times_s) != len(c.token_ids):
                raise errors.ProtocolError(
                    f"request {self.request_id}: {len(c.token_ids)} token ids but "
                    f"{len(c.modelled_times_s)} modelled times"
                )
            chunk = TokenChunk(tuple(c.token_ids), c.text, tuple(c.modelled_times_s), received_ns)
            self.chunks.append(chunk)
            return chunk
        if kind != "finished":
            raise errors.ProtocolError(f"request {self.request_id}: empty GenerateResponse")
        self.result = self._result(msg.request_id or self.request_id, msg.finished, received_ns)
        return None

    def _result(self, request_id: str, f: pb.Finished, finished_ns: int) -> GenerateResult:
        if f.finish_reason not in _FINISH_REASONS:
            raise errors.ProtocolError(f"request {request_id}: finish_reason {f.finish_reason}")
        t = f.timing
        return GenerateResult(
            request_id=request_id,
            finish_reason=_FINISH_REASONS[f.finish_reason],
            usage=Usage(f.usage.prompt_tokens, f.usage.completion_tokens, f.usage.cached_tokens),
            timing=RequestTiming(
                t.queue_s,
                t.prefill_s,
                t.decode_s,
                t.ttft_s,
                t.e2e_s,
                t.preemptions,
                t.received_monotonic_ns or None,
            ),
            energy_j=f.energy_j,
            sampling=sampling_to_dict(f.sampling),
            token_ids=tuple(t for c in self.chunks for t in c.token_ids),
            text="".join(c.text for c in self.chunks),
            chunks=tuple(self.chunks),
            sent_ns=self.sent_ns,
            finished_ns=finished_ns,
            fault=f.fault or None,
            lag=RequestLag(f.lag.host_stall_s, f.lag.decode_host_stall_s, f.lag.max_lag_s)
            if f.HasField("lag")
            else None,
        )

    def end(self) -> GenerateResult:
        """The result once the server closed the stream; a stream without Finished is an error."""
        if self.result is None:
            raise errors.ProtocolError(f"request {self.request_id}: stream ended without Finished")
        return self.result


def finished_result(result: GenerateResult | None, request_id: str) -> GenerateResult:
    """`stream.result` for both twins: the result, or StreamNotFinished."""
    if result is None:
        raise errors.StreamNotFinished(
            f"request {request_id}: no result yet; iterate the stream to its end first"
        )
    return result
