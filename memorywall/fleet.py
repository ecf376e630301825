"""`memorywall fleet SPEC.toml`: several emulated workers, optionally behind the smg gateway.

Each worker is its own `python -m memorywall serve` process on 127.0.0.1, its stderr in
`<log dir>/<name>.log`. With a `[gateway]` table and smg installed (`pip install
'memorywall[gateway]'`), `smg launch` routes to the workers' gRPC ports, where each speaks
SGLang's `SglangScheduler`; smg reads model and tokenizer from the workers themselves.
SIGINT or SIGTERM stops everything (exit 0); a child that dies stops the rest (exit 1).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from memorywall.core import load_hardware, load_model
from memorywall.core._toml import load_toml
from memorywall.errors import ConfigError, MemorywallError

# smg 1.13's --policy choices.
POLICIES = (
    "random",
    "round_robin",
    "passthrough",
    "cache_aware",
    "power_of_two",
    "least_load",
    "manual",
    "consistent_hashing",
    "prefix_hash",
)
GATEWAY_LOG = "gateway"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_STARTED = re.compile(r"memorywall serving .* on 127\.0\.0\.1:(\d+)")
_HTTP = re.compile(r"memorywall serving .*(http://127\.0\.0\.1:\d+)")
_DEVICES = re.compile(r"memorywall serving \S+ on (\d+) x ")
_WORKER_KEYS = {"name", "hardware", "model", "devices", "port", "http_port"}
_GATEWAY_KEYS = {"policy", "port"}


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    hardware: str
    model: str
    devices: int | None = None
    port: int = 0  # gRPC; 0: any free port
    http_port: int | None = None


@dataclass(frozen=True)
class GatewaySpec:
    policy: str = "cache_aware"
    port: int = 30000  # 0: any free port


@dataclass(frozen=True)
class FleetSpec:
    workers: tuple[WorkerSpec, ...]
    gateway: GatewaySpec | None = None


def load_spec(path: Path) -> FleetSpec:
    """Read and check a fleet spec; every problem is a one-line ConfigError naming the field."""
    return parse_spec(load_toml(path), str(path))


def _port(origin: str, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(f"{origin}: {field}: must be an integer 0-65535, got {value!r}")
    return value


def _text(origin: str, field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{origin}: {field}: must be a non-empty string, got {value!r}")
    return value


def _unknown(origin: str, where: str, table: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise ConfigError(
            f"{origin}: {where}{extra[0]}: unknown field (expected: {', '.join(sorted(allowed))})"
        )


def _worker(origin: str, i: int, raw: Any) -> WorkerSpec:
    where = f"worker[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: {where}: must be a table ([[worker]])")
    _unknown(origin, f"{where}.", raw, _WORKER_KEYS)
    for key in ("name", "hardware", "model"):
        if key not in raw:
            raise ConfigError(f"{origin}: {where}.{key}: missing")
    name = _text(origin, f"{where}.name", raw["name"])
    if not _NAME.fullmatch(name) or name == GATEWAY_LOG:
        raise ConfigError(
            f"{origin}: {where}.name: {name!r} must be letters, digits, '.', '_', '-' "
            f"(it names the log file) and not {GATEWAY_LOG!r}"
        )
    hardware = _text(origin, f"{where}.hardware", raw["hardware"])
    model = _text(origin, f"{where}.model", raw["model"])
    for key, load in (("hardware", load_hardware), ("model", load_model)):
        try:
            load(raw[key])
        except MemorywallError as e:
            raise ConfigError(f"{origin}: {where}.{key}: {e}") from None
    devices = raw.get("devices")
    if devices is not None and (
        isinstance(devices, bool) or not isinstance(devices, int) or devices < 1
    ):
        raise ConfigError(f"{origin}: {where}.devices: must be a positive integer, got {devices!r}")
    http_port = raw.get("http_port")
    return WorkerSpec(
        name=name,
        hardware=hardware,
        model=model,
        devices=devices,
        port=_port(origin, f"{where}.port", raw.get("port", 0)),
        http_port=None if http_port is None else _port(origin, f"{where}.http_port", http_port),
    )


def parse_spec(data: dict[str, Any], origin: str = "fleet spec") -> FleetSpec:
    _unknown(origin, "", data, {"worker", "gateway"})
    raw_workers = data.get("worker")
    if not isinstance(raw_workers, list) or not raw_workers:
        raise ConfigError(f"{origin}: worker: needs at least one [[worker]] table")
    workers = tuple(_worker(origin, i, w) for i, w in enumerate(raw_workers))
    seen_names: set[str] = set()
    seen_ports: set[int] = set()
    for i, w in enumerate(workers):
        if w.name in seen_names:
            raise ConfigError(f"{origin}: worker[{i}].name: {w.name!r} is used twice")
        seen_names.add(w.name)
        for key, p in (("port", w.port), ("http_port", w.http_port)):
            if p:
                if p in seen_ports:
                    raise ConfigError(f"{origin}: worker[{i}].{key}: port {p} is used twice")
                seen_ports.add(p)
    gateway = None
    if "gateway" in data:
        raw = data["gateway"]
        if not isinstance(raw, dict):
            raise ConfigError(f"{origin}: gateway: must be a table ([gateway])")
        _unknown(origin, "gateway.", raw, _GATEWAY_KEYS)
        policy = raw.get("policy", GatewaySpec.policy)
        if policy not in POLICIES:
            raise ConfigError(
                f"{origin}: gateway.policy: {policy!r} is not one of {', '.join(POLICIES)}"
            )
        if policy == "power_of_two" and len(workers) < 2:
            raise ConfigError(f"{origin}: gateway.policy: power_of_two needs at least 2 workers")
        gw_port = _port(origin, "gateway.port", raw.get("port", GatewaySpec.port))
        if gw_port and gw_port in seen_ports:
            raise ConfigError(f"{origin}: gateway.port: port {gw_port} is used by a worker")
        gateway = GatewaySpec(policy=policy, port=gw_port)
    return FleetSpec(workers=workers, gateway=gateway)


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


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


def _tail(path: Path, n: int = 10) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "    (no log)"
    return "\n".join(f"    {line}" for line in lines[-n:]) or "    (empty log)"


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=True)) for r in [header]]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


class Fleet:
    """Starts, watches and stops the child processes of one fleet."""

    def __init__(
        self,
        spec: FleetSpec,
        log_dir: Path,
        *,
        out: TextIO = sys.stdout,
        stop: threading.Event | None = None,
        startup_timeout_s: float = 60.0,
        stop_timeout_s: float = 15.0,
    ) -> None:
        self.spec = spec
        self.log_dir = log_dir
        self.out = out
        self.stop = stop or threading.Event()
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.children: list[_Child] = []

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _spawn(self, name: str, cmd: list[str]) -> _Child:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as f:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True
            )
        child = _Child(name, proc, log)
        self.children.append(child)
        return child

    def _dead(self) -> _Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def _report_death(self, child: _Child) -> int:
        self.say(
            f"memorywall fleet: {child.name} exited early (status {child.proc.returncode}); "
            f"last lines of {child.log}:\n{_tail(child.log)}"
        )
        return 1

    def run(self) -> int:
        try:
            return self._run()
        finally:
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
        for w in self.spec.workers:
            cmd = [sys.executable, "-m", "memorywall", "serve", "--host", "127.0.0.1"]
            cmd += ["--hardware", w.hardware, "--model", w.model, "--port", str(w.port)]
            if w.devices is not None:
                cmd += ["--devices", str(w.devices)]
            if w.http_port is not None:
                cmd += ["--http-port", str(w.http_port)]
            self._spawn(w.name, cmd)
        lines = self._wait_for_workers()
        if lines is None:
            return 0 if self.stop.is_set() else 1
        rows, urls = [], []
        for w, child, line in zip(self.spec.workers, self.children, lines, strict=True):
            grpc_addr = f"127.0.0.1:{_STARTED.search(line).group(1)}"
            urls.append(f"grpc://{grpc_addr}")
            http = _HTTP.search(line)
            devices = _DEVICES.search(line)
            rows.append(
                (
                    w.name,
                    w.hardware,
                    w.model,
                    devices.group(1) if devices else str(w.devices or "auto"),
                    str(child.proc.pid),
                    grpc_addr,
                    http.group(1) if http else "-",
                )
            )
        header = ("name", "hardware", "model", "devices", "pid", "gRPC", "HTTP")
        self.say(_table(header, rows))
        if self.spec.gateway is not None and smg is not None:
            gw_url = self._start_gateway(smg, self.spec.gateway, urls)
            if gw_url is None:
                return 0 if self.stop.is_set() else 1
            self.say(
                f"gateway: smg ({self.spec.gateway.policy}) at {gw_url} "
                f"(OpenAI API, /v1/chat/completions), pid {self.children[-1].proc.pid}"
            )
        self.say("fleet up; Ctrl-C (SIGINT) or SIGTERM stops it")
        while not self.stop.wait(0.2):
            if dead := self._dead():
                return self._report_death(dead)
        return 0

    def _wait_for_workers(self) -> list[str] | None:
        """Each worker's startup line, or None if one died, timed out, or a stop came."""
        found: dict[str, str] = {}
        deadline = time.monotonic() + self.startup_timeout_s
        while len(found) < len(self.children):
            for c in self.children:
                if c.name in found:
                    continue
                text = c.log.read_text(errors="replace")
                if line := next((x for x in text.splitlines() if _STARTED.search(x)), None):
                    found[c.name] = line
                elif c.proc.poll() is not None:
                    self._report_death(c)
                    return None
            if len(found) == len(self.children):
                break
            if time.monotonic() > deadline:
                late = [c.name for c in self.children if c.name not in found]
                self.say(
                    f"memorywall fleet: {', '.join(late)} did not start within "
                    f"{self.startup_timeout_s:g} s; see {self.log_dir}"
                )
                return None
            if self.stop.wait(0.1):
                return None
        return [found[c.name] for c in self.children]

    def _start_gateway(self, smg: list[str], gw: GatewaySpec, urls: list[str]) -> str | None:
        port = gw.port or free_port()
        cmd = [*smg, "launch", "--worker-urls", *urls, "--policy", gw.policy]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
        child = self._spawn(GATEWAY_LOG, cmd)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if dead := self._dead():
                self._report_death(dead)
                return None
            if _gateway_serves(base):
                return base
            if self.stop.wait(0.2):
                return None
        self.say(
            f"memorywall fleet: the gateway did not come up within "
            f"{self.startup_timeout_s:g} s; last lines of {child.log}:\n{_tail(child.log)}"
        )
        return None

    def shutdown(self) -> None:
        """SIGTERM every child still running (the gateway first), wait, then SIGKILL."""
        alive = [c for c in reversed(self.children) if c.proc.poll() is None]
        for c in alive:
            c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for c in alive:
            try:
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"memorywall fleet: {c.name} did not stop; killing it")
                c.proc.kill()
                c.proc.wait()


def run(spec: FleetSpec, log_dir: Path | None = None, **kwargs: Any) -> int:
    """Run a fleet in the foreground until SIGINT/SIGTERM (0) or a child's death (1)."""
    if log_dir is None:
        log_dir = Path(tempfile.mkdtemp(prefix="memorywall-fleet-"))
    fleet = Fleet(spec, log_dir, **kwargs)
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda *_: fleet.stop.set())
    try:
        return fleet.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
