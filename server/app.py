"""The gRPC server process: engine + servicer + health + reflection, and graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from memorywall.core import Deployment
from memorywall.server.build import ModelCard, build_core
from memorywall.server.engine import AsyncEngine
from memorywall.server.grpc_servicer import EngineServicer
from memorywall.server.scheduler import EngineConfig
from memorywall.v1 import engine_pb2, engine_pb2_grpc

log = logging.getLogger("memorywall.server")

SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    grace_s: float = 5.0
    # Above this rate the engine groups tokens per message: grpc.aio costs per
    # message, and on a 2-core machine shared with the client, 4,000 messages/s
    # kept the p99 token lateness lowest (benchmarks/server_fidelity.py).
    max_messages_per_s: float = 4_000.0


class EmulatorServer:
    """One emulated engine behind a gRPC port. Build it inside the event loop that runs it;
    `await start()`, then `await stop()`."""

    def __init__(
        self, deployment: Deployment, engine_config: EngineConfig, config: ServerConfig
    ) -> None:
        core, self.card = build_core(deployment, engine_config)
        self.config = config
        self.engine = AsyncEngine(core, max_messages_per_s=config.max_messages_per_s)
        self.health = health_aio.HealthServicer()
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        engine_pb2_grpc.add_EngineServicer_to_server(
            EngineServicer(self.engine, self.card, engine_config.seed), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.port = 0

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> int:
        quiet_gc()
        address = f"{self.config.host}:{self.config.port}"
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as e:  # grpc reports a failed bind this way
            raise OSError(f"cannot serve on {address}: {e}") from None
        await self.engine.start()
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop admitting, give live streams `grace_s` to finish, end the rest UNAVAILABLE."""
        grace = self.config.grace_s if grace_s is None else grace_s
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.engine.drain(grace)
        await self.server.stop(grace=1.0)
        await self.engine.stop()


def quiet_gc() -> None:
    """Keep the cyclic collector from pausing token delivery.

    Objects alive at start (modules, grpc, numpy) move to the permanent
    generation, and the hot path, which frees nearly everything by reference
    counting, triggers young collections less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)


def describe(card: ModelCard, target: str) -> str:
    return (
        f"memorywall serving {card.deployment} on {target}: predicted "
        f"{card.predicted_tokens_per_s_per_user:,.1f} tok/s per user (batch 1), "
        f"KV {card.kv_capacity_tokens:,} tokens, max {card.max_num_seqs} sequences"
    )


async def serve_forever(
    deployment: Deployment, engine_config: EngineConfig, config: ServerConfig
) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    server = EmulatorServer(deployment, engine_config, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    log.info(describe(server.card, server.target))
    await stop.wait()
    log.info("shutting down: draining for up to %.1f s", server.config.grace_s)
    await server.stop()
    log.info("stopped")
