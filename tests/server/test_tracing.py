"""OpenTelemetry traces of the modelled timeline: one span per request continuing the client's
`traceparent` (gRPC metadata, HTTP header), phases that add up to its modelled end-to-end time,
prefill chunks, preemption and host stall spans; and nothing of OpenTelemetry loaded when off."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys

import aiohttp
import grpc
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from memorywall.core import Deployment
from memorywall.server.app import EmulatorServer, ServerConfig
from memorywall.server.engine.api import BatchEntry, Finished, FinishReason, StepReport
from memorywall.server.engine.lora import LoraConfig
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.fronts.tracing import Tracing
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc

TIMEOUT_S = 20.0
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
CHUNK = 256


def by_name(spans, name):
    return [s for s in spans if s.name == name]


def duration_s(span) -> float:
    return (span.end_time - span.start_time) / 1e9


def check_request_trace(spans, e2e_s: float, prompt_tokens: int) -> None:
    """One request's spans: the tree, the phases tiling its e2e, one span per prefill chunk."""
    (root,) = by_name(spans, "request")
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert f"{root.parent.span_id:016x}" == PARENT_ID  # continues the client's span
    assert root.parent.is_remote
    assert duration_s(root) == pytest.approx(e2e_s, rel=0.01)
    phases = [by_name(spans, n)[0] for n in ("queue", "prefill", "decode")]
    for phase in phases:
        assert phase.parent.span_id == root.context.span_id
        assert phase.context.trace_id == root.context.trace_id
    assert sum(duration_s(p) for p in phases) == pytest.approx(e2e_s, rel=0.01)
    assert phases[0].start_time == root.start_time and phases[2].end_time == root.end_time
    prefill = phases[1]
    chunks = by_name(spans, "prefill_chunk")
    assert len(chunks) == math.ceil(prompt_tokens / CHUNK)
    assert sum(c.attributes["memorywall.tokens"] for c in chunks) == prompt_tokens
    for chunk in chunks:
        assert chunk.parent.span_id == prefill.context.span_id
        assert prefill.start_time <= chunk.start_time < chunk.end_time <= prefill.end_time
    assert root.attributes["gen_ai.usage.prompt_tokens"] == prompt_tokens


@pytest.fixture
async def traced(h100_8b: Deployment):
    exporter = InMemorySpanExporter()
    tracing = Tracing.with_exporter(exporter, batch=False)
    server = EmulatorServer(
        h100_8b,
        EngineConfig(max_num_batched_tokens=CHUNK),
        ServerConfig(port=0, http_port=0),
        tracing=tracing,
    )
    await server.start()
    yield server, exporter
    await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)


async def test_grpc_request_continues_the_traceparent_and_tiles_its_e2e(traced):
    server, exporter = traced
    prompt = 1000
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        request = pb.GenerateRequest(token_count=prompt, max_tokens=8, ignore_eos=True)
        call = stub.Generate(request, metadata=(("traceparent", TRACEPARENT),))
        responses = await asyncio.wait_for(_read(call), TIMEOUT_S)
    timing = responses[-1].finished.timing
    check_request_trace(exporter.get_finished_spans(), timing.e2e_s, prompt)
    decode = by_name(exporter.get_finished_spans(), "decode")[0]
    assert decode.attributes["memorywall.steps"] == 7  # the first token came with the prefill


async def test_http_request_continues_the_traceparent(traced):
    server, exporter = traced
    body = {"model": "llama-3.1-8b", "prompt": "hello " * 300, "max_tokens": 4}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.http_url}/v1/completions", json=body, headers={"traceparent": TRACEPARENT}
        ) as response,
    ):
        assert response.status == 200
        reply = await response.json()
    spans = exporter.get_finished_spans()
    (root,) = by_name(spans, "request")
    prompt = reply["usage"]["prompt_tokens"]
    check_request_trace(spans, root.attributes["gen_ai.latency.e2e"], prompt)


async def test_a_lora_request_names_its_adapter_and_a_base_one_none(tmp_path, h100_8b):
    folder = tmp_path / "sql"
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    exporter = InMemorySpanExporter()
    server = EmulatorServer(
        h100_8b,
        EngineConfig(),
        ServerConfig(
            port=0, grpc=False, http_port=0, lora=LoraConfig(modules=(("sql", str(folder)),))
        ),
        tracing=Tracing.with_exporter(exporter, batch=False),
    )
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            for model in ("sql", "llama-3.1-8b"):
                body = {"model": model, "prompt": "hello", "max_tokens": 2}
                url = f"{server.http_url}/v1/completions"
                async with session.post(url, json=body) as response:
                    assert response.status == 200, await response.text()
    finally:
        await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)
    lora, base = by_name(exporter.get_finished_spans(), "request")
    assert lora.attributes["memorywall.lora"] == "sql"
    assert "memorywall.lora" not in base.attributes


async def test_a_request_without_traceparent_starts_its_own_trace(traced):
    server, exporter = traced
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        request = pb.GenerateRequest(token_count=10, max_tokens=2, ignore_eos=True)
        await asyncio.wait_for(_read(stub.Generate(request)), TIMEOUT_S)
    (root,) = by_name(exporter.get_finished_spans(), "request")
    assert root.parent is None
    assert f"{root.context.trace_id:032x}" != TRACE_ID


async def _read(call):
    return [r async for r in call]


def _report(start_s: float, time_s: float, batch, stalled_s: float = 0.0) -> StepReport:
    return StepReport(
        time_s=time_s,
        energy_j=1.0,
        tokens=sum(e.tokens for e in batch),
        generated=0,
        preemptions_total=0,
        first_tokens=[],
        token_gaps=[],
        start_s=start_s,
        stalled_s=stalled_s,
        batch=batch,
    )


def test_preemption_and_host_stall_spans_sit_in_their_phase():
    """A request preempted in its decode (recomputed from position 0) and a host stall before
    one step: spans at the modelled times, under the phase they fall in."""
    exporter = InMemorySpanExporter()
    tracing = Tracing.with_exporter(exporter, batch=False, epoch_offset_ns=0)
    rec = tracing.recorder
    rid = "r"
    # arrival 10.0; prefill 100 tokens in [10.1, 10.2]; decode steps; preempted after 10.4;
    # re-prefill of 102 tokens in [10.6, 10.7] after a 0.05 s host stall; decode to 10.9.
    rec.on_step(_report(10.1, 0.1, [BatchEntry(rid, 0, 100, False)]))
    rec.on_step(_report(10.2, 0.1, [BatchEntry(rid, 100, 1, True)]))
    rec.on_step(_report(10.3, 0.1, [BatchEntry(rid, 101, 1, True)]))
    rec.on_step(_report(10.6, 0.1, [BatchEntry(rid, 0, 102, False)], stalled_s=0.05))
    rec.on_step(_report(10.7, 0.1, [BatchEntry(rid, 102, 1, True)]))
    rec.on_step(_report(10.8, 0.1, [BatchEntry("other", 0, 5, False)]))
    finished = Finished(
        request_id=rid,
        reason=FinishReason.LENGTH,
        prompt_tokens=100,
        completion_tokens=4,
        cached_tokens=0,
        queue_s=0.1,
        prefill_s=0.1,
        decode_s=0.7,
        ttft_s=0.2,
        e2e_s=0.9,
        preemptions=1,
        energy_j=5.0,
        last_token_id=None,
    )
    rec.on_finish(finished)
    rec.on_step(_report(10.9, 0.1, [BatchEntry("other", 5, 1, True)]))
    tracing.export(finished, 10.0, None)
    spans = exporter.get_finished_spans()
    (decode,) = by_name(spans, "decode")
    (preemption,) = by_name(spans, "preemption")
    assert (preemption.start_time, preemption.end_time) == (10_400_000_000, 10_600_000_000)
    assert preemption.parent.span_id == decode.context.span_id
    (stall,) = by_name(spans, "host_stall")
    assert (stall.start_time, stall.end_time) == (10_550_000_000, 10_600_000_000)
    assert stall.parent.span_id == decode.context.span_id
    chunks = by_name(spans, "prefill_chunk")
    assert [c.attributes["memorywall.position"] for c in chunks] == [0, 0]
    (prefill,) = by_name(spans, "prefill")
    assert chunks[0].parent.span_id == prefill.context.span_id
    assert chunks[1].parent.span_id == decode.context.span_id  # the recompute
    assert rec.take(rid) == []  # taken once
    assert rec.take("other") == []  # still live: not finished


def test_kv_transfer_span_in_a_decode_worker():
    """A disaggregated decode half: the remote prefill and the KV transfer come before the
    engine's own queue, and everything still tiles the request's e2e."""
    exporter = InMemorySpanExporter()
    tracing = Tracing.with_exporter(exporter, batch=False, epoch_offset_ns=0)
    finished = Finished(
        request_id="d",
        reason=FinishReason.LENGTH,
        prompt_tokens=100,
        completion_tokens=4,
        cached_tokens=0,
        queue_s=0.0,
        prefill_s=0.01,
        decode_s=0.3,
        ttft_s=0.51,
        e2e_s=0.81,
        preemptions=0,
        energy_j=5.0,
        last_token_id=None,
        kv_transfer_s=0.2,
        kv_transfer_bytes=1e6,
    )
    tracing.recorder.on_finish(finished)
    tracing.export(finished, 1.0, None)
    spans = exporter.get_finished_spans()
    (root,) = by_name(spans, "request")
    (remote,) = by_name(spans, "remote_prefill")
    (kv,) = by_name(spans, "kv_transfer")
    assert (remote.start_time, remote.end_time) == (1_000_000_000, 1_300_000_000)
    assert (kv.start_time, kv.end_time) == (1_300_000_000, 1_500_000_000)
    assert kv.attributes["memorywall.kv_bytes"] == 1e6
    names = ("remote_prefill", "kv_transfer", "queue", "prefill", "decode")
    total = sum(duration_s(by_name(spans, n)[0]) for n in names)
    assert total == pytest.approx(duration_s(root), rel=0.01)
    assert duration_s(root) == pytest.approx(0.81, rel=0.01)


def test_without_the_flag_nothing_of_opentelemetry_loads(wse3_8b):
    code = (
        "import asyncio, sys\n"
        "from memorywall.core import load_hardware, load_model, plan_deployment\n"
        "from memorywall.server.app import EmulatorServer, ServerConfig\n"
        "from memorywall.server.engine.scheduler import EngineConfig\n"
        "async def main():\n"
        "    d = plan_deployment(load_hardware('wse-3'), load_model('llama-3.1-8b'))\n"
        "    s = EmulatorServer(d, EngineConfig(), ServerConfig(port=0, http_port=0))\n"
        "    await s.start(); await s.stop(0.0)\n"
        "asyncio.run(main())\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'loaded'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_flag_without_the_extra_is_a_one_line_error(monkeypatch):
    import importlib.util

    from memorywall.cli.serve import build_parser, configure
    from memorywall.cli.usage import UsageError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    args = build_parser().parse_args(
        ["--hardware", "wse-3", "--model", "llama-3.1-8b", "--otlp-endpoint", "http://c:4318"]
    )
    with pytest.raises(UsageError, match=r"pip install 'memorywall\[otel\]'"):
        configure(args)


def test_endpoint_gets_the_standard_traces_path():
    from memorywall.cli.serve import build_parser

    def parse(url: str) -> str:
        base = ["--hardware", "wse-3", "--model", "llama-3.1-8b"]
        return build_parser().parse_args([*base, "--otlp-endpoint", url]).otlp_endpoint

    assert parse("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert parse("https://c.example/custom/path") == "https://c.example/custom/path"
    with pytest.raises(Exception, match="OTLP/HTTP URL"):
        parse("grpc://127.0.0.1:4317")
