"""`memorywall bench --backend kserve-grpc | kserve-http` against a real emulator on loopback:
the same records, metrics and files as the other backends, and TPOT that agrees with the
engine's modelled TPOT and the core's prediction."""

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
from memorywall.loadgen import options
from memorywall.loadgen.kserve_target import KServeGrpcTarget, KServeHttpTarget, spec_text
from memorywall.loadgen.records import RequestSpec
from memorywall.loadgen.target import Backend, TargetConfig, make_target


@pytest.fixture(scope="module")
def served() -> Iterator[dict]:
    """`memorywall serve` (llama-3.1-8b on one h100-sxm) with gRPC and HTTP, in a subprocess."""
    folder = Path(tempfile.mkdtemp(prefix="kserve-bench-"))
    ready_file = folder / "ready.json"
    cmd = [sys.executable, "-m", "memorywall", "serve", "--hardware", "h100-sxm"]
    cmd += ["--model", "llama-3.1-8b", "--port", "0", "--http-port", "0", "--grace", "1"]
    proc = subprocess.Popen(
        [*cmd, "--ready-file", str(ready_file)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield ready.wait_for(ready_file, proc, timeout_s=60.0)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def bench(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["bench", *argv])
    return rc, out.getvalue(), err.getvalue()


def test_make_target_builds_the_kserve_backends():
    grpc_config = TargetConfig(backend=Backend.KSERVE_GRPC, address="127.0.0.1:1", model="m")
    assert isinstance(make_target(grpc_config), KServeGrpcTarget)
    http_config = TargetConfig(backend=Backend.KSERVE_HTTP, address="http://h:1", model="m")
    target = make_target(http_config, timeout_s=2.0)
    assert isinstance(target, KServeHttpTarget)
    assert target.url == "http://h:1/v2/models/m/generate_stream"
    assert tuple(b.value for b in Backend) == options.BACKENDS


def test_prompt_text_has_one_word_per_token_and_shares_prefixes():
    a = RequestSpec(index=0, prompt_tokens=40, output_tokens=4, prefix_group=1, prefix_tokens=32)
    b = RequestSpec(index=1, prompt_tokens=40, output_tokens=4, prefix_group=1, prefix_tokens=32)
    assert len(spec_text(a, 7).split()) == 40
    assert spec_text(a, 7).split()[:32] == spec_text(b, 7).split()[:32]
    assert spec_text(a, 7) != spec_text(b, 7)


@pytest.mark.parametrize("backend", ["kserve-grpc", "kserve-http"])
def test_bench_against_the_emulator_over_kserve(served, tmp_path, backend):
    target = served["grpc_target"] if backend == "kserve-grpc" else served["http_url"]
    argv = ["--backend", backend, "--target", target, "--concurrency", "1", "--num-prompts", "6"]
    argv += ["--input-len", "64", "--output-len", "128", "--warmup", "1"]
    rc, _, err = bench(*argv, "--out", str(tmp_path), "--label", "k")
    assert rc == 0, err
    r = json.loads((tmp_path / "k-c1.json").read_text())
    assert (r["completed"], r["failed"]) == (6, 0)
    assert r["emulated"] is True and r["hardware"] == "h100-sxm"
    assert (r["backend"], r["model"]) == (backend, "llama-3.1-8b")
    assert r["total_output_tokens"] == 6 * 128
    # Loaded 2-core test machines: the 5% is measured in the README; 10% here, as
    # the memorywall-grpc backend's fidelity test allows.
    assert r["mean_tpot_ms"] == pytest.approx(r["mean_modelled_tpot_ms"], rel=0.10)
    records = [
        json.loads(line) for line in (tmp_path / "k-c1.requests.jsonl").read_text().splitlines()
    ]
    for record in records:
        assert record["error"] is None
        assert len(record["chunk_ns"]) == 128  # one message per token
        assert record["usage_completion_tokens"] == 128
        assert record["modelled_ttft_s"] > 0
        assert record["server_received_ns"] > 0


def test_a_model_the_server_does_not_serve_is_an_error_before_any_load(served, tmp_path):
    argv = ["--backend", "kserve-grpc", "--target", served["grpc_target"], "--model", "nope"]
    rc, _, err = bench(*argv, "--num-prompts", "2", "--out", str(tmp_path))
    assert rc == 2
    assert "NOT_FOUND" in err and "'nope'" in err
    assert not list(tmp_path.iterdir())
