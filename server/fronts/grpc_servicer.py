"""memorywall.v1.Engine over gRPC: a thin adapter from protos to the engine and back."""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Iterator

import grpc

from memorywall import __version__
from memorywall.errors import (
    ContextLengthError,
    InvalidRequestError,
    MemorywallError,
    NotFoundError,
    PayloadTooLargeError,
)
from memorywall.server.engine.api import (
    EngineClient,
    Finished,
    FinishReason,
    ModelCard,
    Request,
    TokenGroup,
    digest,
    synthetic_prompt,
    text_token_ids,
)
from memorywall.server.fronts.status import grpc_fault, grpc_status, grpc_trailers
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc

_FINISH = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


class EngineServicer(engine_pb2_grpc.EngineServicer):
    def __init__(
        self,
        engine: EngineClient,
        card: ModelCard,
        seed: int = 0,
        *,
        max_request_bytes: int | None = None,
        unnamed_prompts: Iterator[int] | None = None,
    ) -> None:
        """`unnamed_prompts`: the numbers unnamed token-count prompts take, in arrival order
        (default 0, 1, 2, ...; each front process of `--api-servers` takes its own share)."""
        self.engine = engine
        self.card = card
        self.seed = seed
        self.max_request_bytes = max_request_bytes
        # Unnamed token-count prompts are numbered in arrival order, so each gets its own
        # content (no accidental prefix-cache hits) and a given order replays the same.
        self._unnamed = itertools.count() if unnamed_prompts is None else unnamed_prompts

    def to_request(self, r: pb.GenerateRequest) -> Request:
        limit = self.max_request_bytes
        if limit is not None and (size := r.ByteSize()) > limit:
            raise PayloadTooLargeError(f"request: {size:,} bytes, more than the limit of {limit:,}")
        if r.model and r.model != self.card.model:
            raise NotFoundError(
                f"model {r.model!r} is not served here; this server serves {self.card.model!r}"
            )
        kind = r.WhichOneof("prompt")
        vocab = self.card.vocab_size
        if kind == "text":
            if not r.text:
                raise InvalidRequestError("prompt: text is empty")
            prompt = text_token_ids(r.text, vocab)
        elif kind == "token_ids":
            prompt = tuple(r.token_ids.ids)
            bad = next((t for t in prompt if t >= vocab), None)
            if bad is not None:
                raise InvalidRequestError(
                    f"prompt: token id {bad} is outside the vocabulary of {vocab}"
                )
        elif kind == "token_count":
            # Checked before the prompt is built: a uint32 count could take gigabytes.
            if r.token_count > self.card.context_window:
                raise ContextLengthError(
                    f"prompt: token_count {r.token_count:,} is more than the context window "
                    f"of {self.card.context_window:,}"
                )
            key = r.request_id or next(self._unnamed)
            prompt = synthetic_prompt(r.token_count, digest(self.seed, key), vocab)
        else:
            raise InvalidRequestError("prompt: one of text, token_ids or token_count is required")
        if not prompt:
            raise InvalidRequestError("prompt: empty")
        if r.max_tokens < 1:
            raise InvalidRequestError("max_tokens: required and must be >= 1")
        if not 0 <= r.stream_options.min_interval_s < math.inf:
            raise InvalidRequestError("stream_options.min_interval_s: must be finite and >= 0")
        s = r.sampling
        return Request(
            request_id=r.request_id or uuid.uuid4().hex,
            prompt_ids=prompt,
            max_tokens=r.max_tokens,
            min_tokens=r.min_tokens,
            ignore_eos=r.ignore_eos,
            stop_token_ids=frozenset(s.stop_token_ids),
            sampling_seed=s.seed if s.HasField("seed") else None,
            protocol="memorywall",
        )

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        # Modelled time starts when the request reaches us, not after we parsed it.
        arrival_s = self.engine.now()
        try:
            domain = self.to_request(request)
            stream = self.engine.submit(
                domain,
                min_interval_s=request.stream_options.min_interval_s,
                arrival_s=arrival_s,
                fault=grpc_fault(context),
            )
        except MemorywallError as e:
            await context.abort(grpc_status(e), str(e), trailing_metadata=grpc_trailers(e))
        rid = domain.request_id
        try:
            # Headers go out now, not with the first token: clients start TTFT clocks on them.
            await context.send_initial_metadata(())
            async for event in stream:
                if isinstance(event, TokenGroup):
                    chunk = pb.TokenChunk(
                        token_ids=event.token_ids, text=event.text, modelled_times_s=event.times_s
                    )
                    yield pb.GenerateResponse(request_id=rid, chunk=chunk)
                else:
                    yield pb.GenerateResponse(request_id=rid, finished=_finished(event, request))
        except MemorywallError as e:
            await context.abort(grpc_status(e), str(e), trailing_metadata=grpc_trailers(e))
        finally:
            # Cancelled, deadline passed or client gone: free the slot and KV now.
            stream.close()

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        return pb.AbortResponse(aborted=[r for r in request.request_ids if self.engine.abort(r)])

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        c = self.card
        return pb.ModelInfo(
            model=c.model,
            context_window=c.context_window,
            vocab_size=c.vocab_size,
            eos_token_ids=c.eos_token_ids,
            hardware=c.hardware,
            devices=c.devices,
            tensor_parallel=c.tensor_parallel,
            pipeline_parallel=c.pipeline_parallel,
            weight_precision=c.weight_precision,
            kv_precision=c.kv_precision,
            placement=c.placement,
            deployment=c.deployment,
            kv_capacity_tokens=c.kv_capacity_tokens,
            max_num_seqs=c.max_num_seqs,
            max_num_batched_tokens=c.max_num_batched_tokens,
            predicted_tokens_per_s_per_user=c.predicted_tokens_per_s_per_user,
        )

    async def GetServerInfo(self, request, context) -> pb.ServerInfo:
        s = self.engine.stats()
        lag = pb.LagStats(
            samples=s.lag.samples,
            mean_s=s.lag.mean_s,
            p50_s=s.lag.p50_s,
            p99_s=s.lag.p99_s,
            max_s=s.lag.max_s,
            late_steps=s.lag.late_steps,
            threshold_s=s.lag.threshold_s,
        )
        return pb.ServerInfo(
            running=s.running,
            waiting=s.waiting,
            kv_used_tokens=s.kv_used_tokens,
            kv_total_tokens=s.kv_total_tokens,
            kv_usage_fraction=s.kv_used_tokens / s.kv_total_tokens if s.kv_total_tokens else 0.0,
            lag=lag,
            uptime_s=s.uptime_s,
            requests_finished=s.requests_finished,
            requests_aborted=s.requests_aborted,
            tokens_generated=s.tokens_generated,
            preemptions=s.preemptions,
            steps=s.steps,
            modelled_energy_j=s.modelled_energy_j,
            draining=s.draining,
            stream_interval_s=s.stream_interval_s,
            server_version=__version__,
            host_stall=pb.HostStall(
                stalls=s.host_stall.stalls,
                stalled_s=s.host_stall.stalled_s,
                degraded=s.host_stall.degraded,
                window_s=s.host_stall.window_s,
            ),
        )


def _finished(f: Finished, request: pb.GenerateRequest) -> pb.Finished:
    return pb.Finished(
        finish_reason=_FINISH[f.reason],
        usage=pb.Usage(
            prompt_tokens=f.prompt_tokens,
            completion_tokens=f.completion_tokens,
            cached_tokens=f.cached_tokens,
        ),
        timing=pb.RequestTiming(
            queue_s=f.queue_s,
            prefill_s=f.prefill_s,
            decode_s=f.decode_s,
            ttft_s=f.ttft_s,
            e2e_s=f.e2e_s,
            preemptions=f.preemptions,
            received_monotonic_ns=f.received_monotonic_ns,
        ),
        energy_j=f.energy_j,
        sampling=request.sampling,
        lag=pb.RequestLag(
            host_stall_s=f.host_stall_s,
            decode_host_stall_s=f.decode_host_stall_s,
            max_lag_s=f.max_lag_s,
        ),
        fault=f.fault or "",
    )
