"""The server process: one engine behind gRPC and/or OpenAI HTTP, and graceful shutdown.

gRPC (servicer, health, reflection) and the aiohttp front share the one
`AsyncEngine`, so both see the same clock, batch and KV pool.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from memorywall.core import Deployment
from memorywall.errors import ConfigError
from memorywall.ready import ServerReady, remove, write_json
from memorywall.server.engine.api import EngineClient
from memorywall.server.engine.build import ModelCard, build_core
from memorywall.server.engine.guard import GuardConfig, GuardedEngine
from memorywall.server.engine.live import AsyncEngine
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.fronts.grpc_gate import GrpcGate
from memorywall.server.fronts.grpc_servicer import EngineServicer
from memorywall.server.fronts.guard_metrics import GuardMetrics
from memorywall.server.fronts.http_front import (
    MAX_BODY_BYTES,
    HttpSite,
    OpenAIFront,
    ServedMetrics,
    metrics_app,
)
from memorywall.server.fronts.metrics import PrometheusMetrics
from memorywall.server.fronts.sglang_servicer import SERVICE_NAME as SGLANG_SERVICE_NAME
from memorywall.server.fronts.sglang_servicer import SglangServicer, add_to_server
from memorywall.server.fronts.tls import TlsConfig
from memorywall.server.fronts.tokenizer import load_tokenizer
from memorywall.server.pd import Disaggregation, PdConfig, disaggregation_for
from memorywall.server.signals import on_stop_signals
from memorywall.v1 import engine_pb2, engine_pb2_grpc

log = logging.getLogger("memorywall.server")

SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name
# Every service on the gRPC port, each with a health status of its own ("" is the server's).
HEALTH_NAMES = ("", SERVICE_NAME, SGLANG_SERVICE_NAME)
MAX_PENDING_CALLS = 1_000_000


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # gRPC
    grpc: bool = True
    http_port: int | None = None  # the OpenAI HTTP front (with /metrics); None: off
    metrics_port: int | None = None  # /metrics alone, for a gRPC-only server; None: off
    tokenizer: Path | None = None  # HF tokenizer.json for HTTP prompt text; None: ~4 chars/token
    grace_s: float = 5.0
    # The message budget's ceiling: about what grpc.aio carries on two cores shared with
    # the client. Below it the engine lowers the budget by itself whenever it wakes late
    # (server/engine/pacing.py), and only then groups tokens, one step at most.
    max_messages_per_s: float = 40_000.0
    disaggregation: PdConfig = field(default_factory=PdConfig)  # --role prefill|decode
    guard: GuardConfig = field(default_factory=GuardConfig)  # admission limit, faults
    # One request's body (HTTP) or message (gRPC): beyond it 413 / INVALID_ARGUMENT.
    max_request_bytes: int = MAX_BODY_BYTES
    tls: TlsConfig | None = None  # None: plaintext on every port
    api_key: str | None = None  # None: no key asked (see fronts/auth.py for what it guards)

    def __post_init__(self) -> None:
        if not self.grpc and self.http_port is None:
            raise ConfigError("nothing to serve: gRPC is off and no HTTP port is given")


class EmulatorServer:
    """One emulated engine behind gRPC and/or HTTP ports. Build it inside the event loop that
    runs it; `await start()`, then `await stop()`.

    `metrics`: what /metrics serves and the engine feeds; by default vLLM's Prometheus
    metrics, built when an HTTP or metrics port is asked for.
    """

    def __init__(
        self,
        deployment: Deployment,
        engine_config: EngineConfig,
        config: ServerConfig,
        *,
        metrics: ServedMetrics | None = None,
    ) -> None:
        core, self.card = build_core(deployment, engine_config)
        self.config = config
        if metrics is None and (config.http_port is not None or config.metrics_port is not None):
            metrics = PrometheusMetrics.for_deployment(deployment)
        self.metrics = metrics
        self.engine = AsyncEngine(
            core,
            max_messages_per_s=config.max_messages_per_s,
            observers=[metrics] if metrics is not None else (),
        )
        self.guard_metrics = GuardMetrics(self.card.model)
        if isinstance(metrics, PrometheusMetrics):
            metrics.registry.register(self.guard_metrics)
        # What every front talks to: admission and faults in front of the engine.
        self.guarded = GuardedEngine(
            self.engine,
            config.guard,
            observers=[self.guard_metrics],
        )
        registry = metrics.registry if isinstance(metrics, PrometheusMetrics) else None
        self.pd = disaggregation_for(self.guarded, deployment, config.disaggregation, registry)
        self._ssl = config.tls.ssl_context() if config.tls is not None else None
        self.server: grpc.aio.Server | None = None
        if config.grpc:
            self.server, self.health = grpc_server(
                self.guarded, self.card, config, engine_config.seed, self.pd
            )
        self.http: HttpSite | None = None
        if config.http_port is not None:
            tokenizer = load_tokenizer(config.tokenizer, self.card.vocab_size)
            front = OpenAIFront(
                self.guarded,
                self.card,
                tokenizer,
                metrics,
                max_request_bytes=config.max_request_bytes,
                api_key=config.api_key,
            )
            self.http = HttpSite(front.app(), ssl_context=self._ssl)
        self.metrics_site: HttpSite | None = None
        if config.metrics_port is not None:
            self.metrics_site = HttpSite(metrics_app(metrics), ssl_context=self._ssl)
        self.port = 0

    @property
    def target(self) -> str:
        """The gRPC address, host:port."""
        return f"{self.config.host}:{self.port}"

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    @property
    def scheme(self) -> str:
        return "https" if self.config.tls is not None else "http"

    @property
    def http_url(self) -> str | None:
        """The HTTP front's base URL (OpenAI clients take `{http_url}/v1`)."""
        if self.http is None:
            return None
        return f"{self.scheme}://{self.config.host}:{self.http.port}"

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_site.port if self.metrics_site is not None else None

    @property
    def addresses(self) -> list[str]:
        """Every bound address: gRPC as host:port first, then HTTP URLs."""
        host = self.config.host
        out = [self.target] if self.server is not None else []
        if self.http is not None:
            out.append(self.http_url)
        if self.metrics_site is not None:
            out.append(f"{self.scheme}://{host}:{self.metrics_site.port}/metrics")
        return out

    async def start(self) -> int:
        """Bind every port, then serve; returns the gRPC port (0 without gRPC)."""
        quiet_gc()
        c = self.config
        if (risk := exposure_risk(c)) is not None:
            log.warning(risk)
        if self.server is not None:
            self.port = bind_grpc(self.server, c, c.port)
        await self.engine.start()
        try:
            if self.http is not None:
                await self.http.start(c.host, c.http_port)
            if self.metrics_site is not None:
                await self.metrics_site.start(c.host, c.metrics_port)
            if self.pd is not None:
                await self.pd.start(c.host)
        except OSError:
            await self._stop_http()
            await self.engine.stop()
            raise
        if self.server is not None:
            await self.server.start()
            for name in HEALTH_NAMES:
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop admitting, give live streams `grace_s` to finish, end the rest UNAVAILABLE
        (gRPC) or with an error event (HTTP)."""
        grace = self.config.grace_s if grace_s is None else grace_s
        if self.server is not None:
            for name in HEALTH_NAMES:
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.engine.drain(grace)  # HTTP /health answers 503 from here on
        if self.pd is not None:
            await self.pd.stop()
        if self.server is not None:
            await self.server.stop(grace=1.0)
        await self._stop_http()
        await self.engine.stop()

    async def _stop_http(self) -> None:
        for site in (self.http, self.metrics_site):
            if site is not None:
                await site.stop()


def grpc_server(
    engine: EngineClient,
    card: ModelCard,
    config: ServerConfig,
    seed: int,
    pd: Disaggregation | None = None,
    *,
    reuse_port: bool = False,
    unnamed_prompts: Iterator[int] | None = None,
) -> tuple[grpc.aio.Server, health_aio.HealthServicer]:
    """The gRPC server (memorywall.v1, SGLang, health, reflection) over `engine`, unbound.

    `reuse_port`: several processes bind the same port (`--api-servers`).
    `unnamed_prompts`: numbers for unnamed token-count prompts (see `EngineServicer`).
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
    server = grpc.aio.server(options=options, interceptors=[gate])
    servicer = EngineServicer(
        engine, card, seed, max_request_bytes=limit, unnamed_prompts=unnamed_prompts
    )
    engine_pb2_grpc.add_EngineServicer_to_server(servicer, server)
    # SGLang's worker API, for the smg gateway: the same engine, the same port.
    add_to_server(SglangServicer(engine, card, pd), server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            SGLANG_SERVICE_NAME,
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


def exposure_risk(config: ServerConfig) -> str | None:
    """A warning for a server reachable beyond this machine without TLS or an API key."""
    if config.tls is not None and config.api_key is not None:
        return None
    try:
        loopback = ipaddress.ip_address(config.host).is_loopback
    except ValueError:  # a name: only localhost is known to stay on this machine
        loopback = config.host == "localhost"
    if loopback:
        return None
    missing = [
        text
        for text, absent in (
            (
                "without TLS: prompts, outputs and any key cross the network in clear text",
                config.tls is None,
            ),
            (
                "without an API key: anyone who can reach the port can send requests, abort "
                "them and read the server's state",
                config.api_key is None,
            ),
        )
        if absent
    ]
    return f"serving on {config.host}, beyond loopback, " + "; and ".join(missing)


def quiet_gc() -> None:
    """Keep the cyclic collector from pausing token delivery.

    Objects alive at start (modules, grpc, numpy) move to the permanent
    generation, and the hot path, which frees nearly everything by reference
    counting, triggers young collections less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)


def ready_info(server: EmulatorServer) -> ServerReady:
    """What the ready file says about a started server."""
    return card_ready(
        server.card,
        pid=os.getpid(),
        host=server.config.host,
        tls=server.config.tls is not None,
        grpc_port=server.port if server.server is not None else None,
        http_port=server.http_port,
        metrics_port=server.metrics_port,
        role=server.config.disaggregation.role.value,
        bootstrap_port=server.pd.bootstrap_port if server.pd is not None else None,
    )


def card_ready(
    card: ModelCard,
    *,
    pid: int,
    host: str,
    tls: bool,
    grpc_port: int | None,
    http_port: int | None,
    metrics_port: int | None,
    role: str = "both",
    bootstrap_port: int | None = None,
) -> ServerReady:
    """A ready file's content: where a process listens, and the model card it serves."""
    return ServerReady(
        pid=pid,
        host=host,
        tls=tls,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        hardware=card.hardware,
        model=card.model,
        devices=card.devices,
        tensor_parallel=card.tensor_parallel,
        pipeline_parallel=card.pipeline_parallel,
        deployment=card.deployment,
        max_num_seqs=card.max_num_seqs,
        max_num_batched_tokens=card.max_num_batched_tokens,
        kv_capacity_tokens=card.kv_capacity_tokens,
        predicted_tokens_per_s_per_user=card.predicted_tokens_per_s_per_user,
        role=role,
        bootstrap_port=bootstrap_port,
    )


def describe(card: ModelCard, addresses: list[str]) -> str:
    return (
        f"memorywall serving {card.deployment} on {', '.join(addresses)}: predicted "
        f"{card.predicted_tokens_per_s_per_user:,.1f} tok/s per user (batch 1), "
        f"KV {card.kv_capacity_tokens:,} tokens, max {card.max_num_seqs} sequences"
    )


async def serve_forever(
    deployment: Deployment,
    engine_config: EngineConfig,
    config: ServerConfig,
    *,
    ready_file: Path | None = None,
) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully.

    `ready_file`: written (atomically) once every port is bound, removed on the way out.
    """
    server = EmulatorServer(deployment, engine_config, config)
    stop = asyncio.Event()
    with on_stop_signals(asyncio.get_running_loop(), stop.set):
        await server.start()
        log.info(describe(server.card, server.addresses))
        try:
            if ready_file is not None:
                write_json(ready_file, ready_info(server).as_dict())
            await stop.wait()
        finally:
            if ready_file is not None:
                remove(ready_file)
        log.info("shutting down: draining for up to %.1f s", server.config.grace_s)
        await server.stop()
        log.info("stopped")
