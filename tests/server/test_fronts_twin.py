"""Every front end against the in-memory engine twin: no scheduler, no KV pool, no core.

Each front is checked for what it owns: converting requests, writing the events
the engine hands over (usage, finish reason, modelled times), mapping errors to
statuses from the shared table, and aborting when its client goes away.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
from engine_fakes import model_card
from polling import wait_until
from prometheus_client.parser import text_string_to_metric_families
from smg_grpc_proto.generated import common_pb2, sglang_scheduler_pb2_grpc
from smg_grpc_proto.generated import sglang_scheduler_pb2 as spb

from memorywall.server.engine.twin import TwinEngine
from memorywall.server.fronts.grpc_servicer import EngineServicer
from memorywall.server.fronts.http_front import HttpSite, OpenAIFront
from memorywall.server.fronts.metrics import PrometheusMetrics
from memorywall.server.fronts.sglang_servicer import SglangServicer, add_to_server
from memorywall.server.fronts.status import STATUS_FOR, grpc_status, http_status
from memorywall.server.fronts.tokenizer import ApproximateTokenizer
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc

TIMEOUT_S = 10.0
CARD = model_card(hardware="twin", deployment="twin")


@pytest.fixture
async def grpc_twin() -> AsyncIterator[tuple[TwinEngine, grpc.aio.Channel]]:
    twin = TwinEngine(ttft_s=0.05, itl_s=0.01)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    engine_pb2_grpc.add_EngineServicer_to_server(EngineServicer(twin, CARD), server)
    add_to_server(SglangServicer(twin, CARD), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield twin, channel
    await channel.close()
    await server.stop(grace=None)


# --- the shared status table ----------------------------------------------------------------


def test_every_domain_error_has_one_status_per_wire():
    assert len(STATUS_FOR) >= 5
    for cls, status in STATUS_FOR.items():
        error = cls("x")
        assert grpc_status(error) is status.grpc
        assert http_status(error) == status.http
        assert status.grpc is not grpc.StatusCode.INTERNAL
        assert status.http in (400, 401, 404, 409, 413, 429, 503, 504)


# --- memorywall.v1 ------------------------------------------------------------------------


async def test_grpc_front_streams_what_the_engine_hands_over(grpc_twin):
    twin, channel = grpc_twin
    stub = engine_pb2_grpc.EngineStub(channel)
    request = pb.GenerateRequest(request_id="a", token_count=40, max_tokens=5, ignore_eos=True)
    responses = await asyncio.wait_for(_read(stub.Generate(request)), TIMEOUT_S)
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    assert [len(c.token_ids) for c in chunks] == [1] * 5
    assert [t for c in chunks for t in c.modelled_times_s] == pytest.approx(
        [0.05, 0.06, 0.07, 0.08, 0.09]
    )
    final = responses[-1].finished
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (40, 5)
    assert final.timing.ttft_s == pytest.approx(0.05)
    assert [r.request_id for r in twin.submitted] == ["a"]
    assert twin.aborted == []


async def test_grpc_front_maps_errors_and_aborts_when_the_client_cancels(grpc_twin):
    twin, channel = grpc_twin
    stub = engine_pb2_grpc.EngineStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _read(stub.Generate(pb.GenerateRequest(token_count=4, max_tokens=0)))
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert twin.submitted == []  # refused before the engine saw it

    twin.gate.clear()  # the engine holds every token: the client waits
    call = stub.Generate(pb.GenerateRequest(request_id="held", token_count=4, max_tokens=50))
    await wait_until(lambda: twin.stats().running == 1, TIMEOUT_S)
    call.cancel()
    await wait_until(lambda: twin.aborted == ["held"], TIMEOUT_S)
    assert twin.stats().running == 0


async def test_grpc_front_says_unavailable_while_draining(grpc_twin):
    twin, channel = grpc_twin
    await twin.drain(0.0)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _read(
            engine_pb2_grpc.EngineStub(channel).Generate(
                pb.GenerateRequest(token_count=4, max_tokens=3)
            )
        )
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE


# --- SGLang's worker service --------------------------------------------------------------


async def test_sglang_front_streams_usage_and_publishes_kv_events(grpc_twin):
    _, channel = grpc_twin
    stub = sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
    events = stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest())
    await asyncio.wait_for(events.initial_metadata(), TIMEOUT_S)
    ids = list(range(1, 41))
    request = spb.GenerateRequest(
        request_id="s",
        tokenized=spb.TokenizedInput(input_ids=ids),
        sampling_params=spb.SamplingParams(max_new_tokens=4, ignore_eos=True),
        stream=True,
    )
    responses = await asyncio.wait_for(_read(stub.Generate(request)), TIMEOUT_S)
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    assert [c.completion_tokens for c in chunks] == [1, 2, 3, 4]
    assert {c.prompt_tokens for c in chunks} == {40}
    complete = responses[-1].complete
    assert complete.finish_reason == "length" and complete.completion_tokens == 4
    batch = await asyncio.wait_for(events.read(), TIMEOUT_S)
    stored = batch.events[0].stored
    assert [len(b.token_ids) for b in stored.blocks] == [16, 16]  # 40 tokens: two full blocks
    assert list(stored.blocks[0].token_ids) == ids[:16]
    events.cancel()


async def test_sglang_front_reports_loads_from_engine_stats(grpc_twin):
    twin, channel = grpc_twin
    stub = sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
    twin.gate.clear()
    call = stub.Generate(
        spb.GenerateRequest(
            request_id="l",
            tokenized=spb.TokenizedInput(input_ids=[5] * 10),
            sampling_params=spb.SamplingParams(max_new_tokens=4),
            stream=True,
        )
    )
    await wait_until(lambda: twin.stats().running == 1, TIMEOUT_S)
    loads = await stub.GetLoads(spb.GetLoadsRequest())
    assert loads.loads[0].num_running_reqs == 1
    assert loads.loads[0].num_used_tokens == 10
    call.cancel()
    await wait_until(lambda: twin.aborted == ["l"], TIMEOUT_S)


# --- OpenAI HTTP ---------------------------------------------------------------------------


@pytest.fixture
async def http_twin() -> AsyncIterator[tuple[TwinEngine, str, PrometheusMetrics]]:
    metrics = PrometheusMetrics(
        model_name="m", max_model_len=4096, idle_power_w=10.0, rated_power_w=100.0
    )
    twin = TwinEngine(ttft_s=0.05, itl_s=0.01, observers=[metrics])
    front = OpenAIFront(twin, CARD, ApproximateTokenizer(CARD.vocab_size), metrics)
    site = HttpSite(front.app())
    port = await site.start("127.0.0.1", 0)
    yield twin, f"http://127.0.0.1:{port}", metrics
    await site.stop()


async def test_http_front_streams_sse_with_the_finish_reason_on_the_last_chunk(http_twin):
    twin, url, _ = http_twin
    body = {"model": "m", "prompt": "hello there", "max_tokens": 3, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200
        raw = await r.read()
    events = [json.loads(e[6:]) for e in raw.split(b"\n\n") if e and e != b"data: [DONE]"]
    token_chunks = [e for e in events if e["choices"]]
    assert [c["choices"][0]["finish_reason"] for c in token_chunks] == [None, None, "length"]
    assert [c["memorywall"]["modelled_times_s"] for c in token_chunks] == [
        [pytest.approx(0.05)],
        [pytest.approx(0.06)],
        [pytest.approx(0.07)],
    ]
    assert events[-1]["usage"]["completion_tokens"] == 3
    assert twin.aborted == []


async def test_http_front_maps_errors_from_the_shared_table(http_twin):
    twin, url, _ = http_twin
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 0}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["code"] == 400
        await twin.drain(0.0)
        async with s.post(f"{url}/v1/completions", json={"prompt": "a"}) as r:
            assert r.status == 503
            assert (await r.json())["error"]["type"] == "ServiceUnavailableError"
        async with s.get(f"{url}/health") as r:
            assert r.status == 503


async def test_http_front_aborts_when_the_client_disconnects(http_twin):
    twin, url, _ = http_twin
    twin.gate.clear()
    body = {"prompt": "a b c", "max_tokens": 50, "stream": True}

    async def post() -> None:
        async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json=body) as r:
            await r.read()

    task = asyncio.create_task(post())
    await wait_until(lambda: twin.stats().running == 1, TIMEOUT_S)
    task.cancel()
    await wait_until(lambda: len(twin.aborted) == 1, TIMEOUT_S)
    assert twin.stats().running == 0


# --- Prometheus, as an engine observer -----------------------------------------------------


async def test_metrics_count_what_the_twin_reports(http_twin):
    twin, url, _ = http_twin
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            body = {"prompt": "x y", "max_tokens": 4, "ignore_eos": True}
            async with s.post(f"{url}/v1/completions", json=body) as r:
                assert r.status == 200
        twin.gate.clear()
        held = asyncio.create_task(
            s.post(f"{url}/v1/completions", json={"prompt": "z", "max_tokens": 9})
        )
        await wait_until(lambda: twin.stats().running == 1, TIMEOUT_S)
        async with s.get(f"{url}/metrics") as r:
            text = await r.text()
        held.cancel()
    samples = {
        (x.name, x.labels.get("finished_reason")): x.value
        for f in text_string_to_metric_families(text)
        for x in f.samples
    }
    assert samples[("vllm:generation_tokens_total", None)] == 8
    assert samples[("vllm:time_to_first_token_seconds_count", None)] == 2
    assert samples[("vllm:inter_token_latency_seconds_count", None)] == 6
    assert samples[("vllm:inter_token_latency_seconds_sum", None)] == pytest.approx(0.06)
    assert samples[("vllm:request_success_total", "length")] == 2
    assert samples[("vllm:num_requests_running", None)] == 1  # gauges read the engine's stats


async def _read(call) -> list:
    return [r async for r in call]
