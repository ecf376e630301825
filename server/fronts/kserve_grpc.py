"""inference.GRPCInferenceService (KServe v2 gRPC, with Triton's extensions) over the engine.

What Triton's clients (`tritonclient.grpc`, perf_analyzer, genai-perf, AIPerf) call
against a Triton serving an LLM through its vLLM backend: health, server and model
metadata, the model's config, ModelInfer (one response) and ModelStreamInfer
(one response per token when the request streams). Tensors are parsed and built in
`kserve_tensors.py`; this module converts the wire form and streams.

ModelStreamInfer carries any number of requests on one call, each answered as it goes;
a bad request is answered in the stream (`error_message`, as Triton does) and the
stream carries on. With `triton_enable_empty_final_response` each response says
whether it is the last (`triton_final_response`) and the last is empty; without it,
the last token's response carries `triton_final_response: true`. The last response's
parameters carry memorywall's usage and modelled timing (`summary_parameters`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import cast

import grpc

from memorywall import __version__
from memorywall.errors import InvalidRequestError, MemorywallError, PayloadTooLargeError
from memorywall.kserve import grpc_service_pb2 as pb
from memorywall.kserve import grpc_service_pb2_grpc, model_config_pb2
from memorywall.server.engine.api import (
    EngineClient,
    FaultRule,
    Finished,
    ModelCard,
    Phase,
)
from memorywall.server.fronts.kserve_tensors import (
    DATATYPES,
    INPUTS,
    OUTPUTS,
    GenerateCall,
    KServeApi,
    Piece,
    Tensor,
    decode_raw,
    encode_raw,
    merge,
    output_tensors,
    per_token,
    piece_of,
    summary_parameters,
)
from memorywall.server.fronts.status import grpc_fault, grpc_status, grpc_trailers
from memorywall.server.fronts.tokenizer import PromptTokenizer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSIONS = ("model_configuration", "binary_tensor_data", "parameters", "generate")
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_CONFIG_TYPE = {"BYTES": "TYPE_STRING"}


def parameter_value(p: pb.InferParameter) -> bool | int | float | str | None:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def set_parameter(target, key: str, value: bool | int | float | str) -> None:
    """`target[key] = value` on a proto map of InferParameter."""
    p = target[key]
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = value


def input_tensors(request: pb.ModelInferRequest) -> list[Tensor]:
    """A request's inputs, from `raw_input_contents` (what tritonclient sends) or typed
    `contents`; InvalidRequestError naming the tensor when one cannot be read."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequestError(
            f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs"
        )
    out = []
    for i, t in enumerate(request.inputs):
        if t.datatype not in DATATYPES:
            raise InvalidRequestError(f"input {t.name!r}: unknown datatype {t.datatype!r}")
        if raw:
            values = decode_raw(t.name, t.datatype, t.shape, raw[i])
        elif t.datatype == "BYTES":
            values = [_utf8(t.name, b) for b in t.contents.bytes_contents]
        elif t.datatype == "FP16":
            raise InvalidRequestError(f"input {t.name!r}: FP16 needs raw_input_contents")
        else:
            values = list(getattr(t.contents, _CONTENTS[t.datatype]))
        out.append(Tensor(t.name, t.datatype, tuple(t.shape), values))
    return out


def _utf8(name: str, b: bytes) -> str:
    try:
        return b.decode()
    except UnicodeDecodeError:
        raise InvalidRequestError(f"input {name!r}: BYTES values must be UTF-8 text") from None


def ready(engine: EngineClient) -> bool:
    """KServe's readiness: serving inference now (weights loaded, awake, not draining)."""
    return not engine.draining and engine.lifecycle.phase is Phase.READY


class KServeServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        engine: EngineClient,
        card: ModelCard,
        tokenizer: PromptTokenizer,
        *,
        max_request_bytes: int | None = None,
    ) -> None:
        self.engine = engine
        self.card = card
        self.api = KServeApi(card, tokenizer, protocol="kserve-grpc")
        self.max_request_bytes = max_request_bytes

    # --- health and metadata ---------------------------------------------------------------

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=ready(self.engine))

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        served = request.name == self.card.model and request.version in ("", "1")
        return pb.ModelReadyResponse(ready=served and ready(self.engine))

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="memorywall", version=__version__, extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context):
        await self._check_model(request.name, request.version, context)
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.card.model,
            versions=["1"],
            platform="memorywall",
            inputs=[meta(name=s.name, datatype=s.datatype, shape=s.dims) for s in INPUTS.values()],
            outputs=[
                meta(name=s.name, datatype=s.datatype, shape=s.dims) for s in OUTPUTS.values()
            ],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context):
        await self._check_model(request.name, request.version, context)
        return pb.ModelConfigResponse(config=model_config(self.card))

    async def RepositoryIndex(self, request, context) -> pb.RepositoryIndexResponse:
        """The one served model, READY (the load generator finds its name here)."""
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[index(name=self.card.model, version="1", state="READY")]
        )

    async def _check_model(self, name: str, version: str, context) -> None:
        try:
            self.api.check_model(name, version)
        except MemorywallError as e:
            await context.abort(grpc_status(e), str(e))

    # --- inference -------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        arrival_s = self.engine.now()
        try:
            # One answer: the empty final response is a stream's.
            call = dataclasses.replace(self._call(request), empty_final=False)
            if call.stream:
                raise InvalidRequestError(
                    "input 'stream': ModelInfer answers once; stream with ModelStreamInfer"
                )
            responses = [
                r async for r in self._responses(request, call, arrival_s, grpc_fault(context))
            ]
        except MemorywallError as e:
            await context.abort(grpc_status(e), str(e), trailing_metadata=grpc_trailers(e))
        return responses[-1]

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        try:
            fault = grpc_fault(context)
        except MemorywallError as e:
            await context.abort(grpc_status(e), str(e))
        queue: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()

        async def answer(request: pb.ModelInferRequest, arrival_s: float) -> None:
            try:
                call = self._call(request)
                async for response in self._responses(request, call, arrival_s, fault):
                    queue.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
            except MemorywallError as e:
                # The request's id goes with its error, so a client can tell which failed.
                said = pb.ModelInferResponse(id=request.id, model_name=request.model_name)
                queue.put_nowait(
                    pb.ModelStreamInferResponse(error_message=str(e), infer_response=said)
                )

        async def read() -> None:
            try:
                async with asyncio.TaskGroup() as group:
                    async for request in request_iterator:
                        # Modelled time starts when the request reaches us.
                        group.create_task(answer(request, self.engine.now()))
            finally:
                queue.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await queue.get()) is not None:
                yield item
            await reader  # raises what a request's task raised unexpectedly
        finally:
            # Cancelled or client gone: the tasks' engine streams close as they cancel.
            reader.cancel()

    def _call(self, request: pb.ModelInferRequest) -> GenerateCall:
        limit = self.max_request_bytes
        if limit is not None and (size := request.ByteSize()) > limit:
            raise PayloadTooLargeError(f"request: {size:,} bytes, more than the limit of {limit:,}")
        self.api.check_model(request.model_name, request.model_version)
        parameters = {k: parameter_value(v) for k, v in request.parameters.items()}
        return self.api.to_call(
            input_tensors(request), parameters, [o.name for o in request.outputs]
        )

    async def _responses(
        self,
        request: pb.ModelInferRequest,
        call: GenerateCall,
        arrival_s: float,
        fault: FaultRule | None,
    ) -> AsyncIterator[pb.ModelInferResponse]:
        """The responses to one request: one per token when it streams, else one."""
        stream = self.engine.submit(call.request, arrival_s=arrival_s, fault=fault)
        frame = {"model_name": self.card.model, "model_version": "1", "id": request.id}
        try:
            first, held = True, None
            pieces: list[Piece] = []
            async for event in stream:
                if isinstance(event, Finished):
                    last = held or (merge(pieces) if pieces else None)
                    if call.empty_final or last is None:
                        if last is not None:
                            yield _response(frame, call, last, first, final=False)
                        yield _final(frame, event, empty_flag=True)
                    else:
                        yield _response(frame, call, last, first, final=True, finished=event)
                    return
                if not call.stream:
                    pieces.append(piece_of(event))
                    continue
                for piece in per_token(event):
                    if piece.finish_reason is not None:
                        held = piece  # the last token waits for Finished: it carries the summary
                        continue
                    yield _response(frame, call, piece, first, final=False, flag=call.empty_final)
                    first = False
        finally:
            stream.close()


def _response(
    frame: dict,
    call: GenerateCall,
    piece: Piece,
    first: bool,
    *,
    final: bool,
    flag: bool = True,
    finished: Finished | None = None,
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(**frame)
    for t in output_tensors(call, piece, first=first):
        response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        response.raw_output_contents.append(encode_raw(t))
    if flag:
        set_parameter(response.parameters, "triton_final_response", final)
    if finished is not None:
        for key, value in summary_parameters(finished).items():
            set_parameter(response.parameters, key, value)
    return response


def _final(frame: dict, finished: Finished, *, empty_flag: bool) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(**frame)
    set_parameter(response.parameters, "triton_final_response", empty_flag)
    for key, value in summary_parameters(finished).items():
        set_parameter(response.parameters, key, value)
    return response


def model_config(card: ModelCard) -> model_config_pb2.ModelConfig:
    """The model's config as Triton's vLLM backend completes it: no batching by Triton,
    decoupled (a stream of responses per request), every input optional but the prompt."""
    mc = model_config_pb2

    def dtype(datatype: str) -> model_config_pb2.DataType:
        # The enum's number: what its stubs call DataType, and Value() returns as an int.
        number = mc.DataType.Value(_CONFIG_TYPE.get(datatype, f"TYPE_{datatype}"))
        return cast(model_config_pb2.DataType, number)

    return mc.ModelConfig(
        name=card.model,
        backend="memorywall",
        max_batch_size=0,
        input=[
            mc.ModelInput(
                name=s.name, data_type=dtype(s.datatype), dims=s.dims, optional=s.optional
            )
            for s in INPUTS.values()
        ],
        output=[
            mc.ModelOutput(name=s.name, data_type=dtype(s.datatype), dims=s.dims)
            for s in OUTPUTS.values()
        ],
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
        # What the emulator emulates: the load generator compares against the core with it.
        parameters={
            "memorywall_hardware": mc.ModelParameter(string_value=card.hardware),
            "memorywall_devices": mc.ModelParameter(string_value=str(card.devices)),
            "memorywall_deployment": mc.ModelParameter(string_value=card.deployment),
        },
    )


def add_to_server(servicer: KServeServicer, server: grpc.aio.Server) -> None:
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
