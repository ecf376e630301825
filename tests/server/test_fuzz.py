"""Hostile input, generated (hypothesis, bounded example counts), against one `memorywall serve`
process on 127.0.0.1: HTTP JSON bodies and headers, memorywall.v1 protobuf fields, raw bytes
as gRPC messages, garbage and truncated requests on both sockets.

Every answer is a client error (HTTP 4xx; gRPC INVALID_ARGUMENT and its family), or a normal
answer when the input happens to be valid: never 5xx, INTERNAL or UNKNOWN. Meanwhile a
healthy stream runs again and again beside the fuzzing and must keep its tokens and its
modelled timing; at the end the server is still serving, idle, and logged no error.
"""

from __future__ import annotations

import http.client
import itertools
import json
import math
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polling import block_until

from memorywall import ready
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc

EXAMPLES = 60  # per test; CI-sized
MAX_REQUEST_BYTES = 64 * 1024
READ_TIMEOUT_S = 3.0  # a valid request with a long output is left after this
START_TIMEOUT_S = 60.0
HEALTHY_TOKENS = 200
# A client error, or an answer to input that happened to be valid, or a stream the client
# left after READ_TIMEOUT_S (valid, long).
GRPC_CLIENT_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases on every run: a CI failure reproduces
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TRIED: Counter[str] = Counter()  # cases per kind, printed at the end of the module


@dataclass
class Healthy:
    """A well-formed stream sent again and again while the fuzzing runs."""

    target: str
    step_s: float  # the core's batch-1 decode step
    results: list[tuple[float, list[float], list[float], int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __repr__(self) -> str:  # hypothesis prints it with every failing case
        return f"Healthy({len(self.results)} streams)"

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = engine_pb2_grpc.EngineStub(channel)
            while not self.stop.is_set():
                request = pb.GenerateRequest(
                    token_count=32, max_tokens=HEALTHY_TOKENS, ignore_eos=True
                )
                sent = time.monotonic()
                received: list[float] = []
                modelled: list[float] = []
                try:
                    for r in stub.Generate(request, timeout=30):
                        now = time.monotonic()
                        if r.HasField("chunk"):
                            modelled.extend(r.chunk.modelled_times_s)
                            received.extend([now - sent] * len(r.chunk.token_ids))
                        else:
                            tokens = r.finished.usage.completion_tokens
                except grpc.RpcError as e:
                    self.errors.append(f"{e.code().name}: {e.details()}")
                    continue
                self.results.append((sent, modelled, received, tokens))


@dataclass
class Server:
    grpc_target: str
    http_host: str
    http_port: int
    grpc_port: int
    log: Path
    healthy: Healthy

    def __repr__(self) -> str:
        return f"Server({self.grpc_target}, http port {self.http_port})"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("fuzz")
    ready_file, log = tmp / "ready.json", tmp / "server.log"
    cmd = [sys.executable, "-m", "memorywall", "serve", "--hardware", "wse-3"]
    cmd += ["--model", "llama-3.1-8b", "--port", "0", "--http-port", "0", "--grace", "1"]
    cmd += ["--max-request-bytes", str(MAX_REQUEST_BYTES), "--ready-file", str(ready_file)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        info = ready.ServerReady.from_dict(
            ready.wait_for(ready_file, proc, timeout_s=START_TIMEOUT_S)
        )
        healthy = Healthy(info.grpc_target, 1 / info.predicted_tokens_per_s_per_user)
        thread = threading.Thread(target=healthy.run, daemon=True)
        thread.start()
        running = Server(info.grpc_target, info.host, info.http_port, info.grpc_port, log, healthy)
        yield running
        # After every test of the module, in whatever order they ran: the server kept
        # serving the healthy stream on time all through the fuzzing, and logged no error.
        try:
            check_still_serving(running)
        finally:
            healthy.stop.set()
            thread.join(timeout=60)
        check_healthy_on_time(healthy)
        check_log_clean(log)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"\nfuzz cases tried: {dict(TRIED)}; healthy streams: {len(healthy.results)}")


def check_healthy_on_time(healthy: Healthy) -> None:
    """Every healthy stream so far: no error, all its tokens, never faster than the core,
    never before its modelled time, and on time in the main."""
    assert not healthy.errors, healthy.errors[:3]
    lateness = []
    for _, modelled, received, tokens in list(healthy.results):
        assert tokens == HEALTHY_TOKENS and len(modelled) == HEALTHY_TOKENS
        assert all(b >= a for a, b in itertools.pairwise(modelled))
        # Never faster than the core: each gap at least a batch-1 step (a 32-token prompt
        # steps a little faster than the 1,024-token context the prediction is for).
        tpot = (modelled[-1] - modelled[0]) / (HEALTHY_TOKENS - 1)
        assert tpot >= 0.8 * healthy.step_s
        # Never before its modelled time (2 ms for clock reads), and on time in the main.
        assert all(r >= m - 0.002 for m, r in zip(modelled, received, strict=True))
        lateness.extend(r - m for m, r in zip(modelled, received, strict=True))
    assert lateness, "no healthy stream finished"
    assert statistics.median(lateness) < 0.05


def check_still_serving(server: Server) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        info = engine_pb2_grpc.EngineStub(channel).GetServerInfo(pb.GetServerInfoRequest())
    assert info.requests_finished > 0


def check_log_clean(log: Path) -> None:
    text = log.read_text()
    assert "ERROR" not in text and "Traceback" not in text, text[-2000:]


# --- strategies -------------------------------------------------------------------------

FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([-0.0, 1e308, -1e-308])
INTS = st.integers(-(2**70), 2**70) | st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, 2**64])
TEXT = st.text(max_size=64) | st.sampled_from(["", "\x00", "\ud7ff" * 8, "😀" * 16, "a" * 5000])
SCALARS = st.none() | st.booleans() | INTS | FLOATS | TEXT
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "min_tokens",
    "stream", "stream_options", "n", "best_of", "temperature", "top_p", "top_k", "seed",
    "stop", "stop_token_ids", "ignore_eos", "logprobs", "top_logprobs", "echo", "suffix",
    "user", "presence_penalty", "frequency_penalty", "tools", "tool_choice", "response_format",
]  # fmt: skip
VALID = {"prompt": "hello", "max_tokens": 4, "ignore_eos": True}


def bodies() -> st.SearchStrategy:
    """Whole junk, or a valid body with a few fields replaced by junk (reaches deeper)."""
    junk_fields = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6)
    mutated = junk_fields.map(lambda d: {**VALID, **d})
    return JSON | junk_fields | mutated


HEADER_NAMES = st.sampled_from(
    ["Authorization", "X-Request-Id", "x-memorywall-fault", "Content-Type", "Accept",
     "Content-Encoding", "Accept-Encoding", "Connection", "Expect", "Cookie", "X-Junk"]
)  # fmt: skip
# What http.client lets through as a header value: latin-1 without CR, LF or NUL.
HEADER_VALUES = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=80,
)
UINT32 = st.integers(0, 2**32 - 1)
PROTO_TEXT = st.text(max_size=200)
SAMPLING = st.builds(
    pb.SamplingParams,
    temperature=FLOATS,
    top_p=FLOATS,
    top_k=st.integers(-(2**31), 2**31 - 1),
    seed=st.integers(0, 2**64 - 1),
    stop=st.lists(PROTO_TEXT, max_size=3),
    stop_token_ids=st.lists(UINT32, max_size=3),
)


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    r = pb.GenerateRequest(
        request_id=draw(PROTO_TEXT),
        model=draw(st.sampled_from(["", "llama-3.1-8b"]) | PROTO_TEXT),
        max_tokens=draw(UINT32 | st.integers(0, 8)),
        min_tokens=draw(UINT32 | st.integers(0, 8)),
        ignore_eos=draw(st.booleans()),
        stream_options=pb.StreamOptions(min_interval_s=draw(FLOATS)),
    )
    if draw(st.booleans()):
        r.sampling.CopyFrom(draw(SAMPLING))
    prompt = draw(st.sampled_from(["text", "ids", "count", "none"]))
    if prompt == "text":
        r.text = draw(PROTO_TEXT)
    elif prompt == "ids":
        r.token_ids.ids.extend(draw(st.lists(UINT32 | st.integers(0, 1000), max_size=50)))
    elif prompt == "count":
        r.token_count = draw(UINT32 | st.integers(0, 100))
    return r


# --- senders ----------------------------------------------------------------------------


def http_post(server: Server, path: str, body: bytes, headers: dict[str, str]) -> int | None:
    """The status, or None for a valid request still generating after READ_TIMEOUT_S."""
    conn = http.client.HTTPConnection(server.http_host, server.http_port, timeout=READ_TIMEOUT_S)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        status = response.status
        json_reply = (response.getheader("Content-Type") or "").startswith("application/json")
        if status >= 400 and json_reply:  # aiohttp's own protocol errors are plain text
            payload = json.loads(response.read())
            assert payload["error"]["code"] == status, payload
        return status
    except TimeoutError:
        return None
    finally:
        conn.close()


def grpc_call(server: Server, method: str, payload, serializer=None) -> grpc.StatusCode:
    with grpc.insecure_channel(server.grpc_target) as channel:
        call = channel.unary_stream(method, request_serializer=serializer)
        try:
            for _ in call(payload, timeout=READ_TIMEOUT_S):
                pass
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def assert_client_error(status: int | None) -> None:
    assert status is None or status < 500, status


# --- HTTP -------------------------------------------------------------------------------


@FUZZ
@given(body=bodies(), chat=st.booleans(), nan=st.booleans())
def test_http_json_bodies_get_client_errors(server, body, chat, nan):
    TRIED["http body"] += 1
    path = "/v1/chat/completions" if chat else "/v1/completions"
    raw = json.dumps(body, allow_nan=nan).encode() if nan or _finite(body) else b"{}"
    status = http_post(server, path, raw, {"Content-Type": "application/json"})
    assert_client_error(status)


@FUZZ
@given(headers=st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=4), stream=st.booleans())
def test_http_headers_get_client_errors(server, headers, stream):
    TRIED["http headers"] += 1
    body = json.dumps({**VALID, "stream": stream}).encode()
    status = http_post(server, "/v1/completions", body, headers)
    assert_client_error(status)


@FUZZ
@given(raw=st.binary(max_size=2048))
def test_http_garbage_bodies_get_client_errors(server, raw):
    TRIED["http raw body"] += 1
    assert_client_error(http_post(server, "/v1/completions", raw, {}))


def test_http_oversized_and_truncated_bodies(server):
    TRIED["http size/truncation"] += 2
    big = json.dumps({**VALID, "prompt": "x" * (2 * MAX_REQUEST_BYTES)}).encode()
    assert http_post(server, "/v1/completions", big, {}) == 413
    with socket.create_connection((server.http_host, server.http_port), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        s.shutdown(socket.SHUT_WR)  # the rest of the body never comes
        reply = _read_all(s)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 4"), reply[:100]


@FUZZ
@given(raw=st.binary(min_size=1, max_size=512))
def test_garbage_on_the_http_socket(server, raw):
    TRIED["http socket garbage"] += 1
    with socket.create_connection((server.http_host, server.http_port), timeout=5) as s:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        reply = _read_all(s)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 4") or reply.startswith(b"HTTP/1.0 4"), (
        reply[:100]
    )


# --- gRPC -------------------------------------------------------------------------------


@FUZZ
@given(request=generate_requests())
def test_protobuf_fields_get_client_errors(server, request):
    TRIED["grpc fields"] += 1
    code = grpc_call(
        server,
        "/memorywall.v1.Engine/Generate",
        request,
        serializer=pb.GenerateRequest.SerializeToString,
    )
    assert code in GRPC_CLIENT_CODES, code


@FUZZ
@given(
    raw=st.binary(max_size=1024),
    method=st.sampled_from(
        ["/memorywall.v1.Engine/Generate", "/memorywall.v1.Engine/Abort",
         "/sglang.grpc.scheduler.SglangScheduler/Generate"]
    ),
)  # fmt: skip
def test_raw_bytes_as_messages_get_client_errors(server, raw, method):
    TRIED["grpc raw message"] += 1
    assert grpc_call(server, method, raw) in GRPC_CLIENT_CODES | {grpc.StatusCode.UNIMPLEMENTED}


@FUZZ
@given(raw=st.binary(max_size=512), preface=st.booleans())
def test_garbage_on_the_grpc_socket(server, raw, preface):
    TRIED["grpc socket garbage"] += 1
    start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" if preface else b""
    with socket.create_connection(("127.0.0.1", server.grpc_port), timeout=5) as s:
        s.sendall(start + raw)
        s.shutdown(socket.SHUT_WR)
        _read_all(s)  # whatever HTTP/2 says back (GOAWAY); the server must just go on


# --- afterwards -------------------------------------------------------------------------


def test_server_serves_the_healthy_stream_on_time(server):
    """Whenever it runs, before, among or after the fuzzing: three healthy streams or more,
    on time, and the server still serving with a clean log. The module's fixture checks the
    same once every test has run (the stream throughout the fuzzing)."""
    healthy = server.healthy
    block_until(lambda: len(healthy.results) >= 3, 30, why=lambda: healthy.errors[:3])
    check_healthy_on_time(healthy)
    check_still_serving(server)
    check_log_clean(server.log)


def _finite(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, list):
        return all(_finite(x) for x in obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    return True


def _read_all(s: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := s.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)
