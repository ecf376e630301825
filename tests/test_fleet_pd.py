"""Disaggregated fleets: prefill and decode roles in the spec, smg's PD mode end to end, and
workers that die mid-transfer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from polling import block_until
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc
from test_fleet import _Running, _wait_gone

from memorywall import ready
from memorywall.core import (
    Batch,
    PrefillChunk,
    StepModel,
    load_hardware,
    load_model,
    plan_deployment,
)
from memorywall.core.kv_transfer import kv_link, kv_transfer
from memorywall.errors import ConfigError
from memorywall.fleet import runner as fleet
from memorywall.fleet import spec as fleet_spec

ROOT = Path(__file__).resolve().parent.parent
MODEL = "llama-3.1-8b"
PREFILL = {"name": "p", "hardware": "h100-sxm", "model": MODEL, "role": "prefill"}
DECODE = {"name": "d", "hardware": "wse-3", "model": MODEL, "role": "decode"}


def test_roles_and_link_parse():
    spec = fleet_spec.parse_spec({"worker": [PREFILL, {**DECODE, "kv_link": 25}]})
    p, d = spec.workers
    assert spec.disaggregated
    assert (p.role, p.kv_link, d.role, d.kv_link) == ("prefill", None, "decode", "25")
    assert not fleet_spec.parse_spec({"worker": [{**DECODE, "role": "both"}]}).disaggregated


def test_example_pd_spec_is_two_h100_prefill_and_one_wafer_decode():
    spec = fleet_spec.load_spec(ROOT / "examples" / "fleet-pd.toml")
    roles = [(w.hardware, w.role) for w in spec.workers]
    assert roles == [("h100-sxm", "prefill"), ("h100-sxm", "prefill"), ("wse-3", "decode")]
    assert spec.gateway is not None


@pytest.mark.parametrize(
    ("workers", "words"),
    [
        ([{**PREFILL, "role": "mixed"}], "worker[0].role"),
        ([{**PREFILL, "kv_link": "nic"}, DECODE], "only a decode worker"),
        ([PREFILL, {**DECODE, "kv_link": "fast"}], "worker[1].kv_link"),
        ([PREFILL], "needs prefill and decode workers"),
        ([PREFILL, DECODE, {**DECODE, "name": "x", "role": "both"}], "and no others"),
    ],
)
def test_bad_roles_name_the_field(workers, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        fleet_spec.parse_spec({"worker": workers})


def _ready(name: str, port: int, role: str, bootstrap: int | None = None) -> ready.ServerReady:
    return ready.ServerReady.from_dict(
        {
            "pid": 1,
            "host": "127.0.0.1",
            "grpc_port": port,
            "http_port": None,
            "metrics_port": None,
            "hardware": "h100-sxm",
            "model": MODEL,
            "devices": 1,
            "tensor_parallel": 1,
            "pipeline_parallel": 1,
            "deployment": "",
            "max_num_seqs": 1,
            "max_num_batched_tokens": 1,
            "kv_capacity_tokens": 1,
            "predicted_tokens_per_s_per_user": 1.0,
            "role": role,
            "bootstrap_port": bootstrap,
        },
        name,
    )


def test_gateway_arguments_in_pd_mode_name_each_prefill_bootstrap_port():
    workers = {
        "a": _ready("a", 1001, "prefill", 2001),
        "b": _ready("b", 1002, "prefill", 2002),
        "d": _ready("d", 1003, "decode"),
    }
    assert fleet.gateway_workers(workers) == [
        "--pd-disaggregation",
        "--prefill", "grpc://127.0.0.1:1001", "2001",
        "--prefill", "grpc://127.0.0.1:1002", "2002",
        "--decode", "grpc://127.0.0.1:1003",
    ]  # fmt: skip
    both = {"a": _ready("a", 1001, "both")}
    assert fleet.gateway_workers(both) == ["--worker-urls", "grpc://127.0.0.1:1001"]


_PD_FLEET = f"""
[[worker]]
name = "prefill"
hardware = "h100-sxm"
model = "{MODEL}"
role = "prefill"

[[worker]]
name = "decode"
hardware = "wse-3"
model = "{MODEL}"
role = "decode"
kv_link = "10"
http_port = 0

[gateway]
policy = "round_robin"
port = 0
"""


def _scrape(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))


def _chat(url: str, prompt: str, stream: bool) -> tuple[dict | None, float, float]:
    """(final usage, seconds to the first content, seconds to the end)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 16,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    req = urllib.request.Request(
        f"{url}/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    start = time.monotonic()
    first = None
    usage = None
    with urllib.request.urlopen(req, timeout=60) as r:
        if not stream:
            reply = json.load(r)
            return reply["usage"], time.monotonic() - start, time.monotonic() - start
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            choices = event.get("choices") or []
            if first is None and choices and choices[0].get("delta", {}).get("content"):
                first = time.monotonic() - start
    return usage, first, time.monotonic() - start


def test_end_to_end_through_smg_in_pd_mode(tmp_path):
    """With smg installed (as in CI) a PD gateway that does not start fails this test."""
    if fleet.find_smg() is None:
        pytest.skip("smg is not installed (pip install 'memorywall[gateway]')")
    running = _Running(_PD_FLEET, tmp_path / "logs")
    try:
        up = running.up()
        assert up.gateway is not None, running.stdout.read_text()
        p, d = up.workers["prefill"], up.workers["decode"]
        assert (p.role, d.role) == ("prefill", "decode") and p.bootstrap_port
        count = "memorywall:kv_transfer_seconds_count"
        before = _scrape(d.http_url, count), _scrape(d.http_url, "memorywall:kv_transfer_bytes")
        usage, ttft_s, _ = _chat(up.gateway.url, "Tell me about wafers. " * 40, stream=True)
        after = _scrape(d.http_url, count), _scrape(d.http_url, "memorywall:kv_transfer_bytes")
        assert usage is not None and usage["completion_tokens"] >= 1
        assert after[0] - before[0] == 1
        prompt = usage["prompt_tokens"]
        assert after[1] - before[1] == pytest.approx(prompt * 131_072)  # 128 KiB per token
        # TTFT holds the prefill, the transfer at 10 GB/s and a wafer step: never less.
        h100 = plan_deployment(load_hardware("h100-sxm"), load_model(MODEL))
        wse = plan_deployment(load_hardware("wse-3"), load_model(MODEL))
        prefill_s = StepModel(h100).step_cost(Batch(prefill=[PrefillChunk(prompt)])).time_s
        step_s = StepModel(wse).step_cost(Batch(prefill=[PrefillChunk(1, prompt - 1)])).time_s
        transfer_s = kv_transfer(h100, kv_link(h100, wse, 10.0), prompt).exposed_s
        modelled_s = prefill_s + transfer_s + step_s
        assert modelled_s <= ttft_s < modelled_s + 2.0
        usage, _, _ = _chat(up.gateway.url, "And about GPUs?", stream=False)
        assert usage["completion_tokens"] >= 1
    finally:
        assert running.stop() == 0
    _wait_gone([up.gateway.pid, *(w.pid for w in up.workers.values())])


# --- A worker that dies mid-transfer ----------------------------------------------------------


def _serve(tmp_path: Path, name: str, *args: str) -> tuple[subprocess.Popen, ready.ServerReady]:
    ready_file = tmp_path / f"{name}.ready.json"
    cmd = [sys.executable, "-m", "memorywall", "serve", "--model", MODEL, "--port", "0"]
    cmd += ["--ready-file", str(ready_file), *args]
    log = (tmp_path / f"{name}.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    data = ready.wait_for(ready_file, proc, timeout_s=60)
    return proc, ready.ServerReady.from_dict(data, name)


def _generate(target: str, room: int, bootstrap_port: int, result: dict, key: str) -> None:
    request = pb.GenerateRequest(
        request_id="r",
        tokenized=pb.TokenizedInput(input_ids=list(range(1, 201))),
        sampling_params=pb.SamplingParams(max_new_tokens=8),
        stream=True,
        disaggregated_params=pb.DisaggregatedParams(
            bootstrap_host="127.0.0.1", bootstrap_port=bootstrap_port, bootstrap_room=room
        ),
    )
    with grpc.insecure_channel(target) as channel:
        stub = sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
        try:
            result[key] = list(stub.Generate(request, timeout=60))
        except grpc.RpcError as e:
            result[key] = e


def _load(target: str) -> pb.SchedulerLoad:
    with grpc.insecure_channel(target) as channel:
        stub = sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
        return stub.GetLoads(pb.GetLoadsRequest(), timeout=10).loads[0]


def _kv_used(target: str) -> int:
    return _load(target).num_used_tokens


def _prefilled(target: str) -> bool:
    """The prefill worker has finished its prefill and holds the KV for its transfer."""
    load = _load(target)
    return load.num_total_reqs == 0 and load.num_used_tokens > 0


def _connected_to(port: int) -> bool:
    """Some TCP connection on this machine is established to 127.0.0.1:`port` (Linux's
    /proc/net/tcp): the decode half has met the prefill worker's bootstrap server."""
    remote = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        next(table)  # the header
        return any(f[2] == remote and f[3] == "01" for f in (line.split() for line in table))


@pytest.mark.parametrize("dies", ["prefill", "decode"])
def test_a_worker_dying_mid_transfer_ends_the_other_half_unavailable(tmp_path, dies):
    # 0.01 GB/s: 200 tokens of KV (26 MB) take 2.6 s to move, a wide window to die in.
    procs = {}
    procs["prefill"], p = _serve(
        tmp_path, "prefill", "--hardware", "h100-sxm", "--role", "prefill", "--bootstrap-port", "0"
    )
    procs["decode"], d = _serve(
        tmp_path, "decode", "--hardware", "wse-3", "--role", "decode", "--kv-link", "0.01"
    )
    try:
        result: dict = {}
        halves = [
            threading.Thread(target=_generate, args=(w.grpc_target, 7, p.bootstrap_port, result, n))
            for n, w in (("prefill", p), ("decode", d))
        ]
        for t in halves:
            t.start()
        # Mid-transfer: the prefill (~20 ms) is over and the decode half has met it; the
        # transfer has more than 2 s to go.
        block_until(
            lambda: _prefilled(p.grpc_target) and _connected_to(p.bootstrap_port),
            30,
            why=lambda: (_load(p.grpc_target), result),
        )
        assert not result, result
        os.kill(procs[dies].pid, signal.SIGKILL)
        for t in halves:
            t.join(timeout=30)
        survivor = "decode" if dies == "prefill" else "prefill"
        error = result[survivor]
        assert isinstance(error, grpc.RpcError), error
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert "went away" in error.details()
        target = (d if survivor == "decode" else p).grpc_target
        assert _kv_used(target) == 0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            proc.wait(timeout=30)
