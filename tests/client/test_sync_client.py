"""Client against the fake engine served from a background thread; twin of test_async_client.py."""

from __future__ import annotations

import contextlib
import io
import re
import threading

import grpc
import pytest
from cases import BAD_ARGS, ERROR_CASES
from fake_engine import CHUNK_TOKENS, MODEL_INFO, SLOW_TOKEN_S, token

import memorywall.client
from memorywall.client import (
    STATUS_ERRORS,
    Client,
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
def fake(threaded_fake):
    return threaded_fake.fake


@pytest.fixture
def client(fake):
    with Client(fake.target) as c:
        yield c


def test_stream_round_trips_chunks_and_result(client, fake):
    sampling = SamplingParams(temperature=0.5, seed=7, stop=("END",))
    stream = client.generate(prompt="a b c", max_tokens=5, request_id="r1", sampling=sampling)
    chunks = list(stream)
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


def test_complete_returns_result_and_sends_request(client, fake):
    sampling = SamplingParams(stop_token_ids=(token(2)[0],))
    result = client.complete(prompt_token_ids=[1, 2], max_tokens=9, sampling=sampling)
    assert result.finish_reason is FinishReason.STOP
    assert result.token_ids == tuple(token(i)[0] for i in range(3))
    assert result.usage.prompt_tokens == 2
    (sent,) = fake.engine.requests
    assert len(sent.request_id) == 32 and sent.request_id == result.request_id
    assert list(sent.token_ids.ids) == [1, 2] and sent.max_tokens == 9


def test_prompt_tokens_count_is_sent(client, fake):
    result = client.complete(prompt_tokens=128, max_tokens=1, min_interval_s=0.01)
    assert result.usage.prompt_tokens == 128
    assert fake.engine.requests[0].stream_options.min_interval_s == pytest.approx(0.01)


def test_result_before_finish_raises(client):
    with client.generate(prompt="x", max_tokens=3) as stream, pytest.raises(StreamNotFinished):
        _ = stream.result


def test_abort_ends_a_live_stream(client):
    with client.generate(prompt="x", max_tokens=10_000, request_id="slow:a") as stream:
        next(stream)
        assert client.abort("slow:a", "unknown") == ["slow:a"]
        for _ in stream:
            pass
    assert stream.result.finish_reason is FinishReason.ABORT
    assert client.abort("slow:a") == []


def test_model_info(client):
    info = client.model_info()
    assert info.model == MODEL_INFO.model and info.eos_token_ids == (2, 3)
    assert info.kv_capacity_tokens == 1_000_000
    assert info.predicted_tokens_per_s_per_user == pytest.approx(123.5)


def test_server_info_has_no_lag_statistic_without_samples(client):
    info = client.server_info()
    assert info.lag.samples == 0 and info.lag.mean_s is None and info.lag.p99_s is None
    client.complete(prompt="x", max_tokens=1)
    info = client.server_info()
    assert info.requests_finished == 1 and info.lag.mean_s == pytest.approx(0.001)
    assert info.kv_total_tokens == 1000 and info.draining is False


def test_health(client, threaded_fake):
    assert client.health() is True
    threaded_fake.call(threaded_fake.fake.set_serving(False))
    assert client.health() is False


def test_health_is_false_when_nothing_listens(threaded_fake):
    target = threaded_fake.fake.target
    threaded_fake.call(threaded_fake.fake.stop())
    with Client(target) as c:
        assert c.health(timeout_s=2) is False


@pytest.mark.parametrize(("code", "error"), ERROR_CASES, ids=lambda v: getattr(v, "name", ""))
def test_status_maps_to_error_class(client, code, error):
    with pytest.raises(ClientError) as info:
        client.complete(prompt="x", max_tokens=1, request_id=f"status:{code.name}")
    assert type(info.value) is error
    assert (info.value.code, info.value.details) == (code, f"fake {code.name}")


def test_unary_errors_are_translated(client):
    with pytest.raises(NotFound):
        client.abort("status:NOT_FOUND")


def test_stream_without_finished_is_a_protocol_error(client):
    with pytest.raises(ProtocolError):
        client.complete(prompt="x", max_tokens=1, request_id="nofinish")


@pytest.mark.parametrize("args", BAD_ARGS, ids=str)
def test_bad_arguments_raise_before_sending(client, fake, args):
    with pytest.raises(ConfigError):
        client.complete(**args)
    assert fake.engine.requests == []


def test_abort_needs_ids(client):
    with pytest.raises(ConfigError):
        client.abort()


def test_per_call_deadline(client):
    with pytest.raises(DeadlineExceeded) as info:
        client.complete(prompt="x", max_tokens=10_000, request_id="slow:d", timeout_s=0.2)
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_default_deadline(fake):
    with Client(fake.target, timeout_s=0.2) as c, pytest.raises(DeadlineExceeded):
        c.complete(prompt="x", max_tokens=10_000, request_id="slow:d")


def test_close_cancels_the_rpc_on_the_server(client, fake):
    stream = client.generate(prompt="x", max_tokens=10_000, request_id="slow:c")
    next(stream)
    stream.close()
    assert fake.engine.cancelled("slow:c").wait(2.0)
    assert list(stream) == []


def test_leaving_with_cancels_the_rpc_on_the_server(client, fake):
    with client.generate(prompt="x", max_tokens=10_000, request_id="slow:w") as stream:
        next(stream)
    assert fake.engine.cancelled("slow:w").wait(2.0)


def test_status_table_is_the_one_used():
    assert {code for code, _ in ERROR_CASES} >= set(STATUS_ERRORS)


def test_readme_example_runs_as_written(fake):
    (example,) = re.findall(r"```python\n(.*?)```", memorywall.client.__doc__, re.S)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(example.replace("127.0.0.1:50051", fake.target), {})
    lines = out.getvalue().splitlines()
    assert lines[0] == f"({token(0)[0]}, {token(1)[0]}) ({token(0)[2]}, {token(1)[2]})"
    assert lines[-1].startswith("RequestTiming(")


def test_close_from_another_thread_ends_iteration_quietly(client, fake):
    stream = client.generate(prompt="x", max_tokens=10_000, request_id="slow:o")
    next(stream)
    timer = threading.Timer(SLOW_TOKEN_S * 2, stream.close)
    timer.start()
    rest = list(stream)  # ends without raising once close() cancels the call
    timer.join(2.0)
    # Ended by the close, not by the server: short of max_tokens, and never finished.
    assert sum(len(c.token_ids) for c in rest) < 10_000 - 1
    with pytest.raises(StreamNotFinished):
        _ = stream.result
    assert fake.engine.cancelled("slow:o").wait(2.0)
