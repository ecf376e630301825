"""trtllm.TrtllmService over gRPC: TensorRT-LLM's worker API, which the smg gateway
routes to.

A thin adapter over the same engine as memorywall.v1 and SGLang's service (see
`smg_worker`); stubs come from the `smg-grpc-proto` package. The gateway sends
prompt ids and a required `max_tokens`; streamed chunks carry only the new ids,
the final message all of them. What the emulator does not model (beams, several
sequences, disaggregated phases, multimodal input, embeddings) answers
UNIMPLEMENTED, never a wrong answer.
"""

from __future__ import annotations

import uuid
from contextlib import aclosing

import grpc
from smg_grpc_proto.generated import trtllm_service_pb2 as pb
from smg_grpc_proto.generated import trtllm_service_pb2_grpc

from memorywall import __version__
from memorywall.errors import InvalidRequestError
from memorywall.server.engine.api import (
    EngineClient,
    ModelCard,
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

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrtllmService"].full_name
HEALTHY = "OK"  # what TensorRT-LLM's HealthCheck says when it serves


def not_emulated(r: pb.GenerateRequest) -> str | None:
    """Why this worker cannot serve `r` as asked (-> UNIMPLEMENTED), or None."""
    s = r.sampling_config
    if s.beam_width > 1:
        return f"sampling_config.beam_width={s.beam_width}: no beam search"
    if s.num_return_sequences > 1:
        return f"sampling_config.num_return_sequences={s.num_return_sequences}: one only"
    d = r.disaggregated_params
    if (
        r.HasField("disaggregated_params")
        and d.request_type != d.REQUEST_TYPE_CONTEXT_AND_GENERATION
    ):
        return "context-only or generation-only requests: disaggregation is not emulated here"
    if r.HasField("multimodal_input"):
        return "multimodal input: this worker emulates a text model"
    return None


class TrtllmServicer(WorkerRpcs, trtllm_service_pb2_grpc.TrtllmServiceServicer):
    def __init__(self, engine: EngineClient, card: ModelCard) -> None:
        self.engine = engine
        self.card = card
        self.tokenizer = TokenizerCache(card)

    def to_request(self, r: pb.GenerateRequest) -> Request:
        prompt = prompt_ids(r.tokenized.input_token_ids, self.card, "tokenized.input_token_ids")
        if r.max_tokens < 1:
            raise InvalidRequestError("max_tokens: required, at least 1")
        return Request(
            request_id=r.request_id or uuid.uuid4().hex,
            prompt_ids=prompt,
            max_tokens=r.max_tokens,
            min_tokens=r.sampling_config.min_tokens,
            ignore_eos=r.ignore_eos,
            stop_token_ids=frozenset(r.stop_token_ids),
            protocol="trtllm",
        )

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        # Modelled time starts when the request reaches us, not after we parsed it.
        arrival_s = self.engine.now()
        if (why := not_emulated(request)) is not None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, why)
        rid = request.request_id

        def submit(fault):
            return self.engine.submit(self.to_request(request), arrival_s=arrival_s, fault=fault)

        def final(f, output):
            # Unlike vLLM's and SGLang's, the final message is cumulative.
            done = complete(pb.GenerateComplete, f, output, ids_field="output_token_ids")
            return pb.GenerateResponse(request_id=rid, complete=done)

        messages = generate(
            context,
            submit,
            streaming=request.streaming,
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

    async def HealthCheck(self, request, context) -> pb.HealthCheckResponse:
        if self.engine.draining:
            return pb.HealthCheckResponse(status="draining: shutting down")
        return pb.HealthCheckResponse(status=HEALTHY)

    async def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        c = self.card
        return pb.GetModelInfoResponse(
            model_id=c.model,
            max_input_len=c.context_window - 1,
            max_seq_len=c.context_window,
            max_batch_size=c.max_num_seqs,
            vocab_size=c.vocab_size,
        )

    async def GetServerInfo(self, request, context) -> pb.GetServerInfoResponse:
        c = self.card
        return pb.GetServerInfoResponse(
            version=f"memorywall-{__version__}",
            backend="pytorch",
            tensor_parallel_size=c.tensor_parallel,
            pipeline_parallel_size=c.pipeline_parallel,
            context_parallel_size=1,
            world_size=c.devices,
        )


def add_to_server(servicer: TrtllmServicer, server: grpc.aio.Server) -> None:
    trtllm_service_pb2_grpc.add_TrtllmServiceServicer_to_server(servicer, server)
