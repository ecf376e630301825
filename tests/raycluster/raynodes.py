"""A two-node local Ray cluster on this host: start, inspect, lose a node, stop by pid.

Node a is the head, node b a worker node; each has one CPU, a small object store, no
dashboard, and a custom resource named after it (`node_a`, `node_b`) so that work can be
pinned to a node and where it ran checked. Both bind 127.0.0.1 and keep their files
under one temp dir (`<dir>/a`, `<dir>/b`). They are stopped by pid, the processes whose
command line names that dir or the head's port and all they started: `ray stop` would
stop every Ray cluster on the machine, another session's too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 120
OBJECT_STORE_BYTES = 100_000_000


@dataclass(frozen=True)
class RayCluster:
    address: str  # the head's GCS address, HOST:PORT
    temp_dir: Path
    ray: Path  # this venv's `ray` command

    def kill_node_b(self) -> None:
        """Node b lost: SIGKILL its raylet and everything under it, at once."""
        kill(cluster_pids(str(self.temp_dir / "b")), signal.SIGKILL)

    def restart_node_b(self) -> None:
        _start(self.ray, [f"--address={self.address}", *_node("b", self.temp_dir)])

    def pids(self, folder: Path) -> list[int]:
        return cluster_pids(str(folder), f":{self.address.rsplit(':', 1)[1]} ")


def ray_command() -> Path | None:
    """This venv's `ray`, when the [ray] extra is installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return None
    found = Path(sys.executable).parent / "ray"
    return found if found.is_file() else None


def processes() -> dict[int, tuple[int, str]]:
    """Each process's parent and command line, from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        out[int(entry.name)] = (ppid, args)
    return out


def cluster_pids(mark: str, port_mark: str | None = None) -> list[int]:
    """Processes whose command line has `mark` (a temp dir) or `port_mark` (the head's
    port: its client server names no dir), and every process under one of them."""
    procs = processes()
    roots = {
        pid
        for pid, (_, args) in procs.items()
        if (mark in args or (port_mark and port_mark in f"{args} ")) and pid != os.getpid()
    }

    def under(pid: int) -> bool:
        seen = set()
        while pid > 1 and pid not in seen:
            if pid in roots:
                return True
            seen.add(pid)
            pid = procs[pid][0] if pid in procs else 0
        return False

    return [pid for pid in procs if under(pid)]


def kill(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _node(name: str, temp_dir: Path) -> list[str]:
    return [
        "--num-cpus=1",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir / name}",
        f'--resources={{"node_{name}": 1000}}',
    ]


def _start(ray: Path, args: list[str]) -> None:
    subprocess.run(
        [str(ray), "start", *args], check=True, timeout=START_TIMEOUT_S, capture_output=True
    )


def stop_cluster(cluster: RayCluster, timeout_s: float = 20) -> None:
    """SIGTERM this cluster's processes, then SIGKILL what is left after `timeout_s`."""
    pids = cluster.pids(cluster.temp_dir)
    kill(pids, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while (left := cluster.pids(cluster.temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    kill(left, signal.SIGKILL)


def start_cluster(ray: Path) -> RayCluster:
    """Start the two nodes; stop them with `stop_cluster`."""
    # A short path: Ray's socket names under it must fit in 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="mwray-", dir="/tmp"))
    port, client_port = _free_port(), _free_port()
    cluster = RayCluster(address=f"127.0.0.1:{port}", temp_dir=temp_dir, ray=ray)
    try:
        head = ["--head", f"--port={port}", f"--ray-client-server-port={client_port}"]
        _start(ray, [*head, "--include-dashboard=false", *_node("a", temp_dir)])
        cluster.restart_node_b()
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
