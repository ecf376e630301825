"""Faults, admission and request limits through the fronts of a real server (127.0.0.1 port 0):
each fault kind with its status and metric (memorywall.v1 gRPC and OpenAI HTTP; SGLang's
worker API reads the same header), the same seed failing the same requests, 429 /
RESOURCE_EXHAUSTED with a retry hint, 413 / INVALID_ARGUMENT for oversized requests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import pytest
from polling import wait_until
from smg_grpc_proto.generated import sglang_scheduler_pb2 as sglang_pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc

from memorywall.server.app import EmulatorServer, ServerConfig
from memorywall.server.engine.faults import parse_rule, parse_spec
from memorywall.server.engine.guard import GuardConfig
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc

TIMEOUT_S = 10.0
FAULT = "x-memorywall-fault"

Serve = Callable[..., Awaitable[EmulatorServer]]


@pytest.fixture
async def serve(wse3_8b) -> AsyncIterator[Serve]:
    servers: list[EmulatorServer] = []

    async def start(**config: Any) -> EmulatorServer:
        config = {"port": 0, "http_port": 0, "load_format": "dummy", **config}
        server = EmulatorServer(wse3_8b, EngineConfig(), ServerConfig(**config))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as s:
        yield s


def body(max_tokens: int = 8, stream: bool = True) -> dict[str, Any]:
    return {"prompt": "hello there", "max_tokens": max_tokens, "stream": stream, "ignore_eos": True}


async def grpc_generate(server: EmulatorServer, request: pb.GenerateRequest, metadata=()):
    """(chunks, finished, None) or (chunks, None, AioRpcError)."""
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        chunks: list[pb.TokenChunk] = []
        finished = None
        call = stub.Generate(request, metadata=metadata, timeout=TIMEOUT_S)
        try:
            async for r in call:
                if r.HasField("chunk"):
                    chunks.append(r.chunk)
                else:
                    finished = r.finished
        except grpc.aio.AioRpcError as e:
            return chunks, None, e
        return chunks, finished, None


async def sglang_generate(server: EmulatorServer, max_new_tokens: int, metadata=()):
    """SGLang's Generate, streamed: (token ids, complete, None) or (ids, None, AioRpcError)."""
    request = sglang_pb.GenerateRequest(
        tokenized=sglang_pb.TokenizedInput(input_ids=list(range(100, 164))),
        sampling_params=sglang_pb.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
        stream=True,
    )
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
        ids: list[int] = []
        complete = None
        try:
            async for r in stub.Generate(request, metadata=metadata, timeout=TIMEOUT_S):
                if r.HasField("chunk"):
                    ids.extend(r.chunk.token_ids)
                else:
                    complete = r.complete
        except grpc.aio.AioRpcError as e:
            return ids, None, e
        return ids, complete, None


def grpc_request(rid: str = "", max_tokens: int = 8) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=rid, token_count=64, max_tokens=max_tokens, ignore_eos=True
    )


async def sse_events(response: aiohttp.ClientResponse) -> list[Any]:
    raw = await response.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    return [json.loads(e[len(b"data: ") :]) for e in events[:-1]]


async def scrape(session, server: EmulatorServer) -> str:
    async with session.get(f"{server.http_url}/metrics") as r:
        return await r.text()


def series(text: str, name: str, label: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {label} not in /metrics")


async def assert_idle(server: EmulatorServer) -> None:
    def idle() -> bool:
        s = server.engine.stats()
        return (s.running, s.waiting, s.kv_used_tokens) == (0, 0, 0)

    await wait_until(idle, 2.0, why=lambda: f"engine not idle: {server.engine.stats()}")


# --- each kind, both fronts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "code", "status"),
    [
        ("error:1", grpc.StatusCode.UNAVAILABLE, 503),
        ("error:1:resource_exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        ("error:1:internal", grpc.StatusCode.INTERNAL, 500),
        ("error:1:deadline_exceeded", grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    ],
)
async def test_error_fault_refuses_on_both_fronts_and_is_counted(
    serve, session, spec, code, status
):
    server = await serve(guard=GuardConfig(allow_fault_headers=True))
    _, _, error = await grpc_generate(server, grpc_request(), metadata=((FAULT, spec),))
    assert error is not None and error.code() is code
    assert "fault injected" in error.details()
    named = str(parse_rule(spec).fault)  # "error:unavailable"
    assert dict(error.trailing_metadata())[FAULT] == named
    async with session.post(
        f"{server.http_url}/v1/completions", json=body(), headers={FAULT: spec}
    ) as r:
        assert r.status == status
        payload = await r.json()
        assert (
            payload["error"]["code"] == status and "fault injected" in payload["error"]["message"]
        )
        assert r.headers[FAULT] == named
    text = await scrape(session, server)
    assert series(text, "memorywall:faults_injected_total", 'kind="error"') == 2
    assert series(text, "memorywall:faults_injected_total", 'kind="abort"') == 0
    await assert_idle(server)


async def test_abort_fault_ends_streams_after_n_tokens_with_unavailable(serve, session):
    server = await serve(guard=GuardConfig(allow_fault_headers=True))
    chunks, finished, error = await grpc_generate(
        server, grpc_request(max_tokens=50), metadata=((FAULT, "abort:1:5"),)
    )
    assert finished is None and error.code() is grpc.StatusCode.UNAVAILABLE
    assert sum(len(c.token_ids) for c in chunks) == 5
    assert dict(error.trailing_metadata())[FAULT] == "abort:5"
    async with session.post(
        f"{server.http_url}/v1/completions", json=body(50), headers={FAULT: "abort:1:5"}
    ) as r:
        assert r.status == 200  # the stream had begun
        events = await sse_events(r)
    tokens = sum(len(e["memorywall"]["token_ids"]) for e in events if "memorywall" in e)
    assert tokens == 5 and events[-1]["error"]["code"] == 503
    async with session.post(
        f"{server.http_url}/v1/completions",
        json=body(50, stream=False),
        headers={FAULT: "abort:1:0"},
    ) as r:
        assert r.status == 503
    text = await scrape(session, server)
    assert series(text, "memorywall:faults_injected_total", 'kind="abort"') == 3
    await assert_idle(server)


async def test_stall_and_slow_show_in_modelled_timing_on_both_fronts(serve, session):
    server = await serve(guard=GuardConfig(allow_fault_headers=True))
    _, plain, _ = await grpc_generate(server, grpc_request("p", 20))
    _, stalled, _ = await grpc_generate(server, grpc_request("s", 20), ((FAULT, "stall:1:0.3"),))
    chunks, slowed, _ = await grpc_generate(server, grpc_request("w", 20), ((FAULT, "slow:1:4"),))
    assert stalled.fault == "stall:0.3" and slowed.fault == "slow:4" and plain.fault == ""
    # Exact shifts and stretches are checked on a jumping clock (test_guard.py); here the
    # host may stall the live timeline, which only ever moves tokens later.
    assert stalled.timing.ttft_s >= 0.3
    times = [t for c in chunks for t in c.modelled_times_s]
    assert slowed.timing.decode_s == pytest.approx(times[-1] - times[0], abs=1e-9)
    # Nineteen gaps, each four times a decode step (the core's batch-1 rate at a 1,024-token
    # context; this 64-token prompt's steps are a little shorter).
    step_s = 1 / server.card.predicted_tokens_per_s_per_user
    assert slowed.timing.decode_s >= 4 * 19 * step_s * 0.8
    async with session.post(
        f"{server.http_url}/v1/completions",
        json={**body(20), "stream_options": {"include_usage": True}},
        headers={FAULT: "stall:1:0.3"},
    ) as r:
        events = await sse_events(r)
    first = next(e for e in events if e.get("memorywall", {}).get("modelled_times_s"))
    assert first["memorywall"]["modelled_times_s"][0] >= 0.3
    assert events[-1]["memorywall"]["fault"] == "stall:0.3"
    text = await scrape(session, server)
    assert series(text, "memorywall:faults_injected_total", 'kind="stall"') == 2
    assert series(text, "memorywall:faults_injected_total", 'kind="slow"') == 1


async def test_the_sglang_front_applies_a_requests_fault(serve, session):
    server = await serve(guard=GuardConfig(allow_fault_headers=True))
    ids, complete, error = await sglang_generate(server, 4, ((FAULT, "error:1:internal"),))
    assert ids == [] and complete is None
    assert error.code() is grpc.StatusCode.INTERNAL and "fault injected" in error.details()
    assert dict(error.trailing_metadata())[FAULT] == "error:internal"
    ids, complete, error = await sglang_generate(server, 50, ((FAULT, "abort:1:5"),))
    assert complete is None and error.code() is grpc.StatusCode.UNAVAILABLE
    assert len(ids) == 5 and dict(error.trailing_metadata())[FAULT] == "abort:5"
    _, _, error = await sglang_generate(server, 4, ((FAULT, "abort:1:five"),))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    ids, complete, error = await sglang_generate(server, 6)
    assert error is None and len(ids) == 6 and complete.finish_reason == "length"
    text = await scrape(session, server)
    assert series(text, "memorywall:faults_injected_total", 'kind="error"') == 1
    assert series(text, "memorywall:faults_injected_total", 'kind="abort"') == 1
    await assert_idle(server)


async def test_fault_headers_are_refused_without_the_flag(serve, session):
    server = await serve()
    _, _, error = await grpc_generate(server, grpc_request(), ((FAULT, "abort:1:1"),))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "--allow-fault-headers" in error.details()
    _, _, error = await sglang_generate(server, 4, ((FAULT, "abort:1:1"),))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "--allow-fault-headers" in error.details()
    async with session.post(
        f"{server.http_url}/v1/completions", json=body(), headers={FAULT: "nonsense"}
    ) as r:
        assert r.status == 400


async def test_the_same_seed_fails_the_same_requests(serve):
    async def fates(seed: int) -> list[str]:
        server = await serve(guard=GuardConfig(faults=parse_spec("error:0.3"), fault_seed=seed))
        out = []
        for i in range(30):  # one at a time: arrival order is request order
            _, finished, error = await grpc_generate(server, grpc_request(f"r{i}", 2))
            out.append("ok" if finished is not None else error.code().name)
        return out

    a, b, c = await fates(11), await fates(11), await fates(12)
    assert a == b and a != c
    assert 0 < a.count("UNAVAILABLE") < 30


# --- admission and limits ------------------------------------------------------------------


async def test_max_waiting_answers_429_and_resource_exhausted_with_a_retry_hint(serve, session):
    server = await serve(guard=GuardConfig(max_waiting=0, retry_after_s=2.5))
    _, _, error = await grpc_generate(server, grpc_request())
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(error.trailing_metadata())["grpc-retry-pushback-ms"] == "2500"
    async with session.post(f"{server.http_url}/v1/completions", json=body()) as r:
        assert r.status == 429 and r.headers["Retry-After"] == "3"
        assert (await r.json())["error"]["type"] == "RateLimitError"
    text = await scrape(session, server)
    assert series(text, "memorywall:requests_rejected_total", 'reason="max_waiting"') == 2


async def test_oversized_requests_get_413_and_invalid_argument(serve, session):
    server = await serve(max_request_bytes=4096)
    async with session.post(
        f"{server.http_url}/v1/completions", json={**body(), "prompt": "x" * 10_000}
    ) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"] == 413
    big = pb.GenerateRequest(text="y" * 6000, max_tokens=4)
    _, _, error = await grpc_generate(server, big)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "limit of 4,096" in error.details()
    huge = pb.GenerateRequest(text="y" * 20_000, max_tokens=4)  # beyond grpc's own cap
    _, _, error = await grpc_generate(server, huge)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    count = pb.GenerateRequest(token_count=4_000_000_000, max_tokens=4)
    _, _, error = await grpc_generate(server, count)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "context window" in error.details()
    await assert_idle(server)
