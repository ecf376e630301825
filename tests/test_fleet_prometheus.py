"""`memorywall fleet --prometheus-config`: the scrape config from ready files, as text, as
promtool checks it, and through the CLI (its errors one line, exit 2)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from binaries import need
from polling import block_until

from memorywall import ready
from memorywall.cli import main
from memorywall.errors import ConfigError
from memorywall.fleet import prometheus
from memorywall.fleet.runner import FleetReady, GatewayReady
from memorywall.fleet.spec import load_spec
from memorywall.ready import ServerReady

ROOT = Path(__file__).resolve().parent.parent


def _ready(**over: object) -> ServerReady:
    base = {
        "pid": 10,
        "host": "127.0.0.1",
        "grpc_port": 5000,
        "http_port": None,
        "metrics_port": None,
        "hardware": "wse-3",
        "model": "llama-3.1-8b",
        "devices": 1,
        "tensor_parallel": 1,
        "pipeline_parallel": 1,
        "deployment": "tp1",
        "max_num_seqs": 256,
        "max_num_batched_tokens": 8192,
        "kv_capacity_tokens": 179_000,
        "predicted_tokens_per_s_per_user": 1700.0,
    }
    return ServerReady(**{**base, **over})  # type: ignore[arg-type]


WORKERS = {
    "wafer": _ready(http_port=8001, dcgm_port=9401),
    "gpu": _ready(hardware="h100-sxm", metrics_port=8002, role="decode"),
    "quiet": _ready(),  # gRPC only: nothing to scrape
}

EXPECTED = """\
# Prometheus scrape config for memorywall workers (spec.toml).
# Written by `memorywall fleet --prometheus-config`; the Grafana dashboard
# (`memorywall grafana-dashboard`) reads the worker and hardware labels.
# quiet: no metrics port (give it http_port or metrics_port)
global:
  scrape_interval: "2.5s"
  evaluation_interval: "2.5s"
scrape_configs:
  - job_name: "memorywall"
    scrape_interval: "2.5s"
    scrape_timeout: "2.5s"
    metrics_path: "/metrics"
    scheme: "http"
    static_configs:
      - targets:
          - "127.0.0.1:8001"
        labels:
          worker: "wafer"
          hardware: "wse-3"
          model: "llama-3.1-8b"
          role: "both"
      - targets:
          - "127.0.0.1:8002"
        labels:
          worker: "gpu"
          hardware: "h100-sxm"
          model: "llama-3.1-8b"
          role: "decode"
  - job_name: "memorywall-dcgm"
    scrape_interval: "2.5s"
    scrape_timeout: "2.5s"
    metrics_path: "/metrics"
    scheme: "http"
    static_configs:
      - targets:
          - "127.0.0.1:9401"
        labels:
          worker: "wafer"
          hardware: "wse-3"
          model: "llama-3.1-8b"
          role: "both"
  - job_name: "smg"
    scrape_interval: "2.5s"
    scrape_timeout: "2.5s"
    metrics_path: "/metrics"
    scheme: "http"
    static_configs:
      - targets:
          - "127.0.0.1:29000"
        labels:
          worker: "gateway"
"""


def test_config_has_a_job_per_kind_of_port_and_labels_per_worker(tmp_path):
    scrape = prometheus.Scrape(WORKERS, "http://127.0.0.1:29000/metrics")
    path = tmp_path / "prometheus.yml"
    prometheus.write(path, scrape, interval_s=2.5, source="spec.toml")
    assert path.read_text() == EXPECTED


def test_tls_workers_are_scraped_over_https_with_the_fleets_ca(tmp_path):
    workers = {"a": _ready(http_port=8001, dcgm_port=9401, tls=True)}
    ca = tmp_path / "ca.pem"
    config = prometheus.scrape_config(prometheus.Scrape(workers, ca_file=ca))
    for job in config["scrape_configs"]:
        assert job["scheme"] == "https" and job["tls_config"] == {"ca_file": str(ca)}
    # Without the CA (a ready file names none), the file says what to add.
    prometheus.write(tmp_path / "p.yml", prometheus.Scrape(workers))
    assert (
        "# a: serves TLS; add tls_config (ca_file) to its jobs" in (tmp_path / "p.yml").read_text()
    )


def test_a_fleet_with_nothing_to_scrape_is_refused():
    with pytest.raises(ConfigError, match="no worker serves metrics"):
        prometheus.scrape_config(prometheus.Scrape({"quiet": _ready()}))


def test_promtool_accepts_the_config(tmp_path):
    promtool = need("promtool", "prometheus")
    path = tmp_path / "prometheus.yml"
    scrape = prometheus.Scrape(WORKERS, "http://127.0.0.1:29000/metrics", tmp_path / "ca.pem")
    prometheus.write(path, scrape)
    done = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def _fleet_ready_file(tmp_path: Path) -> Path:
    gateway = GatewayReady(
        url="http://127.0.0.1:30000",
        policy="round_robin",
        pid=12,
        metrics_url="http://127.0.0.1:29000/metrics",
    )
    ready = FleetReady(pid=11, log_dir=str(tmp_path), workers=WORKERS, gateway=gateway)
    path = tmp_path / "fleet.ready.json"
    path.write_text(json.dumps(ready.as_dict()))
    return path


def test_cli_writes_the_config_from_a_fleets_ready_file(tmp_path, capsys):
    ready = _fleet_ready_file(tmp_path)
    out = tmp_path / "prometheus.yml"
    argv = ["fleet", "--from-ready", str(ready), "--prometheus-config", str(out)]
    assert main([*argv, "--scrape-interval", "2.5"]) == 0
    assert capsys.readouterr().out == f"prometheus config: {out} (3 workers)\n"
    expected = EXPECTED.replace("(spec.toml)", f"({ready})")
    assert out.read_text() == expected


def test_cli_takes_one_servers_ready_file_named_by_its_stem(tmp_path):
    ready = tmp_path / "wafer-1.ready.json"
    ready.write_text(json.dumps(_ready(http_port=8001, dcgm_port=9401).as_dict()))
    out = tmp_path / "prometheus.yml"
    assert main(["fleet", "--from-ready", str(ready), "--prometheus-config", str(out)]) == 0
    text = out.read_text()
    assert text.count('worker: "wafer-1"') == 2 and 'scrape_interval: "5s"' in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give a fleet spec (.toml), or --from-ready READY --prometheus-config FILE"),
        (["--from-ready", "{ready}"], "--from-ready: needs --prometheus-config FILE"),
        (
            ["spec.toml", "--from-ready", "{ready}", "--prometheus-config", "p.yml"],
            "--from-ready: give a fleet spec or --from-ready, not both",
        ),
        (["spec.toml", "--scrape-interval", "2"], "--scrape-interval: only with"),
        (
            ["spec.toml", "--render-kubernetes", "k8s", "--prometheus-config", "p.yml"],
            "--render-kubernetes: not with --prometheus-config or --from-ready",
        ),
        (["--scrape-interval", "0"], "argument --scrape-interval: must be > 0, got 0"),
        (["--scrape-interval", "soon"], "argument --scrape-interval: expected a number"),
        (["--from-ready", "{missing}", "--prometheus-config", "p.yml"], "cannot read"),
        (["--from-ready", "{bad}", "--prometheus-config", "p.yml"], "missing pid"),
        (["--from-ready", "{quiet}", "--prometheus-config", "p.yml"], "no worker serves metrics"),
        (
            ["--from-ready", "{ready}", "--prometheus-config", "{tmp}/no/such/dir/p.yml"],
            "--prometheus-config: no such folder",
        ),
        (
            ["spec.toml", "--prometheus-config", "{tmp}/no/such/dir/p.yml"],
            "--prometheus-config: no such folder",
        ),
        (
            ["--from-ready", "{ready}", "--prometheus-config", "{tmp}"],
            "--prometheus-config: cannot write",
        ),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text('{"host": "127.0.0.1"}')
    (tmp_path / "quiet.json").write_text(json.dumps(_ready().as_dict()))
    names = {
        "ready": str(_fleet_ready_file(tmp_path)),
        "missing": str(tmp_path / "missing.json"),
        "bad": str(tmp_path / "bad.json"),
        "quiet": str(tmp_path / "quiet.json"),
        "tmp": str(tmp_path),
    }
    assert main(["fleet", *(a.format(**names) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memorywall: error: ") and err.count("\n") == 1
    assert message in err
    assert not (tmp_path / "p.yml").exists()


def test_cli_refuses_a_spec_whose_workers_serve_no_metrics(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text('[[worker]]\nname = "a"\nhardware = "wse-3"\nmodel = "llama-3.1-8b"\n')
    assert main(["fleet", str(spec), "--prometheus-config", str(tmp_path / "p.yml")]) == 2
    assert "--prometheus-config: no worker serves metrics" in capsys.readouterr().err


def test_example_spec_serves_metrics_and_dcgm_on_every_worker():
    spec = load_spec(ROOT / "examples" / "fleet-telemetry.toml")
    assert [w.hardware for w in spec.workers] == ["wse-3", "h100-sxm"]
    assert all(w.get("http_port") == 0 and w.get("dcgm_port") == 0 for w in spec.workers)


def test_fleet_writes_the_config_once_it_is_up(tmp_path):
    """`memorywall fleet SPEC --prometheus-config F`: the ports the workers took, from their
    ready files; the file stays after the fleet stops."""
    spec = tmp_path / "fleet.toml"
    spec.write_text(
        '[[worker]]\nname = "w"\nhardware = "wse-3"\nmodel = "llama-3.1-8b"\n'
        "http_port = 0\ndcgm_port = 0\n"
    )
    ready_file, config = tmp_path / "fleet.ready.json", tmp_path / "prometheus.yml"
    cmd = [sys.executable, "-m", "memorywall", "fleet", str(spec), "--log-dir", str(tmp_path)]
    cmd += ["--ready-file", str(ready_file), "--prometheus-config", str(config)]
    out = tmp_path / "fleet.out"
    with out.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        try:
            data = ready.wait_for(ready_file, proc, timeout_s=60)
        except ready.ReadyError as e:
            pytest.fail(f"fleet not up ({e}):\n{out.read_text()}")
        block_until(config.exists, 10)
        worker = FleetReady.from_dict(data).workers["w"]
        text = config.read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    assert '  - job_name: "memorywall"\n' in text
    assert f'"127.0.0.1:{worker.http_port}"' in text and f'"127.0.0.1:{worker.dcgm_port}"' in text
    assert f"prometheus config: {config}\n" in out.read_text()
    assert config.exists() and not ready_file.exists()
