"""Ready files: written whole, read back by pid, and `serve --ready-file` end to end."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from memorywall import ready
from memorywall.client import Client

SERVE = [sys.executable, "-m", "memorywall", "serve", "--hardware", "h100-sxm"]
SERVE += ["--model", "llama-3.1-8b", "--port", "0", "--grace", "1"]


def test_write_json_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "r.json"
    ready.write_json(path, {"pid": 1, "a": [1, 2]})
    ready.write_json(path, {"pid": 2})
    assert json.loads(path.read_text()) == {"pid": 2}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_poll_takes_only_the_file_of_its_own_process(tmp_path):
    path = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)  # fmt: skip
    try:
        assert ready.poll(path, proc) is None  # no file yet
        ready.write_json(path, {"pid": proc.pid + 1})  # left by another process
        assert ready.poll(path, proc) is None
        ready.write_json(path, {"pid": proc.pid, "x": 1})
        assert ready.poll(path, proc) == {"pid": proc.pid, "x": 1}
        path.write_text("{half")
        with pytest.raises(ready.ReadyError, match="unreadable"):
            ready.poll(path, proc)
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    path.unlink()
    with pytest.raises(ready.ReadyError, match="exited with status 0"):
        ready.wait_for(path, proc, timeout_s=10)


def test_wait_for_times_out(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)  # fmt: skip
    try:
        with pytest.raises(ready.ReadyError, match=r"not ready within 0\.2 s"):
            ready.wait_for(tmp_path / "r.json", proc, timeout_s=0.2)
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def test_server_ready_rejects_a_file_missing_fields():
    with pytest.raises(ready.ReadyError, match=r"missing .*devices"):
        ready.ServerReady.from_dict({"pid": 1, "host": "x"}, "f")
    with pytest.raises(ready.ReadyError, match="not a JSON object"):
        ready.ServerReady.from_dict([1], "f")


def test_serve_writes_the_ready_file_once_bound_and_removes_it_on_exit(tmp_path):
    path = tmp_path / "serve.ready.json"
    cmd = [*SERVE, "--http-port", "0", "--metrics-port", "0", "--max-num-seqs", "32"]
    proc = subprocess.Popen([*cmd, "--ready-file", str(path)], stderr=subprocess.DEVNULL)
    try:
        data = ready.wait_for(path, proc, timeout_s=60)
        r = ready.ServerReady.from_dict(data)
        assert (r.pid, r.host, r.hardware, r.model) == (proc.pid, "127.0.0.1", "h100-sxm",
                                                        "llama-3.1-8b")  # fmt: skip
        assert (r.devices, r.tensor_parallel, r.pipeline_parallel) == (1, 1, 1)
        assert r.max_num_seqs == 32 and r.max_num_batched_tokens == 8192
        assert r.kv_capacity_tokens > 0 and r.predicted_tokens_per_s_per_user > 0
        assert data["grpc_target"] == r.grpc_target == f"127.0.0.1:{r.grpc_port}"
        assert data["http_url"] == f"http://127.0.0.1:{r.http_port}"
        assert data["metrics_url"] == f"http://127.0.0.1:{r.metrics_port}/metrics"
        assert len({r.grpc_port, r.http_port, r.metrics_port}) == 3
        # Every port in the file is bound and serving when the file appears.
        with Client(r.grpc_target, timeout_s=10) as client:
            info = client.model_info()
        assert info.kv_capacity_tokens == r.kv_capacity_tokens
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert not path.exists()


def test_serve_that_cannot_start_writes_no_ready_file(tmp_path):
    path = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "memorywall", "serve", "--hardware", "h100-sxm"]
    cmd += ["--model", "llama-3.1-70b", "--devices", "1", "--ready-file", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "memorywall: error:" in proc.stderr
    assert not path.exists()
    assert not any(Path(tmp_path).iterdir())
