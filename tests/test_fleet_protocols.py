"""`protocol =` per fleet worker: the spec, the worker's services, smg's `--backend`; and
end to end through smg `--backend vllm` to a worker that serves only vLLM's service."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from memorywall.errors import ConfigError
from memorywall.fleet import runner as fleet
from memorywall.fleet import spec as fleet_spec

WORKER = {"name": "a", "hardware": "h100-sxm", "model": "llama-3.1-8b"}
TPOT_TOLERANCE = 0.05


def test_protocol_defaults_to_sglang_and_names_the_workers_services():
    spec = fleet_spec.parse_spec({"worker": [WORKER]})
    assert spec.protocol == "sglang" and "--grpc-services" not in spec.workers[0].argv()
    spec = fleet_spec.parse_spec({"worker": [{**WORKER, "protocol": "vllm"}]})
    assert spec.protocol == "vllm"
    argv = spec.workers[0].argv()
    assert argv[argv.index("--grpc-services") + 1] == "vllm"
    # serve's own option by its name says the same; protocol may repeat it.
    for table in (
        {"grpc_services": "memorywall,trtllm"},
        {"protocol": "trtllm", "grpc_services": "trtllm"},
    ):
        assert fleet_spec.parse_spec({"worker": [{**WORKER, **table}]}).protocol == "trtllm"
    assert fleet.smg_backend("vllm") == ["--backend", "vllm"]
    assert fleet.smg_backend("sglang") == ["--backend", "sglang"]
    assert fleet.smg_backend("trtllm") == []  # smg 1.13 finds TensorRT-LLM by its service


GATEWAY = {"policy": "round_robin", "port": 0}


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (
            {"worker": [{**WORKER, "protocol": "openai"}]},
            "worker[0].protocol: 'openai' is not one of",
        ),
        (
            {"worker": [{**WORKER, "protocol": "vllm", "grpc_services": "sglang"}]},
            "worker[0].protocol: vllm disagrees with grpc_services",
        ),
        ({"worker": [{**WORKER, "grpc_services": "sglang,vllm"}]}, "two engines"),
        (
            {
                "worker": [{**WORKER, "protocol": "vllm"}, {**WORKER, "name": "b"}],
                "gateway": GATEWAY,
            },
            "worker.protocol: one gateway backend",
        ),
        (
            {"worker": [{**WORKER, "grpc_services": "memorywall"}], "gateway": GATEWAY},
            "gateway: a serves no engine service smg speaks",
        ),
        (
            {
                "worker": [
                    {**WORKER, "protocol": "vllm", "role": "prefill"},
                    {**WORKER, "name": "b", "role": "decode"},
                ]
            },
            "add sglang to --grpc-services",
        ),
    ],
)
def test_bad_protocols_are_one_line_errors(data, words):
    with pytest.raises(ConfigError) as e:
        fleet_spec.parse_spec(data)
    assert words in str(e.value) and "\n" not in str(e.value)


def _chat(url: str, body: dict) -> list[tuple[float, dict]]:
    """The SSE events of a streamed chat request, each with its receipt time."""
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    events = []
    with urllib.request.urlopen(request, timeout=60) as r:
        for raw in r:
            line = raw.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                events.append((time.perf_counter(), json.loads(line[6:])))
    return events


def _scrape(url: str) -> dict[str, float]:
    """Unlabelled-or-first sample of each series on a /metrics page."""
    out: dict[str, float] = {}
    with urllib.request.urlopen(url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                name = line.split("{", 1)[0].split(" ", 1)[0]
                out.setdefault(name, float(line.rsplit(" ", 1)[1]))
    return out


def test_through_smg_backend_vllm_to_a_worker_serving_only_vllms_service():
    """With smg installed (as in CI) a gateway that does not start fails this test."""
    if fleet.find_smg() is None:
        pytest.skip("smg is not installed (pip install 'memorywall[gateway]')")
    spec = fleet_spec.parse_spec(
        {
            "worker": [{**WORKER, "protocol": "vllm", "http_port": 0}],  # for /metrics
            "gateway": {"policy": "round_robin", "port": 0},
        }
    )
    with fleet.in_background(spec) as up:
        worker = up.workers["a"]
        assert worker.grpc_services == ("vllm",)
        assert up.gateway is not None
        log = (Path(up.log_dir) / "gateway.log").read_text()
        assert "(runtime: vllm)" in log  # smg took the worker for a vLLM engine

        # A stream at one user decodes at the core's pace.
        tokens = 128
        body = {
            "model": "llama-3.1-8b",
            "messages": [{"role": "user", "content": "Hello, how are you today?"}],
            "max_tokens": tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        before = _scrape(worker.metrics_url)
        events = _chat(up.gateway.url, body)
        after = _scrape(worker.metrics_url)
        times = [t for t, e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
        assert events[-1][1]["usage"]["completion_tokens"] == tokens
        # Streamed (a loaded host groups tokens per message; some ids have no text alone).
        assert len(times) > 1
        # vLLM's bench measure: from the first token to the last event with a choice (the
        # finish reason comes with the last token), over the tokens after the first.
        end = max(t for t, e in events if e["choices"])
        tpot_s = (end - times[0]) / (tokens - 1)
        # The worker modelled the core's TPOT for it...
        core_tpot_s = 1 / worker.predicted_tokens_per_s_per_user
        tpot_series = "vllm:request_time_per_output_token_seconds"
        assert after[f"{tpot_series}_count"] - before[f"{tpot_series}_count"] == 1
        modelled_s = after[f"{tpot_series}_sum"] - before[f"{tpot_series}_sum"]
        assert modelled_s == pytest.approx(core_tpot_s, rel=TPOT_TOLERANCE)
        # ...and delivered it at that pace, later only by what the worker's own host cost it
        # (a loaded machine: the emulator's stalls, which it counts).
        stall = "memorywall:host_stall_seconds_total"
        stalled_s = after[stall] - before[stall]
        expected_s = modelled_s + stalled_s / (tokens - 1)
        assert tpot_s == pytest.approx(expected_s, rel=TPOT_TOLERANCE), (
            tpot_s,
            modelled_s,
            stalled_s,
        )

        # A repeated prompt finds its prefix in the worker's cache.
        words = " ".join(f"word{i}" for i in range(200))
        repeat = {**body, "messages": [{"role": "user", "content": words}], "max_tokens": 4}
        first = _chat(up.gateway.url, repeat)[-1][1]["usage"]
        second = _chat(up.gateway.url, repeat)[-1][1]["usage"]
        assert first["prompt_tokens"] == second["prompt_tokens"] > 64
        assert first["prompt_tokens_details"]["cached_tokens"] == 0
        assert second["prompt_tokens_details"]["cached_tokens"] >= first["prompt_tokens"] - 16


def test_through_smg_to_a_tensorrt_llm_worker():
    """smg finds the engine by its service, and takes the worker's own tokenizer."""
    if fleet.find_smg() is None:
        pytest.skip("smg is not installed (pip install 'memorywall[gateway]')")
    spec = fleet_spec.parse_spec(
        {
            "worker": [{**WORKER, "protocol": "trtllm"}],
            "gateway": {"policy": "round_robin", "port": 0},
        }
    )
    with fleet.in_background(spec) as up:
        assert up.workers["a"].grpc_services == ("trtllm",)
        log = (Path(up.log_dir) / "gateway.log").read_text()
        assert "gRPC client (trtllm)" in log
        assert (Path(up.log_dir) / "tokenizer" / "tokenizer.json").is_file()
        body = {
            "model": "llama-3.1-8b",
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 8,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        events = _chat(up.gateway.url, body)
        text = "".join(
            e["choices"][0]["delta"].get("content") or "" for _, e in events if e["choices"]
        )
        assert events[-1][1]["usage"]["completion_tokens"] == 8 and text.strip()
