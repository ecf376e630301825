"""`memorywall.launch`: children started with a log, waited for by ready file, stopped."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from memorywall import launch
from memorywall.client import Client

# A stand-in for `memorywall serve`: writes a ready file for its own pid, then waits.
FAKE_SERVER = """
import json, os, sys, time
fields = dict(pid=os.getpid(), host="127.0.0.1", grpc_port=1, http_port=None,
              metrics_port=None, hardware="wse-3", model="m", devices=1, tensor_parallel=1,
              pipeline_parallel=1, deployment="d", max_num_seqs=1, max_num_batched_tokens=1,
              kv_capacity_tokens=1, predicted_tokens_per_s_per_user=1.0)
print("starting", flush=True)
time.sleep(0.2)
path = sys.argv[1]
with open(path + ".tmp", "w") as f:
    json.dump(fields, f)
os.replace(path + ".tmp", path)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")  # a zombie runs nothing
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_child_that_exits_early_names_its_status_and_log_tail(tmp_path):
    script = "import sys; print('loading'); print('boom: no such model', file=sys.stderr); "
    script += "sys.exit(3)"
    child = launch.start(
        "w", [sys.executable, "-c", script], log=tmp_path / "w.log", ready_file=tmp_path / "r"
    )
    with pytest.raises(launch.ChildExited) as e:
        launch.wait_ready([child], timeout_s=30)
    assert e.value.child is child
    assert str(e.value) == "exited with status 3 before it was ready"
    assert child.tail().splitlines() == ["    loading", "    boom: no such model"]
    assert child.last_line() == "boom: no such model"


def test_ready_file_found_and_terminate_cleans_up(tmp_path):
    ready_file = tmp_path / "r.json"
    ready_file.write_text(json.dumps({"pid": 1}))  # stale: removed at start, never taken
    child = launch.start(
        "fake",
        [sys.executable, "-c", FAKE_SERVER, str(ready_file)],
        log=tmp_path / "fake.log",
        ready_file=ready_file,
    )
    try:
        assert launch.wait_ready([child], timeout_s=30)
        assert child.ready is not None and child.ready.pid == child.pid
        assert child.ready.grpc_target == "127.0.0.1:1"
        assert child.tail() == "    starting"
    finally:
        launch.stop([child], timeout_s=10)
    assert child.proc.returncode == -15  # SIGTERM ended it
    assert _gone(child.pid)


def test_stop_kills_a_child_that_ignores_sigterm(tmp_path):
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    script += "print('up', flush=True); time.sleep(600)"
    child = launch.start("stubborn", [sys.executable, "-c", script], log=tmp_path / "s.log")
    deadline = time.monotonic() + 30
    while "up" not in (tmp_path / "s.log").read_text():  # its handler is in place
        assert time.monotonic() < deadline
        time.sleep(0.02)
    killed = []
    launch.stop([child], timeout_s=0.5, on_kill=killed.append)
    assert killed == [child] and child.proc.returncode == -9
    assert _gone(child.pid)


def test_not_ready_in_time_names_the_late_ones(tmp_path):
    child = launch.start("slow", [sys.executable, "-c", "import time; time.sleep(600)"],
                         ready_file=tmp_path / "r.json", log=tmp_path / "slow.log")  # fmt: skip
    try:
        with pytest.raises(launch.NotReady, match=r"^slow did not start within 0\.2 s$") as e:
            launch.wait_ready([child], timeout_s=0.2)
        assert e.value.late == [child]
    finally:
        launch.stop([child], timeout_s=10)
    assert _gone(child.pid)


def test_serve_command_runs_this_python_with_the_ready_file(tmp_path):
    cmd = launch.serve_command(["--port", "0"], tmp_path / "r.json")
    assert cmd == [sys.executable, "-m", "memorywall", "serve", "--port", "0",
                   "--ready-file", str(tmp_path / "r.json")]  # fmt: skip


def test_serving_yields_a_running_server_and_stops_it():
    with launch.serving("--hardware", "h100-sxm", "--model", "llama-3.1-8b") as server:
        assert server.model == "llama-3.1-8b"
        with Client(server.grpc_target, timeout_s=10) as client:
            assert client.server_info().running == 0
        pid = server.pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_serving_a_server_that_cannot_start_raises_child_exited():
    cannot_fit = ("--hardware", "h100-sxm", "--model", "llama-3.1-70b", "--devices", "1")
    with (
        pytest.raises(launch.ChildExited, match="exited with status 2"),
        launch.serving(*cannot_fit),
    ):
        pass
