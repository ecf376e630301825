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
from dataclasses import replace
from multiprocessing.connection import Connection

from aiohttp import web

from memorywall.server.app import quiet_gc
from memorywall.server.config import ServerConfig
from memorywall.server.engine.api import ModelCard
from memorywall.server.engine.guard import GuardedEngine
from memorywall.server.listeners import ListenerPorts, Listeners
from memorywall.server.multi.child import configure_logging, watch_parent
from memorywall.server.multi.remote import EngineLostError, RemoteEngine
from memorywall.server.signals import on_stop_signals

FRONT_HEADER = "X-Memorywall-Front"

log = logging.getLogger("memorywall.front")


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
        self.listeners = Listeners(
            self.guarded,
            card,
            config,
            seed=seed,
            metrics=self.metrics,  # the engine's series, asked of the engine process
            reuse_port=True,
            # Unnamed token-count prompts: front i numbers them i, i + N, i + 2N, ..., so no
            # two fronts build the same prompt (and share a prefix the client never sent).
            unnamed_prompts=itertools.count(index, count),
            response_headers={FRONT_HEADER: str(index)},
        )

    async def metrics(self, request: web.Request) -> web.Response:
        """The engine's series, whichever front is asked."""
        try:
            body, content_type = await self.remote.render_metrics()
        except (EngineLostError, TimeoutError):
            return web.Response(status=503, text="the engine did not answer\n")
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def start(self, ports: ListenerPorts) -> ListenerPorts:
        """Bind every listener (port 0: any free port), then serve; returns the bound ports."""
        bound = await self.listeners.bind(ports)
        await self.listeners.serve()
        return bound

    async def stop(self) -> None:
        """Stop admitting, let the engine drain (it waits for every front's streams up to
        the grace period), then close the listeners and the engine socket."""
        await self.listeners.stop_serving()
        await self.guarded.drain(self.config.grace_s)
        await self.listeners.close()
        await self.remote.close()


def front_main(
    index: int,
    count: int,
    config: ServerConfig,
    seed: int,
    ports: ListenerPorts,
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
    ports: ListenerPorts,
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
