"""`memorywall serve --api-servers N`: the parent that starts one engine and N front processes.

Like vLLM's `--api-server-count`: the engine process (`engine_host`) owns the
clock, scheduler, KV and metrics; N front processes (`front`) own the ports,
all bound with SO_REUSEPORT, and reach the engine over one socketpair each
(`wire`). The parent starts the engine, then front 0 (which binds the ports
asked for, 0 meaning any free one), then the other fronts on front 0's ports;
once every front is bound it writes the ready file (its own pid: signal it to
stop them all). It forwards SIGINT/SIGTERM to every child, and if any child
dies it stops the rest and exits 1: a front that is gone leaves its share of
connections refused, which is better said loudly than served quietly.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from memorywall.core import Deployment
from memorywall.errors import ConfigError, MemorywallError
from memorywall.ready import remove, write_json
from memorywall.server.app import card_ready, describe, exposure_risk
from memorywall.server.config import ServerConfig
from memorywall.server.engine.api import ModelCard
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.listeners import ListenerPorts, addresses
from memorywall.server.multi.engine_host import engine_main
from memorywall.server.multi.front import front_main
from memorywall.server.pd import Role

log = logging.getLogger("memorywall.server")

START_TIMEOUT_S = 60.0  # a spawned child imports numpy, grpc and aiohttp on a busy machine
STOP_MARGIN_S = 10.0  # beyond the drain's grace, before a child is killed


class ChildFailed(MemorywallError):
    """A child process exited, or did not say it was ready in time."""


class StopAsked(Exception):
    """SIGINT or SIGTERM reached the parent while it was starting its children."""


@dataclass
class Child:
    name: str
    process: BaseProcess
    status: Connection  # the child says "ready" (or why not) here


class Supervisor:
    """The parent's children and the signals that stop them."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self._ctx = multiprocessing.get_context("spawn")
        self._wake_r, wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake_w = wake_w
        self._old = {
            sig: signal.signal(sig, lambda signum, frame: None)
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        self._old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)

    def start(self, name: str, target, *args) -> Child:
        reader, writer = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=target, args=(*args, writer), name=name)
        process.start()
        writer.close()
        child = Child(name, process, reader)
        self.children.append(child)
        return child

    def ready(self, child: Child, timeout_s: float = START_TIMEOUT_S):
        """What `child` sent with "ready"; OSError for a bind it could not make, ChildFailed
        if it exits or stays silent, StopAsked on a signal."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildFailed(f"{child.name} was not ready within {timeout_s:g} s")
            woke = wait([child.status, child.process.sentinel, self._wake_r], timeout=left)
            if self._wake_r in woke:
                self._clear_wake()
                raise StopAsked
            if child.status in woke:
                try:
                    kind, value = child.status.recv()
                except EOFError:
                    kind, value = "exit", None
                if kind == "ready":
                    return value
                if kind == "error":
                    raise OSError(value)
            if child.process.sentinel in woke or not child.process.is_alive():
                child.process.join(1.0)
                code = child.process.exitcode
                raise ChildFailed(f"{child.name} exited with status {code} before it was ready")

    def watch(self) -> Child | None:
        """Wait for a stop signal (None) or a child's exit (that child)."""
        sentinels = {c.process.sentinel: c for c in self.children}
        while True:
            woke = wait([*sentinels, self._wake_r])
            if self._wake_r in woke:
                self._clear_wake()
                return None
            for sentinel in woke:
                if isinstance(sentinel, int):  # a child's sentinel, not the wake pipe
                    return sentinels[sentinel]

    def stop(self, grace_s: float) -> None:
        """SIGTERM every child still alive, wait for them to drain, kill what is left."""
        for c in self.children:
            pid = c.process.pid  # None only before start()
            if pid is not None and c.process.is_alive():
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s + STOP_MARGIN_S
        for c in self.children:
            c.process.join(max(deadline - time.monotonic(), 0.0))
            if c.process.is_alive():
                log.error("%s did not stop in time; killing it", c.name)
                c.process.kill()
                c.process.join()
            c.status.close()

    def close(self) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._wake_r.close()
        self._wake_w.close()

    def _clear_wake(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except BlockingIOError:
            pass


def serve_processes(
    deployment: Deployment,
    engine_config: EngineConfig,
    config: ServerConfig,
    *,
    api_servers: int,
    ready_file: Path | None = None,
    log_level: str = "INFO",
) -> int:
    """Run an engine process and `api_servers` front processes until SIGINT or SIGTERM (0),
    or until a child dies (1). Raises OSError if a port cannot be bound."""
    if api_servers < 2:
        raise ConfigError(f"api_servers: a multi-process server needs >= 2, got {api_servers}")
    if config.disaggregation.role is not Role.BOTH:
        raise ConfigError("--api-servers above 1 does not combine with --role prefill|decode yet")
    if config.otlp_endpoint is not None:
        raise ConfigError(
            "--api-servers above 1 does not combine with --otlp-endpoint yet: "
            "trace from a single process (--api-servers 1)"
        )
    if (risk := exposure_risk(config)) is not None:
        log.warning(risk)
    supervisor = Supervisor()
    try:
        try:
            ports = _start(supervisor, deployment, engine_config, config, api_servers, log_level)
        except StopAsked:
            supervisor.stop(config.grace_s)
            return 0
        except BaseException:
            supervisor.stop(0.0)
            raise
        card, bound = ports
        try:
            if ready_file is not None:
                write_json(ready_file, _ready(card, config, bound).as_dict())
            log.info(describe(card, addresses(config, bound)) + f" ({api_servers} front processes)")
            dead = supervisor.watch()
        finally:
            if ready_file is not None:
                remove(ready_file)
        if dead is not None:
            log.error(
                "%s (pid %d) exited with status %s; stopping every process",
                dead.name,
                dead.process.pid,
                dead.process.exitcode,
            )
        else:
            log.info("shutting down: draining for up to %.1f s", config.grace_s)
        supervisor.stop(config.grace_s)
        log.info("stopped")
        return 1 if dead is not None else 0
    finally:
        supervisor.close()


def _start(
    supervisor: Supervisor,
    deployment: Deployment,
    engine_config: EngineConfig,
    config: ServerConfig,
    count: int,
    log_level: str,
) -> tuple[ModelCard, ListenerPorts]:
    pairs = [socket.socketpair() for _ in range(count)]
    try:
        engine = supervisor.start(
            "engine",
            engine_main,
            deployment,
            engine_config,
            config.max_messages_per_s,
            config.stream_interval,
            config.grace_s,
            config.weight_load_s(deployment),
            [a for a, _ in pairs],
            log_level,
            config if config.dcgm_port is not None else None,
        )
        for a, _ in pairs:  # only the engine holds these now: its exit reads as EOF
            a.close()
        card, dcgm_port = supervisor.ready(engine)
        # The fronts bind every port but the DCGM one, which the engine process serves.
        bound = replace(ListenerPorts.of(config), dcgm_port=None)
        front_config = replace(config, dcgm_port=None)
        fronts = []
        for index, (_, sock) in enumerate(pairs):
            args = (index, count, front_config, engine_config.seed, bound, sock, log_level)
            fronts.append(supervisor.start(f"front {index}", front_main, *args))
            sock.close()  # only the front holds it now: its death reads as EOF in the engine
            if index == 0:
                # The others bind where front 0 did (its port 0 became a real port).
                bound = supervisor.ready(fronts[0])
        for front in fronts[1:]:
            supervisor.ready(front)
        bound = replace(bound, dcgm_port=dcgm_port)
    finally:
        for a, b in pairs:  # a front that never started: the engine sees its socket close
            a.close()
            b.close()
    return card, bound


def _ready(card: ModelCard, config: ServerConfig, ports: ListenerPorts):
    return card_ready(
        card,
        pid=os.getpid(),
        host=config.host,
        tls=config.tls is not None,
        grpc_port=ports.grpc_port,
        http_port=ports.http_port,
        metrics_port=ports.metrics_port,
        grpc_services=config.grpc_services if ports.grpc_port is not None else (),
        dcgm_port=ports.dcgm_port,
    )
