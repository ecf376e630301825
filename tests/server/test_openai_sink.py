"""The synchronous sink path of a streamed call (`EventStream.attach`, `openai_sink.SseSink`,
`http_front.write_now`) against the task path it replaces (`next_event`, awaited writes).

1. The live engine hands a sink exactly the events `next_event` returns, in order, for
   every grouping rule (`auto` with and without a short budget, a fixed interval), an
   abort and a drain; on the stepping test clock, so both runs are the same run.
2. The bytes the transport receives are the same on both paths, byte for byte and write
   for write (aiohttp's own payload writer frames the task path's), for completions, chat,
   usage, continuous usage, logprobs, echo, a tool call, a stop string and a drained
   server; also when flow control pauses the transport mid-stream (the chunks queue for
   the handler task, in order) and when the client has gone (the handler raises
   ConnectionResetError). The handler task wakes once a request; a sink that fails
   raises in the handler task, never in the engine's step.
3. Through a real server: every chunk of the HTTP body holds exactly one SSE event, the
   sink path is the one taken, and it gives what the task path gives.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_writer import StreamWriter
from engine_fakes import SteppingClock, model_card

from memorywall.errors import DrainingError, MemorywallError
from memorywall.server.app import EmulatorServer, ServerConfig
from memorywall.server.engine.api import (
    Event,
    EventIteration,
    Finished,
    StreamSink,
    TokenGroup,
)
from memorywall.server.engine.build import build_core
from memorywall.server.engine.live import AsyncEngine, RequestStream
from memorywall.server.engine.scheduler import EngineConfig, Request
from memorywall.server.fronts import openai_sink, openai_stream
from memorywall.server.fronts.http_front import write_now
from memorywall.server.fronts.openai_api import Endpoint, OpenAIApi
from memorywall.server.fronts.openai_reply import Reply
from memorywall.server.fronts.tokenizer import ApproximateTokenizer

TIMEOUT_S = 10.0


# --- 1. the engine's hook ---------------------------------------------------------------


@dataclass
class Recorder:
    """A `StreamSink` that keeps what it is given; `over` is set at the end."""

    events: list[Event | MemorywallError] = field(default_factory=list)
    over: asyncio.Event = field(default_factory=asyncio.Event)

    def group(self, group: TokenGroup) -> None:
        assert not self.over.is_set()
        self.events.append(group)

    def end(self, final: Finished | None, error: MemorywallError | None) -> None:
        assert not self.over.is_set()
        self.events.append(final if error is None else error)
        self.over.set()


async def read_task(stream, on_group) -> list[Event | MemorywallError]:
    out: list[Event | MemorywallError] = []
    try:
        async for event in stream:
            out.append(event)
            if isinstance(event, TokenGroup):
                on_group(len(out))
    except MemorywallError as e:
        out.append(e)
    return out


async def read_sink(stream, on_group) -> list[Event | MemorywallError]:
    recorder = Recorder()
    group = recorder.group

    def counted(g: TokenGroup) -> None:
        group(g)
        # As a front would: never into the engine from inside its step.
        asyncio.get_running_loop().call_soon(on_group, len(recorder.events))

    recorder.group = counted  # type: ignore[method-assign]
    assert stream.attach(recorder)
    assert not stream.attach(Recorder())  # one sink a stream
    await recorder.over.wait()
    if isinstance(recorder.events[-1], Finished):
        assert await stream.next_event() is None  # the sink had it all
    return recorder.events


async def engine_run(deployment, *, sink: bool, interval, rate, abort_at=0, drain_at=0):
    core, _ = build_core(deployment, EngineConfig())
    engine = AsyncEngine(
        core,
        clock=SteppingClock(),
        max_messages_per_s=rate,
        stream_interval=interval,
        cpu_time=lambda: 0.0,
    )
    await engine.start()

    def on_group(rid: str, n: int) -> None:
        if n == abort_at and rid == "r0":
            engine.abort(rid)
        if n == drain_at and rid == "r0":
            asyncio.get_running_loop().create_task(engine.drain(0.0))

    reads = []
    for i in range(6):
        request = Request(
            request_id=f"r{i}", prompt_ids=tuple(range(1, 60)), max_tokens=30, ignore_eos=True
        )
        stream = engine.submit(request)
        assert isinstance(stream, RequestStream)
        reads.append(
            (read_sink if sink else read_task)(stream, lambda n, i=i: on_group(f"r{i}", n))
        )
    try:
        return await asyncio.wait_for(asyncio.gather(*reads), TIMEOUT_S)
    finally:
        await asyncio.wait_for(engine.stop(), TIMEOUT_S)


@pytest.mark.parametrize(
    ("interval", "rate", "abort_at", "drain_at"),
    [
        (None, 1e6, 0, 0),  # auto, every token alone
        (None, 2e3, 0, 0),  # auto on a short budget: grouped, held
        (1, 1e6, 0, 0),
        (4, 1e6, 0, 0),
        (4, 1e6, 3, 0),  # aborted after its third message
        (None, 1e6, 4, 0),
        (None, 2e3, 0, 5),  # the server drains mid-stream
        (3, 1e6, 0, 4),
    ],
)
async def test_a_sink_gets_what_next_event_returns(wse3_8b, interval, rate, abort_at, drain_at):
    args = dict(interval=interval, rate=rate, abort_at=abort_at, drain_at=drain_at)
    read = await engine_run(wse3_8b, sink=False, **args)
    got = await engine_run(wse3_8b, sink=True, **args)
    assert len(got) == len(read) == 6
    for mine, theirs in zip(got, read, strict=True):
        assert [type(e) for e in mine] == [type(e) for e in theirs]
        for a, b in zip(mine, theirs, strict=True):
            if isinstance(a, MemorywallError):
                assert str(a) == str(b)
            else:
                assert a == b
    sizes = [len(e.token_ids) for r in read for e in r if isinstance(e, TokenGroup)]
    assert (max(sizes) > 1) == (interval != 1 and not (interval is None and rate > 1e5))
    if drain_at:
        assert all(isinstance(r[-1], DrainingError) for r in read)
    if abort_at:
        assert read[0][-1].reason.value == "abort"


async def test_a_closed_stream_stops_calling_its_sink(wse3_8b):
    core, _ = build_core(wse3_8b, EngineConfig())
    engine = AsyncEngine(core, clock=SteppingClock(), max_messages_per_s=1e6)
    await engine.start()
    try:
        request = Request(request_id="a", prompt_ids=(1, 2, 3), max_tokens=50, ignore_eos=True)
        stream = engine.submit(request)
        recorder = Recorder()
        assert stream.attach(recorder)
        await asyncio.wait_for(_until(lambda: len(recorder.events) >= 3), TIMEOUT_S)
        stream.close()  # the handler was cancelled: the request is aborted at once
        assert stream.ended and not engine.stats().running
        seen = len(recorder.events)
        await asyncio.sleep(0.01)
        assert len(recorder.events) == seen and not recorder.over.is_set()
    finally:
        await engine.stop()


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0)


# --- 2. the bytes on the transport --------------------------------------------------------


# Calls as the front builds them, for a card with the served model's vocabulary.
CARD_API = OpenAIApi(model_card(vocab_size=128_256), ApproximateTokenizer(128_256))


class Transport:
    """What aiohttp's writer and `write_now` write to: each write kept as it came."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def connection() -> tuple[Transport, BaseProtocol, StreamWriter]:
    """aiohttp's payload writer, chunked, over a protocol holding a recording transport."""
    loop = asyncio.get_running_loop()
    transport = Transport()
    protocol = BaseProtocol(loop)
    protocol.connection_made(transport)  # type: ignore[arg-type]
    writer = StreamWriter(protocol, loop)
    writer.enable_chunking()
    return transport, protocol, writer


class Replay(EventIteration):
    """A recorded stream, read with `next_event` or fed to a sink a loop turn per event (as
    the engine's steps would); `pause`/`close_at`: event indices at which the transport
    pauses for flow control (resumed two turns later) or closes (the client left)."""

    def __init__(self, events, protocol=None, transport=None, pause=(), close_at=None) -> None:
        self.request_id = "r"
        self._events = list(events)
        self._protocol, self._transport = protocol, transport
        self._pause, self._close_at = set(pause), close_at
        self.closed = False

    @property
    def ended(self) -> bool:
        return not self._events

    async def next_event(self) -> Event | None:
        await asyncio.sleep(0)
        if not self._events:
            return None
        event = self._events.pop(0)
        if isinstance(event, MemorywallError):
            raise event
        return event

    def attach(self, sink: StreamSink) -> bool:
        asyncio.get_running_loop().create_task(self._feed(sink))
        return True

    async def _feed(self, sink: StreamSink) -> None:
        protocol = self._protocol
        for i, event in enumerate(self._events):
            await asyncio.sleep(0)
            if i in self._pause:
                protocol.pause_writing()
                asyncio.get_running_loop().call_later(0.001, protocol.resume_writing)
            if i == self._close_at:
                self._transport.closing = True
            if self.closed:
                return
            if isinstance(event, TokenGroup):
                sink.group(event)
            elif isinstance(event, Finished):
                sink.end(event, None)
            else:
                sink.end(None, event)

    def close(self) -> None:
        self.closed = True


async def recorded(body: dict[str, Any], endpoint: Endpoint, deployment) -> tuple[Reply, list]:
    """A call's reply and the events a live engine (stepping clock) gives its request."""
    core, _ = build_core(deployment, EngineConfig())
    engine = AsyncEngine(core, clock=SteppingClock(), max_messages_per_s=1e6)
    await engine.start()
    try:
        call = CARD_API.to_call(body, endpoint, "req-1")
        out = await read_task(engine.submit(call.request), lambda n: None)
    finally:
        await engine.stop()
    return Reply(call, "llama-3.1-8b", 1767000000), out


async def both_paths(body, endpoint, deployment, *, drain=False, **replay) -> tuple[list, list]:
    """The transport's writes through the task path and through the sink path."""
    _, events = await recorded(body, endpoint, deployment)
    if drain:  # the server drained after the third message
        events = [*events[:3], DrainingError("server shut down before the request finished")]
    writes = []
    for direct in (False, True):
        transport, protocol, writer = connection()
        reply = Reply(CARD_API.to_call(body, endpoint, "req-1"), "llama-3.1-8b", 1767000000)
        stream = Replay(events, protocol, transport, **(replay if direct else {}))
        request = SimpleNamespace(writer=writer, protocol=protocol, transport=transport)
        now = write_now(request, SimpleNamespace(compression=False)) if direct else None
        assert (now is not None) == direct
        try:
            await openai_stream.stream_events([stream], [reply], writer.write, now)
        except ConnectionResetError:
            transport.writes.append(b"<reset>")
        writes.append(transport.writes)
    return writes[0], writes[1]


CHAT = {"messages": [{"role": "user", "content": "hi there"}]}
CASES = [
    ({"prompt": "hello", "max_tokens": 12}, Endpoint.COMPLETIONS),
    ({"prompt": "hello", "max_tokens": 9, "stream_options": {"include_usage": True}}, None),
    (
        {
            "prompt": "hello",
            "max_tokens": 5,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
        None,
    ),
    ({"prompt": "hello", "max_tokens": 6, "logprobs": 2, "echo": True}, None),
    ({**CHAT, "max_tokens": 8, "stream_options": {"include_usage": True}}, Endpoint.CHAT),
    ({**CHAT, "max_tokens": 7, "logprobs": True, "top_logprobs": 2}, Endpoint.CHAT),
    (
        {
            **CHAT,
            "max_tokens": 30,
            "tool_choice": "required",
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}},
                    },
                }
            ],
        },
        Endpoint.CHAT,
    ),
]


@pytest.mark.parametrize(("body", "endpoint"), CASES)
async def test_the_transport_gets_the_same_bytes_on_both_paths(h100_8b, body, endpoint):
    endpoint = endpoint or Endpoint.COMPLETIONS
    body = {**body, "stream": True, "ignore_eos": True}
    task, sink = await both_paths(body, endpoint, h100_8b)
    assert len(task) >= 2
    assert sink == task
    for write in task:  # one chunk of the chunked encoding a message
        size, rest = write.split(b"\r\n", 1)
        assert rest.startswith(b"data: ") and len(rest) == int(size, 16) + 2


async def test_the_handler_task_wakes_once_a_request(wse3_8b, monkeypatch):
    """The engine writes every chunk from its step; the handler task wakes at the end only."""
    wakes: list[int] = []
    wake = openai_sink.SseSink._wake

    def counted(self) -> None:
        wakes.append(self._waiter is not None)
        wake(self)

    monkeypatch.setattr(openai_sink.SseSink, "_wake", counted)
    core, _ = build_core(wse3_8b, EngineConfig())
    engine = AsyncEngine(core, clock=SteppingClock(), max_messages_per_s=1e6, stream_interval=1)
    await engine.start()
    body = {"prompt": "hello", "max_tokens": 40, "stream": True, "ignore_eos": True}
    call = CARD_API.to_call(body, Endpoint.COMPLETIONS, "req-1")
    transport, protocol, writer = connection()
    request = SimpleNamespace(writer=writer, protocol=protocol, transport=transport)
    now = write_now(request, SimpleNamespace(compression=False))
    try:
        stream = engine.submit(call.request)
        await asyncio.wait_for(
            openai_stream.stream_events([stream], [Reply(call, "m", 1)], writer.write, now),
            TIMEOUT_S,
        )
    finally:
        await engine.stop()
    assert len(transport.writes) == 40 + 1  # a chunk a token, then [DONE]
    assert wakes == [True]


async def test_a_drained_server_writes_the_same_error_on_both_paths(h100_8b):
    body = {"prompt": "hello", "max_tokens": 12, "stream": True}
    task, sink = await both_paths(body, Endpoint.COMPLETIONS, h100_8b, drain=True)
    assert sink == task
    assert b'"error"' in task[-1] and task[-1].endswith(b"data: [DONE]\n\n\r\n")


async def test_flow_control_queues_chunks_for_the_handler_in_order(h100_8b):
    body = {"prompt": "hello", "max_tokens": 20, "stream": True}
    task, sink = await both_paths(body, Endpoint.COMPLETIONS, h100_8b, pause=(3, 11))
    assert sink == task


async def test_a_client_gone_mid_stream_resets_as_the_task_path_does(h100_8b):
    body = {"prompt": "hello", "max_tokens": 20, "stream": True}
    _, events = await recorded(body, Endpoint.COMPLETIONS, h100_8b)
    transport, protocol, writer = connection()
    reply = Reply(CARD_API.to_call(body, Endpoint.COMPLETIONS, "req-1"), "m", 1767000000)
    stream = Replay(events, protocol, transport, close_at=5)
    request = SimpleNamespace(writer=writer, protocol=protocol, transport=transport)
    now = write_now(request, SimpleNamespace(compression=False))
    with pytest.raises(ConnectionResetError):
        await openai_stream.stream_events([stream], [reply], writer.write, now)
    assert len(transport.writes) == 5


async def test_a_sink_that_fails_raises_in_the_handler_not_the_engine(h100_8b, monkeypatch):
    body = {"prompt": "hello", "max_tokens": 20, "stream": True, "ignore_eos": True}
    _, events = await recorded(body, Endpoint.COMPLETIONS, h100_8b)
    group_event = Reply.group_event
    calls = []

    def third_fails(self, group):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a bug in formatting")
        return group_event(self, group)

    monkeypatch.setattr(Reply, "group_event", third_fails)
    transport, protocol, writer = connection()
    reply = Reply(CARD_API.to_call(body, Endpoint.COMPLETIONS, "req-1"), "m", 1767000000)
    stream = Replay(events, protocol, transport)
    request = SimpleNamespace(writer=writer, protocol=protocol, transport=transport)
    now = write_now(request, SimpleNamespace(compression=False))
    with pytest.raises(RuntimeError, match="a bug in formatting"):
        await openai_stream.stream_events([stream], [reply], writer.write, now)
    assert len(transport.writes) == 2  # what went before; nothing after
    await asyncio.sleep(0.01)  # the engine's later calls are ignored
    assert len(transport.writes) == 2 and len(calls) == 3


def test_compression_or_a_declared_length_takes_the_task_path():
    writer = SimpleNamespace(length=None, chunked=True, output_size=0)
    request = SimpleNamespace(writer=writer, protocol=object(), transport=object())
    assert write_now(request, SimpleNamespace(compression=True)) is None
    assert write_now(request, SimpleNamespace(compression=False)) is not None
    writer.length = 100
    assert write_now(request, SimpleNamespace(compression=False)) is None


async def test_a_stop_string_ends_the_chunks_alike_and_aborts_from_the_handler(h100_8b):
    body = {"prompt": "hello", "max_tokens": 16, "stream": True, "ignore_eos": True}
    _, events = await recorded(body, Endpoint.COMPLETIONS, h100_8b)
    stop = events[5].text.strip()[:3]  # cut inside the sixth message
    assert stop
    writes = []
    for direct in (False, True):
        transport, protocol, writer = connection()
        call = CARD_API.to_call({**body, "stop": [stop]}, Endpoint.COMPLETIONS, "req-1")
        stream = Replay(events, protocol, transport)
        request = SimpleNamespace(writer=writer, protocol=protocol, transport=transport)
        now = write_now(request, SimpleNamespace(compression=False)) if direct else None
        await openai_stream.stream_events([stream], [Reply(call, "m", 1)], writer.write, now)
        assert stream.closed  # the engine request is aborted, from the handler task
        writes.append(transport.writes)
    task, sink = writes
    assert sink == task
    assert b'"finish_reason":"stop","stop_reason":"%b"' % stop.encode() in task[-2]
    assert len(task) < len(events)  # the messages after the stop string are not written


# --- 3. through a real server -------------------------------------------------------------


@pytest.fixture
async def server(h100_8b):
    # A message a token whatever the host's load (`auto` groups when the host falls behind).
    config = ServerConfig(port=0, http_port=0, load_format="dummy", stream_interval=1)
    s = EmulatorServer(h100_8b, EngineConfig(), config)
    await s.start()
    yield s
    await asyncio.wait_for(s.stop(grace_s=0.0), TIMEOUT_S)


async def raw_stream(port: int, body: bytes) -> list[bytes]:
    """The chunks of one streamed response's chunked body, read off a plain socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    writer.write(head + body)
    raw = await asyncio.wait_for(reader.read(), TIMEOUT_S)
    writer.close()
    headers, rest = raw.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding: chunked" in headers.lower()
    chunks = []
    while True:
        size, rest = rest.split(b"\r\n", 1)
        n = int(size, 16)
        if n == 0:
            return chunks
        chunks.append(rest[:n])
        assert rest[n : n + 2] == b"\r\n"
        rest = rest[n + 2 :]


async def test_every_chunk_on_the_wire_is_one_event_and_both_paths_agree(server, monkeypatch):
    body = (
        b'{"prompt":"hi","max_tokens":10,"stream":true,"ignore_eos":true,'
        b'"stream_options":{"include_usage":true}}'
    )
    sunk: list[int] = []
    attach = RequestStream.attach

    def counting(self, sink) -> bool:
        sunk.append(1)
        return attach(self, sink)

    monkeypatch.setattr(RequestStream, "attach", counting)
    direct = await raw_stream(server.http_port, body)
    assert sunk == [1]  # the sink path served it
    monkeypatch.setattr(RequestStream, "attach", lambda self, sink: False)
    tasked = await raw_stream(server.http_port, body)
    for chunks in (direct, tasked):
        assert len(chunks) == 10 + 1  # a message a token, then usage and [DONE] together
        assert all(re.fullmatch(rb"data: [^\n]+\n\n", c) for c in chunks[:-1])
        assert re.fullmatch(rb'data: \{"id"[^\n]+"usage"[^\n]+\n\ndata: \[DONE\]\n\n', chunks[-1])
    # The same but for the call's id, time of creation and the modelled times.
    variable = rb'"(id|created|modelled_times_s|timing|lag|energy_j)":(\[[^]]*\]|\{[^}]*\}|[^,}]+)'
    assert [re.sub(variable, b"", c) for c in direct] == [re.sub(variable, b"", c) for c in tasked]


async def test_a_client_gone_mid_stream_aborts_on_the_sink_path(server):
    body = b'{"prompt":"hi","max_tokens":100000,"stream":true,"ignore_eos":true}'
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    await asyncio.wait_for(reader.readuntil(b"data: "), TIMEOUT_S)  # a token came
    assert server.engine.stats().running == 1
    writer.close()
    for _ in range(200):
        if server.engine.stats().running == 0:
            break
        await asyncio.sleep(0.01)
    stats = server.engine.stats()
    assert stats.running == 0 and stats.kv_used_tokens == 0 and stats.requests_aborted == 1


async def test_the_official_client_reads_the_sink_path(server):
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0)
    stream = await client.completions.create(
        model="llama-3.1-8b",
        prompt="hi",
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    await client.close()
    n = chunks[-1].usage.completion_tokens
    assert 1 <= n <= 8 and len(chunks) == n + 1  # a chunk a token, then usage
    assert chunks[-2].choices[0].finish_reason in ("length", "stop")
    assert all(len(c.memorywall["token_ids"]) == 1 for c in chunks[:-1])
