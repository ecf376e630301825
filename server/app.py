"""The server process: one engine behind gRPC and/or OpenAI HTTP, and graceful shutdown.

gRPC (servicer, health, reflection) and the aiohttp front share the one
`AsyncEngine`, so both see the same clock, batch and KV pool. The listeners are
wired in `listeners.py`, as each front process of `serve --api-servers N` wires
them (`multi/front.py`); the configuration is `config.ServerConfig`.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from memorywall.core import Deployment
from memorywall.ready import ServerReady, remove, write_json
from memorywall.server.config import ServerConfig
from memorywall.server.engine.api import (
    EngineClient,
    EngineObserver,
    LoraRegistry,
    ModelCard,
    Phase,
    lora_state,
)
from memorywall.server.engine.build import build_core
from memorywall.server.engine.guard import GuardedEngine
from memorywall.server.engine.live import AsyncEngine
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.fronts.dcgm import DcgmExporter
from memorywall.server.fronts.guard_metrics import GuardMetrics
from memorywall.server.fronts.http_front import ServedMetrics, metrics_handler
from memorywall.server.fronts.metrics import PrometheusMetrics
from memorywall.server.fronts.openai_lora import LoraInfoMetrics
from memorywall.server.listeners import ListenerPorts, Listeners, addresses
from memorywall.server.pd import Role, disaggregation_for
from memorywall.server.signals import on_stop_signals

if TYPE_CHECKING:
    from aiohttp import web

    from memorywall.server.fronts.tracing import Tracing

__all__ = [
    "EmulatorServer",
    "ServerConfig",
    "card_ready",
    "describe",
    "exposure_risk",
    "quiet_gc",
    "ready_info",
    "serve_forever",
]

log = logging.getLogger("memorywall.server")


class EmulatorServer:
    """One emulated engine behind gRPC and/or HTTP ports. Build it inside the event loop that
    runs it; `await start()`, then `await stop()`.

    `metrics`: what /metrics serves and the engine feeds; by default vLLM's Prometheus
    metrics, built when an HTTP or metrics port is asked for. `tracing`: a
    `fronts.tracing.Tracing` (tests pass one with an in-memory exporter); by default one
    exporting to `config.otlp_endpoint`, if given.
    """

    def __init__(
        self,
        deployment: Deployment,
        engine_config: EngineConfig,
        config: ServerConfig,
        *,
        metrics: ServedMetrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        max_loras = config.lora.max_loras if config.lora is not None else None
        core, self.card = build_core(deployment, engine_config, max_loras=max_loras)
        # --enable-lora: the adapters served by name (fronts resolve `model` through it).
        self.lora = (
            LoraRegistry(config.lora, deployment.model, self.card.model)
            if config.lora is not None
            else None
        )
        self.dashboard_path: str | None = None  # `serve --dashboard`: set with the routes
        self.config = config
        self.load_s = config.weight_load_s(deployment)  # startup and wake-up
        if metrics is None and (config.http_port is not None or config.metrics_port is not None):
            metrics = PrometheusMetrics.for_deployment(deployment)
        self.metrics = metrics
        observers: list[EngineObserver] = [metrics] if metrics is not None else []
        self.dcgm: DcgmExporter | None = None
        if config.dcgm_port is not None:
            self.dcgm = DcgmExporter.for_deployment(deployment)
            observers.append(self.dcgm)
        if tracing is None and config.otlp_endpoint is not None:
            # Imported only when asked for: without --otlp-endpoint nothing of OpenTelemetry loads.
            from memorywall.server.fronts.tracing import Tracing

            tracing = Tracing.to_collector(config.otlp_endpoint)
        self.tracing = tracing
        if tracing is not None:
            observers.append(tracing.recorder)
        self.engine = AsyncEngine(
            core,
            max_messages_per_s=config.max_messages_per_s,
            stream_interval=config.stream_interval,
            observers=observers,
            load_s=self.load_s,
        )
        self.guard_metrics = GuardMetrics(self.card.model)
        if isinstance(metrics, PrometheusMetrics):
            metrics.registry.register(self.guard_metrics)
            if config.lora is not None:
                info = LoraInfoMetrics(config.lora.max_loras, lambda: lora_state(core))
                metrics.registry.register(info)
        # What every front talks to: admission and faults in front of the engine.
        self.guarded = GuardedEngine(
            self.engine,
            config.guard,
            observers=[self.guard_metrics],
        )
        registry = metrics.registry if isinstance(metrics, PrometheusMetrics) else None
        self.pd = disaggregation_for(self.guarded, deployment, config.disaggregation, registry)
        fronts_engine: EngineClient = self.guarded
        fronts_pd = self.pd
        if self.tracing is not None:
            fronts_engine = self.tracing.wrap(self.guarded)
            fronts_pd = self.tracing.wrap_pd(self.pd) if self.pd is not None else None
        self.listeners = Listeners(
            fronts_engine,
            self.card,
            config,
            seed=engine_config.seed,
            metrics=metrics_handler(metrics) if metrics is not None else None,
            pd=fronts_pd,
            dcgm=metrics_handler(self.dcgm) if self.dcgm is not None else None,
            tracing=self.tracing,
            http_extras=self._dashboard(metrics) if config.dashboard else None,
            lora=self.lora,
        )

    def _dashboard(self, metrics: ServedMetrics | None) -> Callable[[web.Application], None]:
        """`serve --dashboard`: the dashboard under /dashboard/ of the HTTP front, polling
        this server's metrics in-process (imported only when asked for)."""
        from memorywall.dashboard.poller import Poller
        from memorywall.dashboard.sources import LocalSource, Target
        from memorywall.dashboard.web import MOUNT_PATH, mount

        if metrics is None:  # ServerConfig refuses a dashboard without an HTTP front
            raise ValueError("the dashboard needs the server's metrics")
        card = self.card
        target = Target(
            name=card.deployment, hardware=card.hardware, model=card.model, devices=card.devices
        )
        source = LocalSource(target, lambda: metrics.render()[0].decode())
        self.dashboard_path = MOUNT_PATH
        return lambda app: mount(app, Poller([source]))

    @property
    def port(self) -> int:
        """The bound gRPC port; 0 before `start` or without gRPC."""
        return self.listeners.ports.grpc_port or 0

    @property
    def target(self) -> str:
        """The gRPC address, host:port."""
        return f"{self.config.host}:{self.port}"

    @property
    def http_port(self) -> int | None:
        return self.listeners.ports.http_port

    @property
    def scheme(self) -> str:
        return self.config.scheme

    @property
    def http_url(self) -> str | None:
        """The HTTP front's base URL (OpenAI clients take `{http_url}/v1`)."""
        if self.http_port is None:
            return None
        return f"{self.scheme}://{self.config.host}:{self.http_port}"

    @property
    def metrics_port(self) -> int | None:
        return self.listeners.ports.metrics_port

    @property
    def dcgm_port(self) -> int | None:
        return self.listeners.ports.dcgm_port

    @property
    def addresses(self) -> list[str]:
        """Every bound address: gRPC as host:port first, then HTTP URLs."""
        return addresses(self.config, self.listeners.ports)

    async def start(self) -> int:
        """Bind every port, then serve; returns the gRPC port (0 without gRPC)."""
        quiet_gc()
        c = self.config
        if (risk := exposure_risk(c)) is not None:
            log.warning(risk)
        await self.engine.start()
        try:
            await self.listeners.bind(ListenerPorts.of(c))
            if self.pd is not None:
                await self.pd.start(c.host)
        except OSError:
            await self.listeners.close()
            await self.engine.stop()
            raise
        if self.engine.lifecycle.phase is Phase.LOADING:
            # HTTP answers meanwhile (/health 503, requests 503); gRPC serves after.
            log.info("loading the weights: %.3f s", self.load_s)
            await self.engine.load()
        await self.listeners.serve()
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop admitting, give live streams `grace_s` to finish, end the rest UNAVAILABLE
        (gRPC) or with an error event (HTTP)."""
        grace = self.config.grace_s if grace_s is None else grace_s
        await self.listeners.stop_serving()
        await self.engine.drain(grace)  # HTTP /health answers 503 from here on
        if self.pd is not None:
            await self.pd.stop()
        await self.listeners.close()
        await self.engine.stop()
        if self.tracing is not None:
            self.tracing.shutdown()  # sends the spans still batched


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
        grpc_port=server.listeners.ports.grpc_port,
        http_port=server.http_port,
        metrics_port=server.metrics_port,
        role=server.config.disaggregation.role,
        bootstrap_port=server.pd.bootstrap_port if server.pd is not None else None,
        grpc_services=server.config.grpc_services if server.config.grpc else (),
        dcgm_port=server.dcgm_port,
        dashboard_path=server.dashboard_path,
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
    role: Role = Role.BOTH,
    bootstrap_port: int | None = None,
    grpc_services: tuple[str, ...] = (),
    dcgm_port: int | None = None,
    dashboard_path: str | None = None,
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
        expert_parallel=card.expert_parallel,
        deployment=card.deployment,
        max_num_seqs=card.max_num_seqs,
        max_num_batched_tokens=card.max_num_batched_tokens,
        kv_capacity_tokens=card.kv_capacity_tokens,
        predicted_tokens_per_s_per_user=card.predicted_tokens_per_s_per_user,
        role=role.value,
        bootstrap_port=bootstrap_port,
        grpc_services=grpc_services,
        dcgm_port=dcgm_port,
        dashboard_path=dashboard_path,
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
