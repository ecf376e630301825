"""EmulatorServer end to end over loopback gRPC: raw stubs, real engine, real performance core."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from polling import wait_until

from memorywall.core import Deployment
from memorywall.server.app import EmulatorServer, ServerConfig
from memorywall.server.engine.build import build_core
from memorywall.server.engine.live import AsyncEngine
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.engine.tokens import count_text_tokens
from memorywall.server.fronts.grpc_servicer import EngineServicer
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
SERVICE = "memorywall.v1.Engine"
TIMEOUT_S = 10.0
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]

Serve = Callable[..., Awaitable[EmulatorServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start EmulatorServers on 127.0.0.1 port 0 in this test's loop; all stopped at the end."""
    servers: list[EmulatorServer] = []

    async def start(deployment: Deployment, engine_config: EngineConfig | None = None):
        server = EmulatorServer(
            deployment, engine_config or EngineConfig(), ServerConfig(port=0, load_format="dummy")
        )
        port = await server.start()
        assert port > 0 and server.target == f"127.0.0.1:{port}"
        servers.append(server)
        return server

    yield start
    for server in servers:
        await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)


@pytest.fixture
async def channels() -> AsyncIterator[Callable[[EmulatorServer], grpc.aio.Channel]]:
    opened: list[grpc.aio.Channel] = []

    def open_channel(server: EmulatorServer) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(server.target, options=CHANNEL_OPTIONS)
        opened.append(channel)
        return channel

    yield open_channel
    for channel in opened:
        await channel.close()


@pytest.fixture
async def wse3(serve, channels, wse3_8b):
    server = await serve(wse3_8b)
    return server, engine_pb2_grpc.EngineStub(channels(server))


async def generate(
    stub: engine_pb2_grpc.EngineStub, request: pb.GenerateRequest, timeout_s: float = TIMEOUT_S
) -> tuple[list[pb.TokenChunk], pb.Finished]:
    async def read():
        return [r async for r in stub.Generate(request)]

    responses = await asyncio.wait_for(read(), timeout_s)
    assert all(r.request_id == responses[0].request_id for r in responses)
    assert all(r.WhichOneof("kind") == "chunk" for r in responses[:-1])
    assert responses[-1].WhichOneof("kind") == "finished"
    return [r.chunk for r in responses[:-1]], responses[-1].finished


async def read_rest(call: grpc.aio.UnaryStreamCall) -> list[pb.GenerateResponse]:
    """The responses left on a stream, read with read() (grpc.aio forbids mixing styles)."""
    responses = []
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return responses


async def expect_error(call_or_coro, timeout_s: float = TIMEOUT_S) -> grpc.aio.AioRpcError:
    async def run():
        if isinstance(call_or_coro, grpc.aio.UnaryStreamCall):
            await read_rest(call_or_coro)
        else:
            await call_or_coro

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(run(), timeout_s)
    return info.value


def ids_of(chunks: list[pb.TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def wait_idle(stub: engine_pb2_grpc.EngineStub, within_s: float = 2.0) -> pb.ServerInfo:
    """Poll GetServerInfo until nothing runs and no KV is held."""
    last: list[pb.ServerInfo] = []

    async def idle() -> pb.ServerInfo | None:
        info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT_S)
        last[:] = [info]
        return info if (info.running, info.waiting, info.kv_used_tokens) == (0, 0, 0) else None

    return await wait_until(idle, within_s, every_s=0.02, why=lambda: f"slot or KV held: {last}")


# --- Generate ---------------------------------------------------------------------------------


async def test_generate_round_trip(wse3):
    _, stub = wse3
    sampling = pb.SamplingParams(
        temperature=0.7, top_p=0.9, top_k=40, seed=42, stop=["\n\n"], stop_token_ids=[17]
    )
    text = "The memory wall moves bytes between compute and storage."
    request = pb.GenerateRequest(
        request_id="round-trip", text=text, max_tokens=50, ignore_eos=True, sampling=sampling
    )
    chunks, finished = await generate(stub, request)

    ids = ids_of(chunks)
    times = [t for c in chunks for t in c.modelled_times_s]
    assert len(ids) == 50
    assert all(len(c.token_ids) == len(c.modelled_times_s) > 0 for c in chunks)
    assert all(c.text for c in chunks)
    assert times == sorted(times)
    assert finished.finish_reason == pb.FINISH_REASON_LENGTH
    assert finished.usage.prompt_tokens == count_text_tokens(text)
    assert finished.usage.completion_tokens == 50
    assert 0 < finished.timing.ttft_s <= finished.timing.e2e_s
    assert finished.timing.ttft_s == pytest.approx(times[0])
    assert finished.timing.e2e_s == pytest.approx(times[-1])
    assert finished.energy_j > 0
    assert finished.sampling == sampling


@pytest.mark.parametrize(
    ("prompt", "prompt_tokens"),
    [
        ({"text": "hello wafer world"}, count_text_tokens("hello wafer world")),
        ({"token_ids": pb.TokenIds(ids=[1, 2, 3, 128255])}, 4),
        ({"token_count": 777}, 777),
    ],
)
async def test_each_prompt_kind_works(wse3, prompt, prompt_tokens):
    _, stub = wse3
    request = pb.GenerateRequest(max_tokens=8, ignore_eos=True, **prompt)
    chunks, finished = await generate(stub, request)
    assert len(ids_of(chunks)) == 8
    assert finished.usage.prompt_tokens == prompt_tokens


async def test_server_assigns_request_id_when_empty(wse3):
    _, stub = wse3
    responses = [
        r
        async for r in stub.Generate(
            pb.GenerateRequest(token_count=10, max_tokens=3), timeout=TIMEOUT_S
        )
    ]
    rid = responses[0].request_id
    assert rid
    assert all(r.request_id == rid for r in responses)


async def test_model_info(wse3, wse3_8b):
    _, stub = wse3
    info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT_S)
    assert info.model == "llama-3.1-8b"
    assert info.hardware == "wse-3"
    assert info.devices == 1
    assert info.context_window == 131072
    assert info.vocab_size == 128256
    assert set(info.eos_token_ids) == set(wse3_8b.model.eos_token_ids)
    assert info.deployment == wse3_8b.describe()
    assert 0 < wse3_8b.kv_capacity_tokens - info.kv_capacity_tokens < 16
    assert info.kv_capacity_tokens % 16 == 0
    assert info.max_num_seqs == 256
    assert info.max_num_batched_tokens == 8192
    assert info.predicted_tokens_per_s_per_user == pytest.approx(1800, rel=0.05)


async def test_server_info_after_traffic(wse3):
    _, stub = wse3
    requests = [
        pb.GenerateRequest(request_id=f"r{i}", token_count=50, max_tokens=40, ignore_eos=True)
        for i in range(3)
    ]
    await asyncio.gather(*(generate(stub, r) for r in requests))
    info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT_S)
    assert info.steps > 0
    assert info.tokens_generated == 120
    assert info.requests_finished == 3
    assert info.running == info.waiting == info.kv_used_tokens == 0
    assert info.kv_usage_fraction == 0
    assert info.kv_total_tokens > 0
    assert info.lag.samples > 0
    assert info.lag.max_s >= info.lag.p99_s >= info.lag.p50_s
    assert info.lag.threshold_s > 0
    assert info.modelled_energy_j > 0
    assert info.uptime_s > 0
    assert not info.draining


async def test_abort_rpc_ends_a_live_stream(wse3):
    _, stub = wse3
    call = stub.Generate(
        pb.GenerateRequest(request_id="victim", token_count=100, max_tokens=20_000, ignore_eos=True)
    )
    first = await asyncio.wait_for(call.read(), TIMEOUT_S)
    assert first.WhichOneof("kind") == "chunk"
    reply = await stub.Abort(pb.AbortRequest(request_ids=["victim", "nobody"]), timeout=TIMEOUT_S)
    assert list(reply.aborted) == ["victim"]
    responses = await asyncio.wait_for(read_rest(call), TIMEOUT_S)
    assert responses[-1].WhichOneof("kind") == "finished"
    finished = responses[-1].finished
    assert finished.finish_reason == pb.FINISH_REASON_ABORT
    got = len(first.chunk.token_ids) + len(ids_of([r.chunk for r in responses[:-1]]))
    assert finished.usage.completion_tokens == got < 20_000
    info = await wait_idle(stub)
    assert info.requests_aborted == 1


# --- bad input --------------------------------------------------------------------------------

BAD_REQUESTS = {
    "max_tokens 0": (
        {"token_count": 10, "max_tokens": 0},
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_tokens",
    ),
    "no prompt": ({"max_tokens": 5}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    "empty text": ({"text": "", "max_tokens": 5}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    "empty token_ids": (
        {"token_ids": pb.TokenIds(ids=[]), "max_tokens": 5},
        grpc.StatusCode.INVALID_ARGUMENT,
        "prompt",
    ),
    "token_count 0": (
        {"token_count": 0, "max_tokens": 5},
        grpc.StatusCode.INVALID_ARGUMENT,
        "prompt",
    ),
    "token id >= vocab": (
        {"token_ids": pb.TokenIds(ids=[5, 128256]), "max_tokens": 5},
        grpc.StatusCode.INVALID_ARGUMENT,
        "128256",
    ),
    "min_tokens > max_tokens": (
        {"token_count": 10, "max_tokens": 5, "min_tokens": 6},
        grpc.StatusCode.INVALID_ARGUMENT,
        "min_tokens",
    ),
    "beyond context": (
        {"token_count": 131_000, "max_tokens": 100},
        grpc.StatusCode.INVALID_ARGUMENT,
        "context window",
    ),
    "unknown model": (
        {"model": "gpt-9", "token_count": 10, "max_tokens": 5},
        grpc.StatusCode.NOT_FOUND,
        "gpt-9",
    ),
    "duplicate live id": (
        {"request_id": "good", "token_count": 10, "max_tokens": 5},
        grpc.StatusCode.ALREADY_EXISTS,
        "good",
    ),
    "negative min_interval_s": (
        {
            "token_count": 10,
            "max_tokens": 5,
            "stream_options": pb.StreamOptions(min_interval_s=-0.1),
        },
        grpc.StatusCode.INVALID_ARGUMENT,
        "min_interval_s",
    ),
}


@pytest.mark.parametrize(("fields", "code", "words"), BAD_REQUESTS.values(), ids=BAD_REQUESTS)
async def test_bad_input_gets_status_and_good_stream_survives(wse3, fields, code, words):
    _, stub = wse3
    good_call = stub.Generate(
        pb.GenerateRequest(request_id="good", token_count=200, max_tokens=600, ignore_eos=True)
    )
    first = await asyncio.wait_for(good_call.read(), TIMEOUT_S)  # "good" is live now
    error = await expect_error(stub.Generate(pb.GenerateRequest(**fields), timeout=TIMEOUT_S))
    assert error.code() == code, error.details()
    assert words in error.details()
    responses = [first, *await asyncio.wait_for(read_rest(good_call), TIMEOUT_S)]
    finished = responses[-1].finished
    assert finished.finish_reason == pb.FINISH_REASON_LENGTH
    assert finished.usage.completion_tokens == 600
    assert len(ids_of([r.chunk for r in responses[:-1]])) == 600
    info = await wait_idle(stub)
    assert info.requests_finished == 1
    assert info.requests_aborted == 0


async def test_request_beyond_kv_capacity_is_invalid(serve, channels, wse3_8b):
    small = dataclasses.replace(wse3_8b, memory_utilization=0.5)  # ~45k tokens of KV
    assert small.kv_capacity_tokens < 60_000
    server = await serve(small)
    stub = engine_pb2_grpc.EngineStub(channels(server))
    info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT_S)
    assert info.kv_capacity_tokens <= small.kv_capacity_tokens
    too_big = pb.GenerateRequest(token_count=info.kv_capacity_tokens, max_tokens=1)
    error = await expect_error(stub.Generate(too_big, timeout=TIMEOUT_S))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "KV" in error.details()
    assert str(info.kv_capacity_tokens) in error.details().replace(",", "")
    fits = pb.GenerateRequest(token_count=info.kv_capacity_tokens - 1, max_tokens=1)
    _, finished = await generate(stub, fits, timeout_s=30.0)
    assert finished.usage.completion_tokens == 1


# --- cancellation, deadlines ------------------------------------------------------------------


async def test_client_cancel_frees_slot_and_kv(wse3):
    _, stub = wse3
    call = stub.Generate(
        pb.GenerateRequest(request_id="c", token_count=1000, max_tokens=20_000, ignore_eos=True)
    )
    await asyncio.wait_for(call.read(), TIMEOUT_S)
    info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT_S)
    assert info.running == 1 and info.kv_used_tokens > 1000
    call.cancel()
    info = await wait_idle(stub, within_s=2.0)
    assert info.requests_aborted == 1
    # The id is free for reuse at once.
    again = pb.GenerateRequest(request_id="c", token_count=5, max_tokens=3, ignore_eos=True)
    _, finished = await generate(stub, again)
    assert finished.usage.completion_tokens == 3


async def test_deadline_shorter_than_request_frees_kv(wse3):
    _, stub = wse3
    request = pb.GenerateRequest(token_count=100, max_tokens=20_000, ignore_eos=True)  # ~11 s
    error = await expect_error(stub.Generate(request, timeout=0.3))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    info = await wait_idle(stub, within_s=2.0)
    assert info.requests_aborted == 1


class CancelledAtHeaders:
    """A servicer context whose client goes away while the response headers are being sent."""

    def invocation_metadata(self) -> tuple:
        return ()

    async def send_initial_metadata(self, metadata) -> None:
        raise asyncio.CancelledError

    async def abort(self, code, details) -> None:
        raise AssertionError(f"unexpected abort: {code} {details}")


async def test_cancel_while_sending_headers_frees_slot_and_kv(wse3_8b):
    core, card = build_core(wse3_8b, EngineConfig())
    engine = AsyncEngine(core, max_messages_per_s=16_000)
    servicer = EngineServicer(engine, card)
    request = pb.GenerateRequest(request_id="gone", token_count=10, max_tokens=1000)
    try:
        generator = servicer.Generate(request, CancelledAtHeaders())
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(anext(generator), TIMEOUT_S)
        assert "gone" not in core.live
        assert engine.stats().running + engine.stats().waiting == 0
        assert engine.stats().kv_used_tokens == 0
    finally:
        await engine.stop()


# --- health, reflection, shutdown -------------------------------------------------------------


async def test_health_serving_then_not_serving_once_stop_begins(serve, channels, wse3_8b):
    server = await serve(wse3_8b)
    channel = channels(server)
    health = health_pb2_grpc.HealthStub(channel)
    stub = engine_pb2_grpc.EngineStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ("", SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT_S)
        assert reply.status == serving
    error = await expect_error(
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT_S)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND

    long_call = stub.Generate(pb.GenerateRequest(token_count=10, max_tokens=20_000))
    await asyncio.wait_for(long_call.read(), TIMEOUT_S)
    stopping = asyncio.create_task(server.stop(grace_s=1.0))
    try:

        async def not_serving() -> bool:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
            return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

        await wait_until(not_serving, 2.0)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2.0)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=2.0)
        assert info.draining
        error = await expect_error(
            stub.Generate(pb.GenerateRequest(token_count=10, max_tokens=5), timeout=2.0)
        )
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in error.details()
    finally:
        await asyncio.wait_for(stopping, TIMEOUT_S)
    error = await expect_error(long_call)
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_reflection_lists_the_engine_service(wse3):
    server, _ = wse3
    async with grpc.aio.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(timeout=TIMEOUT_S)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await asyncio.wait_for(call.read(), TIMEOUT_S)
        await call.done_writing()
        names = {s.name for s in reply.list_services_response.service}
    assert SERVICE in names
    assert "grpc.health.v1.Health" in names


async def test_graceful_shutdown_cuts_long_streams_and_lets_short_ones_finish(
    serve, channels, h100_8b
):
    server = await serve(h100_8b)  # ~7.6 ms per decode step
    stub = engine_pb2_grpc.EngineStub(channels(server))
    long_call = stub.Generate(
        pb.GenerateRequest(request_id="long", token_count=100, max_tokens=3000, ignore_eos=True)
    )
    await asyncio.wait_for(long_call.read(), TIMEOUT_S)
    short_call = stub.Generate(
        pb.GenerateRequest(request_id="short", token_count=100, max_tokens=8, ignore_eos=True)
    )
    first_short = await asyncio.wait_for(short_call.read(), TIMEOUT_S)
    short_rest = asyncio.create_task(read_rest(short_call))
    started = time.monotonic()
    await asyncio.wait_for(server.stop(grace_s=0.2), TIMEOUT_S)
    assert time.monotonic() - started < 5.0

    short = [first_short, *await asyncio.wait_for(short_rest, TIMEOUT_S)]
    assert short[-1].finished.finish_reason == pb.FINISH_REASON_LENGTH
    assert short[-1].finished.usage.completion_tokens == 8
    assert len(ids_of([r.chunk for r in short[:-1]])) == 8

    error = await expect_error(long_call)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "shut down" in error.details()


async def test_start_on_a_busy_port_raises_oserror(wse3_8b):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmulatorServer(
            wse3_8b, EngineConfig(), ServerConfig(port=port, load_format="dummy")
        )
        try:
            with pytest.raises(OSError, match=str(port)):
                await server.start()
        finally:
            await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)


def test_generated_proto_code_is_current():
    result = subprocess.run(
        [sys.executable, "protos/generate.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
