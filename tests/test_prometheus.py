"""A real Prometheus (Debian's `prometheus`) scrapes a fleet from the config that
`memorywall fleet --prometheus-config` writes for examples/fleet-telemetry.toml: a wafer
and a GPU worker, each with its emulated DCGM port. PromQL over Prometheus's HTTP API
returns the workers' series and the DCGM series, labelled by worker and hardware, and
every expression of the Grafana dashboard evaluates there. Loopback only; everything
started here is stopped here."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from binaries import need
from polling import block_until

from benchmarks._prometheus import Prometheus
from memorywall import ready
from memorywall.client import Client
from memorywall.fleet.runner import FleetReady
from memorywall.telemetry import grafana

# A wafer and a GPU worker, each with its HTTP front (/metrics) and its DCGM port.
SPEC = Path(__file__).resolve().parent.parent / "examples" / "fleet-telemetry.toml"
HARDWARE = {"wse3": "wse-3", "h100": "h100-sxm"}
START_TIMEOUT_S = 60.0
# Prometheus hands new targets to its scrapers every 5 s; then one scrape a second.
SCRAPED_WITHIN_S = 20.0
# The dashboard's variables: every worker, and a rate window the whole test fits in.
VARIABLES = {"$worker": ".*", "$hardware": ".*", "$__rate_interval": "1m"}


def _by_worker(series: list[dict]) -> dict[str, dict]:
    return {s["metric"].get("worker", ""): s for s in series}


def _start_fleet(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    ready_file, config = tmp_path / "fleet.ready.json", tmp_path / "prometheus.yml"
    cmd = [sys.executable, "-m", "memorywall", "fleet", str(SPEC)]
    cmd += ["--log-dir", str(tmp_path / "logs"), "--ready-file", str(ready_file)]
    cmd += ["--prometheus-config", str(config), "--scrape-interval", "1"]
    with (tmp_path / "fleet.out").open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    return proc, ready_file, config


def _stop_fleet(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_a_real_prometheus_scrapes_the_workers_and_their_dcgm_ports(tmp_path):
    binary = need("prometheus", "prometheus")
    fleet, ready_file, config = _start_fleet(tmp_path)
    server = None
    try:
        try:
            data = ready.wait_for(ready_file, fleet, timeout_s=START_TIMEOUT_S)
        except ready.ReadyError as e:
            pytest.fail(f"fleet not up ({e}):\n{(tmp_path / 'fleet.out').read_text()}")
        up = FleetReady.from_dict(data)
        # The fleet writes the config right after its ready file.
        block_until(config.exists, 10)
        server = Prometheus(binary, config, tmp_path)
        block_until(server.ready, 15, every_s=0.1)

        def all_up() -> bool:
            series = server.query("up == 1")
            return {(s["metric"]["job"], s["metric"]["worker"]) for s in series} == {
                (job, w) for job in ("memorywall", "memorywall-dcgm") for w in HARDWARE
            }

        block_until(all_up, SCRAPED_WITHIN_S, every_s=0.2, why=lambda: server.query("up"))
        for w in up.workers.values():
            assert w.grpc_target is not None
            with Client(w.grpc_target) as client:
                for i in range(3):
                    client.complete(prompt_tokens=64 + i, max_tokens=16, ignore_eos=True)
        # A scrape after the load, on both ports of both workers.
        for expr in (
            "vllm:generation_tokens_total > 0",
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION > 0",
        ):
            block_until(
                lambda e=expr: set(_by_worker(server.query(e))) == set(HARDWARE),
                SCRAPED_WITHIN_S,
                every_s=0.2,
                why=lambda e=expr: server.query(e),
            )

        running = _by_worker(server.query("vllm:num_requests_running"))
        power = _by_worker(server.query("DCGM_FI_DEV_POWER_USAGE"))
        for worker, hardware in HARDWARE.items():
            labels = running[worker]["metric"]
            assert (labels["job"], labels["hardware"]) == ("memorywall", hardware)
            assert labels["model_name"] == "llama-3.1-8b"
            labels = power[worker]["metric"]
            assert (labels["job"], labels["hardware"], labels["modelName"]) == (
                "memorywall-dcgm",
                hardware,
                hardware,
            )
            assert labels["memorywall"] == "emulated" and labels["gpu"] == "0"
            assert float(power[worker]["value"][1]) > 0

        # Every dashboard expression is valid PromQL to a real Prometheus, and the energy per
        # token, from the DCGM counters over the tokens, is there for both workers.
        energy_per_token = 0
        for expr in grafana.expressions(grafana.dashboard()):
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            result = server.query(expr)
            if expr.startswith("sum by (worker, hardware) (rate(DCGM_FI_DEV_TOTAL_ENERGY"):
                per_token = {w: float(s["value"][1]) for w, s in _by_worker(result).items()}
                assert set(per_token) == set(HARDWARE)
                assert all(math.isfinite(j) and j > 0 for j in per_token.values()), per_token
                energy_per_token += 1
        assert energy_per_token == 1
    finally:
        if server is not None:
            server.stop()
        code = _stop_fleet(fleet)
    assert code == 0
    assert server.proc.returncode is not None
