"""A server's listeners over one `EngineClient`: the wiring `memorywall serve` and each front
process of `serve --api-servers N` share.

gRPC (the worker protocols `config.grpc_services` names: memorywall.v1, SGLang's,
vLLM's or TensorRT-LLM's worker API, KServe v2 / Triton's GRPCInferenceService; health,
reflection, every call behind the auth gate), the
HTTP front (OpenAI and KServe v2 routes, with /metrics) and a /metrics-only
port, each as `ServerConfig` asks, with TLS on all of them when it asks. The
owner keeps the engine's lifecycle; the listeners go through theirs:

    listeners = Listeners(engine, card, config, seed=..., metrics=...)
    ports = await listeners.bind(ListenerPorts.of(config))   # OSError: nothing left bound
    await listeners.serve()                                   # health: SERVING
    ...
    await listeners.stop_serving()                            # health: NOT_SERVING
    # the owner drains its engine here
    await listeners.close()
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from memorywall.server.config import ServerConfig
from memorywall.server.engine.api import EngineClient, LoraRegistry, ModelCard
from memorywall.server.fronts import kserve_grpc, sglang_servicer, trtllm_servicer, vllm_servicer
from memorywall.server.fronts.grpc_gate import GrpcGate
from memorywall.server.fronts.grpc_servicer import EngineServicer
from memorywall.server.fronts.http_front import (
    Handler,
    HttpSite,
    OpenAIFront,
    expect_continue,
    metrics_app,
)
from memorywall.server.fronts.kserve_http import KServeHttp
from memorywall.server.fronts.tokenizer import PromptTokenizer, load_tokenizer
from memorywall.server.grpc_services import KSERVE, MEMORYWALL, SGLANG, TRTLLM, VLLM
from memorywall.server.pd import Disaggregation
from memorywall.v1 import engine_pb2, engine_pb2_grpc


class TraceHooks(Protocol):
    """Where a request's incoming trace context is read (`fronts/tracing.Tracing`)."""

    def grpc_interceptor(self) -> grpc.aio.ServerInterceptor: ...

    def http_middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]: ...


SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name
# Each `--grpc-services` name's gRPC service.
SERVICE_NAMES = {
    MEMORYWALL: SERVICE_NAME,
    SGLANG: sglang_servicer.SERVICE_NAME,
    VLLM: vllm_servicer.SERVICE_NAME,
    TRTLLM: trtllm_servicer.SERVICE_NAME,
    KSERVE: kserve_grpc.SERVICE_NAME,
}
MAX_PENDING_CALLS = 1_000_000


def health_names(services: tuple[str, ...]) -> tuple[str, ...]:
    """Every service on the gRPC port, each with a health status of its own ("" is the
    server's)."""
    return ("", *(SERVICE_NAMES[s] for s in services))


@dataclass(frozen=True)
class ListenerPorts:
    """A server's ports (None: that listener is off; 0 before binding: any free port)."""

    grpc_port: int | None
    http_port: int | None
    metrics_port: int | None
    dcgm_port: int | None = None  # the emulated dcgm-exporter

    @classmethod
    def of(cls, config: ServerConfig) -> ListenerPorts:
        """The ports `config` asks for."""
        grpc_port = config.port if config.grpc else None
        return cls(grpc_port, config.http_port, config.metrics_port, config.dcgm_port)


def addresses(config: ServerConfig, ports: ListenerPorts) -> list[str]:
    """Every bound address: gRPC as host:port first, then HTTP URLs."""
    host, scheme = config.host, config.scheme
    out = [f"{host}:{ports.grpc_port}"] if ports.grpc_port is not None else []
    if ports.http_port is not None:
        out.append(f"{scheme}://{host}:{ports.http_port}")
    if ports.metrics_port is not None:
        out.append(f"{scheme}://{host}:{ports.metrics_port}/metrics")
    if ports.dcgm_port is not None:
        out.append(f"{scheme}://{host}:{ports.dcgm_port}/metrics (DCGM)")
    if config.dashboard and ports.http_port is not None:
        out.append(f"{scheme}://{host}:{ports.http_port}/dashboard/ (dashboard)")
    return out


def _port(port: int | None, listener: str) -> int:
    """The port to bind a listener that is on to (0: any free one)."""
    if port is None:
        raise ValueError(f"the {listener} listener is on but given no port to bind")
    return port


class Listeners:
    """The gRPC server and HTTP sites `config` asks for, over `engine`. Build inside the
    event loop that runs them.

    `metrics`: the /metrics handler, on the HTTP front and the metrics port; needed when
    `config` names a metrics port. `seed`, `unnamed_prompts`: for the memorywall.v1
    servicer's prompts (see `EngineServicer`). `pd`: this worker's disaggregation role, for
    SGLang's worker API. `reuse_port`: several processes bind the same ports
    (`--api-servers`). `response_headers`: added to every OpenAI HTTP response.
    `dcgm`: the emulated dcgm-exporter's /metrics handler; needed when `config` names a
    DCGM port. `tracing`: continues each request's `traceparent` (`fronts/tracing.py`;
    None: tracing is off and nothing of it is loaded). `http_extras`: adds routes to the
    HTTP front's application (`serve --dashboard`'s page). `lora`: the adapters served by
    name (`--enable-lora`), for the OpenAI and SGLang fronts.
    """

    def __init__(
        self,
        engine: EngineClient,
        card: ModelCard,
        config: ServerConfig,
        *,
        seed: int,
        metrics: Handler | None = None,
        pd: Disaggregation | None = None,
        reuse_port: bool = False,
        unnamed_prompts: Iterator[int] | None = None,
        response_headers: Mapping[str, str] | None = None,
        dcgm: Handler | None = None,
        tracing: TraceHooks | None = None,
        http_extras: Callable[[web.Application], None] | None = None,
        lora: LoraRegistry | None = None,
    ) -> None:
        if config.metrics_port is not None and metrics is None:
            raise ValueError("a metrics port needs a /metrics handler")
        if config.dcgm_port is not None and dcgm is None:
            raise ValueError("a DCGM port needs a /metrics handler")
        self.config = config
        self.ports = ListenerPorts(None, None, None, None)
        self._serving = False
        ssl_context = config.tls.ssl_context() if config.tls is not None else None
        # Prompt text to ids, for every front that takes text (OpenAI HTTP, KServe v2).
        tokenizer = load_tokenizer(config.tokenizer, card.vocab_size)
        self.grpc: grpc.aio.Server | None = None
        self.health: health_aio.HealthServicer | None = None
        if config.grpc:
            self.grpc, self.health = grpc_server(
                engine,
                card,
                config,
                seed,
                pd,
                reuse_port=reuse_port,
                unnamed_prompts=unnamed_prompts,
                tokenizer=tokenizer,
                interceptors=(tracing.grpc_interceptor(),) if tracing is not None else (),
                lora=lora,
            )
        self.http: HttpSite | None = None
        if config.http_port is not None:
            front = OpenAIFront(
                engine,
                card,
                tokenizer,
                max_request_bytes=config.max_request_bytes,
                api_key=config.api_key,
                lora=lora,
            )
            app = front.app()
            KServeHttp(engine, card, tokenizer).add_routes(app, expect_handler=expect_continue)
            if metrics is not None:
                app.router.add_route("GET", "/metrics", metrics, expect_handler=expect_continue)
            if response_headers:
                app.on_response_prepare.append(_add_headers(dict(response_headers)))
            if tracing is not None:
                app.middlewares.append(tracing.http_middleware())
            if http_extras is not None:
                http_extras(app)
            self.http = HttpSite(app, ssl_context=ssl_context, reuse_port=reuse_port)
        self.metrics_site: HttpSite | None = None
        if config.metrics_port is not None:
            assert metrics is not None  # refused above
            self.metrics_site = HttpSite(
                metrics_app(metrics), ssl_context=ssl_context, reuse_port=reuse_port
            )
        # Its own port, as dcgm-exporter's (9400) is beside vLLM's; never several processes.
        self.dcgm_site: HttpSite | None = None
        if dcgm is not None and config.dcgm_port is not None:
            self.dcgm_site = HttpSite(metrics_app(dcgm), ssl_context=ssl_context)

    async def bind(self, ports: ListenerPorts) -> ListenerPorts:
        """Bind every listener that is on to its port in `ports` (0: any free port); returns
        the bound ports. OSError if one cannot bind: the HTTP sites started are stopped."""
        host = self.config.host
        grpc_port = http_port = metrics_port = dcgm_port = None
        if self.grpc is not None:
            grpc_port = bind_grpc(self.grpc, self.config, _port(ports.grpc_port, "gRPC"))
        try:
            if self.http is not None:
                http_port = await self.http.start(host, _port(ports.http_port, "HTTP"))
            if self.metrics_site is not None:
                port = _port(ports.metrics_port, "metrics")
                metrics_port = await self.metrics_site.start(host, port)
            if self.dcgm_site is not None:
                dcgm_port = await self.dcgm_site.start(host, _port(ports.dcgm_port, "DCGM"))
        except OSError:
            await self._stop_http()
            raise
        self.ports = ListenerPorts(grpc_port, http_port, metrics_port, dcgm_port)
        return self.ports

    async def serve(self) -> None:
        """Start answering gRPC (HTTP answers once bound) and report every service SERVING."""
        if self.grpc is not None and self.health is not None:  # built together
            await self.grpc.start()
            self._serving = True
            for name in health_names(self.config.grpc_services):
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop_serving(self) -> None:
        """Report every gRPC service NOT_SERVING; calls keep being answered until `close`."""
        if self._serving and self.health is not None:
            for name in health_names(self.config.grpc_services):
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def close(self) -> None:
        """Stop the gRPC server (a second's grace) and the HTTP sites."""
        if self._serving and self.grpc is not None:
            await self.grpc.stop(grace=1.0)
            self._serving = False
        await self._stop_http()

    async def _stop_http(self) -> None:
        for site in (self.http, self.metrics_site, self.dcgm_site):
            if site is not None:
                await site.stop()


def _add_headers(headers: dict[str, str]):
    async def add(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(headers)

    return add


def grpc_server(
    engine: EngineClient,
    card: ModelCard,
    config: ServerConfig,
    seed: int,
    pd: Disaggregation | None = None,
    *,
    reuse_port: bool = False,
    unnamed_prompts: Iterator[int] | None = None,
    tokenizer: PromptTokenizer | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    lora: LoraRegistry | None = None,
) -> tuple[grpc.aio.Server, health_aio.HealthServicer]:
    """The gRPC server (the services `config.grpc_services` names, health, reflection) over
    `engine`, unbound.

    `reuse_port`: several processes bind the same port (`--api-servers`).
    `unnamed_prompts`: numbers for unnamed token-count prompts (see `EngineServicer`).
    `tokenizer`: KServe v2's prompt text to ids (default: `config.tokenizer`'s).
    `interceptors`: run after the gate (tracing's, which reads `traceparent` metadata).
    `lora`: the adapters SGLang's `lora_id` may name (`--enable-lora`).
    """
    health = health_aio.HealthServicer()
    limit = config.max_request_bytes
    options = [
        ("grpc.so_reuseport", int(reuse_port)),
        # Up to twice the limit reaches the servicer, which answers INVALID_ARGUMENT
        # naming the limit; grpc itself refuses larger (RESOURCE_EXHAUSTED) unread.
        ("grpc.max_receive_message_length", 2 * limit),
        # grpc core cancels calls that wait for the Python loop to take them beyond
        # 1,000 (randomly) to 3,000 (all): a burst of 10,000 streams then sees
        # CANCELLED. Admission is ours to decide (--max-waiting, with a status that
        # says so), so core's backlog bounds sit far above any burst we serve.
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
    ]
    # Every call passes the gate first: the API key, and a request that decodes.
    gate = GrpcGate(api_key=config.api_key)
    server = grpc.aio.server(options=options, interceptors=[gate, *interceptors])
    services = config.grpc_services
    if MEMORYWALL in services:
        servicer = EngineServicer(
            engine, card, seed, max_request_bytes=limit, unnamed_prompts=unnamed_prompts
        )
        engine_pb2_grpc.add_EngineServicer_to_server(servicer, server)
    # The smg gateway's worker APIs: the same engine, the same port.
    if SGLANG in services:
        servicer = sglang_servicer.SglangServicer(engine, card, pd, lora)
        sglang_servicer.add_to_server(servicer, server)
    if VLLM in services:
        vllm_servicer.add_to_server(vllm_servicer.VllmServicer(engine, card), server)
    if TRTLLM in services:
        trtllm_servicer.add_to_server(trtllm_servicer.TrtllmServicer(engine, card), server)
    # KServe v2 / Triton's inference service, for tritonclient, perf_analyzer and AIPerf.
    if KSERVE in services:
        if tokenizer is None:
            tokenizer = load_tokenizer(config.tokenizer, card.vocab_size)
        kserve = kserve_grpc.KServeServicer(engine, card, tokenizer, max_request_bytes=limit)
        kserve_grpc.add_to_server(kserve, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *(SERVICE_NAMES[s] for s in services),
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return server, health


def bind_grpc(server: grpc.aio.Server, config: ServerConfig, port: int) -> int:
    """Bind `server` to config.host:`port`; returns the bound port, OSError if it cannot."""
    address = f"{config.host}:{port}"
    try:
        if config.tls is not None:
            return server.add_secure_port(address, config.tls.grpc_credentials())
        return server.add_insecure_port(address)
    except RuntimeError as e:  # grpc reports a failed bind this way
        raise OSError(f"cannot serve on {address}: {e}") from None
