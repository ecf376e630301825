"""Ready files: how `memorywall serve` and `memorywall fleet` tell other processes they are up.

A ready file is one JSON object, written atomically (a temporary file in the same folder,
then a rename) once every listener is bound, and removed when the process exits. A reader
never sees half a file, and never has to parse a log line to learn a port.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from memorywall.errors import MemorywallError


class ReadyError(MemorywallError):
    """A process did not become ready: it exited, timed out, or wrote an unreadable file."""


@dataclass(frozen=True, kw_only=True)
class ServerReady:
    """What a running `memorywall serve` tells tools: where it listens and what it emulates."""

    pid: int
    host: str
    grpc_port: int | None  # None: gRPC is off
    http_port: int | None  # the OpenAI HTTP front (with /metrics); None: off
    metrics_port: int | None  # /metrics alone; None: off
    hardware: str
    model: str
    devices: int
    tensor_parallel: int
    pipeline_parallel: int
    deployment: str
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_capacity_tokens: int
    predicted_tokens_per_s_per_user: float
    tls: bool = False  # every port speaks TLS (https, secure gRPC)
    role: str = "both"  # disaggregated serving: prefill, decode, or both phases
    bootstrap_port: int | None = None  # a prefill worker's rendezvous port
    # The worker protocols on the gRPC port (`serve --grpc-services`); () when gRPC is off.
    grpc_services: tuple[str, ...] = ()
    dcgm_port: int | None = None  # the emulated dcgm-exporter's /metrics; None: off
    dashboard_path: str | None = None  # `serve --dashboard`'s page on the HTTP front; None: off
    # Devices a MoE layer's experts spread over (`--ep`); 1: none. Defaulted, so a ready
    # file from before it was named still reads.
    expert_parallel: int = 1

    @property
    def grpc_target(self) -> str | None:
        """host:port, as `memorywall bench --target` and `Client` take it."""
        return None if self.grpc_port is None else f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str | None:
        """The HTTP front's base URL (OpenAI clients take `{http_url}/v1`)."""
        scheme = "https" if self.tls else "http"
        return None if self.http_port is None else f"{scheme}://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str | None:
        """Where Prometheus metrics are served, if anywhere."""
        if self.metrics_port is not None:
            scheme = "https" if self.tls else "http"
            return f"{scheme}://{self.host}:{self.metrics_port}/metrics"
        return None if self.http_url is None else f"{self.http_url}/metrics"

    @property
    def dcgm_url(self) -> str | None:
        """Where the emulated dcgm-exporter serves, if anywhere."""
        if self.dcgm_port is None:
            return None
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.dcgm_port}/metrics"

    @property
    def dashboard_url(self) -> str | None:
        """The live dashboard's page, if this server serves one."""
        if self.dashboard_path is None or self.http_url is None:
            return None
        return f"{self.http_url}{self.dashboard_path}"

    def as_dict(self) -> dict[str, Any]:
        """The file's content: every field, plus the addresses spelled out for tools."""
        out = asdict(self)
        out |= {
            "grpc_target": self.grpc_target,
            "http_url": self.http_url,
            "metrics_url": self.metrics_url,
            "dcgm_url": self.dcgm_url,
            "dashboard_url": self.dashboard_url,
        }
        return out

    @classmethod
    def from_dict(cls, data: Any, origin: str = "ready file") -> ServerReady:
        if not isinstance(data, dict):
            raise ReadyError(f"{origin}: not a JSON object")
        required = [f for f in fields(cls) if f.default is MISSING]
        missing = [f.name for f in required if f.name not in data]
        if missing:
            raise ReadyError(f"{origin}: missing {', '.join(missing)}")
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        if isinstance(values.get("grpc_services"), list):  # JSON has no tuples
            values["grpc_services"] = tuple(values["grpc_services"])
        return cls(**values)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` so that a reader sees either no file or all of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes it private; readers may be others
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def poll(path: Path, proc: subprocess.Popen) -> dict[str, Any] | None:
    """The ready file `proc` wrote at `path`, or None while it is not there yet.

    A file left by an earlier process (another pid) is not taken. Raises ReadyError
    once `proc` has exited without writing it.
    """
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        data = None
    except (OSError, json.JSONDecodeError) as e:
        raise ReadyError(f"{path}: unreadable ready file ({e})") from None
    if isinstance(data, dict) and data.get("pid") == proc.pid:
        return data
    if proc.poll() is not None:
        raise ReadyError(f"exited with status {proc.returncode} before it was ready")
    return None


def wait_for(
    path: Path,
    proc: subprocess.Popen,
    *,
    timeout_s: float,
    stop: threading.Event | None = None,
    poll_s: float = 0.05,
) -> dict[str, Any] | None:
    """`poll` until the file is there; None if `stop` is set first, ReadyError if `proc`
    exits or `timeout_s` passes."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + timeout_s
    while (data := poll(path, proc)) is None:
        if time.monotonic() > deadline:
            raise ReadyError(f"not ready within {timeout_s:g} s")
        if stop.wait(poll_s):
            return None
    return data
