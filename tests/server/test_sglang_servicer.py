"""SGLang's worker API (sglang.grpc.scheduler.SglangScheduler) end to end over loopback gRPC,
with the stubs the smg gateway's Python side ships (smg-grpc-proto), on an EmulatorServer."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import zipfile
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from polling import wait_until
from smg_grpc_proto.generated import common_pb2, sglang_scheduler_pb2_grpc
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from tokenizers import Tokenizer

from memorywall.core import Deployment
from memorywall.server.app import EmulatorServer, ServerConfig
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.engine.tokens import token_text
from memorywall.server.fronts.sglang_servicer import ThroughputWindow
from memorywall.v1 import engine_pb2, engine_pb2_grpc

SERVICE = "sglang.grpc.scheduler.SglangScheduler"
TIMEOUT_S = 10.0
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]
LONG = 20_000  # output tokens: ~11 s of decode on the wse-3, far longer than any test


@pytest.fixture
async def serve() -> AsyncIterator[Callable]:
    servers: list[EmulatorServer] = []

    async def start(deployment: Deployment) -> EmulatorServer:
        server = EmulatorServer(
            deployment, EngineConfig(), ServerConfig(port=0, load_format="dummy")
        )
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)


@pytest.fixture
async def wse3(serve, wse3_8b):
    """The server, an SglangScheduler stub and a memorywall.v1 stub on the same port."""
    server = await serve(wse3_8b)
    async with grpc.aio.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel:
        yield (
            server,
            sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel),
            engine_pb2_grpc.EngineStub(channel),
        )


def generate_request(
    request_id: str = "",
    prompt: int = 20,
    *,
    stream: bool = True,
    max_new_tokens: int | None = 50,
    ignore_eos: bool = True,
    first_id: int = 100,
    **sampling,
) -> pb.GenerateRequest:
    """Prompt ids `first_id`, `first_id + 1`, ...: give concurrent requests different
    `first_id`s where a shared prefix (prefix caching) would change what a test measures."""
    params = pb.SamplingParams(
        temperature=1.0, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos, **sampling
    )
    return pb.GenerateRequest(
        request_id=request_id,
        tokenized=pb.TokenizedInput(input_ids=list(range(first_id, first_id + prompt))),
        sampling_params=params,
        stream=stream,
    )


async def generate(stub, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    async def read():
        return [r async for r in stub.Generate(request)]

    responses = await asyncio.wait_for(read(), TIMEOUT_S)
    assert all(r.WhichOneof("response") == "chunk" for r in responses[:-1])
    assert responses[-1].WhichOneof("response") == "complete"
    return responses


async def read_rest(call) -> list[pb.GenerateResponse]:
    responses = []
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return responses


async def expect_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(read_rest(call), TIMEOUT_S)
    return info.value


async def wait_idle(stub, within_s: float = 2.0) -> pb.SchedulerLoad:
    """Poll GetLoads until nothing runs or waits and no KV is held."""
    last: list[pb.SchedulerLoad] = []

    async def idle() -> pb.SchedulerLoad | None:
        load = (await stub.GetLoads(pb.GetLoadsRequest(), timeout=TIMEOUT_S)).loads[0]
        last[:] = [load]
        held = (load.num_running_reqs, load.num_waiting_reqs, load.num_used_tokens)
        return load if held == (0, 0, 0) else None

    return await wait_until(idle, within_s, every_s=0.02, why=lambda: f"slot or KV held: {last}")


# --- info and health --------------------------------------------------------------------------


async def test_health_check_and_model_info(wse3):
    server, stub, _ = wse3
    health = await stub.HealthCheck(pb.HealthCheckRequest(), timeout=TIMEOUT_S)
    assert health.healthy
    info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT_S)
    card = server.card
    assert info.served_model_name == info.model_path == card.model
    assert info.is_generation
    assert info.max_context_length == card.context_window
    assert info.vocab_size == card.vocab_size
    assert tuple(info.eos_token_ids) == card.eos_token_ids
    assert info.tokenizer_path and list(info.architectures)


async def test_server_info_reports_parallelism_and_capacity(wse3):
    server, stub, _ = wse3
    info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT_S)
    card = server.card
    args = info.server_args
    assert args["tp_size"] == card.tensor_parallel
    assert args["pp_size"] == card.pipeline_parallel
    assert args["dp_size"] == 1
    assert args["max_running_requests"] == card.max_num_seqs
    assert args["context_length"] == card.context_window
    assert args["max_total_tokens"] == info.max_total_num_tokens == card.kv_capacity_tokens
    assert info.server_type == "grpc" and info.active_requests == 0
    assert info.start_time.seconds > 0


# --- Generate ---------------------------------------------------------------------------------


async def test_streaming_generate_counts_and_usage(wse3):
    _, stub, _ = wse3
    responses = await generate(stub, generate_request("s", prompt=20, max_new_tokens=50))
    assert all(r.request_id == "s" for r in responses)
    chunks, complete = [r.chunk for r in responses[:-1]], responses[-1].complete
    assert chunks and sum(len(c.token_ids) for c in chunks) == 50
    running = 0
    for c in chunks:
        running += len(c.token_ids)
        assert c.completion_tokens == running
        assert c.prompt_tokens == 20 and c.cached_tokens == 0
    assert complete.finish_reason == "length"
    assert complete.prompt_tokens == 20 and complete.completion_tokens == 50
    assert len(complete.output_ids) == 0  # streamed ids are not repeated


async def test_non_streaming_generate_sends_one_complete(wse3):
    server, stub, _ = wse3
    responses = await generate(stub, generate_request(stream=False, max_new_tokens=30))
    assert len(responses) == 1
    complete = responses[0].complete
    assert complete.finish_reason == "length" and complete.completion_tokens == 30
    assert len(complete.output_ids) == 30
    assert all(0 <= t < server.card.vocab_size for t in complete.output_ids)


async def test_unset_max_new_tokens_defaults_to_sglangs_128(wse3):
    _, stub, _ = wse3
    responses = await generate(stub, generate_request(stream=False, max_new_tokens=None))
    assert responses[0].complete.completion_tokens == 128


async def test_stop_token_ids_end_with_a_matched_token_after_min_new_tokens(wse3):
    _, stub, _ = wse3
    stops = list(range(0, 64_000))  # half the vocabulary: a stop comes within a few tokens
    request = generate_request(
        stream=False, max_new_tokens=1000, ignore_eos=False, stop_token_ids=stops, min_new_tokens=5
    )
    complete = (await generate(stub, request))[0].complete
    assert complete.finish_reason == "stop"
    assert 5 <= complete.completion_tokens < 1000
    assert complete.WhichOneof("matched_stop") == "matched_token_id"
    assert complete.matched_token_id == complete.output_ids[-1] < 64_000


async def test_natural_stop_matches_an_eos_id(wse3):
    server, stub, _ = wse3
    for i in range(5):
        request = generate_request(f"n{i}", stream=False, max_new_tokens=200, ignore_eos=False)
        complete = (await generate(stub, request))[0].complete
        if complete.finish_reason == "stop":
            assert complete.matched_token_id in server.card.eos_token_ids
            assert complete.output_ids[-1] == complete.matched_token_id
            return
        assert complete.finish_reason == "length"
    pytest.fail("no request of five stopped before 200 tokens")


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (
            pb.GenerateRequest(
                tokenized=pb.TokenizedInput(input_ids=[1, 2, 3]),
                sampling_params=pb.SamplingParams(max_new_tokens=5),
                disaggregated_params=pb.DisaggregatedParams(
                    bootstrap_host="10.0.0.1", bootstrap_port=8998, bootstrap_room=7
                ),
            ),
            grpc.StatusCode.UNIMPLEMENTED,
            "disaggregation",
        ),
        (
            pb.GenerateRequest(sampling_params=pb.SamplingParams(max_new_tokens=5)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input_ids",
        ),
        (
            pb.GenerateRequest(
                tokenized=pb.TokenizedInput(input_ids=[5, 128256]),
                sampling_params=pb.SamplingParams(max_new_tokens=5),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "vocabulary",
        ),
        (
            pb.GenerateRequest(
                tokenized=pb.TokenizedInput(input_ids=[5]),
                sampling_params=pb.SamplingParams(max_new_tokens=5, n=2),
            ),
            grpc.StatusCode.UNIMPLEMENTED,
            "n=2",
        ),
    ],
    ids=["disaggregation", "no input ids", "id beyond vocab", "n > 1"],
)
async def test_unsupported_or_bad_requests_get_a_status(wse3, request_, code, words):
    _, stub, _ = wse3
    error = await expect_error(stub.Generate(request_))
    assert error.code() == code
    assert words in error.details()
    await wait_idle(stub)
    ok = await generate(stub, generate_request(stream=False, max_new_tokens=3))
    assert ok[0].complete.completion_tokens == 3


# --- Abort and cancellation ---------------------------------------------------------------------


async def test_abort_rpc_ends_a_live_stream_and_frees_its_kv(wse3):
    _, stub, _ = wse3
    call = stub.Generate(generate_request("victim", prompt=100, max_new_tokens=LONG))
    first = await asyncio.wait_for(call.read(), TIMEOUT_S)
    assert first.WhichOneof("response") == "chunk"
    reply = await stub.Abort(pb.AbortRequest(request_id="victim"), timeout=TIMEOUT_S)
    assert reply.success
    responses = await asyncio.wait_for(read_rest(call), TIMEOUT_S)
    complete = responses[-1].complete
    assert complete.finish_reason == "abort"
    got = len(first.chunk.token_ids) + sum(len(r.chunk.token_ids) for r in responses[:-1])
    assert complete.completion_tokens == got < LONG
    await wait_idle(stub)
    missing = await stub.Abort(pb.AbortRequest(request_id="victim"), timeout=TIMEOUT_S)
    assert not missing.success and "victim" in missing.message


async def test_client_cancel_frees_slot_and_kv(wse3):
    _, stub, _ = wse3
    call = stub.Generate(generate_request("c", prompt=1000, max_new_tokens=LONG))
    await asyncio.wait_for(call.read(), TIMEOUT_S)
    info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT_S)
    assert info.active_requests == 1
    call.cancel()
    await wait_idle(stub)
    info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT_S)
    assert info.active_requests == 0


# --- GetLoads -----------------------------------------------------------------------------------


async def test_get_loads_agrees_with_memorywall_server_info_under_load(wse3):
    server, stub, v1 = wse3
    calls = [
        stub.Generate(generate_request(f"l{i}", 500, max_new_tokens=LONG, first_id=1000 * i))
        for i in range(4)
    ]
    try:
        for call in calls:
            await asyncio.wait_for(call.read(), TIMEOUT_S)
        before = (await stub.GetLoads(pb.GetLoadsRequest(), timeout=TIMEOUT_S)).loads[0]
        info = await v1.GetServerInfo(engine_pb2.GetServerInfoRequest(), timeout=TIMEOUT_S)
        reply = await stub.GetLoads(pb.GetLoadsRequest(), timeout=TIMEOUT_S)
        after = reply.loads[0]
        assert reply.dp_rank_count == 1 and reply.aggregate.total_running_reqs == 4
        assert before.num_running_reqs == info.running == after.num_running_reqs == 4
        assert before.num_waiting_reqs == info.waiting == after.num_waiting_reqs == 0
        # KV only grows while all four decode, so the v1 reading lies between the two.
        assert before.num_used_tokens <= info.kv_used_tokens <= after.num_used_tokens
        assert after.num_used_tokens >= 4 * 500
        assert after.max_total_num_tokens == info.kv_total_tokens == server.card.kv_capacity_tokens
        assert after.token_usage == pytest.approx(after.num_used_tokens / info.kv_total_tokens)
        assert after.max_running_requests == server.card.max_num_seqs
        assert after.gen_throughput > 0
        assert after.cache_hit_rate == 0.0  # until prefix caching lands
    finally:
        for call in calls:
            call.cancel()
    await wait_idle(stub)


def test_throughput_window_rate_over_recent_samples():
    window = ThroughputWindow(now_s=0.0, window_s=10.0)
    assert window.rate(0.0, 0) == 0.0
    assert window.rate(2.0, 200) == pytest.approx(100.0)
    assert window.rate(12.0, 1200) == pytest.approx(100.0)
    # Samples older than the window drop out: the rate follows the recent slope.
    assert window.rate(25.0, 1200) == pytest.approx(0.0, abs=1e-9)


# --- GetTokenizer -------------------------------------------------------------------------------


async def fetch_tokenizer(stub) -> Tokenizer:
    chunks = [c async for c in stub.GetTokenizer(common_pb2.GetTokenizerRequest())]
    assert len(chunks) > 1  # a 128k vocabulary zips to more than one 512 KiB chunk
    assert all(not c.sha256 for c in chunks[:-1]) and chunks[-1].sha256
    data = b"".join(c.data for c in chunks)
    assert hashlib.sha256(data).hexdigest() == chunks[-1].sha256
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert {"tokenizer.json", "tokenizer_config.json"} <= set(zf.namelist())
        config = json.loads(zf.read("tokenizer_config.json"))
        assert config["chat_template"]
        return Tokenizer.from_str(zf.read("tokenizer.json").decode())


def streamed_text(ids, eos_ids) -> str:
    return "".join("" if i in eos_ids else token_text(i) for i in ids)


async def test_shipped_tokenizer_decodes_emitted_ids_to_text_of_the_same_length(wse3):
    server, stub, _ = wse3
    tokenizer = await fetch_tokenizer(stub)
    card = server.card
    eos = set(card.eos_token_ids)
    assert tokenizer.get_vocab_size() == card.vocab_size
    for i in range(3):
        request = generate_request(f"t{i}", stream=False, max_new_tokens=100, ignore_eos=i == 0)
        ids = list((await generate(stub, request))[0].complete.output_ids)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert text == streamed_text(ids, eos)
        assert len(tokenizer.encode(text).ids) == sum(1 for t in ids if t not in eos)
    # The same over ids drawn from the whole vocabulary, EOS ids included.
    rng = np.random.default_rng(7)
    for _ in range(20):
        ids = rng.integers(0, card.vocab_size, size=int(rng.integers(1, 300))).tolist()
        ids += list(card.eos_token_ids)[: int(rng.integers(0, 2))]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert text == streamed_text(ids, eos)
        assert len(tokenizer.encode(text).ids) == sum(1 for t in ids if t not in eos)


async def test_tokenizer_bytes_are_reproducible(wse3):
    _, stub, _ = wse3
    first = [c async for c in stub.GetTokenizer(common_pb2.GetTokenizerRequest())]
    second = [c async for c in stub.GetTokenizer(common_pb2.GetTokenizerRequest())]
    assert first[-1].sha256 == second[-1].sha256


# --- KV events, health, reflection --------------------------------------------------------------


async def test_subscribe_kv_events_streams_stored_blocks(wse3):
    _, stub, _ = wse3
    call = stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest())
    await asyncio.wait_for(call.initial_metadata(), TIMEOUT_S)
    # 40 prompt ids fill two 16-token blocks, which enter the prefix cache.
    await generate(stub, generate_request(prompt=40, stream=False, max_new_tokens=5, first_id=7))
    batch = await asyncio.wait_for(call.read(), TIMEOUT_S)
    stored = [e.stored for e in batch.events if e.WhichOneof("data") == "stored"]
    assert stored, batch
    first = stored[0]
    assert not first.HasField("parent_block_hash")  # the sequence's first block
    assert list(first.blocks[0].token_ids) == list(range(7, 7 + 16))
    assert all(b.block_size == 16 for s in stored for b in s.blocks)
    call.cancel()


async def test_health_not_serving_while_draining(serve, wse3_8b):
    server = await serve(wse3_8b)
    async with grpc.aio.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel:
        stub = sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service=SERVICE)
        assert (await health.Check(check, timeout=TIMEOUT_S)).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        long_call = stub.Generate(generate_request(max_new_tokens=LONG))
        await asyncio.wait_for(long_call.read(), TIMEOUT_S)
        stopping = asyncio.create_task(server.stop(grace_s=1.0))
        try:

            async def not_serving() -> bool:
                reply = await health.Check(check, timeout=2.0)
                return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

            await wait_until(not_serving, 2.0)
            reply = await stub.HealthCheck(pb.HealthCheckRequest(), timeout=2.0)
            assert not reply.healthy and "draining" in reply.message
            error = await expect_error(stub.Generate(generate_request(max_new_tokens=5)))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await asyncio.wait_for(stopping, TIMEOUT_S)
        error = await expect_error(long_call)
        assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_reflection_lists_both_services(wse3):
    server, _, _ = wse3
    async with grpc.aio.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(timeout=TIMEOUT_S)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await asyncio.wait_for(call.read(), TIMEOUT_S)
        await call.done_writing()
        names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE, "memorywall.v1.Engine"} <= names


async def test_shared_prompts_show_cache_hits_in_chunks_and_loads(wse3):
    _, stub, _ = wse3
    request = generate_request(prompt=64, stream=True, max_new_tokens=3, first_id=300)
    await generate(stub, request)
    chunks = [m async for m in stub.Generate(request)]
    cached = [m.chunk.cached_tokens for m in chunks if m.WhichOneof("response") == "chunk"]
    assert cached and cached[0] == 48  # three of four 16-token blocks; the last is recomputed
    load = (await stub.GetLoads(pb.GetLoadsRequest(), timeout=TIMEOUT_S)).loads[0]
    assert load.cache_hit_rate > 0
