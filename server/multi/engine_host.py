"""The engine process of `serve --api-servers N`: one `AsyncEngine`, N front links.

It owns the clock, scheduler, KV pool and every metric series; it runs no grpc
code and binds no port but the emulated dcgm-exporter's (`--dcgm-port`), which,
like dcgm-exporter beside a real engine, is one process's alone. Each front
process has one `FrontLink`: the link submits what the front sends, forwards
each stream's events back (one task per stream reads it as a front handler
would, so grouping and lag are the engine's own, and the link's `Outbox` sends
everything one loop turn produced in one frame), and aborts every stream of a
front whose socket closes, freeing their slots and KV. Stats are pushed to
every front when they change (fronts answer GetServerInfo and admission from
them); /metrics is rendered here on request.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from memorywall.core import Deployment
from memorywall.errors import MemorywallError
from memorywall.server.app import quiet_gc
from memorywall.server.config import ServerConfig
from memorywall.server.engine.api import (
    EngineObserver,
    EngineStats,
    EventStream,
    Finished,
    Request,
    StepReport,
    TokenGroup,
)
from memorywall.server.engine.build import build_core
from memorywall.server.engine.faults import FaultKind
from memorywall.server.engine.live import AsyncEngine
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.fronts.dcgm import DcgmExporter
from memorywall.server.fronts.guard_metrics import GuardMetrics
from memorywall.server.fronts.http_front import HttpSite, metrics_app, metrics_handler
from memorywall.server.fronts.metrics import PrometheusMetrics
from memorywall.server.multi.child import configure_logging, watch_parent
from memorywall.server.multi.wire import Kind, Outbox, error_message, group_tuple, read_frame
from memorywall.server.signals import on_stop_signals

log = logging.getLogger("memorywall.engine")

# How often changed stats reach the fronts, and the longest between two pushes (time-based
# fields such as `host_stall.degraded` change with nothing else changing).
STATS_INTERVAL_S = 0.1
STATS_REFRESH_S = 1.0


class FrontLink:
    """The engine's end of one front's socket."""

    def __init__(
        self, host: EngineHost, index: int, reader: asyncio.StreamReader, out: Outbox
    ) -> None:
        self.host = host
        self.index = index
        self.reader = reader
        self.out = out
        self.streams: dict[int, EventStream] = {}
        self.forwarders: set[asyncio.Task] = set()
        self._kv_unsubscribe: Callable[[], None] | None = None

    async def run(self) -> None:
        """Serve the front until its socket closes, then free everything it held."""
        engine = self.host.engine
        while (messages := await read_frame(self.reader)) is not None:
            for m in messages:
                kind = m[0]
                if kind is Kind.SUBMIT:
                    self._submit(*m[1:])
                elif kind is Kind.CLOSE:
                    if (stream := self.streams.get(m[1])) is not None:
                        stream.close()
                elif kind is Kind.RELEASE_KV:
                    engine.release_kv(m[1])
                elif kind is Kind.ABORT_ID:
                    engine.abort(m[1])
                else:
                    self._control(m)
            self.host.share_waiting()
        self._unsubscribe_kv()
        held = list(self.streams.values())
        for stream in held:
            stream.close()  # aborts: the slot and KV are free now
        if held:
            log.warning("front %d disconnected: aborted its %d live streams", self.index, len(held))

    def _submit(self, key: int, request: Request, min_interval_s: float, arrival_s: float) -> None:
        try:
            stream = self.host.engine.submit(
                request, min_interval_s=min_interval_s, arrival_s=arrival_s
            )
        except MemorywallError as e:  # what the front could not check: a duplicate id
            self.out.put(error_message(key, e))
            return
        self.streams[key] = stream
        task = asyncio.create_task(self._forward(key, stream))
        self.forwarders.add(task)
        task.add_done_callback(self.forwarders.discard)

    async def _forward(self, key: int, stream: EventStream) -> None:
        put = self.out.put
        try:
            while (event := await stream.next_event()) is not None:
                if type(event) is TokenGroup:
                    put(group_tuple(key, event))
                else:
                    put((Kind.FINISHED, key, event))
        except MemorywallError as e:  # drained before it finished
            put(error_message(key, e))
        finally:
            self.streams.pop(key, None)

    def _control(self, m: tuple) -> None:
        kind, host = m[0], self.host
        if kind is Kind.KV_EVENTS:
            self._unsubscribe_kv()
            if m[1]:
                out = self.out
                self._kv_unsubscribe = host.engine.subscribe_kv_events(
                    lambda event: out.put((Kind.KV_EVENT, event))
                )
        elif kind is Kind.METRICS:
            body, content_type = host.metrics.render()
            self.out.put((Kind.METRICS_BODY, m[1], body, content_type))
        elif kind is Kind.GUARD_FAULT:
            host.guard_metrics.on_fault(FaultKind(m[1]))
        elif kind is Kind.GUARD_REJECTED:
            host.guard_metrics.on_rejected(m[1])
        elif kind is Kind.DRAIN:
            host.start_drain()
        elif kind is Kind.LIFECYCLE:
            task = asyncio.create_task(host.lifecycle_call(self, *m[1:]))
            self.forwarders.add(task)
            task.add_done_callback(self.forwarders.discard)
        else:
            raise ValueError(f"unknown message from front {self.index}: {kind!r}")

    def _unsubscribe_kv(self) -> None:
        if self._kv_unsubscribe is not None:
            self._kv_unsubscribe()
            self._kv_unsubscribe = None


class EngineHost:
    """The engine and its metrics, serving front links. Build it inside its event loop."""

    def __init__(
        self,
        deployment: Deployment,
        engine_config: EngineConfig,
        *,
        max_messages_per_s: float,
        stream_interval: int | None = None,
        grace_s: float,
        load_s: float = 0.0,
        dcgm: ServerConfig | None = None,
    ) -> None:
        """`dcgm`: the server's config when it asks for a DCGM port (its host, port, TLS)."""
        core, self.card = build_core(deployment, engine_config)
        self.block_size = engine_config.block_size
        self.grace_s = grace_s
        # Always built: any front may be asked for /metrics, and the cost is per step.
        self.metrics = PrometheusMetrics.for_deployment(deployment)
        self.guard_metrics = GuardMetrics(self.card.model)
        self.metrics.registry.register(self.guard_metrics)
        observers: list[EngineObserver] = [self.metrics, self]
        self.dcgm_config = dcgm
        self.dcgm_site: HttpSite | None = None
        if dcgm is not None:
            exporter = DcgmExporter.for_deployment(deployment)
            observers.append(exporter)
            ssl_context = dcgm.tls.ssl_context() if dcgm.tls is not None else None
            self.dcgm_site = HttpSite(
                metrics_app(metrics_handler(exporter)), ssl_context=ssl_context
            )
        self.engine = AsyncEngine(
            core,
            max_messages_per_s=max_messages_per_s,
            stream_interval=stream_interval,
            observers=observers,
            load_s=load_s,
        )
        self.links: list[FrontLink] = []
        self._drain: asyncio.Task | None = None
        self._pushed: tuple = ()
        self._pushed_s = 0.0
        self._waiting = 0  # the queue length the fronts last heard

    async def bind_dcgm(self) -> int | None:
        """Bind the DCGM port, if asked for; its bound port (OSError if it cannot)."""
        config = self.dcgm_config
        if self.dcgm_site is None or config is None or config.dcgm_port is None:
            return None
        return await self.dcgm_site.start(config.host, config.dcgm_port)

    async def serve(self, sockets: list[socket.socket]) -> None:
        """Run the engine for these front sockets until every one has closed."""
        await self.engine.start()
        for index, sock in enumerate(sockets):
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            link = FrontLink(self, index, reader, Outbox(writer))
            hello = (self.card, self.engine.stats(), self.block_size, self.engine.lifecycle)
            link.out.put((Kind.HELLO, *hello))
            self.links.append(link)
        pusher = asyncio.create_task(self._push_stats())
        try:
            await asyncio.gather(*(link.run() for link in self.links))
        finally:
            pusher.cancel()
            for link in self.links:
                await link.out.close()
            if self.dcgm_site is not None:
                await self.dcgm_site.stop()
            await self.engine.stop()

    async def lifecycle_call(self, link: FrontLink, token: int, op: str, arg: int | None) -> None:
        """A front's /sleep, /wake_up or /reset_prefix_cache: the answer goes to it, the new
        state to every front. `arg`: sleep's level, else None."""
        result: object = None
        try:
            if op == "sleep":
                assert arg is not None, "RemoteEngine.sleep sends its level"
                await self.engine.sleep(arg)
            elif op == "wake_up":
                await self.engine.wake_up()
            elif op == "reset_prefix_cache":
                result = await self.engine.reset_prefix_cache()
            else:
                raise ValueError(f"unknown lifecycle call from front {link.index}: {op!r}")
        except MemorywallError as e:
            link.out.put((Kind.LIFECYCLE_DONE, token, None, type(e), str(e)))
        else:
            link.out.put((Kind.LIFECYCLE_DONE, token, result, None, ""))
        self._share_lifecycle()

    def _share_lifecycle(self) -> None:
        for link in self.links:
            link.out.put((Kind.LIFECYCLE_STATE, self.engine.lifecycle))

    def start_drain(self) -> None:
        """Stop admitting, give live streams the grace period, end the rest; then tell every
        front (once, however many ask)."""
        if self._drain is None:
            self._drain = asyncio.create_task(self._drain_all())

    async def _drain_all(self) -> None:
        draining = self.engine.drain(self.grace_s)
        for link in self.links:
            link.out.put((Kind.DRAINING,))
        await draining
        # The forwarders still hold the streams' last events (the drain's errors): let
        # them put those before the fronts hear that draining is over.
        forwarders = [t for link in self.links for t in link.forwarders]
        if forwarders:
            await asyncio.wait(forwarders, timeout=self.grace_s)
        self._push(self.engine.stats())
        for link in self.links:
            link.out.put((Kind.DRAINED,))

    def share_waiting(self) -> None:
        """Tell the fronts the queue's length when it changed: their guards admit against
        it (`--max-waiting`), so it cannot wait for the next stats push."""
        n = self.engine.waiting()
        if n != self._waiting:
            self._waiting = n
            for link in self.links:
                link.out.put((Kind.WAITING, n))

    # EngineObserver: admissions happen in steps

    def watch(self, stats: Callable[[], EngineStats]) -> None:
        pass

    def on_step(self, step: StepReport) -> None:
        self.share_waiting()

    def on_finish(self, finished: Finished) -> None:
        pass

    def on_lag(self, lag_s: float) -> None:
        pass

    async def _push_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            c, core = self.engine.core.counters, self.engine.core
            state = (c.steps, c.finished, c.aborted, len(core.waiting), len(core.running))
            now = time.monotonic()
            if state != self._pushed or now - self._pushed_s >= STATS_REFRESH_S:
                self._pushed, self._pushed_s = state, now
                self._push(self.engine.stats())

    def _push(self, stats: EngineStats) -> None:
        for link in self.links:
            link.out.put((Kind.STATS, stats))


def engine_main(
    deployment: Deployment,
    engine_config: EngineConfig,
    max_messages_per_s: float,
    stream_interval: int | None,
    grace_s: float,
    load_s: float,
    sockets: list[socket.socket],
    log_level: str,
    dcgm: ServerConfig | None,
    status: Connection,
) -> None:
    """The engine process's entry point (multiprocessing, spawn): serves until every front
    has closed its socket. SIGINT/SIGTERM, or the parent's death, start a drain. Says
    ("ready", (card, DCGM port or None)), or ("error", why) if the DCGM port cannot bind."""
    configure_logging(log_level)
    asyncio.run(
        _engine(
            deployment,
            engine_config,
            max_messages_per_s,
            stream_interval,
            grace_s,
            load_s,
            sockets,
            dcgm,
            status,
        )
    )


async def _engine(
    deployment: Deployment,
    engine_config: EngineConfig,
    max_messages_per_s: float,
    stream_interval: int | None,
    grace_s: float,
    load_s: float,
    sockets: list[socket.socket],
    dcgm: ServerConfig | None,
    status: Connection,
) -> None:
    host = EngineHost(
        deployment,
        engine_config,
        max_messages_per_s=max_messages_per_s,
        stream_interval=stream_interval,
        grace_s=grace_s,
        load_s=load_s,
        dcgm=dcgm,
    )
    try:
        dcgm_port = await host.bind_dcgm()
    except OSError as e:
        status.send(("error", str(e)))
        return
    loop = asyncio.get_running_loop()
    with on_stop_signals(loop, host.start_drain):
        watch_parent(loop, host.start_drain)
        quiet_gc()
        await host.engine.load()  # the fronts start once the weights are in, ready at once
        status.send(("ready", (host.card, dcgm_port)))
        await host.serve(sockets)
