"""A front process of `serve --api-servers N`: the ports, over a `RemoteEngine`.

Every front binds the same ports with SO_REUSEPORT, so the kernel spreads
connections over them; each serves gRPC (memorywall.v1, SGLang, health,
reflection), the OpenAI HTTP API and /metrics as `memorywall serve` does,
encoding and streaming here while the engine process keeps time, batch and KV.
The guard (admission and faults) runs here too, on the engine's pushed waiting
count; its counts go to the engine's /metrics. Each front draws faults with
its own seed (`--fault-seed` plus its index) so fronts do not repeat one
another's fates. HTTP responses carry `X-Memorywall-Front: INDEX`, so a client
can tell which front it reached.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import sys
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection

from aiohttp import web
from grpc_health.v1 import health_pb2

from memorywall.server.app import (
    HEALTH_NAMES,
    ServerConfig,
    bind_grpc,
    grpc_server,
    quiet_gc,
)
from memorywall.server.engine.build import ModelCard
from memorywall.server.engine.guard import GuardedEngine
from memorywall.server.fronts.http_front import (
    HttpSite,
    OpenAIFront,
    expect_continue,
    openai_errors,
)
from memorywall.server.fronts.tokenizer import load_tokenizer
from memorywall.server.multi.child import configure_logging, watch_parent
from memorywall.server.multi.remote import EngineLostError, RemoteEngine
from memorywall.server.signals import on_stop_signals

FRONT_HEADER = "X-Memorywall-Front"

log = logging.getLogger("memorywall.front")


@dataclass(frozen=True)
class FrontPorts:
    """The ports a front bound (None: that listener is off)."""

    grpc_port: int | None
    http_port: int | None
    metrics_port: int | None


class FrontServer:
    """One front process's listeners around `remote`. `await start(ports)`, then `stop()`."""

    def __init__(
        self,
        remote: RemoteEngine,
        card: ModelCard,
        config: ServerConfig,
        *,
        seed: int,
        index: int,
        count: int,
    ) -> None:
        self.remote = remote
        self.config = config
        self.index = index
        guard = replace(config.guard, fault_seed=config.guard.fault_seed + index)
        self.guarded = GuardedEngine(remote, guard, observers=[remote])
        ssl_context = config.tls.ssl_context() if config.tls is not None else None
        self.server = None
        if config.grpc:
            # Unnamed token-count prompts: front i numbers them i, i + N, i + 2N, ..., so no
            # two fronts build the same prompt (and share a prefix the client never sent).
            self.server, self.health = grpc_server(
                self.guarded,
                card,
                config,
                seed,
                reuse_port=True,
                unnamed_prompts=itertools.count(index, count),
            )
        self.http: HttpSite | None = None
        if config.http_port is not None:
            front = OpenAIFront(
                self.guarded,
                card,
                load_tokenizer(config.tokenizer, card.vocab_size),
                None,  # /metrics comes from the engine, below
                max_request_bytes=config.max_request_bytes,
                api_key=config.api_key,
            )
            app = front.app()
            app.router.add_route("GET", "/metrics", self.metrics, expect_handler=expect_continue)
            app.on_response_prepare.append(self._stamp)
            self.http = HttpSite(app, ssl_context=ssl_context, reuse_port=True)
        self.metrics_site: HttpSite | None = None
        if config.metrics_port is not None:
            app = web.Application(middlewares=[openai_errors])
            app.router.add_get("/metrics", self.metrics)
            self.metrics_site = HttpSite(app, ssl_context=ssl_context, reuse_port=True)

    async def metrics(self, request: web.Request) -> web.Response:
        """The engine's series, whichever front is asked."""
        try:
            body, content_type = await self.remote.render_metrics()
        except (EngineLostError, TimeoutError):
            return web.Response(status=503, text="the engine did not answer\n")
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[FRONT_HEADER] = str(self.index)

    async def start(self, ports: FrontPorts) -> FrontPorts:
        """Bind every listener (port 0: any free port), then serve; returns the bound ports."""
        c = self.config
        grpc_port = bind_grpc(self.server, c, ports.grpc_port) if self.server else None
        http_port = metrics_port = None
        try:
            if self.http is not None:
                http_port = await self.http.start(c.host, ports.http_port)
            if self.metrics_site is not None:
                metrics_port = await self.metrics_site.start(c.host, ports.metrics_port)
        except OSError:
            await self._stop_http()
            raise
        if self.server is not None:
            await self.server.start()
            for name in HEALTH_NAMES:
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return FrontPorts(grpc_port, http_port, metrics_port)

    async def stop(self) -> None:
        """Stop admitting, let the engine drain (it waits for every front's streams up to
        the grace period), then close the listeners and the engine socket."""
        if self.server is not None:
            for name in HEALTH_NAMES:
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.guarded.drain(self.config.grace_s)
        if self.server is not None:
            await self.server.stop(grace=1.0)
        await self._stop_http()
        await self.remote.close()

    async def _stop_http(self) -> None:
        for site in (self.http, self.metrics_site):
            if site is not None:
                await site.stop()


def front_main(
    index: int,
    count: int,
    config: ServerConfig,
    seed: int,
    ports: FrontPorts,
    sock: socket.socket,
    log_level: str,
    status: Connection,
) -> None:
    """A front process's entry point (multiprocessing, spawn): exits 0 after a clean stop,
    1 if the engine went away first, 2 if a port could not be bound."""
    configure_logging(log_level)
    sys.exit(asyncio.run(_front(index, count, config, seed, ports, sock, status)))


async def _front(
    index: int,
    count: int,
    config: ServerConfig,
    seed: int,
    ports: FrontPorts,
    sock: socket.socket,
    status: Connection,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    with on_stop_signals(loop, stop.set):
        watch_parent(loop, stop.set)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        remote = RemoteEngine(reader, writer)
        card = await remote.connect()
        server = FrontServer(remote, card, config, seed=seed, index=index, count=count)
        try:
            bound = await server.start(ports)
        except OSError as e:
            status.send(("error", str(e)))
            await remote.close()
            return 2
        quiet_gc()
        status.send(("ready", bound))
        # Stop when told, when the engine drained by itself (it was signalled), or when it died.
        waits = [asyncio.create_task(e.wait()) for e in (stop, remote.drained, remote.lost)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        engine_gone = remote.lost.is_set()
        if engine_gone:
            log.error("front %d: the engine process exited; stopping", index)
        await server.stop()
        for task in waits:
            task.cancel()
        return 1 if engine_gone else 0
