"""AsyncClient against the in-process fake engine; twin of test_sync_client.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from cases import BAD_ARGS, ERROR_CASES
from fake_engine import CHUNK_TOKENS, MODEL_INFO, SLOW_TOKEN_S, token

from memorywall.client import (
    STATUS_ERRORS,
    AsyncClient,
    ClientError,
    DeadlineExceeded,
    FinishReason,
    NotFound,
    ProtocolError,
    RequestLag,
    SamplingParams,
    StreamNotFinished,
)
from memorywall.errors import ConfigError


@pytest.fixture
async def client(fake):
    async with AsyncClient(fake.target) as c:
        yield c


async def test_stream_round_trips_chunks_and_result(client, fake):
    sampling = SamplingParams(temperature=0.5, seed=7, stop=("END",))
    stream = client.generate(prompt="a b c", max_tokens=5, request_id="r1", sampling=sampling)
    chunks = [chunk async for chunk in stream]
    assert [len(c.token_ids) for c in chunks] == [CHUNK_TOKENS, CHUNK_TOKENS, 1]
    ids, texts, times_s = zip(*(token(i) for i in range(5)), strict=True)
    assert tuple(t for c in chunks for t in c.token_ids) == ids
    assert tuple(t for c in chunks for t in c.modelled_times_s) == pytest.approx(times_s)
    received = [c.received_ns for c in chunks]
    assert received == sorted(received)
    result = stream.result
    assert result.request_id == "r1"
    assert result.finish_reason is FinishReason.LENGTH
    assert result.token_ids == ids and result.text == "".join(texts)
    assert result.chunks == tuple(chunks)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (3, 5)
    assert result.timing.ttft_s == pytest.approx(times_s[0])
    assert result.timing.e2e_s == pytest.approx(times_s[-1])
    assert result.energy_j == pytest.approx(2.5)
    assert result.lag == RequestLag(0.002, 0.001, 0.0005)
    assert result.sampling == {"temperature": 0.5, "seed": 7, "stop": ["END"]}
    assert result.sent_ns <= received[0] <= received[-1] <= result.finished_ns


async def test_complete_returns_result_and_sends_request(client, fake):
    sampling = SamplingParams(stop_token_ids=(token(2)[0],))
    result = await client.complete(prompt_token_ids=[1, 2], max_tokens=9, sampling=sampling)
    assert result.finish_reason is FinishReason.STOP
    assert result.token_ids == tuple(token(i)[0] for i in range(3))
    assert result.usage.prompt_tokens == 2
    (sent,) = fake.engine.requests
    assert len(sent.request_id) == 32 and sent.request_id == result.request_id
    assert list(sent.token_ids.ids) == [1, 2] and sent.max_tokens == 9


async def test_prompt_tokens_count_is_sent(client, fake):
    result = await client.complete(prompt_tokens=128, max_tokens=1, min_interval_s=0.01)
    assert result.usage.prompt_tokens == 128
    assert fake.engine.requests[0].stream_options.min_interval_s == pytest.approx(0.01)


async def test_result_before_finish_raises(client):
    async with client.generate(prompt="x", max_tokens=3) as stream:
        with pytest.raises(StreamNotFinished):
            _ = stream.result


async def test_abort_ends_a_live_stream(client):
    async with client.generate(prompt="x", max_tokens=10_000, request_id="slow:a") as stream:
        await anext(stream)
        assert await client.abort("slow:a", "unknown") == ["slow:a"]
        async for _ in stream:
            pass
    assert stream.result.finish_reason is FinishReason.ABORT
    assert await client.abort("slow:a") == []


async def test_model_info(client):
    info = await client.model_info()
    assert info.model == MODEL_INFO.model and info.eos_token_ids == (2, 3)
    assert info.kv_capacity_tokens == 1_000_000
    assert info.predicted_tokens_per_s_per_user == pytest.approx(123.5)


async def test_server_info_has_no_lag_statistic_without_samples(client):
    info = await client.server_info()
    assert info.lag.samples == 0 and info.lag.mean_s is None and info.lag.p99_s is None
    await client.complete(prompt="x", max_tokens=1)
    info = await client.server_info()
    assert info.requests_finished == 1 and info.lag.mean_s == pytest.approx(0.001)
    assert info.kv_total_tokens == 1000 and info.draining is False


async def test_health(client, fake):
    assert await client.health() is True
    await fake.set_serving(False)
    assert await client.health() is False


async def test_health_is_false_when_nothing_listens(fake):
    target = fake.target
    await fake.stop()
    async with AsyncClient(target) as c:
        assert await c.health(timeout_s=2) is False


@pytest.mark.parametrize(("code", "error"), ERROR_CASES, ids=lambda v: getattr(v, "name", ""))
async def test_status_maps_to_error_class(client, code, error):
    with pytest.raises(ClientError) as info:
        await client.complete(prompt="x", max_tokens=1, request_id=f"status:{code.name}")
    assert type(info.value) is error
    assert (info.value.code, info.value.details) == (code, f"fake {code.name}")


async def test_unary_errors_are_translated(client):
    with pytest.raises(NotFound):
        await client.abort("status:NOT_FOUND")


async def test_stream_without_finished_is_a_protocol_error(client):
    with pytest.raises(ProtocolError):
        await client.complete(prompt="x", max_tokens=1, request_id="nofinish")


@pytest.mark.parametrize("args", BAD_ARGS, ids=str)
async def test_bad_arguments_raise_before_sending(client, fake, args):
    with pytest.raises(ConfigError):
        await client.complete(**args)
    assert fake.engine.requests == []


async def test_abort_needs_ids(client):
    with pytest.raises(ConfigError):
        await client.abort()


async def test_per_call_deadline(client):
    with pytest.raises(DeadlineExceeded) as info:
        await client.complete(prompt="x", max_tokens=10_000, request_id="slow:d", timeout_s=0.2)
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_default_deadline(fake):
    async with AsyncClient(fake.target, timeout_s=0.2) as c:
        with pytest.raises(DeadlineExceeded):
            await c.complete(prompt="x", max_tokens=10_000, request_id="slow:d")


async def test_aclose_cancels_the_rpc_on_the_server(client, fake):
    stream = client.generate(prompt="x", max_tokens=10_000, request_id="slow:c")
    await anext(stream)
    await stream.aclose()
    assert await asyncio.to_thread(fake.engine.cancelled("slow:c").wait, 2.0)
    assert [c async for c in stream] == []


async def test_cancelling_the_task_cancels_the_rpc(client, fake):
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in client.generate(prompt="x", max_tokens=10_000, request_id="slow:t"):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 2.0)
    await asyncio.sleep(SLOW_TOKEN_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(fake.engine.cancelled("slow:t").wait, 2.0)


def test_status_table_is_the_one_used():
    assert {code for code, _ in ERROR_CASES} >= set(STATUS_ERRORS)


async def test_aclose_from_another_task_ends_iteration_quietly(client, fake):
    stream = client.generate(prompt="x", max_tokens=10_000, request_id="slow:o")
    await anext(stream)

    async def drain() -> int:
        return sum([len(c.token_ids) async for c in stream])

    task = asyncio.create_task(drain())
    await asyncio.sleep(SLOW_TOKEN_S * 2)
    await stream.aclose()
    # Ends without raising; ended by the close, not by the server: short of max_tokens,
    # and never finished.
    assert await asyncio.wait_for(task, 2.0) < 10_000 - 1
    with pytest.raises(StreamNotFinished):
        _ = stream.result
    assert await asyncio.to_thread(fake.engine.cancelled("slow:o").wait, 2.0)
