"""A two-node local Ray cluster for the `--ray` tests, started once per session.

Node a is the head, node b a worker node; each has one CPU, a small object store, no
dashboard, and a custom resource named after it (`node_a`, `node_b`) so that a test can
pin work to a node and check where it ran. Both bind 127.0.0.1 and live under one temp
dir of their own, and are stopped (`ray stop --force` on that dir) after the session.
Without ray installed the tests skip, except under MEMORYWALL_CI=1 where they fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 120
OBJECT_STORE_BYTES = 100_000_000


@dataclass(frozen=True)
class RayCluster:
    address: str  # the head's GCS address, HOST:PORT
    temp_dir: Path
    ray: Path  # this venv's `ray` command

    def stop_node_b(self) -> None:
        """Kill node b's processes (a node lost), leaving the head."""
        for pid in node_pids(self.temp_dir, "node_b"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def ray_command() -> Path | None:
    """This venv's `ray`, when the [ray] extra is installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return None
    found = Path(sys.executable).parent / "ray"
    return found if found.is_file() else None


def node_pids(temp_dir: Path, resource: str) -> list[int]:
    """The processes of the node started with `resource` under `temp_dir`: its raylet
    (found by its command line) and every process whose parent chain reaches it."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True)
    rows = [line.split(None, 2) for line in out.stdout.splitlines()]
    parents = {int(r[0]): int(r[1]) for r in rows if len(r) >= 2}
    raylets = {
        int(r[0])
        for r in rows
        if len(r) == 3 and "raylet" in r[2] and resource in r[2] and str(temp_dir) in r[2]
    }

    def under(pid: int) -> bool:
        seen = set()
        while pid > 1 and pid not in seen:
            if pid in raylets:
                return True
            seen.add(pid)
            pid = parents.get(pid, 0)
        return False

    return [pid for pid in parents if under(pid)]


def _start(ray: Path, args: list[str], temp_dir: Path) -> None:
    common = [
        "--num-cpus=1",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
    ]
    subprocess.run(
        [str(ray), "start", *args, *common],
        check=True,
        timeout=START_TIMEOUT_S,
        capture_output=True,
        env={**os.environ, "RAY_TMPDIR": str(temp_dir)},
    )


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    ray = ray_command()
    if ray is None:
        if os.environ.get("MEMORYWALL_CI") == "1":
            pytest.fail("ray is not installed (CI installs memorywall[ray])")
        pytest.skip("ray is not installed (pip install 'memorywall[ray]')")
    # A short path: Ray's socket names under it must fit in 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="mwray-", dir="/tmp"))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    try:
        _start(
            ray,
            [
                "--head",
                f"--port={port}",
                "--include-dashboard=false",
                f"--temp-dir={temp_dir}",
                '--resources={"node_a": 1000}',
            ],
            temp_dir,
        )
        _start(ray, [f"--address={address}", '--resources={"node_b": 1000}'], temp_dir)
        yield RayCluster(address=address, temp_dir=temp_dir, ray=ray)
    finally:
        stop_cluster(ray, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_cluster(ray: Path, temp_dir: Path) -> None:
    """`ray stop --force` for this cluster's processes only: its temp dir's."""
    subprocess.run(
        [str(ray), "stop", "--force"],
        timeout=60,
        capture_output=True,
        env={**os.environ, "RAY_TMPDIR": str(temp_dir)},
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
