"""`memorywall bench --backend sglang-grpc | vllm-grpc | trtllm-grpc` against a real emulator
(`serve --grpc-services memorywall,PROTOCOL` in a subprocess): the same files and metrics
as the memorywall-grpc backend, and a measured TPOT that agrees with the core as closely."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from memorywall import ready
from memorywall.cli import main
from memorywall.loadgen.records import RequestRecord, RequestSpec
from memorywall.loadgen.target import Backend, TargetConfig, make_target

PROTOCOLS = {"sglang-grpc": "sglang", "vllm-grpc": "vllm", "trtllm-grpc": "trtllm"}
PLOTS = ("latency_vs_load.png", "throughput_vs_interactivity.png")


@contextlib.contextmanager
def serving(services: str) -> Iterator[str]:
    folder = Path(tempfile.mkdtemp(prefix="bench-smg-"))
    ready_file = folder / "ready.json"
    cmd = [sys.executable, "-m", "memorywall", "serve", "--hardware", "h100-sxm"]
    cmd += ["--model", "llama-3.1-8b", "--port", "0", "--grace", "1"]
    cmd += ["--grpc-services", services, "--ready-file", str(ready_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield ready.wait_for(ready_file, proc, timeout_s=60)["grpc_target"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def bench(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["bench", *argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("backend", list(PROTOCOLS))
def test_bench_speaks_each_worker_protocol_with_the_same_files_and_fidelity(tmp_path, backend):
    with serving(f"memorywall,{PROTOCOLS[backend]}") as target:
        argv = ["--backend", backend, "--target", target, "--concurrency", "1"]
        argv += ["--num-prompts", "4", "--input-len", "64", "--output-len", "256"]
        rc, out, err = bench(*argv, "--warmup", "1", "--out", str(tmp_path))
    assert rc == 0, err
    assert "h100-sxm" in out and "(emulated)" in out
    names = {p.name for p in tmp_path.iterdir()}
    assert {"run-c1.json", "run-c1.requests.jsonl", "summary.json", *PLOTS} <= names
    r = json.loads((tmp_path / "run-c1.json").read_text())
    assert (r["completed"], r["failed"], r["backend"]) == (4, 0, backend)
    assert r["total_output_tokens"] == 4 * 256 and r["total_input_tokens"] == 4 * 64
    assert (r["emulated"], r["hardware"], r["model"]) == (True, "h100-sxm", "llama-3.1-8b")
    assert r["mean_modelled_tpot_ms"] is None  # these protocols carry no modelled timeline
    for key in ("mean_ttft_ms", "mean_tpot_ms", "p99_itl_ms", "predicted_tpot_ms"):
        assert r[key] > 0, key
    # As the memorywall-grpc backend's check: the core's TPOT, unless the host fell behind
    # and the level says so.
    kept_pace = r["mean_tpot_ms"] == pytest.approx(r["predicted_tpot_ms"], rel=0.10)
    said_so = any("host stalled" in s for s in r["suspect"])
    assert kept_pace or said_so, (r["mean_tpot_ms"], r["predicted_tpot_ms"], r["suspect"])
    records = [json.loads(line) for line in (tmp_path / "run-c1.requests.jsonl").open()]
    assert len(records) == 5 and sum(x["warmup"] for x in records) == 1
    assert all(x["error"] is None and x["usage_completion_tokens"] == 256 for x in records)


async def test_a_worker_without_memorywall_v1_is_measured_but_not_emulated():
    import asyncio

    from memorywall.loadgen.cli import smg_worker_facts

    with serving("vllm") as target:
        facts = await asyncio.to_thread(smg_worker_facts, Backend.VLLM_GRPC, target)
        assert (facts.emulated, facts.model, facts.hardware) == (False, "llama-3.1-8b", None)
        worker = make_target(TargetConfig(backend=Backend.VLLM_GRPC, address=target))
        await worker.connect()
        try:
            spec = RequestSpec(0, 32, 8, prefix_group=None)
            record = RequestRecord(0, 32, 8, None, 0)
            await worker.send(spec, record)
            assert record.ok and record.usage_completion_tokens == 8
            assert sum(record.chunk_tokens) == 8 and record.usage_prompt_tokens == 32
            # The same request again: its whole prompt but the last block is cached.
            again = RequestRecord(0, 32, 8, None, 0)
            await worker.send(spec, again)
            assert again.usage_cached_tokens == 16
            bad = RequestRecord(1, 32, 0, None, 0)
            await worker.send(RequestSpec(1, 32, 0), bad)
            assert bad.error.startswith("INVALID_ARGUMENT")
        finally:
            await worker.aclose()


def test_bad_backend_targets_exit_2():
    rc, _, err = bench("--backend", "vllm-grpc", "--target", "http://127.0.0.1:1")
    assert rc == 2 and "is a URL" in err
    rc, _, err = bench("--backend", "trtllm-grpc", "--target", "127.0.0.1:1", "--timeout", "2")
    assert rc == 2 and "cannot reach a trtllm-grpc worker" in err
