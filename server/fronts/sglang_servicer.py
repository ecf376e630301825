"""sglang.grpc.scheduler.SglangScheduler over gRPC: the worker API the smg gateway speaks.

A thin adapter over the same engine as memorywall.v1, served on the same
port. Stubs come from the `smg-grpc-proto` package. The gateway tokenizes for
itself with the tokenizer that `GetTokenizer` ships (`sglang_tokenizer`), sends
prompt ids, and decodes the ids streamed back.
"""

from __future__ import annotations

import datetime
import uuid
from collections import deque
from contextlib import aclosing

import grpc
from google.protobuf.struct_pb2 import Struct
from smg_grpc_proto.generated import common_pb2, sglang_scheduler_pb2_grpc
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from memorywall import __version__
from memorywall.errors import InvalidRequestError
from memorywall.server.engine.api import (
    EngineClient,
    LoraAdapter,
    LoraRegistry,
    ModelCard,
    Phase,
    Request,
)
from memorywall.server.fronts.smg_worker import (
    TokenizerCache,
    WorkerRpcs,
    complete,
    generate,
    prompt_ids,
    stream_chunk,
)
from memorywall.server.pd import Bootstrap, Disaggregation

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SglangScheduler"].full_name
DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default when a request leaves max_new_tokens unset
THROUGHPUT_WINDOW_S = 10.0


def bootstrap_of(r: pb.GenerateRequest) -> Bootstrap | None:
    """Where a disaggregated request's halves meet (smg's PD mode), or None."""
    d = r.disaggregated_params
    if r.HasField("disaggregated_params") and (
        d.bootstrap_host or d.bootstrap_port or d.bootstrap_room
    ):
        return Bootstrap(host=d.bootstrap_host, port=d.bootstrap_port, room=d.bootstrap_room)
    return None


def not_emulated(r: pb.GenerateRequest, *, disaggregated: bool = False) -> str | None:
    """Why this worker cannot serve `r` as asked (-> UNIMPLEMENTED), or None."""
    if not disaggregated and bootstrap_of(r) is not None:
        return (
            "prefill/decode disaggregation (disaggregated_params) needs workers started with "
            "--role prefill or --role decode; this one serves both phases (--role both)"
        )
    if r.sampling_params.n > 1:
        return f"sampling_params.n={r.sampling_params.n}: one sample per request only"
    return None


class ThroughputWindow:
    """Tokens generated per second over the last `window_s`, from the engine's counter."""

    def __init__(self, now_s: float, window_s: float = THROUGHPUT_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque([(now_s, 0)])

    def rate(self, now_s: float, tokens_generated: int) -> float:
        self._samples.append((now_s, tokens_generated))
        while len(self._samples) > 2 and now_s - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        return (tokens_generated - n0) / (now_s - t0) if now_s > t0 else 0.0


class SglangServicer(WorkerRpcs, sglang_scheduler_pb2_grpc.SglangSchedulerServicer):
    def __init__(
        self,
        engine: EngineClient,
        card: ModelCard,
        disaggregation: Disaggregation | None = None,
        lora: LoraRegistry | None = None,
    ) -> None:
        self.engine = engine
        self.lora = lora  # adapters served by name: `lora_id` names one (--enable-lora)
        self.card = card
        self.pd = disaggregation  # this worker's prefill or decode role, if it has one
        self.started = datetime.datetime.now(datetime.UTC)
        self.throughput = ThroughputWindow(engine.now())
        self.tokenizer = TokenizerCache(card)

    def to_request(self, r: pb.GenerateRequest) -> Request:
        s = r.sampling_params
        prompt = prompt_ids(r.tokenized.input_ids, self.card, "tokenized.input_ids")
        if s.HasField("max_new_tokens"):
            max_tokens = s.max_new_tokens
        else:
            max_tokens = max(1, min(DEFAULT_MAX_NEW_TOKENS, self.card.context_window - len(prompt)))
        return Request(
            request_id=r.request_id or uuid.uuid4().hex,
            prompt_ids=prompt,
            max_tokens=max_tokens,
            min_tokens=s.min_new_tokens,
            ignore_eos=s.ignore_eos,
            stop_token_ids=frozenset(s.stop_token_ids),
            protocol="sglang",
            lora=self._adapter(r.lora_id),
        )

    def _adapter(self, lora_id: str) -> LoraAdapter | None:
        """The adapter SGLang's `lora_id` names (the router passes the adapter's name, as
        SGLang's `lora_path` takes it); "" runs the base model."""
        if not lora_id:
            return None
        if self.lora is None:
            raise InvalidRequestError(f"lora_id: {lora_id!r}: LoRA is off (--enable-lora)")
        adapter = self.lora.get(lora_id)
        if adapter is None:
            served = ", ".join(a.adapter.name for a in self.lora.served()) or "none"
            raise InvalidRequestError(f"lora_id: unknown adapter {lora_id!r} (served: {served})")
        return adapter

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        # Modelled time starts when the request reaches us, not after we parsed it.
        arrival_s = self.engine.now()
        if (why := not_emulated(request, disaggregated=self.pd is not None)) is not None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, why)
        rid = ""  # the request's id once built (SGLang's `rid`, or one made up)

        def submit(fault):
            nonlocal rid
            domain = self.to_request(request)
            rid = domain.request_id
            if self.pd is not None and (bootstrap := bootstrap_of(request)) is not None:
                return self.pd.submit(domain, bootstrap, arrival_s=arrival_s, fault=fault)
            return self.engine.submit(domain, arrival_s=arrival_s, fault=fault)

        def final(f, output):
            # Streamed ids went out in chunks: the final message repeats none of them.
            ids = () if request.stream else output
            return pb.GenerateResponse(
                request_id=rid, complete=complete(pb.GenerateComplete, f, ids)
            )

        messages = generate(
            context,
            submit,
            streaming=request.stream,
            chunk=lambda g: pb.GenerateResponse(
                request_id=rid, chunk=stream_chunk(pb.GenerateStreamChunk, g)
            ),
            final=final,
        )
        async with aclosing(messages):
            async for message in messages:
                yield message

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        if self.engine.abort(request.request_id):
            return pb.AbortResponse(success=True, message="aborted")
        return pb.AbortResponse(success=False, message=f"{request.request_id!r} is not in flight")

    async def FlushCache(self, request, context) -> common_pb2.FlushCacheResponse:
        """SGLang's /flush_cache: the prefix cache, refused while requests hold KV."""
        if await self.engine.reset_prefix_cache():
            return common_pb2.FlushCacheResponse(success=True, message="prefix cache flushed")
        message = "requests hold KV blocks; retry when idle"
        return common_pb2.FlushCacheResponse(success=False, message=message)

    async def HealthCheck(self, request, context) -> pb.HealthCheckResponse:
        if self.engine.draining:
            return pb.HealthCheckResponse(healthy=False, message="draining: shutting down")
        state = self.engine.lifecycle
        if state.phase is not Phase.READY:  # the gateway must not route here yet
            return pb.HealthCheckResponse(healthy=False, message=state.phase.value)
        return pb.HealthCheckResponse(healthy=True, message="serving")

    async def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        c = self.card
        return pb.GetModelInfoResponse(
            model_path=c.model,
            tokenizer_path=c.model,  # the files themselves come from GetTokenizer
            is_generation=True,
            served_model_name=c.model,
            max_context_length=c.context_window,
            vocab_size=c.vocab_size,
            model_type="llama",
            eos_token_ids=c.eos_token_ids,
            max_req_input_len=c.context_window - 1,
            architectures=["MemorywallEmulatedForCausalLM"],
            weight_version=__version__,
        )

    async def GetServerInfo(self, request, context) -> pb.GetServerInfoResponse:
        c, s = self.card, self.engine.stats()
        args = Struct()
        args.update(
            {
                "model_path": c.model,
                "served_model_name": c.model,
                "tokenizer_path": c.model,
                "tp_size": c.tensor_parallel,
                "pp_size": c.pipeline_parallel,
                "dp_size": 1,
                "max_running_requests": c.max_num_seqs,
                "chunked_prefill_size": c.max_num_batched_tokens,
                "context_length": c.context_window,
                "max_total_tokens": c.kv_capacity_tokens,
                "disaggregation_mode": "null" if self.pd is None else self.pd.role.value,
                "hardware": c.hardware,
                "deployment": c.deployment,
            }
        )
        info = Struct()
        info.update(
            {"max_total_num_tokens": c.kv_capacity_tokens, "kv_used_tokens": s.kv_used_tokens}
        )
        response = pb.GetServerInfoResponse(
            server_args=args,
            scheduler_info=info,
            active_requests=s.running + s.waiting,
            is_paused=False,
            uptime_seconds=s.uptime_s,
            sglang_version=f"memorywall-{__version__}",
            server_type="grpc",
            max_total_num_tokens=c.kv_capacity_tokens,
        )
        response.start_time.FromDatetime(self.started)
        return response

    async def GetLoads(self, request: pb.GetLoadsRequest, context) -> pb.GetLoadsResponse:
        s = self.engine.stats()
        usage = s.kv_used_tokens / s.kv_total_tokens if s.kv_total_tokens else 0.0
        gen = self.throughput.rate(self.engine.now(), s.tokens_generated)
        max_running = self.card.max_num_seqs
        load = pb.SchedulerLoad(
            dp_rank=0,
            num_running_reqs=s.running,
            num_waiting_reqs=s.waiting,
            num_total_reqs=s.running + s.waiting,
            num_used_tokens=s.kv_used_tokens,
            max_total_num_tokens=s.kv_total_tokens,
            token_usage=usage,
            gen_throughput=gen,
            cache_hit_rate=s.prefix_cache.hit_rate or 0.0,
            utilization=s.running / max_running,
            max_running_requests=max_running,
        )
        aggregate = pb.AggregateMetrics(
            total_running_reqs=s.running,
            total_waiting_reqs=s.waiting,
            total_reqs=s.running + s.waiting,
            avg_token_usage=usage,
            avg_throughput=gen,
            avg_utilization=load.utilization,
        )
        now = datetime.datetime.now(datetime.UTC).isoformat()
        return pb.GetLoadsResponse(
            timestamp=now,
            version=f"memorywall-{__version__}",
            dp_rank_count=1,
            loads=[load],
            aggregate=aggregate,
        )


def add_to_server(servicer: SglangServicer, server: grpc.aio.Server) -> None:
    sglang_scheduler_pb2_grpc.add_SglangSchedulerServicer_to_server(servicer, server)
