"""`OpenAITarget` and `memorywall bench --backend openai-*` against a fake vLLM.

The fake is a small aiohttp.web app on 127.0.0.1 port 0, run in a thread with its own
event loop (module-scoped, always stopped), so both async target tests and the
synchronous CLI (which runs its own event loop) can reach it. It streams SSE the
way vLLM's OpenAI server does: completions put `finish_reason` on the last token
chunk; chat opens with a role-only delta and closes with an empty-delta
`finish_reason` chunk; both end with a `choices: []` usage chunk and `data: [DONE]`.
The request's `model` picks a behaviour: an error body, a slow answer, a dropped
connection, an error event, a JSON reply to a stream request, or chunks of two tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from memorywall.cli import main
from memorywall.loadgen import options
from memorywall.loadgen.cli import openai_server_facts
from memorywall.loadgen.openai_target import (
    TOKEN_ID_HIGH,
    TOKEN_ID_LOW,
    OpenAITarget,
    SseDecoder,
    SseEvent,
    apply_event,
    base_url,
    error_message,
    prompt_rng,
    prompt_text,
    prompt_token_ids,
)
from memorywall.loadgen.records import RequestRecord, RequestSpec
from memorywall.loadgen.target import Backend, GrpcTarget, TargetConfig, make_target

MODEL = "fake-model"
TTFT_S = 0.03  # the fake's delay before the first token
ITL_S = 0.01  # and between tokens
MS = 1_000_000  # ns
PLOTS = ("latency_vs_load.png", "throughput_vs_interactivity.png")
CHAT_TEMPLATE_TOKENS = 5  # the fake's stand-in for a chat template's tokens
MODELLED = {
    "queue_s": 0.0,
    "prefill_s": 0.01,
    "decode_s": 0.07,
    "ttft_s": 0.01,
    "e2e_s": 0.08,
    "received_monotonic_ns": 123_456_789,
}


# ---- the fake vLLM --------------------------------------------------------------------------


@dataclass
class FakeVllm:
    url: str = ""
    bodies: list[dict] = field(default_factory=list)  # every POST body, in arrival order
    peers: list[int] = field(default_factory=list)  # the client port of every request

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/emu/v1/models", self.emulator_models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def models(self, request: web.Request) -> web.Response:
        self.peers.append(request.transport.get_extra_info("peername")[1])
        entries = [{"id": m, "object": "model", "owned_by": "vllm"} for m in (MODEL, "other")]
        return web.json_response({"object": "list", "data": entries})

    async def emulator_models(self, request: web.Request) -> web.Response:
        entry = {"id": "llama-3.1-8b", "owned_by": "memorywall", "hardware": "wse-3"}
        return web.json_response({"object": "list", "data": [entry]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, chat=True)

    async def serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.peers.append(request.transport.get_extra_info("peername")[1])
        model = body["model"]
        if model == "bad-request":
            error = {"message": "max_tokens is too large", "type": "BadRequestError", "code": 400}
            return web.json_response({"error": error}, status=400)
        if model == "old-error":
            error = {"object": "error", "message": "old style", "type": "X", "code": 404}
            return web.json_response(error, status=404)
        if model == "crash":
            return web.Response(status=500, text="Internal Server Error")
        if model == "json":
            return web.json_response({"choices": [{"text": "all at once"}]})
        if model == "slow":
            await asyncio.sleep(5)
        if chat:
            prompt = len(body["messages"][0]["content"].split()) + CHAT_TEMPLATE_TOKENS
            n = body["max_completion_tokens"]
        else:
            prompt, n = len(body["prompt"]), body["max_tokens"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)

        async def event(data: dict | str) -> None:
            text = data if isinstance(data, str) else json.dumps(data)
            await resp.write(f"data: {text}\n\n".encode())

        head = {"id": "cmpl-1", "created": 0, "model": model}
        if chat:
            delta = {"role": "assistant", "content": ""}
            await event(head | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        await asyncio.sleep(TTFT_S)
        per_chunk = 2 if model in ("pairs", "memorywall") else 1
        for i in range(0, n, per_chunk):
            if i:
                await asyncio.sleep(ITL_S)
            if model == "drop" and i == 2:
                request.transport.close()
                return resp
            if model == "error-event" and i == 2:
                await event({"error": {"message": "engine died", "code": 500}})
                break
            last = i + per_chunk >= n and not chat
            choice = {"index": 0, "finish_reason": "length" if last else None}
            if chat:
                choice["delta"] = {"content": " tok"}
            else:
                choice["text"] = " tok"
            ids = list(range(i, min(i + per_chunk, n)))
            chunk = head | {"choices": [choice]}
            if model == "memorywall":  # the emulator's HTTP front: ids in its extension
                chunk["memorywall"] = {"token_ids": ids, "modelled_times_s": [0.0] * len(ids)}
            elif per_chunk > 1:
                choice["token_ids"] = ids
            await event(chunk)
        if chat:
            await event(head | {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        details = None if chat else {"cached_tokens": 4}
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        last_chunk = head | {"choices": [], "usage": usage | {"prompt_tokens_details": details}}
        if model == "memorywall":
            last_chunk["memorywall"] = {"timing": MODELLED, "energy_j": 1.0}
        await event(last_chunk)
        await event("[DONE]")
        await resp.write_eof()
        return resp


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeVllm]:
    server = FakeVllm()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(server.app(), handler_cancellation=True)

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        server.url = f"http://{host}:{port}"

    loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def record_for(spec: RequestSpec) -> RequestRecord:
    return RequestRecord(
        index=spec.index,
        prompt_tokens=spec.prompt_tokens,
        output_tokens=spec.output_tokens,
        scheduled_ns=None,
        sent_ns=0,
    )


async def send(
    url: str, model: str = MODEL, *, chat: bool = False, timeout_s: float | None = 10.0, n=8
) -> RequestRecord:
    spec = RequestSpec(3, 16, n)
    record = record_for(spec)
    target = OpenAITarget(url, chat=chat, model=model, timeout_s=timeout_s, prompt_salt=7)
    await target.connect()
    try:
        await target.send(spec, record)
    finally:
        await target.aclose()
    return record


def assert_stream_times(record: RequestRecord, chunks: int) -> None:
    assert record.error is None and record.ok
    assert len(record.chunk_ns) == len(record.chunk_tokens) == chunks
    # A loaded host may read several chunks at once, so gaps can shrink at the client;
    # what cannot happen is a chunk arriving before the fake has slept long enough to send it.
    assert record.chunk_ns == sorted(record.chunk_ns)
    for i, at in enumerate(record.chunk_ns):
        assert at - record.sent_ns >= 0.8 * (TTFT_S + i * ITL_S) * 1e9
    assert record.finished_ns is not None and record.finished_ns >= record.chunk_ns[-1]


# ---- streaming into records -----------------------------------------------------------------


async def test_completions_stream_fills_the_record(fake):
    before = len(fake.bodies)
    record = await send(fake.url)
    assert_stream_times(record, 8)
    assert record.chunk_tokens == [1] * 8
    assert (record.usage_prompt_tokens, record.usage_completion_tokens) == (16, 8)
    assert record.usage_cached_tokens == 4
    assert record.completion_tokens == 8
    assert record.modelled_ttft_s is None and record.modelled_e2e_s is None
    (body,) = fake.bodies[before:]
    assert body["max_tokens"] == 8 and body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["model"] == MODEL
    assert len(body["prompt"]) == 16
    assert all(TOKEN_ID_LOW <= t < TOKEN_ID_HIGH for t in body["prompt"])


async def test_chat_stream_skips_the_role_and_finish_chunks(fake):
    before = len(fake.bodies)
    record = await send(fake.url, chat=True)
    assert_stream_times(record, 8)  # the role-only first chunk is not the first token
    assert record.usage_prompt_tokens == 16 + CHAT_TEMPLATE_TOKENS
    assert record.usage_completion_tokens == 8
    assert record.usage_cached_tokens is None  # prompt_tokens_details: null
    (body,) = fake.bodies[before:]
    assert body["max_completion_tokens"] == body["max_tokens"] == 8
    assert body["messages"][0]["role"] == "user"
    assert len(body["messages"][0]["content"].split()) == 16
    assert body["ignore_eos"] is True and body["stream_options"] == {"include_usage": True}


async def test_chunks_that_list_their_token_ids_count_them(fake):
    record = await send(fake.url, "pairs")
    assert_stream_times(record, 4)
    assert record.chunk_tokens == [2, 2, 2, 2]
    assert record.completion_tokens == 8


@pytest.mark.parametrize("chat", [False, True])
async def test_the_emulators_extension_gives_token_ids_and_modelled_times(fake, chat):
    record = await send(fake.url, "memorywall", chat=chat)
    assert_stream_times(record, 4)
    assert record.chunk_tokens == [2, 2, 2, 2]
    assert record.modelled_ttft_s == MODELLED["ttft_s"]
    assert record.modelled_e2e_s == MODELLED["e2e_s"]
    assert record.modelled_decode_s == MODELLED["decode_s"]
    assert record.server_received_ns == MODELLED["received_monotonic_ns"]


async def test_sequential_requests_reuse_one_connection(fake):
    before = len(fake.peers)
    target = OpenAITarget(fake.url, chat=False, model=MODEL, timeout_s=10)
    await target.connect()  # GET /v1/models opens the connection
    try:
        for i in range(3):
            spec = RequestSpec(i, 8, 2)
            record = record_for(spec)
            await target.send(spec, record)
            assert record.ok
    finally:
        await target.aclose()
    assert len(set(fake.peers[before:])) == 1  # read to the end after [DONE], kept alive


# ---- failures become record.error ----------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "error"),
    [
        ("bad-request", "HTTP 400: max_tokens is too large"),
        ("old-error", "HTTP 404: old style"),
        ("crash", "HTTP 500: Internal Server Error"),
        ("error-event", "stream error: engine died"),
        ("json", "no server-sent events in the response (application/json)"),
    ],
)
async def test_server_errors_become_record_errors(fake, model, error):
    record = await send(fake.url, model)
    assert record.error == error
    assert record.sent_ns > 0 and not record.ok


async def test_a_dropped_stream_is_a_connection_error_after_the_chunks_it_sent(fake):
    record = await send(fake.url, "drop")
    assert record.error is not None and record.error.startswith("connection error: ")
    assert len(record.chunk_ns) == 2 and not record.ok


async def test_timeout_becomes_an_error_on_time(fake):
    started = time.perf_counter()
    record = await send(fake.url, "slow", timeout_s=0.2)
    assert record.error == "timeout: no complete response within 0.2 s"
    assert time.perf_counter() - started < 2


async def test_refused_connection_is_an_error():
    record = await send(closed_port_url())
    assert record.error is not None and record.error.startswith("connection error: ")
    assert record.sent_ns > 0 and not record.chunk_ns


async def test_send_before_connect_is_a_bug():
    target = OpenAITarget("http://127.0.0.1:1", chat=False, model=MODEL)
    spec = RequestSpec(0, 4, 2)
    with pytest.raises(RuntimeError):
        await target.send(spec, record_for(spec))


# ---- pieces without a server ----------------------------------------------------------------


STREAM = (
    b": ping\r\n"
    b'data: {"a": "\xc3\xa9"}\r\n\r\n'
    b"event: error\n"
    b"data: line one\n"
    b"data:line two\n\n"
    b"data: [DONE]"
)


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(STREAM)])
def test_sse_decoder_handles_any_split(size):
    decoder = SseDecoder()
    events: list[SseEvent] = []
    for i in range(0, len(STREAM), size):
        events += decoder.feed(STREAM[i : i + size])
    events += decoder.close()
    assert events == [
        SseEvent('{"a": "é"}'),
        SseEvent("line one\nline two", "error"),
        SseEvent("[DONE]"),  # the last event needs no blank line at the end of the stream
    ]


def test_sse_decoder_waits_for_the_blank_line():
    decoder = SseDecoder()
    assert decoder.feed(b"data: 1\n") == []
    assert decoder.feed(b"\r") == []  # maybe half of a CRLF
    assert decoder.feed(b"\ndata: 2\r\r") == [SseEvent("1")]
    assert decoder.feed(b"data: 3\n\n") == [SseEvent("2"), SseEvent("3")]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": {"message": "m1", "type": "t"}}', "m1"),
        (b'{"object": "error", "message": "m2"}', "m2"),
        (b'{"detail": "m3"}', "m3"),
        (b'{"error": "m4"}', "m4"),
        (b"plain text\n", "plain text"),
        (b"", "Bad Gateway"),
    ],
)
def test_error_message_reads_the_usual_bodies(body, message):
    assert error_message(body, "Bad Gateway") == message


def test_prompts_depend_on_salt_and_index_only():
    def ids(salt: int, index: int) -> list[int]:
        return prompt_token_ids(32, prompt_rng(salt, index))

    assert ids(1, 5) == ids(1, 5)
    assert ids(1, 5) != ids(1, 6) and ids(1, 5) != ids(2, 5) and ids(1, 1) != ids(1, -1)
    text = prompt_text(100, prompt_rng(1, 0))
    assert len(text.split()) == 100 and len(text) == 4 * 100 - 1  # four characters a token


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
        ("https://host/v1/", "https://host"),
        ("http://host:1/proxy/v1", "http://host:1/proxy"),
    ],
)
def test_base_url_is_normalised(url, base):
    assert base_url(url) == base


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://host", "http://", "http://h/?q=1"])
def test_base_url_rejects_non_urls(url):
    with pytest.raises(ValueError):
        base_url(url)


def test_make_target_builds_each_backend():
    grpc = make_target(TargetConfig(address="127.0.0.1:1"), timeout_s=1.0)
    assert isinstance(grpc, GrpcTarget)
    for backend, chat in ((Backend.OPENAI_COMPLETIONS, False), (Backend.OPENAI_CHAT, True)):
        config = TargetConfig(backend=backend, address="http://h:1", model="m")
        target = make_target(config, timeout_s=2.0)
        assert isinstance(target, OpenAITarget)
        assert (target.chat, target.model, target.timeout_s) == (chat, "m", 2.0)
        assert pickle.loads(pickle.dumps(config)) == config  # workers get it by pickle
    with pytest.raises(ValueError):
        make_target(TargetConfig(backend=Backend.OPENAI_CHAT, address="http://h:1"))


def test_cli_backend_choices_match_the_enum():
    assert tuple(b.value for b in Backend) == options.BACKENDS


def test_emulator_is_recognised_by_its_models_entry(fake):
    facts = openai_server_facts(fake.url + "/emu", None)
    assert facts.emulated and facts.hardware == "wse-3"
    assert (facts.model, facts.devices) == ("llama-3.1-8b", 1)
    facts = openai_server_facts(fake.url, "other")
    assert not facts.emulated and facts.model == "other" and facts.hardware is None


# ---- the CLI end to end ---------------------------------------------------------------------


def bench(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["bench", *argv])
    return rc, out.getvalue(), err.getvalue()


SMALL = ("--num-prompts", "4", "--input-len", "16", "--output-len", "8")


@pytest.mark.parametrize("backend", ["openai-completions", "openai-chat"])
def test_bench_sweep_against_an_openai_server(fake, tmp_path, backend):
    before = len(fake.bodies)
    argv = ["--backend", backend, "--target", fake.url, "--concurrency", "1,2", *SMALL]
    rc, out, err = bench(*argv, "--out", str(tmp_path))
    assert rc == 0, err
    assert "fake-model" in out
    assert len(fake.bodies) - before == 2 * (4 + 1)  # two levels of 4, one warm-up each
    assert all(b["model"] == MODEL for b in fake.bodies[before:])
    names = {p.name for p in tmp_path.iterdir()}
    for level in ("c1", "c2"):
        assert {f"run-{level}.json", f"run-{level}.requests.jsonl"} <= names
    assert {"summary.json", *PLOTS} <= names
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["level"] for r in summary] == ["c1", "c2"]
    for r in summary:
        assert (r["completed"], r["failed"]) == (4, 0)
        assert r["total_output_tokens"] == 32
        assert r["emulated"] is False and r["hardware"] is None
        assert (r["backend"], r["model"], r["target"]) == (backend, MODEL, fake.url)
        assert r["mean_ttft_ms"] >= 0.8 * TTFT_S * 1e3
        assert r["mean_tpot_ms"] >= 0.8 * ITL_S * 1e3
        for key in ("p99_itl_ms", "output_throughput", "request_throughput", "median_ttft_ms"):
            assert r[key] is not None and r[key] > 0
        assert r["predicted_tpot_ms"] is None and r.get("mean_modelled_ttft_ms") is None
    lines = (tmp_path / "run-c2.requests.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 5 and sum(r["warmup"] for r in records) == 1
    assert all(r["error"] is None and len(r["chunk_ns"]) == 8 for r in records)


def test_bench_with_two_workers(fake, tmp_path):
    argv = ["--backend", "openai-completions", "--target", fake.url + "/v1", "--workers", "2"]
    rc, _, err = bench(
        *argv, "--concurrency", "2", "--model", "other", *SMALL, "--out", str(tmp_path)
    )
    assert rc == 0, err
    r = json.loads((tmp_path / "run-c2.json").read_text())
    assert (r["completed"], r["failed"], r["workers"], r["model"]) == (4, 0, 2, "other")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--target", "http://127.0.0.1:1"], "is a URL"),
        (["--backend", "openai-chat", "--target", "127.0.0.1:8000"], "takes a URL"),
        (["--backend", "openai-chat", "--target", "http://h:1?x=1"], "without query"),
        (["--model", "m", "--target", "127.0.0.1:1"], "--model is for the OpenAI backends"),
    ],
)
def test_bad_target_exits_2_before_any_load(argv, message):
    rc, out, err = bench(*argv, "--num-prompts", "1")
    assert rc == 2 and message in err and out == ""


def test_unreachable_or_modelless_server_exits_2(fake):
    before = len(fake.bodies)
    for target, message in (
        (closed_port_url(), "cannot use an OpenAI-compatible server"),
        (fake.url + "/nothing", "HTTP 404"),
    ):
        rc, out, err = bench("--backend", "openai-completions", "--target", target, *SMALL)
        assert rc == 2 and message in err and out == "", err
    rc, _, err = bench("--backend", "openai-chat", "--target", fake.url, "--model", "nope", *SMALL)
    assert rc == 2 and "--model nope is not served" in err and "fake-model, other" in err
    assert len(fake.bodies) == before  # no request was sent


def test_event_json_is_read_as_the_stdlib_reads_it():
    """orjson reads the chunks; what it refuses and the stdlib reads (NaN, integers past 64
    bits) still counts, and data neither reads is the same one-line error as before."""
    record = RequestRecord(index=0, prompt_tokens=4, output_tokens=4, scheduled_ns=None, sent_ns=0)
    plain = '{"choices": [{"text": "a", "token_ids": [1, 2]}], "x": 1.0000000000000002}'
    odd = '{"choices": [{"text": "b", "token_ids": [3]}], "x": NaN, "y": 18446744073709551616}'
    assert not apply_event(SseEvent(plain), 10, record, chat=False)
    assert not apply_event(SseEvent(odd), 20, record, chat=False)
    assert (record.chunk_ns, record.chunk_tokens) == ([10, 20], [2, 1])
    with pytest.raises(Exception, match=r"^bad event data: '\{nope'$"):
        apply_event(SseEvent("{nope"), 30, record, chat=False)
    assert apply_event(SseEvent("[DONE]"), 40, record, chat=False)
