"""`memorywall fleet SPEC --ray`: workers as actors on both nodes of the test cluster,
served through smg, stopped by SIGINT with nothing left; a node lost mid-run."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from polling import block_until
from raynodes import RayCluster, processes

from memorywall import ready
from memorywall.client import Client
from memorywall.cluster.fleet import RayFleet
from memorywall.cluster.pools import connected
from memorywall.fleet import runner as fleet
from memorywall.fleet.spec import parse_spec

WORKER = 'hardware = "wse-3"\nmodel = "llama-3.1-8b"\nport = 0\n'
START_S = 240  # four servers and smg on a shared two-core host


class _Fleet:
    """`memorywall fleet SPEC --ray ADDRESS --ready-file F`, its output in a file."""

    def __init__(self, spec: str, tmp: Path, address: str) -> None:
        path = tmp / "fleet.toml"
        path.write_text(spec)
        self.log_dir, self.ready_file, self.out = tmp / "logs", tmp / "ready.json", tmp / "out"
        cmd = [sys.executable, "-m", "memorywall", "fleet", str(path), "--ray", address]
        cmd += ["--log-dir", str(self.log_dir), "--ready-file", str(self.ready_file)]
        with self.out.open("wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)

    def up(self) -> dict:
        try:
            return ready.wait_for(self.ready_file, self.proc, timeout_s=START_S)
        except ready.ReadyError as e:
            pytest.fail(f"fleet not up ({e}):\n{self.out.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def servers(self) -> list[int]:
        """`memorywall serve` processes of this fleet still running (not zombies)."""
        mark = str(self.log_dir)
        return [
            pid
            for pid, (_, args) in processes().items()
            if " serve " in args and mark in args and not _zombie(pid)
        ]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _chat(url: str) -> dict:
    body = json.dumps(
        {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    ).encode()
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.load(r)


def test_four_workers_over_both_nodes_serve_through_smg(ray_cluster: RayCluster, tmp_path):
    if fleet.find_smg() is None:
        pytest.skip("smg is not installed (pip install 'memorywall[gateway]')")
    spec = "".join(
        f'[[worker]]\nname = "{name}"\n{WORKER}{pin}\n'
        for name, pin in [
            ("spread-1", ""),
            ("spread-2", ""),
            ("on-a", 'node = "node_a"\n'),
            ("on-b", 'node = "node_b"\n'),
        ]
    )
    running = _Fleet(
        spec + '[gateway]\npolicy = "round_robin"\nport = 0\n', tmp_path, ray_cluster.address
    )
    try:
        doc = running.up()
        nodes = {w["name"]: w["node"] for w in doc["workers"]}
        assert nodes["on-a"] != nodes["on-b"], nodes  # two nodes, each pin on its own
        assert {nodes["spread-1"], nodes["spread-2"]} <= {nodes["on-a"], nodes["on-b"]}
        # Each server binds its node's address (the one the node joined with): one per node.
        hosts = {(w["node"], w["host"]) for w in doc["workers"]}
        assert len(hosts) == len({w["node"] for w in doc["workers"]}), hosts
        for _ in range(4):  # round robin: each worker once
            reply = _chat(doc["gateway"]["url"])
            assert reply["usage"]["completion_tokens"] >= 1
        assert len(running.servers()) == 4
    finally:
        code = running.stop()
    assert code == 0, running.out.read_text()
    block_until(lambda: not running.servers(), 30, every_s=0.2, why=running.servers)


def test_a_lost_node_marks_its_workers_dead(ray_cluster: RayCluster, tmp_path):
    spec = "".join(
        f'[[worker]]\nname = "{name}"\n{WORKER}node = "{node}"\n\n'
        for name, node in [("a", "node_a"), ("b", "node_b")]
    )
    running = _Fleet(spec, tmp_path, ray_cluster.address)
    try:
        doc = running.up()
        assert [w.get("alive", True) for w in doc["workers"]] == [True, True]
        b_pid, b_node = next((w["pid"], w["node"]) for w in doc["workers"] if w["name"] == "b")
        ray_cluster.kill_node_b()
        block_until(
            lambda: "b is dead" in running.out.read_text(),
            60,
            every_s=0.2,
            why=running.out.read_text,
        )
        assert running.proc.poll() is None  # the fleet goes on with a
        after = json.loads(running.ready_file.read_text())
        assert {w["name"]: w.get("alive", True) for w in after["workers"]} == {
            "a": True,
            "b": False,
        }
        # b's server went with its actor (the kernel's SIGTERM when its keeper died).
        block_until(lambda: _zombie(b_pid), 30, every_s=0.2)
        # The cluster's health checks then find the node dead, and the fleet says so.
        block_until(
            lambda: f"node {b_node} is lost (its workers: b)" in running.out.read_text(),
            120,
            every_s=0.5,
            why=running.out.read_text,
        )
    finally:
        code = running.stop()
        ray_cluster.restart_node_b()
    assert code == 0, running.out.read_text()
    block_until(lambda: not running.servers(), 30, every_s=0.2, why=running.servers)


def test_faults_go_through_the_actors(ray_cluster: RayCluster, tmp_path):
    spec = "".join(
        f'[[worker]]\nname = "{name}"\n{WORKER}node = "{node}"\n\n'
        for name, node in [("a", "node_a"), ("b", "node_b")]
    )
    spec += '[[fault]]\nworker = "a"\nat_s = 0\naction = "pause"\nfor_s = 1\n\n'
    spec += '[[fault]]\nworker = "b"\nat_s = 0.5\naction = "kill"\n'
    running = _Fleet(spec, tmp_path, ray_cluster.address)
    try:
        doc = running.up()
        pids = {w["name"]: w["pid"] for w in doc["workers"]}
        log = running.log_dir / "faults.jsonl"

        def actions() -> list[tuple[str, str, int]]:
            lines = log.read_text().splitlines() if log.exists() else []
            return [(d["worker"], d["action"], d["pid"]) for d in map(json.loads, lines)]

        block_until(lambda: len(actions()) == 3, 60, every_s=0.2, why=actions)
        assert actions() == [
            ("a", "pause", pids["a"]),
            ("b", "kill", pids["b"]),
            ("a", "resume", pids["a"]),
        ]
        block_until(lambda: _zombie(pids["b"]), 30, every_s=0.2)
        assert running.proc.poll() is None  # a planned kill: the fleet goes on
        assert pids["a"] in running.servers()
    finally:
        code = running.stop()
    assert code == 0, running.out.read_text()
    block_until(lambda: not running.servers(), 30, every_s=0.2, why=running.servers)


def test_a_worker_no_node_can_take_is_reported(ray_cluster: RayCluster, tmp_path):
    spec = parse_spec(
        {"worker": [{"name": "a", "hardware": "wse-3", "model": "llama-3.1-8b", "node": "node_z"}]}
    )
    out = io.StringIO()
    with connected(ray_cluster.address) as ray:
        fleet = RayFleet(spec, tmp_path / "logs", ray=ray, out=out, startup_timeout_s=2)
        assert fleet.run() == 1
    assert (
        "a not started within 4 s on the cluster (a wants a node with resource 'node_z')"
        in out.getvalue()
    )


def test_twenty_workers_spread_over_both_nodes_start_and_serve(ray_cluster: RayCluster, tmp_path):
    """The issue's 20-40 worker fleet, at its low end: function, not timing (`ray start`s
    a few seconds, then ~15 s for 20 servers on this 2-core host; 40 took 46 s)."""
    spec = "".join(f'[[worker]]\nname = "w{i:02d}"\n{WORKER}\n' for i in range(20))
    running = _Fleet(spec, tmp_path, ray_cluster.address)
    try:
        doc = running.up()
        assert len({w["node"] for w in doc["workers"]}) == 2  # spread over both nodes
        for w in doc["workers"]:
            with Client(w["grpc_target"]) as client:
                assert client.model_info(timeout_s=30).model == "llama-3.1-8b"
    finally:
        code = running.stop()
    assert code == 0, running.out.read_text()
    block_until(lambda: not running.servers(), 60, every_s=0.2, why=running.servers)
