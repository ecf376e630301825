"""`bench --workers N --ray`: the load generators as tasks on the test cluster, their
records merged as local workers' are, on this process's clock."""

from __future__ import annotations

import json
import time
from pathlib import Path

from memorywall.cli import main
from memorywall.launch import serving
from memorywall.loadgen.records import RequestRecord
from memorywall.loadgen.runner import shift_records

LOAD = ["--concurrency", "4", "--num-prompts", "16", "--input-len", "32", "--output-len", "8"]


def _records(folder: Path) -> list[dict]:
    lines = (folder / "run-c4.requests.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_bench_workers_on_ray_merge_as_local_workers(ray_cluster, tmp_path, capsys):
    with serving("--hardware", "wse-3", "--model", "llama-3.1-8b") as server:
        argv = ["bench", "--target", server.grpc_target, *LOAD, "--workers", "2", "--no-plots"]
        assert main([*argv, "--out", str(tmp_path / "local")]) == 0
        t0 = time.perf_counter_ns()
        assert main([*argv, "--out", str(tmp_path / "ray"), "--ray", ray_cluster.address]) == 0
        t1 = time.perf_counter_ns()
    capsys.readouterr()
    local, remote = _records(tmp_path / "local"), _records(tmp_path / "ray")
    shape = ("index", "worker", "prompt_tokens", "output_tokens", "warmup")
    assert [tuple(r[k] for k in shape) for r in remote] == [
        tuple(r[k] for k in shape) for r in local
    ]
    assert {r["worker"] for r in remote} == {0, 1}
    # Clocks reconciled: every time on this process's clock, inside the run.
    for r in remote:
        assert t0 < r["sent_ns"] <= r["chunk_ns"][0] <= r["finished_ns"] < t1
    result = json.loads((tmp_path / "ray" / "run-c4.json").read_text())
    assert (result["completed"], result["failed"], result["workers"]) == (16, 0, 2)


def test_too_many_workers_for_the_cluster_is_one_line_exit_2(ray_cluster, capsys):
    argv = ["bench", "--target", "127.0.0.1:1", *LOAD, "--workers", "3"]
    assert main([*argv, "--ray", ray_cluster.address]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has 2 CPUs" in err


def test_shift_records_moves_every_client_time():
    r = RequestRecord(
        index=0, prompt_tokens=1, output_tokens=2, scheduled_ns=5, sent_ns=10, warmup=False
    )
    r.chunk_ns, r.finished_ns, r.server_received_ns = [20, 30], 30, 12
    shift_records([r], 100)
    assert (r.scheduled_ns, r.sent_ns, r.chunk_ns, r.finished_ns) == (105, 110, [120, 130], 130)
    assert r.server_received_ns == 12  # the server's clock
