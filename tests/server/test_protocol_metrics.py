"""`memorywall:finished_requests_by_protocol_total`: /metrics counts each finished request
under the wire protocol of the front it came in on, one server with many fronts, in one
process and under `serve --api-servers 2` (the `Request` crosses to the engine process)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_api_servers import H100_8B, tree  # noqa: F401  (the process-tree fixture)
from test_worker_parity import GENERATE, MAX_TOKENS, PROMPT, SEED, TIMEOUT_S, _memorywall, _sglang

from memorywall.kserve import grpc_service_pb2 as kpb
from memorywall.kserve import grpc_service_pb2_grpc
from memorywall.server.app import EmulatorServer, ServerConfig
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc

SERIES = "memorywall:finished_requests_by_protocol_total"


def by_protocol(text: str) -> dict[str, float]:
    """The series' value per protocol, checking its base labels."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == SERIES:
                assert set(sample.labels) == {"model_name", "engine", "protocol"}
                out[sample.labels["protocol"]] = sample.value
    return out


def _raw_bytes(value: bytes) -> bytes:
    return len(value).to_bytes(4, "little") + value


async def test_each_front_counts_its_requests_under_its_protocol(wse3_8b):
    config = ServerConfig(port=0, http_port=0)  # default gRPC: memorywall, sglang, kserve
    server = EmulatorServer(wse3_8b, EngineConfig(seed=SEED), config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            await _memorywall(channel, "a", ())
            await _sglang(channel, "b", ())
            infer = kpb.ModelInferRequest(model_name=server.card.model)
            infer.inputs.add(name="text_input", datatype="BYTES", shape=[1])
            infer.raw_input_contents.append(_raw_bytes(b"hello there"))
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            await stub.ModelInfer(infer, timeout=TIMEOUT_S)
        url = server.http_url
        async with aiohttp.ClientSession() as s:
            body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True}
            async with s.post(f"{url}/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
            body = {"text_input": "hello there", "max_tokens": MAX_TOKENS}
            async with s.post(f"{url}/v2/models/{server.card.model}/generate", json=body) as r:
                assert r.status == 200, await r.text()
            async with s.get(f"{url}/metrics") as r:
                assert r.status == 200
                counts = by_protocol(await r.text())
    finally:
        await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)
    assert counts == {
        "memorywall": 1,
        "sglang": 1,
        "kserve-grpc": 1,
        "openai": 1,
        "kserve-http": 1,
    }


@pytest.mark.parametrize("protocol", ["vllm", "trtllm"])
async def test_the_smg_engines_served_alone_count_under_their_own_name(wse3_8b, protocol):
    config = ServerConfig(port=0, metrics_port=0, grpc_services=(protocol,))
    server = EmulatorServer(wse3_8b, EngineConfig(seed=SEED), config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            await GENERATE[protocol](channel, "a", ())
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            assert r.status == 200
            counts = by_protocol(await r.text())
    finally:
        await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)
    assert counts == {protocol: 1}


def test_the_protocol_crosses_to_the_engine_process(tree):  # noqa: F811
    t = tree(*H100_8B, "--port", "0", "--http-port", "0", "--api-servers", "2")
    fronts = t.connect_to_each_front(2)
    body = json.dumps({"prompt": "hi", "max_tokens": 4, "ignore_eos": True})
    for conn in fronts.values():  # one OpenAI request through each front process
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()
    with grpc.insecure_channel(t.ready.grpc_target) as channel:
        request = pb.GenerateRequest(token_count=20, max_tokens=4, ignore_eos=True)
        replies = list(engine_pb2_grpc.EngineStub(channel).Generate(request, timeout=TIMEOUT_S))
        assert replies[-1].finished.usage.completion_tokens == 4
    # Every front serves the engine process's /metrics: the same counts from each.
    for conn in fronts.values():
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        assert by_protocol(response.read().decode()) == {"openai": 2, "memorywall": 1}
        conn.close()
