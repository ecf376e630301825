"""The OpenAI-compatible HTTP front end to end: EmulatorServer on 127.0.0.1 port 0, aiohttp and
the official `openai` client as clients, real engine, real performance core."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from polling import wait_until

from memorywall import __version__
from memorywall.core import Deployment
from memorywall.server.app import EmulatorServer, ServerConfig, describe
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.engine.tokens import count_text_tokens
from memorywall.server.fronts.http_front import HttpSite
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc

TIMEOUT_S = 10.0
START_TIMEOUT_S = 30.0
FREED_WITHIN_S = 2.0
MODEL = "llama-3.1-8b"

Serve = Callable[..., Awaitable[EmulatorServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start EmulatorServers (gRPC and HTTP on port 0) in this test's loop; stopped at the end."""
    servers: list[EmulatorServer] = []

    async def start(deployment: Deployment, **config: Any) -> EmulatorServer:
        config = {"port": 0, "http_port": 0, "load_format": "dummy", **config}
        server = EmulatorServer(deployment, EngineConfig(), ServerConfig(**config))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        yield s


@pytest.fixture
async def wse3(serve, wse3_8b) -> EmulatorServer:
    return await serve(wse3_8b)


def parse_sse(raw: bytes) -> list[Any]:
    """Events exactly as OpenAI clients read them: `data: ` lines, blank-line separated."""
    assert raw.endswith(b"\n\n"), raw[-80:]
    events = raw[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events), events
    assert events[-1] == b"data: [DONE]"
    return [json.loads(e[len(b"data: ") :]) for e in events[:-1]]


async def post(session, server, path: str, body: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with session.post(f"{server.http_url}{path}", json=body) as r:
        raw = await r.read()
        if r.content_type == "text/event-stream":
            return r.status, parse_sse(raw), r
        return r.status, json.loads(raw) if raw else None, r


def idle(server: EmulatorServer) -> bool:
    s = server.engine.stats()
    return s.running == 0 and s.waiting == 0 and s.kv_used_tokens == 0


# --- the small endpoints ---------------------------------------------------------------


async def test_ports_0_are_bound_and_reported(wse3):
    assert wse3.port > 0 and wse3.http_port > 0 and wse3.http_port != wse3.port
    assert wse3.http_url == f"http://127.0.0.1:{wse3.http_port}"
    assert wse3.addresses == [f"127.0.0.1:{wse3.port}", wse3.http_url]
    line = describe(wse3.card, wse3.addresses)
    # gRPC first, as `on 127.0.0.1:PORT` that tests and benchmarks parse
    assert re.search(r"on 127\.0\.0\.1:(\d+)", line)[1] == str(wse3.port)
    assert f", http://127.0.0.1:{wse3.http_port}: predicted" in line


async def test_models_health_version_metrics(wse3, session):
    async with session.get(f"{wse3.http_url}/v1/models") as r:
        assert r.status == 200
        models = await r.json()
    assert models["object"] == "list"
    [model] = models["data"]
    assert model["id"] == MODEL and model["object"] == "model"
    assert model["max_model_len"] == wse3.card.context_window
    assert isinstance(model["created"], int) and model["owned_by"] == "memorywall"

    async with session.get(f"{wse3.http_url}/health") as r:
        assert r.status == 200
    async with session.get(f"{wse3.http_url}/version") as r:
        assert await r.json() == {"version": __version__}

    await post(session, wse3, "/v1/completions", {"prompt": "hi", "max_tokens": 3})
    async with session.get(f"{wse3.http_url}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    assert 'vllm:request_success_total{engine="0",finished_reason="length"' in text
    assert "vllm:num_requests_running" in text


async def test_unknown_route_and_wrong_method_get_openai_error_bodies(wse3, session):
    async with session.get(f"{wse3.http_url}/v1/nothing") as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == 404
    async with session.get(f"{wse3.http_url}/v1/completions") as r:
        assert r.status == 405
        assert (await r.json())["error"]["type"] == "MethodNotAllowedError"


# --- completions -----------------------------------------------------------------------


async def test_completion_returns_one_body_with_usage(wse3, session):
    body = {"model": MODEL, "prompt": "hello wafer", "max_tokens": 12, "ignore_eos": True}
    status, out, r = await post(session, wse3, "/v1/completions", body)
    assert status == 200, out
    assert r.headers["X-Request-Id"] and out["id"] == f"cmpl-{r.headers['X-Request-Id']}"
    assert out["object"] == "text_completion" and out["model"] == MODEL
    [choice] = out["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["logprobs"] is None and choice["stop_reason"] is None
    assert len(choice["text"].split()) == 12  # one word per synthetic token
    prompt = count_text_tokens("hello wafer")
    assert out["usage"] == {
        "prompt_tokens": prompt,
        "total_tokens": prompt + 12,
        "completion_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    timing = out["memorywall"]["timing"]
    assert 0 < timing["ttft_s"] <= timing["e2e_s"]


async def test_completion_stream_is_sse_with_one_event_per_group(wse3, session):
    body = {
        "prompt": [1, 2, 3, 4, 5],
        "max_tokens": 40,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with session.post(f"{wse3.http_url}/v1/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream"
        events = parse_sse(await r.read())
    *chunks, usage = events
    assert chunks and all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in events}) == 1 and len({c["created"] for c in events}) == 1
    ids = [t for c in chunks for t in c["memorywall"]["token_ids"]]
    times = [t for c in chunks for t in c["memorywall"]["modelled_times_s"]]
    assert len(ids) == len(times) == 40
    assert times == sorted(times) and times[0] > 0
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons == [None] * (len(chunks) - 1) + ["length"]
    for c in chunks:
        [choice] = c["choices"]
        assert set(choice) == {"index", "text", "logprobs", "finish_reason", "stop_reason"}
        assert len(choice["text"].split()) == len(c["memorywall"]["token_ids"])
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": 5,
        "total_tokens": 45,
        "completion_tokens": 40,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_stream_without_include_usage_ends_with_finish_then_done(wse3, session):
    body = {"prompt": "x" * 40, "max_tokens": 5, "ignore_eos": True, "stream": True}
    status, events, _ = await post(session, wse3, "/v1/completions", body)
    assert status == 200
    assert all("usage" not in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


async def test_default_max_tokens_is_16_for_completions(wse3, session):
    _, out, _ = await post(session, wse3, "/v1/completions", {"prompt": "hi", "ignore_eos": True})
    assert out["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize(
    ("prompt", "tokens"),
    [("abcdefgh", 2), (["abcdefgh"], 2), ([7, 8, 9], 3), ([[7, 8, 9, 10]], 4)],
    ids=["text", "one-text", "ids", "one-ids"],
)
async def test_prompt_forms(wse3, session, prompt, tokens):
    _, out, _ = await post(session, wse3, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
    assert out["usage"]["prompt_tokens"] == tokens


async def test_natural_length_stops_with_reason_stop_and_counts_eos(wse3, session):
    # Without ignore_eos a synthetic output ends uniformly in [min_tokens, max_tokens].
    body = {"prompt": "abc", "max_tokens": 64, "min_tokens": 2, "seed": 3, "stream": True}
    body["stream_options"] = {"include_usage": True}
    finishes = set()
    for seed in range(8):
        _, events, _ = await post(session, wse3, "/v1/completions", {**body, "seed": seed})
        *chunks, usage = events
        streamed = sum(len(c["memorywall"]["token_ids"]) for c in chunks)
        assert streamed == usage["usage"]["completion_tokens"]
        assert 2 <= streamed <= 64
        finishes.add(chunks[-1]["choices"][0]["finish_reason"])
    assert "stop" in finishes


# --- chat ------------------------------------------------------------------------------


async def test_chat_stream_opens_with_role_and_ends_with_usage(wse3, session):
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_completion_tokens": 20,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, events, _ = await post(session, wse3, "/v1/chat/completions", body)
    assert status == 200
    role, *chunks, usage = events
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert all(e["id"].startswith("chatcmpl-") for e in events)
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert role["choices"][0]["finish_reason"] is None
    assert sum(len(c["memorywall"]["token_ids"]) for c in chunks) == 20
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert len(text.split()) == 20
    prompt = count_text_tokens("system: be brief\nuser: hi\nassistant:")
    assert usage["usage"]["prompt_tokens"] == prompt
    assert usage["usage"]["completion_tokens"] == 20


async def test_chat_returns_one_message(wse3, session):
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        "max_tokens": 6,
        "ignore_eos": True,
    }
    status, out, _ = await post(session, wse3, "/v1/chat/completions", body)
    assert status == 200, out
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    [choice] = out["choices"]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 6
    assert choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 6


# --- errors ----------------------------------------------------------------------------

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def tool(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


TOOL = tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}})


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        (COMPLETIONS, {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
        (COMPLETIONS, {"prompt": ["a", "b"]}, 400, "prompt"),
        (COMPLETIONS, {"prompt": [[1], [2]]}, 400, "prompt"),
        (COMPLETIONS, {}, 400, "prompt"),
        (COMPLETIONS, {"prompt": ""}, 400, "prompt"),
        (COMPLETIONS, {"prompt": [1, 10**9]}, 400, "prompt"),
        (COMPLETIONS, {"prompt": "hi", "n": 0}, 400, "n"),
        (COMPLETIONS, {"prompt": "hi", "n": 129}, 400, "n"),
        (COMPLETIONS, {"prompt": "hi", "best_of": 3}, 400, "best_of"),
        (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
        (COMPLETIONS, {"prompt": "hi", "prompt_logprobs": 1}, 400, "prompt_logprobs"),
        (COMPLETIONS, {"prompt": "hi", "echo": "yes"}, 400, "echo"),
        (COMPLETIONS, {"prompt": "hi", "tools": [{"type": "function"}]}, 400, "tools"),
        (COMPLETIONS, {"prompt": "hi", "stop": [""]}, 400, "stop"),
        (COMPLETIONS, {"prompt": "hi", "suffix": "x"}, 400, "suffix"),
        (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        (COMPLETIONS, {"prompt": "hi", "max_tokens": "8"}, 400, "max_tokens"),
        (COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
        (COMPLETIONS, {"prompt": "hi", "stop": [1]}, 400, "stop"),
        (COMPLETIONS, {"prompt": "hi", "stream_options": {}}, 400, "stream_options"),
        (COMPLETIONS, {"prompt": "hi", "max_tokens": 10**6}, 400, None),  # context length
        (CHAT, {"messages": []}, 400, "messages"),
        (CHAT, {"messages": [{"content": "no role"}]}, 400, "messages[0]"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "messages[0].content",
        ),
        (CHAT, {"messages": USER, "logprobs": 1}, 400, "logprobs"),
        (CHAT, {"messages": USER, "echo": True}, 400, "echo"),
        (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
        (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
        (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools[0]"),
        (CHAT, {"messages": USER, "tools": [TOOL], "tool_choice": "any"}, 400, "tool_choice"),
        (CHAT, {"messages": USER, "tools": [TOOL], "tool_choice": named("x")}, 400, "tool_choice"),
        (
            CHAT,
            {
                "messages": USER,
                "tools": [tool("f", {"type": "integer", "minimum": 3, "maximum": 1})],
            },
            400,
            "tools[0].function.parameters",
        ),
        (CHAT, {"messages": USER, "tool_choice": "required"}, 400, "tool_choice"),
        (CHAT, {"messages": USER, "response_format": {"type": "json_object"}}, 400, None),
        (CHAT, {"messages": USER, "model": "other"}, 404, "model"),
    ],
)
async def test_bad_input_gets_status_and_openai_error_body(
    wse3, session, path, body, status, param
):
    got, out, _ = await post(session, wse3, path, body)
    assert got == status, out
    error = out["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    assert error["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
    if param is not None:
        assert error["param"] == param and param.split(".")[0] in error["message"]
    assert idle(wse3)


async def test_accepted_knobs_and_client_defaults(wse3, session):
    body = {
        "prompt": "hi",
        "max_tokens": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "seed": 1,
        "stop": ["never"],
        "stop_token_ids": [5],
        "logprobs": None,
        "n": 1,
        "user": "u",
    }
    status, out, _ = await post(session, wse3, COMPLETIONS, body)
    assert status == 200, out
    chat = {"messages": USER, "logprobs": False, "top_logprobs": 0, "tool_choice": "none"}
    status, out, _ = await post(session, wse3, CHAT, {**chat, "max_tokens": 2})
    assert status == 200, out


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff"])
async def test_malformed_body_is_400(wse3, session, raw):
    headers = {"Content-Type": "application/json"}
    async with session.post(f"{wse3.http_url}{COMPLETIONS}", data=raw, headers=headers) as r:
        assert r.status == 400
        assert (await r.json())["error"]["type"] == "BadRequestError"


async def test_duplicate_request_id_is_409(serve, h100_8b, session):
    server = await serve(h100_8b)
    body = {"prompt": "hi", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    headers = {"X-Request-Id": "same"}
    async with session.post(f"{server.http_url}{COMPLETIONS}", json=body, headers=headers) as r:
        await r.content.readuntil(b"\n\n")
        async with session.post(
            f"{server.http_url}{COMPLETIONS}", json=body, headers=headers
        ) as second:
            assert second.status == 409
            assert (await second.json())["error"]["type"] == "ConflictError"
        r.close()
    await wait_until(lambda: idle(server), FREED_WITHIN_S)


async def test_draining_server_answers_503(wse3, session):
    await wse3.engine.drain(0.0)
    status, out, _ = await post(session, wse3, COMPLETIONS, {"prompt": "hi"})
    assert status == 503 and out["error"]["type"] == "ServiceUnavailableError"
    async with session.get(f"{wse3.http_url}/health") as r:
        assert r.status == 503


async def test_stream_cut_by_shutdown_ends_with_error_event(serve, h100_8b, session):
    server = await serve(h100_8b)
    body = {"prompt": "hi", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    async with session.post(f"{server.http_url}{COMPLETIONS}", json=body) as r:
        await r.content.readuntil(b"\n\n")
        await server.engine.drain(0.0)
        rest = parse_sse(await r.read())
    assert rest[-1]["error"]["code"] == 503


# --- disconnects free the slot and KV --------------------------------------------------


async def test_client_disconnect_mid_stream_aborts(serve, h100_8b, session):
    server = await serve(h100_8b)
    body = {"prompt": "hi " * 300, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    async with session.post(f"{server.http_url}{COMPLETIONS}", json=body) as r:
        await r.content.readuntil(b"\n\n")
        assert server.engine.stats().kv_used_tokens > 0
        r.close()
    await wait_until(lambda: idle(server), FREED_WITHIN_S)
    assert server.engine.stats().requests_aborted == 1


async def test_client_disconnect_while_waiting_for_a_body_aborts(serve, h100_8b, session):
    server = await serve(h100_8b)
    body = {"prompt": "hi", "max_tokens": 2000, "ignore_eos": True}
    task = asyncio.create_task(post(session, server, COMPLETIONS, body))
    await wait_until(lambda: server.engine.stats().running == 1, FREED_WITHIN_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: idle(server), FREED_WITHIN_S)
    assert server.engine.stats().requests_aborted == 1


# --- the official openai client --------------------------------------------------------


@pytest.fixture
async def openai_client(wse3):
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(
        base_url=f"{wse3.http_url}/v1", api_key="x", max_retries=0, timeout=TIMEOUT_S
    )
    yield client
    await client.close()


async def test_openai_client_streams_completions(openai_client):
    stream = await openai_client.completions.create(
        model=MODEL,
        prompt="hello wafer",
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, reasons, usage = "", [], None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
            reasons.append(chunk.choices[0].finish_reason)
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(text.split()) == 24
    assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}
    assert usage.completion_tokens == 24
    assert usage.prompt_tokens_details.cached_tokens == 0


async def test_openai_client_streams_chat(openai_client):
    stream = await openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 24
    assert chunks[-1].usage.completion_tokens == 24
    assert chunks[-2].choices[0].finish_reason == "length"


async def test_openai_client_lists_models_and_completes(openai_client):
    models = await openai_client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    out = await openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert out.choices[0].message.role == "assistant"
    assert 1 <= out.usage.completion_tokens <= 4


async def test_openai_client_parses_samples_logprobs_and_tool_calls_from_the_engine(
    openai_client,
):
    out = await openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        n=2,
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content != out.choices[1].message.content
    assert out.usage.completion_tokens == 8
    assert all(len(c.logprobs.content) == 4 for c in out.choices)
    params = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    tool = {"type": "function", "function": {"name": "count", "parameters": params}}
    out = await openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=[tool],
        tool_choice="required",
    )  # fmt: skip
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "count" and isinstance(
        json.loads(call.function.arguments)["n"], int
    )
    assert out.choices[0].finish_reason == "tool_calls"
    assert out.usage.completion_tokens == -(-len(call.function.arguments) // 4)


async def test_openai_client_raises_typed_errors(openai_client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.NotFoundError):
        await openai_client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="n: must be >= 1"):
        await openai_client.completions.create(model=MODEL, prompt="hi", n=0)


# --- one engine behind both fronts -----------------------------------------------------


async def test_grpc_and_http_share_one_engine(serve, h100_8b, session):
    server = await serve(h100_8b)
    body = {"prompt": "hi", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    options = [("grpc.enable_http_proxy", 0)]
    async with grpc.aio.insecure_channel(server.target, options=options) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        call = stub.Generate(pb.GenerateRequest(text="hi", max_tokens=1000, ignore_eos=True))
        async with session.post(f"{server.http_url}{COMPLETIONS}", json=body) as r:
            await r.content.readuntil(b"\n\n")
            await call.read()
            assert server.engine.stats().running == 2
            info = await stub.GetServerInfo(pb.GetServerInfoRequest())
            assert info.running == 2
            r.close()
            call.cancel()
    await wait_until(lambda: idle(server), FREED_WITHIN_S)
    assert server.engine.stats().requests_aborted == 2


async def test_http_only_and_metrics_only_servers(serve, wse3_8b, session):
    http_only = await serve(wse3_8b, grpc=False)
    assert http_only.listeners.grpc is None and http_only.addresses == [http_only.http_url]
    status, out, _ = await post(session, http_only, COMPLETIONS, {"prompt": "hi", "max_tokens": 2})
    assert status == 200, out

    grpc_only = await serve(wse3_8b, http_port=None, metrics_port=0)
    assert grpc_only.listeners.http is None
    url = f"http://127.0.0.1:{grpc_only.metrics_port}"
    assert grpc_only.addresses == [grpc_only.target, f"{url}/metrics"]
    async with session.get(f"{url}/metrics") as r:
        assert r.status == 200 and "vllm:num_requests_running" in await r.text()
    async with session.get(f"{url}/v1/models") as r:
        assert r.status == 404


def test_nothing_to_serve_is_a_config_error():
    from memorywall.errors import ConfigError

    with pytest.raises(ConfigError, match="nothing to serve"):
        ServerConfig(grpc=False)


async def test_accepted_connections_have_tcp_nodelay():
    """Small writes must leave at once: Nagle would hold each token behind the last ACK."""

    async def nodelay(request: web.Request) -> web.Response:
        sock = request.transport.get_extra_info("socket")
        return web.json_response(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    app = web.Application()
    app.router.add_get("/", nodelay)
    site = HttpSite(app)
    port = await site.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/") as r:
            assert await r.json() != 0
    finally:
        await site.stop()


async def test_http_port_in_use_is_an_oserror(serve, wse3_8b):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve HTTP on 127.0.0.1:{port}"):
            await serve(wse3_8b, http_port=port)


# --- a real tokenizer ------------------------------------------------------------------


async def test_tokenizer_counts_prompt_text(serve, wse3_8b, session, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "wafer": 2, "scale": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    server = await serve(wse3_8b, tokenizer=tmp_path)
    text = "hello wafer scale engines everywhere"
    _, out, _ = await post(session, server, COMPLETIONS, {"prompt": text, "max_tokens": 1})
    assert out["usage"]["prompt_tokens"] == 5 != count_text_tokens(text)


# --- the command line ------------------------------------------------------------------

SERVE = [sys.executable, "-m", "memorywall", "serve", "--hardware", "wse-3", "--model", MODEL]
HTTP_LINE = re.compile(r"on 127\.0\.0\.1:(\d+), http://127\.0\.0\.1:(\d+): predicted")


def test_serve_http_port_0_logs_both_addresses_and_stops_on_sigterm():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [*SERVE, "--port", "0", "--http-port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(START_TIMEOUT_S, process.kill)  # a silent hang fails, not blocks
    watchdog.start()
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if match := HTTP_LINE.search(line):
                break
        assert match, lines
        url = f"http://127.0.0.1:{match[2]}"

        async def ask() -> int:
            async with aiohttp.ClientSession() as s, s.get(f"{url}/health") as r:
                return r.status

        assert asyncio.run(ask()) == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=TIMEOUT_S) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=TIMEOUT_S)


def test_serve_no_grpc_without_http_port_is_a_one_line_error():
    result = subprocess.run([*SERVE, "--no-grpc"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "memorywall: error: nothing to serve: gRPC is off and no HTTP port is given"
    ]
