"""`memorywall fleet SPEC.toml`: several emulated workers, optionally behind the smg gateway.

Each worker is its own `python -m memorywall serve` process on 127.0.0.1, its stderr in
`<log dir>/<name>.log`; the fleet learns its ports and devices from the ready file it
writes (`<log dir>/<name>.ready.json`, see `memorywall.ready`). With a `[gateway]` table
and smg installed (`pip install 'memorywall[gateway]'`), `smg launch` routes to the
workers' gRPC ports, where each speaks SGLang's `SglangScheduler` (or, with `protocol =`,
vLLM's or TensorRT-LLM's worker service, and smg gets the matching `--backend`, or for
TensorRT-LLM the worker's tokenizer: `smg_options`); smg reads model and
tokenizer from the workers themselves. Once everything answers, the fleet writes its own
ready file (`--ready-file`): every worker's entry and the gateway's address.
SIGINT or SIGTERM stops everything (exit 0); a child that dies stops the rest (exit 1),
unless a `[[fault]]` of the spec killed it (`fleet_faults.py`: kill, pause, resume on a
schedule). With `[tls]` every worker serves TLS; an API key in MEMORYWALL_API_KEY reaches
the workers through their environment. Neither goes with a gateway: smg 1.13 connects to
gRPC workers in plaintext (with `grpc://` or `grpcs://` URLs, `--ca-cert-paths` or not)
and sends no key on gRPC (its `--api-key` did not reach the worker's health check).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from memorywall import launch
from memorywall.errors import ConfigError
from memorywall.fleet.faults import FaultSchedule
from memorywall.fleet.spec import (
    GATEWAY_LOG,
    FleetSpec,
    GatewaySpec,
    TlsSpec,
    WorkerSpec,
    load_spec,
)
from memorywall.launch import Child
from memorywall.ready import ReadyError, ServerReady, remove, write_json
from memorywall.server.grpc_services import SMG_BACKEND, TRTLLM

__all__ = ["Fleet", "FleetReady", "find_smg", "in_background", "load_spec", "run"]

API_KEY_ENV = "MEMORYWALL_API_KEY"  # as `serve` reads it


@dataclass(frozen=True, kw_only=True)
class GatewayReady:
    url: str  # OpenAI API base URL
    policy: str
    pid: int
    metrics_url: str | None = None  # smg's Prometheus endpoint


@dataclass(frozen=True, kw_only=True)
class FleetReady:
    """What the fleet's ready file says: its pid, each worker by name, and the gateway."""

    pid: int
    log_dir: str
    workers: dict[str, ServerReady]
    gateway: GatewayReady | None
    nodes: dict[str, str] = field(default_factory=dict)  # `--ray`: each worker's node

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "log_dir": self.log_dir,
            "workers": [
                {"name": n, **w.as_dict(), **({"node": self.nodes[n]} if n in self.nodes else {})}
                for n, w in self.workers.items()
            ],
            "gateway": None if self.gateway is None else asdict(self.gateway),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FleetReady:
        gw = data.get("gateway")
        return cls(
            pid=data["pid"],
            log_dir=data["log_dir"],
            workers={w["name"]: ServerReady.from_dict(w) for w in data["workers"]},
            gateway=None if gw is None else GatewayReady(**gw),
            nodes={w["name"]: w["node"] for w in data["workers"] if "node" in w},
        )


def find_smg() -> list[str] | None:
    """The command that runs smg: the executable beside this Python's, or on PATH."""
    beside = Path(sys.executable).parent / "smg"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("smg")
    return [found] if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=True)) for r in [header]]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


class Fleet:
    """Starts, watches and stops the child processes of one fleet.

    `ready_file`: where to write the fleet's ready file once it serves (removed on exit);
    `self.ready` holds the same once it is written, and `on_ready` is then called with it
    (`--prometheus-config` writes its file there).
    """

    def __init__(
        self,
        spec: FleetSpec,
        log_dir: Path,
        *,
        out: TextIO = sys.stdout,
        stop: threading.Event | None = None,
        ready_file: Path | None = None,
        on_ready: Callable[[FleetReady], None] | None = None,
        startup_timeout_s: float = 60.0,
        stop_timeout_s: float = 15.0,
    ) -> None:
        self.spec = spec
        self.log_dir = log_dir
        self.out = out
        self.stop = stop or threading.Event()
        self.ready_file = ready_file
        self.ready: FleetReady | None = None
        self.on_ready = on_ready
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.children: list[Child] = []
        self.faults = FaultSchedule(spec.faults, log_dir)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _start(self, name: str, cmd: list[str], ready_file: Path | None = None) -> Child:
        child = launch.start(name, cmd, log=self.log_dir / f"{name}.log", ready_file=ready_file)
        self.children.append(child)
        return child

    def _worker_ready_file(self, name: str) -> Path:
        return self.log_dir / f"{name}.ready.json"

    def _dead(self) -> Child | None:
        """A child that died unplanned (not killed by a scheduled fault)."""
        return next(
            (c for c in self.children if c.name not in self.faults.killed and not c.alive()),
            None,
        )

    def _check(self) -> int | None:
        """The fleet's exit status if a child died unplanned (reported), else None."""
        dead = self._dead()
        return None if dead is None else self._report_death(dead)

    def _report_death(self, child: Child) -> int:
        self.say(
            f"memorywall fleet: {child.name} exited early (status {child.proc.returncode}); "
            f"last lines of {child.log}:\n{child.tail()}"
        )
        return 1

    def run(self) -> int:
        try:
            return self._run()
        finally:
            if self.ready_file is not None:
                remove(self.ready_file)
            self.shutdown()

    def _run(self) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.say(f"logs: {self.log_dir}")
        smg = None
        if self.spec.gateway is not None:
            smg = find_smg()
            if smg is None:
                self.say(
                    "gateway skipped: smg is not installed "
                    "(pip install 'memorywall[gateway]'); running the workers only"
                )
        self._start_workers()
        workers = self._wait_for_workers()
        if workers is None:
            return 0 if self.stop.is_set() else 1
        rows = [
            (
                name,
                r.hardware,
                r.model,
                str(r.devices),
                str(r.pid),
                r.grpc_target or "-",
                r.http_url or "-",
            )
            for name, r in workers.items()
        ]
        header = ("name", "hardware", "model", "devices", "pid", "gRPC", "HTTP")
        self.say(_table(header, rows))
        gateway = None
        if self.spec.gateway is not None and smg is not None:
            worker_args = gateway_workers(workers)
            worker_args += smg_options(self.spec.protocol, workers, self.log_dir)
            gw_url = self._start_gateway(smg, self.spec.gateway, worker_args)
            if gw_url is None:
                return 0 if self.stop.is_set() else 1
            gateway = GatewayReady(
                url=gw_url,
                policy=self.spec.gateway.policy,
                pid=self.children[-1].pid,
                metrics_url=f"http://127.0.0.1:{self.gateway_metrics_port}/metrics",
            )
            self.say(
                f"gateway: smg ({gateway.policy}) at {gw_url} "
                f"(OpenAI API, /v1/chat/completions), pid {gateway.pid}"
            )
        self.ready = FleetReady(
            pid=os.getpid(),
            log_dir=str(self.log_dir),
            workers=workers,
            gateway=gateway,
            nodes=self._nodes(),
        )
        if self.ready_file is not None:
            write_json(self.ready_file, self.ready.as_dict())
        if self.on_ready is not None:
            self.on_ready(self.ready)
        self.say("fleet up; Ctrl-C (SIGINT) or SIGTERM stops it")
        self.faults.start()
        pids = {name: r.pid for name, r in workers.items()}
        while not self.stop.wait(0.05):
            for fault in self.faults.apply_due(pids, self._signal):
                self.say(f"fault: {fault.action.value} {fault.worker} at {fault.at_s:g} s")
            if (status := self._check()) is not None:
                return status
        return 0

    def _start_workers(self) -> None:
        """Each worker's serve process, on this host (a subclass may place them elsewhere)."""
        for w in self.spec.workers:
            ready = self._worker_ready_file(w.name)
            self._start(w.name, serve_command(w, ready, self.spec.tls), ready)

    def _nodes(self) -> dict[str, str]:
        """Each worker's node, for the ready file: none here, every worker is on this host."""
        return {}

    def _signal(self, pid: int, signum: int) -> None:
        """A fault's signal to a worker's server, by pid."""
        os.kill(pid, signum)

    def _wait_for_workers(self) -> dict[str, ServerReady] | None:
        """Each worker's ready file by name, or None if one died, timed out, or a stop came."""
        try:
            if not launch.wait_ready(
                self.children, timeout_s=self.startup_timeout_s, stop=self.stop
            ):
                return None
        except launch.ChildExited as e:
            self._report_death(e.child)
            return None
        except launch.NotReady as e:
            self.say(f"memorywall fleet: {e}; see {self.log_dir}")
            return None
        except ReadyError as e:
            self.say(f"memorywall fleet: {e}")
            return None
        return {c.name: c.served for c in self.children}

    def _start_gateway(self, smg: list[str], gw: GatewaySpec, worker_args: list[str]) -> str | None:
        port = gw.port or free_port()
        cmd = [*smg, "launch", *worker_args, "--policy", gw.policy]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        self.gateway_metrics_port = free_port()
        cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port"]
        cmd += [str(self.gateway_metrics_port), *gw.args]
        child = self._start(GATEWAY_LOG, cmd)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._check() is not None:
                return None
            if _gateway_serves(base):
                return base
            if self.stop.wait(0.2):
                return None
        self.say(
            f"memorywall fleet: the gateway did not come up within "
            f"{self.startup_timeout_s:g} s; last lines of {child.log}:\n{child.tail()}"
        )
        return None

    def shutdown(self) -> None:
        """SIGTERM every child still running (the gateway first), wait, then SIGKILL."""
        launch.stop(
            list(reversed(self.children)),
            timeout_s=self.stop_timeout_s,
            on_kill=lambda c: self.say(f"memorywall fleet: {c.name} did not stop; killing it"),
        )


def serve_command(w: WorkerSpec, ready: Path, tls: TlsSpec | None = None) -> list[str]:
    """`memorywall serve` with the worker's options, and the fleet's own: loopback, the
    ready file, a free bootstrap port for a prefill worker, `[tls]`."""
    return launch.serve_command(["--host", "127.0.0.1", *serve_args(w, tls)], ready)


def serve_args(w: WorkerSpec, tls: TlsSpec | None = None) -> list[str]:
    """The worker's serve options and the fleet's own but the host and the ready file."""
    args = w.argv()
    if w.role == "prefill":
        args += ["--bootstrap-port", "0"]  # the ready file names it
    if tls is not None:
        args += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
        if tls.client_ca is not None:
            args += ["--tls-client-ca", str(tls.client_ca)]
    return args


def smg_backend(protocol: str | None) -> list[str]:
    """smg's `--backend` for workers speaking `protocol`. smg 1.13 has none for TensorRT-LLM:
    it finds that engine by the service a gRPC worker answers."""
    backend = SMG_BACKEND.get(protocol or "")
    return ["--backend", backend] if backend else []


def smg_options(protocol: str | None, workers: dict[str, ServerReady], folder: Path) -> list[str]:
    """smg's options for workers speaking `protocol`: its `--backend`, and for TensorRT-LLM,
    whose model info names no tokenizer for smg to fetch, `--tokenizer-path` to the one the
    first worker ships (`GetTokenizer`), unpacked into `folder`/tokenizer."""
    options = smg_backend(protocol)
    if protocol == TRTLLM:
        target = next(iter(workers.values())).grpc_target
        assert target is not None, "a gatewayed fleet's workers serve gRPC (checked in spec)"
        options += ["--tokenizer-path", str(fetch_trtllm_tokenizer(target, folder / "tokenizer"))]
    return options


def fetch_trtllm_tokenizer(target: str, folder: Path) -> Path:
    """The tokenizer a TensorRT-LLM worker ships, unpacked into `folder`."""
    import grpc
    from smg_grpc_proto.generated import common_pb2, trtllm_service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = trtllm_service_pb2_grpc.TrtllmServiceStub(channel)
        chunks = stub.GetTokenizer(common_pb2.GetTokenizerRequest(), timeout=60)
        data = b"".join(c.data for c in chunks)
    zipfile.ZipFile(io.BytesIO(data)).extractall(folder)
    return folder


def gateway_workers(workers: dict[str, ServerReady]) -> list[str]:
    """smg's worker arguments: `--worker-urls`, or in PD mode each prefill worker with its
    bootstrap port and each decode worker."""
    if all(r.role == "both" for r in workers.values()):
        return ["--worker-urls", *(f"grpc://{r.grpc_target}" for r in workers.values())]
    args = ["--pd-disaggregation"]
    for r in workers.values():
        if r.role == "prefill":
            args += ["--prefill", f"grpc://{r.grpc_target}", str(r.bootstrap_port)]
        else:
            args += ["--decode", f"grpc://{r.grpc_target}"]
    return args


def run(
    spec: FleetSpec,
    log_dir: Path | None = None,
    *,
    make: Callable[..., Fleet] = Fleet,
    **kwargs: Any,
) -> int:
    """Run a fleet in the foreground until SIGINT/SIGTERM (0) or a child's death (1);
    `make` builds it (`Fleet`'s arguments; `memorywall.cluster.fleet` places it on Ray)."""
    if spec.gateway is not None and os.environ.get(API_KEY_ENV):
        raise ConfigError(
            f"{API_KEY_ENV} is set, but smg sends no API key to gRPC workers: unset it or "
            "drop [gateway] (the workers listen on 127.0.0.1 only)"
        )
    if log_dir is None:
        log_dir = Path(tempfile.mkdtemp(prefix="memorywall-fleet-"))
    fleet = make(spec, log_dir, **kwargs)
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda *_: fleet.stop.set())
    try:
        return fleet.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def in_background(
    spec: FleetSpec, *, start_timeout_s: float = 120.0, prefix: str = "memorywall-fleet-"
) -> Iterator[FleetReady]:
    """Run a fleet in a background thread for the block (an experiment's fleet): yields its
    ready document once every worker, and smg if any, answers; stops it after. Logs go to a
    fresh temporary folder; a fleet that does not come up raises RuntimeError with its
    output."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    ready_file, stop, out = folder / "fleet.ready.json", threading.Event(), io.StringIO()
    fleet = Fleet(spec, folder / "logs", out=out, stop=stop, ready_file=ready_file)
    thread = threading.Thread(target=fleet.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not ready_file.exists():
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"fleet did not start:\n{out.getvalue()}")
            stop.wait(0.05)
        yield FleetReady.from_dict(json.loads(ready_file.read_text()))
    finally:
        stop.set()
        thread.join(timeout=60)


def _gateway_serves(base: str) -> bool:
    """True once smg answers a one-token chat request: it lists the model in /v1/models
    before it has fetched the workers' tokenizer, and answers 503 until then."""
    try:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=2) as r:
            models = json.load(r).get("data") or []
        if not models:
            return False
        body = json.dumps(
            {
                "model": models[0]["id"],
                "messages": [{"role": "user", "content": "ready"}],
                "max_tokens": 1,
            }
        ).encode()
        request = urllib.request.Request(
            f"{base}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status == 200
    except (OSError, ValueError, KeyError):
        return False
