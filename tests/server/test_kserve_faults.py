"""KServe v2 fronts of a real server share the other fronts' faults, admission, request limit
and API key, through the one status table (127.0.0.1 port 0)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from memorywall.kserve import grpc_service_pb2 as pb
from memorywall.kserve import grpc_service_pb2_grpc
from memorywall.server.app import EmulatorServer, ServerConfig
from memorywall.server.engine.guard import GuardConfig
from memorywall.server.engine.scheduler import EngineConfig

TIMEOUT_S = 10.0
FAULT = "x-memorywall-fault"
MODEL = "llama-3.1-8b"


@pytest.fixture
async def serve(wse3_8b) -> AsyncIterator:
    servers: list[EmulatorServer] = []

    async def start(**config: Any) -> EmulatorServer:
        config = {"port": 0, "http_port": 0, **config}
        server = EmulatorServer(wse3_8b, EngineConfig(), ServerConfig(**config))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)


def infer_request(text: str = "hello there", max_tokens: int = 8) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=MODEL)
    body = f'{{"max_tokens": {max_tokens}, "ignore_eos": true}}'.encode()
    for name, value in (("text_input", text.encode()), ("sampling_parameters", body)):
        r.inputs.add(name=name, datatype="BYTES", shape=[1])
        r.raw_input_contents.append(len(value).to_bytes(4, "little") + value)
    return r


async def model_infer(server: EmulatorServer, request: pb.ModelInferRequest, metadata=()):
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            return await stub.ModelInfer(request, metadata=metadata, timeout=TIMEOUT_S), None
        except grpc.aio.AioRpcError as e:
            return None, e


async def test_an_injected_fault_has_the_tables_status_on_every_kserve_path(serve):
    server = await serve(guard=GuardConfig(allow_fault_headers=True))
    spec = "error:1:unavailable"
    _, error = await model_infer(server, infer_request(), metadata=((FAULT, spec),))
    assert error.code() is grpc.StatusCode.UNAVAILABLE and "fault injected" in error.details()
    assert dict(error.trailing_metadata())[FAULT] == "error:unavailable"
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stream = stub.ModelStreamInfer(iter([infer_request()]), metadata=((FAULT, spec),))
        responses = [r async for r in stream]
    assert len(responses) == 1 and "fault injected" in responses[0].error_message
    body = {"text_input": "hi", "max_tokens": 4}
    async with aiohttp.ClientSession() as s:
        for route in ("generate", "generate_stream"):
            url = f"{server.http_url}/v2/models/{MODEL}/{route}"
            async with s.post(url, json=body, headers={FAULT: spec}) as r:
                assert r.status == 503 and r.headers[FAULT] == "error:unavailable"
                assert "fault injected" in (await r.json())["error"]


async def test_admission_and_the_request_limit(serve):
    server = await serve(
        guard=GuardConfig(max_waiting=0, retry_after_s=2.5), max_request_bytes=4096
    )
    _, error = await model_infer(server, infer_request())
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(error.trailing_metadata())["grpc-retry-pushback-ms"] == "2500"
    _, error = await model_infer(server, infer_request("y" * 6000))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "limit of 4,096" in error.details()
    async with aiohttp.ClientSession() as s:
        url = f"{server.http_url}/v2/models/{MODEL}/generate"
        async with s.post(url, json={"text_input": "hi"}) as r:
            assert r.status == 429 and r.headers["Retry-After"] == "3"
        async with s.post(url, json={"text_input": "x" * 10_000}) as r:
            assert r.status == 413


async def test_the_api_key_guards_inference_and_leaves_health_open(serve):
    server = await serve(api_key="sekrit")
    _, error = await model_infer(server, infer_request())
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    response, error = await model_infer(
        server, infer_request(), metadata=(("authorization", "Bearer sekrit"),)
    )
    assert error is None and response.outputs[0].name == "text_output"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{server.http_url}/v2/health/ready") as r:
            assert r.status == 200
        url = f"{server.http_url}/v2/models/{MODEL}/generate"
        async with s.post(url, json={"text_input": "hi"}) as r:
            assert r.status == 401
        headers = {"Authorization": "Bearer sekrit"}
        async with s.post(url, json={"text_input": "hi"}, headers=headers) as r:
            assert r.status == 200
