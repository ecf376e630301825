"""`memorywall dashboard`, `serve --dashboard` and `demo --dashboard` options: every bad value
or combination is one line and exit 2; worker URLs and fleet ready files become targets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memorywall.cli import main
from memorywall.dashboard.sources import Target, described, target_from_url, targets_from_fleet
from memorywall.errors import ConfigError

SERVE = ["serve", "--hardware", "wse-3", "--model", "llama-3.1-8b"]


def fleet_file(tmp_path: Path, workers: list[dict]) -> Path:
    path = tmp_path / "fleet.ready.json"
    path.write_text(json.dumps({"pid": 1, "log_dir": "x", "workers": workers, "gateway": None}))
    return path


def worker_entry(name: str, hardware: str, http_port: int | None = 8000) -> dict:
    return {
        "name": name,
        "pid": 2,
        "host": "127.0.0.1",
        "grpc_port": 5000,
        "http_port": http_port,
        "metrics_port": None,
        "hardware": hardware,
        "model": "llama-3.1-8b",
        "devices": 4,
        "tensor_parallel": 4,
        "pipeline_parallel": 1,
        "deployment": "d",
        "max_num_seqs": 256,
        "max_num_batched_tokens": 8192,
        "kv_capacity_tokens": 1000,
        "predicted_tokens_per_s_per_user": 100.0,
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dashboard"], "name the workers to watch"),
        (["dashboard", "--worker", "localhost:8000"], "--worker: expected http(s)://host:port"),
        (["dashboard", "--worker", "http://h:99999"], "--worker: bad port"),
        (["dashboard", "--worker", "http://h:1/v1"], "--worker: expected a base URL or"),
        (
            ["dashboard", "--worker", "http://h:1", "--worker", "http://h:1/metrics"],
            "--worker: h:1 named twice",
        ),
        (["dashboard", "--worker", "http://h:1", "--interval", "0"], "--interval"),
        (["dashboard", "--worker", "http://h:1", "--port", "70000"], "--port"),
        (
            ["dashboard", "--worker", "http://h:1", "--interval", "2", "--window", "1"],
            "--window (1 s) must cover at least one --interval (2 s)",
        ),
        (["dashboard", "--fleet", "/nonexistent/fleet.json"], "--fleet: cannot read"),
        ([*SERVE, "--dashboard"], "--dashboard: it is served on the HTTP front; add --http-port"),
        (
            [*SERVE, "--dashboard", "--http-port", "0", "--api-servers", "2"],
            "--dashboard needs a single process",
        ),
    ],
)
def test_bad_options_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("memorywall: error: ")
    assert message in err
    assert err.count("\n") == 1


def test_a_dashboard_port_in_use_is_one_line_and_exit_2(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", "--worker", "http://127.0.0.1:1", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"memorywall: error: cannot serve the dashboard on 127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("url", "name", "metrics", "models"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000", "/metrics", "/v1/models"),
        ("http://127.0.0.1:8000/", "127.0.0.1:8000", "/metrics", "/v1/models"),
        ("https://w:9100/metrics", "w:9100", "/metrics", "/v1/models"),
    ],
)
def test_worker_urls(url, name, metrics, models):
    t = target_from_url(url)
    base = url.split("/metrics")[0].rstrip("/")
    assert t == Target(name=name, metrics_url=base + metrics, models_url=base + models)


def test_fleet_ready_file_gives_each_worker_with_its_hardware(tmp_path):
    path = fleet_file(tmp_path, [worker_entry("wafer", "wse-3"), worker_entry("gpu", "h100-sxm")])
    targets = targets_from_fleet(path)
    assert [(t.name, t.hardware, t.devices) for t in targets] == [
        ("wafer", "wse-3", 4),
        ("gpu", "h100-sxm", 4),
    ]
    assert targets[0].metrics_url == "http://127.0.0.1:8000/metrics"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "is not JSON"),
        ('{"workers": []}', "lists no workers"),
        ('{"workers": [{"name": "a"}]}', "a: missing"),
        (None, "worker a serves no /metrics"),
    ],
)
def test_bad_fleet_ready_files(tmp_path, content, message):
    if content is None:
        path = fleet_file(tmp_path, [worker_entry("a", "wse-3", http_port=None)])
    else:
        path = tmp_path / "f.json"
        path.write_text(content)
    with pytest.raises(ConfigError, match=r"^--fleet: ") as e:
        targets_from_fleet(path)
    assert message in str(e.value)


def test_the_cli_startup_path_loads_neither_grpc_nor_the_dashboard():
    code = (
        "import sys; from memorywall.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('grpc', 'memorywall.dashboard') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "grpc" not in out.stdout
    assert "memorywall.dashboard" not in out.stdout


def test_v1_models_names_the_hardware():
    t = Target(name="w")
    body = {"data": [{"id": "llama-3.1-8b", "hardware": "wse-3", "devices": 2}]}
    assert described(t, body) == Target(name="w", hardware="wse-3", model="llama-3.1-8b", devices=2)


@pytest.mark.parametrize(
    "body",
    [None, [], {"data": []}, {"data": ["x"]}, {"data": [{"hardware": 3, "devices": "two"}]}],
)
def test_a_v1_models_body_without_the_fields_changes_nothing(body):
    t = Target(name="w", hardware="h100-sxm", devices=1)
    assert described(t, body) == t
