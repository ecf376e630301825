"""The seam between the load generator and a server: send one request, fill one record.

`GrpcTarget` speaks memorywall.v1 through `AsyncClient`; `OpenAITarget`
(`openai_target.py`) speaks the OpenAI completions or chat API over HTTP;
`KServeGrpcTarget` and `KServeHttpTarget` (`kserve_target.py`) speak KServe v2 /
Triton (ModelStreamInfer, generate_stream); `SmgWorkerTarget` (`smg_target.py`)
speaks SGLang's, vLLM's or TensorRT-LLM's gRPC worker service, as the smg gateway does.
`make_target` is the one place a `TargetConfig` becomes a `Target`, in this
process and in every worker process.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from memorywall.loadgen.prompts import carries_ids, spec_token_ids
from memorywall.loadgen.records import RequestRecord, RequestSpec

if TYPE_CHECKING:  # the gRPC client (grpc: ~0.1 s to import) only for gRPC targets
    import ssl

    from memorywall.client import AsyncClient, ModelInfo, Tls


class Target(Protocol):
    async def connect(self) -> None: ...

    async def send(self, spec: RequestSpec, record: RequestRecord) -> None: ...

    async def aclose(self) -> None: ...


class Backend(StrEnum):
    """The protocol a target speaks (`--backend`)."""

    MEMORYWALL_GRPC = "memorywall-grpc"
    OPENAI_COMPLETIONS = "openai-completions"  # POST /v1/completions
    OPENAI_CHAT = "openai-chat"  # POST /v1/chat/completions
    KSERVE_GRPC = "kserve-grpc"  # inference.GRPCInferenceService/ModelStreamInfer
    KSERVE_HTTP = "kserve-http"  # POST /v2/models/{model}/generate_stream
    SGLANG_GRPC = "sglang-grpc"  # sglang.grpc.scheduler.SglangScheduler
    VLLM_GRPC = "vllm-grpc"  # vllm.grpc.engine.VllmEngine (`vllm serve --grpc`)
    TRTLLM_GRPC = "trtllm-grpc"  # trtllm.TrtllmService

    @property
    def is_openai(self) -> bool:
        return self in (Backend.OPENAI_COMPLETIONS, Backend.OPENAI_CHAT)

    @property
    def takes_url(self) -> bool:
        """Its target is a base URL (HTTP), not host:port (gRPC)."""
        return self.is_openai or self is Backend.KSERVE_HTTP

    @property
    def names_model(self) -> bool:
        """Every request names the model (memorywall.v1 serves one and names none)."""
        return self is not Backend.MEMORYWALL_GRPC and not self.is_smg_worker

    @property
    def is_smg_worker(self) -> bool:
        """A worker service the smg gateway speaks (gRPC, host:port, prompt ids)."""
        return self in (Backend.SGLANG_GRPC, Backend.VLLM_GRPC, Backend.TRTLLM_GRPC)


@dataclass(frozen=True, kw_only=True)
class Access:
    """What a server behind TLS or an API key needs (`--tls`, `--tls-ca`, `--api-key`).

    gRPC targets (host:port) speak TLS when `tls` is set; OpenAI targets when their URL
    is https. `tls_ca`: PEM roots that sign the server's certificate (None: the system's).
    """

    tls: bool = False
    tls_ca: str | None = None
    api_key: str | None = None
    # `--otlp-endpoint`: every request in a span of its own, its traceparent sent along.
    otlp_endpoint: str | None = None

    def grpc_tls(self) -> Tls | None:
        from memorywall.client import Tls

        return Tls(ca=self.tls_ca) if self.tls or self.tls_ca else None

    def ssl_context(self) -> ssl.SSLContext | None:
        """For https: the given roots, else None (aiohttp's default verification)."""
        import ssl  # here: `simulate` builds an Access and never opens a connection

        return ssl.create_default_context(cafile=self.tls_ca) if self.tls_ca else None

    def headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if self.otlp_endpoint is not None:
            from memorywall.loadgen.tracing import inject

            inject(headers)
        return headers

    def client(self, address: str, *, timeout_s: float | None) -> AsyncClient:
        from memorywall.client import AsyncClient

        interceptors = []
        if self.otlp_endpoint is not None:
            from memorywall.loadgen.tracing import TraceMetadata

            interceptors.append(TraceMetadata())
        return AsyncClient(
            address,
            timeout_s=timeout_s,
            tls=self.grpc_tls(),
            api_key=self.api_key,
            interceptors=interceptors,
        )


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """Where and how to send: picklable, so worker processes build their own target."""

    backend: Backend = Backend.MEMORYWALL_GRPC
    address: str  # host:port for gRPC; a base URL (http://host:port) for HTTP backends
    model: str | None = None  # OpenAI and KServe backends: the model every request names
    # Seeds the synthetic prompt ids (`loadgen/prompts.py`); one value for every worker of
    # a level, so shared prefixes are shared across processes. None: fresh per target.
    prompt_salt: int | None = None
    access: Access = field(default_factory=Access)


def make_target(config: TargetConfig, *, timeout_s: float | None = None) -> Target:
    """The one factory for targets; `timeout_s` is the per-request deadline (None: none)."""
    target = _make_target(config, timeout_s=timeout_s)
    if config.access.otlp_endpoint is not None:
        from memorywall.loadgen.tracing import TracedTarget, otlp_provider

        return TracedTarget(target, otlp_provider(config.access.otlp_endpoint))
    return target


def _make_target(config: TargetConfig, *, timeout_s: float | None) -> Target:
    if config.backend is Backend.MEMORYWALL_GRPC:
        return GrpcTarget(
            config.address,
            timeout_s=timeout_s,
            prompt_salt=config.prompt_salt,
            access=config.access,
        )
    if config.backend.is_smg_worker:
        from memorywall.loadgen.smg_target import SmgWorkerTarget  # its stubs only when used

        return SmgWorkerTarget(
            config.address,
            config.backend,
            timeout_s=timeout_s,
            prompt_salt=config.prompt_salt,
            access=config.access,
        )
    if config.model is None:
        raise ValueError(f"{config.backend} needs a model name")
    if config.backend in (Backend.KSERVE_GRPC, Backend.KSERVE_HTTP):
        from memorywall.loadgen import kserve_target

        kind = (
            kserve_target.KServeGrpcTarget
            if config.backend is Backend.KSERVE_GRPC
            else kserve_target.KServeHttpTarget
        )
        return kind(
            config.address,
            model=config.model,
            timeout_s=timeout_s,
            prompt_salt=config.prompt_salt,
            access=config.access,
        )
    from memorywall.loadgen.openai_target import OpenAITarget  # aiohttp only when used

    return OpenAITarget(
        config.address,
        chat=config.backend is Backend.OPENAI_CHAT,
        model=config.model,
        timeout_s=timeout_s,
        prompt_salt=config.prompt_salt,
        access=config.access,
    )


class GrpcTarget:
    """A memorywall engine over gRPC.

    A request without a prefix group sends only its prompt length (the server makes up
    the prompt); one in a shared-prefix group, of a trace with hash ids or of a session
    sends its token ids, built as the OpenAI targets build them, so the same workload
    hits the prefix cache on every backend.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float | None = None,
        prompt_salt: int | None = None,
        access: Access | None = None,
    ) -> None:
        self.address = address
        self.client = (access or Access()).client(address, timeout_s=timeout_s)
        self.prompt_salt = secrets.randbits(63) if prompt_salt is None else prompt_salt

    async def connect(self) -> None:
        """Open the channel now, so the first measured request does not pay for the handshake."""
        await self.client.health()

    async def model_info(self) -> ModelInfo:
        return await self.client.model_info()

    async def send(self, spec: RequestSpec, record: RequestRecord) -> None:
        """Stream one request into `record`; a failure becomes `record.error`, not an exception."""
        from memorywall.client import ClientError

        try:
            if not carries_ids(spec):
                prompt: dict = {"prompt_tokens": spec.prompt_tokens}
            else:
                prompt = {"prompt_token_ids": spec_token_ids(spec, self.prompt_salt)}
            stream = self.client.generate(**prompt, max_tokens=spec.output_tokens, ignore_eos=True)
            record.sent_ns = stream.sent_ns
            async with stream:
                async for chunk in stream:
                    record.add_chunk(chunk.received_ns, len(chunk.token_ids))
            result = stream.result
        except ClientError as e:
            record.error = f"{e.code.name}: {e.details}"
            return
        record.finished_ns = result.finished_ns
        record.usage_prompt_tokens = result.usage.prompt_tokens
        record.usage_completion_tokens = result.usage.completion_tokens
        record.usage_cached_tokens = result.usage.cached_tokens
        record.modelled_ttft_s = result.timing.ttft_s
        record.modelled_e2e_s = result.timing.e2e_s
        record.modelled_decode_s = result.timing.decode_s
        record.server_received_ns = result.timing.received_monotonic_ns

    async def aclose(self) -> None:
        await self.client.aclose()


def now_ns() -> int:
    return time.perf_counter_ns()
