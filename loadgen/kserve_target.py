"""A KServe v2 / Triton server serving an LLM (Triton with its vLLM or TensorRT-LLM backend,
memorywall's KServe fronts) as a `Target`: gRPC ModelStreamInfer or HTTP generate_stream.

Requests are what genai-perf and AIPerf send a vLLM-backend model: BYTES
`text_input`, BOOL `stream`, BYTES `sampling_parameters` with `max_tokens` and
`ignore_eos`, plus `max_tokens` as a request parameter, which the TensorRT-LLM
ensemble reads from its input of that name over the generate extension. Every
response (gRPC) or event (SSE) carrying text counts as one token-carrying message;
it counts `num_output_tokens` tokens when the server returns that output (it is
asked for), else one. The request's usage and modelled timeline come from the
last response's `memorywall_*` parameters when the server is memorywall; other
servers leave them None. Prompts are text, built as the OpenAI chat target builds
them (`openai_target.prompt_text`: one common word per token). Failures become
`record.error`, never exceptions.

The gRPC target uses the KServe protos this project vendors (`memorywall.kserve`),
not tritonclient: no extra dependency, and the same timing code as the other targets.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from memorywall.kserve import grpc_service_pb2 as pb
from memorywall.kserve import grpc_service_pb2_grpc
from memorywall.loadgen.openai_target import SseDecoder, aiohttp_ssl, post_stream, prompt_text
from memorywall.loadgen.prompts import prefix_rng, prompt_rng, shared_tokens
from memorywall.loadgen.records import RequestRecord, RequestSpec
from memorywall.loadgen.target import Access

CONNECT_TIMEOUT_S = 5.0


def spec_text(spec: RequestSpec, salt: int) -> str:
    """The prompt text of `spec`: its shared prefix (if any), then its own words."""
    shared = shared_tokens(spec)
    own = spec.prompt_tokens - shared
    parts = [prompt_text(shared, prefix_rng(salt, spec.prefix_group or 0))] if shared else []
    if own or not parts:
        parts.append(prompt_text(own, prompt_rng(salt, spec.index)))
    return " ".join(parts)


def sampling(spec: RequestSpec) -> str:
    return json.dumps({"max_tokens": spec.output_tokens, "ignore_eos": True})


def apply_summary(params: dict[str, Any], record: RequestRecord) -> None:
    """memorywall's usage and modelled timeline from a last response's parameters."""
    if "memorywall_completion_tokens" not in params:
        return
    record.usage_prompt_tokens = params["memorywall_prompt_tokens"]
    record.usage_completion_tokens = params["memorywall_completion_tokens"]
    record.usage_cached_tokens = params["memorywall_cached_tokens"]
    record.modelled_ttft_s = params["memorywall_ttft_s"]
    record.modelled_e2e_s = params["memorywall_e2e_s"]
    record.modelled_decode_s = params["memorywall_decode_s"]
    received = params.get("memorywall_received_monotonic_ns")
    record.server_received_ns = received or None


def _raw_bytes(text: str) -> bytes:
    b = text.encode()
    return len(b).to_bytes(4, "little") + b


def _param(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


class KServeGrpcTarget:
    """ModelStreamInfer, one stream per request, on one channel."""

    def __init__(
        self,
        address: str,
        *,
        model: str,
        timeout_s: float | None = None,
        prompt_salt: int | None = None,
        access: Access | None = None,
    ) -> None:
        self.address = address
        self.model = model
        self.timeout_s = timeout_s
        self.access = access or Access()
        self.prompt_salt = secrets.randbits(63) if prompt_salt is None else prompt_salt
        key = self.access.api_key
        self.metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self.channel: grpc.aio.Channel | None = None  # opened by `connect`, in the run's loop
        self.stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub | None = None

    async def connect(self) -> None:
        """Open the channel now, so the first measured request does not pay for the handshake."""
        tls = self.access.grpc_tls()
        if tls is None:
            self.channel = grpc.aio.insecure_channel(self.address)
        else:
            roots = Path(tls.ca).read_bytes() if tls.ca else None
            credentials = grpc.ssl_channel_credentials(roots)
            self.channel = grpc.aio.secure_channel(self.address, credentials)
        self.stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        with contextlib.suppress(grpc.aio.AioRpcError):  # left to `send`, which records it
            await self.stub.ServerLive(
                pb.ServerLiveRequest(), timeout=CONNECT_TIMEOUT_S, metadata=self.metadata
            )

    def request(self, spec: RequestSpec) -> pb.ModelInferRequest:
        r = pb.ModelInferRequest(model_name=self.model, id=str(spec.index))
        for name, datatype, raw in (
            ("text_input", "BYTES", _raw_bytes(spec_text(spec, self.prompt_salt))),
            ("stream", "BOOL", b"\x01"),
            ("sampling_parameters", "BYTES", _raw_bytes(sampling(spec))),
            ("return_num_output_tokens", "BOOL", b"\x01"),
        ):
            r.inputs.add(name=name, datatype=datatype, shape=[1])
            r.raw_input_contents.append(raw)
        return r

    async def send(self, spec: RequestSpec, record: RequestRecord) -> None:
        """Stream one request into `record`; a failure becomes `record.error`."""
        if self.stub is None:
            raise RuntimeError("send before connect")
        request = self.request(spec)  # built before the send time is taken
        record.sent_ns = time.perf_counter_ns()
        call = self.stub.ModelStreamInfer(
            iter([request]), timeout=self.timeout_s, metadata=self.metadata
        )
        try:
            async for message in call:
                received_ns = time.perf_counter_ns()
                if message.error_message:
                    record.error = f"error: {message.error_message}"
                    call.cancel()
                    return
                response = message.infer_response
                params = {k: _param(v) for k, v in response.parameters.items()}
                tokens = _output_tokens(response)
                if tokens:
                    record.add_chunk(received_ns, tokens)
                if params.get("triton_final_response"):
                    record.finished_ns = received_ns
                    apply_summary(params, record)
            if record.finished_ns is None:  # a server that never flags its last response
                record.finished_ns = time.perf_counter_ns()
        except grpc.aio.AioRpcError as e:
            record.error = f"{e.code().name}: {e.details()}"

    async def aclose(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = self.stub = None


def _output_tokens(response: pb.ModelInferResponse) -> int:
    """Tokens a response carries: its num_output_tokens, else one if it has text."""
    names = [o.name for o in response.outputs]
    raw = response.raw_output_contents
    if "num_output_tokens" in names and len(raw) == len(names):
        return int.from_bytes(raw[names.index("num_output_tokens")][:4], "little")
    if "text_output" in names and len(raw) == len(names):
        return 1 if len(raw[names.index("text_output")]) > 4 else 0
    return 1 if names else 0


class KServeHttpTarget:
    """POST /v2/models/{model}/generate_stream, one server-sent event per response."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        timeout_s: float | None = None,
        prompt_salt: int | None = None,
        access: Access | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self.access = access or Access()
        self.prompt_salt = secrets.randbits(63) if prompt_salt is None else prompt_salt
        self.url = f"{self.base_url}/v2/models/{model}/generate_stream"
        self._session: aiohttp.ClientSession | None = None

    async def connect(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ssl=aiohttp_ssl(self.access))
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        warm = aiohttp.ClientTimeout(total=CONNECT_TIMEOUT_S)
        try:
            async with self._session.get(f"{self.base_url}/v2/health/live", timeout=warm) as r:
                await r.read()
        except (aiohttp.ClientError, TimeoutError):
            pass

    def payload(self, spec: RequestSpec) -> dict[str, Any]:
        return {
            "text_input": spec_text(spec, self.prompt_salt),
            "stream": True,
            "sampling_parameters": sampling(spec),
            "return_num_output_tokens": True,
            "id": str(spec.index),
        }

    async def send(self, spec: RequestSpec, record: RequestRecord) -> None:
        """Stream one request into `record`; a failure becomes `record.error`."""
        if self._session is None:
            raise RuntimeError("send before connect")
        await post_stream(
            self._session,
            self.url,
            self.payload(spec),
            self.access,
            record,
            self._read,
            timeout_error="timeout: no complete response",
        )

    async def _read(self, resp: aiohttp.ClientResponse, record: RequestRecord) -> None:
        decoder = SseDecoder()
        received_ns = record.sent_ns
        last: dict[str, Any] = {}
        async for data in resp.content.iter_any():
            received_ns = time.perf_counter_ns()
            for event in decoder.feed(data):
                self._apply(event.data, received_ns, record, last)
        for event in decoder.close():
            self._apply(event.data, received_ns, record, last)
        record.finished_ns = received_ns
        if record.error is None:
            apply_summary(last, record)

    @staticmethod
    def _apply(data: str, received_ns: int, record: RequestRecord, last: dict) -> None:
        try:
            body = json.loads(data)
        except ValueError:
            record.error = f"malformed event: {data[:100]!r}"
            return
        if not isinstance(body, dict):
            return
        if "error" in body:
            record.error = f"error: {body['error']}"
            return
        if body.get("text_output"):
            tokens = body.get("num_output_tokens", 1)
            record.add_chunk(received_ns, tokens if isinstance(tokens, int) else 1)
        last.clear()
        last.update(body)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
