"""vllm.grpc.engine.VllmEngine over gRPC: the worker API of `vllm serve --grpc`, which the
smg gateway routes to with `--backend vllm`.

A thin adapter over the same engine as memorywall.v1 and SGLang's service (see
`smg_worker`); stubs come from the `smg-grpc-proto` package. Like SGLang's, the
gateway tokenizes with the tokenizer `GetTokenizer` ships and sends prompt ids; a
`text` prompt is taken too, as stand-in ids (four characters each) the way the
OpenAI front reads prompt text without a tokenizer. What the emulator does not
model (n > 1, PD's KV transfer, multimodal input, embeddings, profiling, flushing
the prefix cache) answers UNIMPLEMENTED, never a wrong answer.
"""

from __future__ import annotations

import datetime
import uuid
from contextlib import aclosing

import grpc
from smg_grpc_proto.generated import vllm_engine_pb2 as pb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc

from memorywall import __version__
from memorywall.server.engine.api import (
    EngineClient,
    ModelCard,
    Request,
    text_token_ids,
)
from memorywall.server.fronts.sglang_servicer import ThroughputWindow
from memorywall.server.fronts.smg_worker import (
    TokenizerCache,
    WorkerRpcs,
    complete,
    generate,
    prompt_ids,
    stream_chunk,
)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VllmEngine"].full_name
BLOCK_SIZE = 16  # the KV block size the engine's prefix cache hashes by (vLLM's default)


def not_emulated(r: pb.GenerateRequest) -> str | None:
    """Why this worker cannot serve `r` as asked (-> UNIMPLEMENTED), or None."""
    if r.sampling_params.n > 1:
        return f"sampling_params.n={r.sampling_params.n}: one sample per request only"
    if r.HasField("kv_transfer_params") or r.HasField("kv_transfer_params_json"):
        return "prefill/decode disaggregation (kv_transfer_params) is not emulated for vLLM"
    if r.HasField("mm_inputs") or r.extra_mm_inputs or r.HasField("media_refs"):
        return "multimodal input: this worker emulates a text model"
    return None


class VllmServicer(WorkerRpcs, vllm_engine_pb2_grpc.VllmEngineServicer):
    def __init__(self, engine: EngineClient, card: ModelCard) -> None:
        self.engine = engine
        self.card = card
        self.started = datetime.datetime.now(datetime.UTC)
        self.throughput = ThroughputWindow(engine.now())
        self.tokenizer = TokenizerCache(card)

    def to_request(self, r: pb.GenerateRequest) -> Request:
        s = r.sampling_params
        if r.WhichOneof("input") == "text":
            prompt = prompt_ids(text_token_ids(r.text, self.card.vocab_size), self.card, "text")
        else:
            prompt = prompt_ids(r.tokenized.input_ids, self.card, "tokenized.input_ids")
        # vLLM's default: as many tokens as the context leaves.
        max_tokens = (
            s.max_tokens
            if s.HasField("max_tokens")
            else max(1, self.card.context_window - len(prompt))
        )
        return Request(
            request_id=r.request_id or uuid.uuid4().hex,
            prompt_ids=prompt,
            max_tokens=max_tokens,
            min_tokens=s.min_tokens,
            ignore_eos=s.ignore_eos,
            stop_token_ids=frozenset(s.stop_token_ids),
            protocol="vllm",
        )

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        # Modelled time starts when the request reaches us, not after we parsed it.
        arrival_s = self.engine.now()
        if (why := not_emulated(request)) is not None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, why)

        def submit(fault):
            return self.engine.submit(self.to_request(request), arrival_s=arrival_s, fault=fault)

        def final(f, output):
            # Streamed ids went out in chunks: the final message repeats none of them.
            ids = () if request.stream else output
            return pb.GenerateResponse(complete=complete(pb.GenerateComplete, f, ids))

        messages = generate(
            context,
            submit,
            streaming=request.stream,
            chunk=lambda g: pb.GenerateResponse(chunk=stream_chunk(pb.GenerateStreamChunk, g)),
            final=final,
        )
        async with aclosing(messages):
            async for message in messages:
                yield message

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        for rid in request.request_ids:
            self.engine.abort(rid)
        return pb.AbortResponse()

    async def HealthCheck(self, request, context) -> pb.HealthCheckResponse:
        if self.engine.draining:
            return pb.HealthCheckResponse(healthy=False, message="draining: shutting down")
        return pb.HealthCheckResponse(healthy=True, message="serving")

    async def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        c = self.card
        return pb.GetModelInfoResponse(
            model_path=c.model,
            is_generation=True,
            max_context_length=c.context_window,
            vocab_size=c.vocab_size,
            supports_vision=False,
            served_model_name=c.model,
            tokenizer_path=c.model,  # the files themselves come from GetTokenizer
            model_type="llama",
            architectures=["MemorywallEmulatedForCausalLM"],
            eos_token_ids=c.eos_token_ids,
            max_req_input_len=c.context_window - 1,
        )

    async def GetServerInfo(self, request, context) -> pb.GetServerInfoResponse:
        s = self.engine.stats()
        return pb.GetServerInfoResponse(
            active_requests=s.running + s.waiting,
            is_paused=False,
            uptime_seconds=s.uptime_s,
            server_type="vllm-grpc",
            data_parallel_size=1,
            kv_cache_dtype="auto",
            block_size=BLOCK_SIZE,
            max_num_seqs=self.card.max_num_seqs,
        )

    async def GetLoads(self, request: pb.GetLoadsRequest, context) -> pb.GetLoadsResponse:
        s = self.engine.stats()
        max_running = self.card.max_num_seqs
        load = pb.SchedulerLoad(
            dp_rank=0,
            num_running_reqs=s.running,
            num_waiting_reqs=s.waiting,
            num_total_reqs=s.running + s.waiting,
            num_used_tokens=s.kv_used_tokens,
            max_total_num_tokens=s.kv_total_tokens,
            token_usage=s.kv_usage,
            gen_throughput=self.throughput.rate(self.engine.now(), s.tokens_generated),
            cache_hit_rate=s.prefix_cache.hit_rate or 0.0,
            utilization=s.running / max_running,
            max_running_requests=max_running,
        )
        return pb.GetLoadsResponse(
            timestamp=datetime.datetime.now(datetime.UTC).isoformat(),
            version=f"memorywall-{__version__}",
            dp_rank_count=1,
            loads=[load],
        )


def add_to_server(servicer: VllmServicer, server: grpc.aio.Server) -> None:
    vllm_engine_pb2_grpc.add_VllmEngineServicer_to_server(servicer, server)
