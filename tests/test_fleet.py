"""`memorywall fleet`: the spec, and a real fleet of worker processes (with smg if installed)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from polling import block_until

from memorywall import ready
from memorywall.cli import main
from memorywall.client import Client
from memorywall.errors import ConfigError
from memorywall.fleet import runner as fleet
from memorywall.fleet import spec as fleet_spec

ROOT = Path(__file__).resolve().parent.parent
WORKER = {"name": "a", "hardware": "wse-3", "model": "llama-3.1-8b"}


def _spec(*workers: dict, **top: object) -> dict:
    return {"worker": list(workers), **top}


def test_good_spec_parses_with_defaults():
    spec = fleet_spec.parse_spec(
        _spec(
            WORKER,
            {**WORKER, "name": "b", "devices": 2, "port": 5000, "http_port": 0},
            gateway={"policy": "round_robin", "port": 0},
        )
    )
    a, b = spec.workers
    assert (a.name, a.devices, a.port, a.http_port) == ("a", None, 0, None)
    assert (b.devices, b.port, b.http_port) == (2, 5000, 0)
    assert spec.gateway == fleet_spec.GatewaySpec("round_robin", 0)
    assert fleet_spec.parse_spec(_spec(WORKER)).gateway is None
    assert fleet_spec.parse_spec(_spec(WORKER, gateway={})).gateway == fleet_spec.GatewaySpec()


def test_example_spec_is_valid():
    spec = fleet_spec.load_spec(ROOT / "examples" / "fleet.toml")
    assert [w.hardware for w in spec.workers] == ["h100-sxm", "h100-sxm", "wse-3"]
    assert spec.gateway is not None and spec.gateway.policy == "power_of_two"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({}, "worker"),
        ({"worker": []}, "worker"),
        (_spec(WORKER, extra=1), "extra"),
        (_spec("x"), "worker[0]"),
        (_spec({**WORKER, "colour": "red"}), "worker[0].colour"),
        (_spec({k: v for k, v in WORKER.items() if k != "name"}), "worker[0].name"),
        (_spec({k: v for k, v in WORKER.items() if k != "hardware"}), "worker[0].hardware"),
        (_spec({k: v for k, v in WORKER.items() if k != "model"}), "worker[0].model"),
        (_spec({**WORKER, "name": ""}), "worker[0].name"),
        (_spec({**WORKER, "name": "../x"}), "worker[0].name"),
        (_spec({**WORKER, "name": "gateway"}), "worker[0].name"),
        (_spec(WORKER, WORKER), "worker[1].name"),
        (_spec({**WORKER, "hardware": "abacus"}), "worker[0].hardware"),
        (_spec({**WORKER, "hardware": 3}), "worker[0].hardware"),
        (_spec({**WORKER, "model": "gpt-9"}), "worker[0].model"),
        (_spec({**WORKER, "devices": 0}), "worker[0].devices"),
        (_spec({**WORKER, "devices": "2"}), "worker[0].devices"),
        (_spec({**WORKER, "devices": True}), "worker[0].devices"),
        (_spec({**WORKER, "port": -1}), "worker[0].port"),
        (_spec({**WORKER, "port": 70000}), "worker[0].port"),
        (_spec({**WORKER, "port": "50051"}), "worker[0].port"),
        (_spec({**WORKER, "http_port": 1.5}), "worker[0].http_port"),
        (_spec({**WORKER, "port": 5000}, {**WORKER, "name": "b", "port": 5000}), "worker[1].port"),
        (_spec({**WORKER, "port": 5000, "http_port": 5000}), "worker[0].http_port"),
        (_spec(WORKER, gateway="smg"), "gateway"),
        (_spec(WORKER, gateway={"policy": "fastest"}), "gateway.policy"),
        (_spec(WORKER, gateway={"policy": "power_of_two"}), "gateway.policy"),
        (_spec(WORKER, gateway={"port": 1e3}), "gateway.port"),
        (_spec({**WORKER, "port": 5000}, gateway={"port": 5000}), "gateway.port"),
        (_spec(WORKER, gateway={"host": "0.0.0.0"}), "gateway.host"),
    ],
)
def test_bad_spec_names_the_field(data, field):
    with pytest.raises(ConfigError) as e:
        fleet_spec.parse_spec(data, "f.toml")
    message = str(e.value)
    assert message.startswith(f"f.toml: {field}") and "\n" not in message


def test_cli_bad_spec_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "f.toml"
    path.write_text('[[worker]]\nname = "a"\nhardware = "wse-3"\n')
    assert main(["fleet", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"memorywall: error: {path}: worker[0].model: missing\n"
    path.write_text("[[worker]\n")
    assert main(["fleet", str(path)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["fleet", str(tmp_path / "missing.toml")]) == 2


def test_gateway_without_smg_is_skipped(tmp_path, monkeypatch):
    """With smg missing the gateway is skipped in one line; a stop before start exits 0."""
    monkeypatch.setattr(fleet, "find_smg", lambda: None)
    spec = fleet_spec.parse_spec(_spec(WORKER, gateway={"policy": "round_robin"}))
    stop = threading.Event()
    stop.set()
    out = io.StringIO()
    assert fleet.Fleet(spec, tmp_path, out=out, stop=stop).run() == 0
    lines = out.getvalue().splitlines()
    skipped = [line for line in lines if line.startswith("gateway skipped")]
    assert skipped == [
        "gateway skipped: smg is not installed (pip install 'memorywall[gateway]'); "
        "running the workers only"
    ]


def test_a_child_that_dies_stops_the_fleet(tmp_path):
    """A worker whose port is taken exits at once: reported, exit 1. (A deployment that
    cannot fit is refused earlier, when the spec is read.)"""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        spec = fleet_spec.parse_spec(_spec(WORKER, {**WORKER, "name": "tiny", "port": port}))
        out = io.StringIO()
        f = fleet.Fleet(spec, tmp_path, out=out, startup_timeout_s=60)
        assert f.run() == 1
    assert "tiny exited early (status 2)" in out.getvalue()
    assert "memorywall: error:" in out.getvalue()  # the last lines of its log
    assert all(c.proc.poll() is not None for c in f.children)


class _Running:
    """`memorywall fleet SPEC --ready-file F` as a subprocess; its stdout goes to a file."""

    def __init__(self, spec: str, log_dir: Path) -> None:
        path = log_dir.parent / "fleet.toml"
        path.write_text(spec)
        self.ready_file = log_dir.parent / "fleet.ready.json"
        self.stdout = log_dir.parent / "fleet.out"
        cmd = [sys.executable, "-m", "memorywall", "fleet", str(path), "--log-dir", str(log_dir)]
        cmd += ["--ready-file", str(self.ready_file)]
        with self.stdout.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def up(self, timeout_s: float = 90) -> fleet.FleetReady:
        """The fleet's ready file; fails the test, with the fleet's output, if it never comes."""
        try:
            data = ready.wait_for(self.ready_file, self.proc, timeout_s=timeout_s)
        except ready.ReadyError as e:
            pytest.fail(f"fleet not up ({e}):\n{self.stdout.read_text()}")
        return fleet.FleetReady.from_dict(data)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is gone too: it runs nothing.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def _wait_gone(pids: list[int], timeout_s: float = 10) -> None:
    block_until(lambda: all(_gone(p) for p in pids), timeout_s, every_s=0.05, why=lambda: pids)


_TWO_WORKERS = """
[[worker]]
name = "one"
hardware = "wse-3"
model = "llama-3.1-8b"
port = 0

[[worker]]
name = "two"
hardware = "wse-3"
model = "llama-3.1-8b"
port = 0
http_port = 0
"""


def test_fleet_serves_and_sigint_stops_every_child(tmp_path):
    log_dir = tmp_path / "logs"
    running = _Running(_TWO_WORKERS, log_dir)
    try:
        up = running.up()
        assert up.pid == running.proc.pid and up.gateway is None
        assert list(up.workers) == ["one", "two"]
        one, two = up.workers["one"], up.workers["two"]
        assert one.http_url is None and two.http_url.startswith("http://127.0.0.1:")
        for w in (one, two):
            with Client(w.grpc_target) as client:
                info = client.model_info(timeout_s=10)
            assert (info.model, info.hardware, info.devices) == ("llama-3.1-8b", "wse-3", 1)
            assert w.devices == 1 and (w.tensor_parallel, w.pipeline_parallel) == (1, 1)
            assert w.kv_capacity_tokens > 0 and w.max_num_seqs == 256
        with urllib.request.urlopen(f"{two.http_url}/v1/models", timeout=10) as r:
            assert json.load(r)["data"][0]["id"] == "llama-3.1-8b"
        table = running.stdout.read_text()
        assert f"{one.grpc_target}  -" in table and two.http_url in table
        logs = sorted(p.name for p in log_dir.iterdir())
        assert logs == ["one.log", "one.ready.json", "two.log", "two.ready.json"]
    finally:
        code = running.stop()
    assert code == 0
    pids = [w.pid for w in up.workers.values()]
    _wait_gone(pids)
    assert "stopped" in (log_dir / "one.log").read_text()
    # Every ready file goes with its process.
    assert sorted(p.name for p in log_dir.iterdir()) == ["one.log", "two.log"]
    assert not running.ready_file.exists()


def test_end_to_end_through_the_smg_gateway(tmp_path):
    """With smg installed (as in CI) a gateway that does not start fails this test."""
    if fleet.find_smg() is None:
        pytest.skip("smg is not installed (pip install 'memorywall[gateway]')")
    log_dir = tmp_path / "logs"
    running = _Running(_TWO_WORKERS + '\n[gateway]\npolicy = "round_robin"\nport = 0\n', log_dir)
    try:
        up = running.up()
        assert up.gateway is not None, running.stdout.read_text()
        assert up.gateway.policy == "round_robin"
        body = json.dumps(
            {
                "model": "llama-3.1-8b",
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 8,
            }
        ).encode()
        # The fleet is up only once smg has answered a request: no retry needed here.
        req = urllib.request.Request(
            f"{up.gateway.url}/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            reply = json.load(r)
        assert reply["usage"]["completion_tokens"] >= 1
        assert reply["choices"][0]["message"]["content"]
    finally:
        assert running.stop() == 0
    _wait_gone([up.gateway.pid, *(w.pid for w in up.workers.values())])


def test_in_background_serves_for_the_block_and_stops_after():
    spec = fleet_spec.FleetSpec(workers=(fleet_spec.WorkerSpec(**WORKER, http_port=0),))
    with fleet.in_background(spec, start_timeout_s=60) as up:
        worker = up.workers["a"]
        with urllib.request.urlopen(f"{worker.http_url}/health", timeout=10) as r:
            assert r.status == 200
        pid = worker.pid
    block_until(lambda: not _alive(pid), 30, every_s=0.05)


def test_in_background_raises_with_the_fleets_output_when_a_worker_fails():
    bad = fleet_spec.FleetSpec(workers=(fleet_spec.WorkerSpec(**{**WORKER, "hardware": "nope"}),))
    with pytest.raises(RuntimeError, match="unknown hardware"), fleet.in_background(bad):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
