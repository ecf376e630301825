"""`memorywall serve --api-servers N`: one engine process behind N front processes.

The engine side is tested in-process over a real socketpair (`EngineHost` and
`RemoteEngine`, the same code the processes run); the process tree is tested as
a user runs it, on 127.0.0.1 with port 0 (front 0 binds any free port, the
others join it with SO_REUSEPORT). A test reaches a given front by opening
connections until each front has answered one (`X-Memorywall-Front`), then
keeps those connections alive.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from polling import block_until, wait_until

from memorywall.cli import main
from memorywall.errors import (
    DuplicateRequestError,
    LifecycleError,
    NotReadyError,
    OverloadedError,
)
from memorywall.ready import ServerReady, wait_for
from memorywall.server.engine.api import BlockStored, Finished, FinishReason, Request, TokenGroup
from memorywall.server.engine.guard import GuardConfig, GuardedEngine
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.multi.engine_host import EngineHost
from memorywall.server.multi.front import FRONT_HEADER
from memorywall.server.multi.remote import RemoteEngine
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc

H100_8B = ["--hardware", "h100-sxm", "--model", "llama-3.1-8b"]
START_TIMEOUT_S = 60.0  # three spawned interpreters importing numpy and grpc on 2 busy cores
EXIT_TIMEOUT_S = 30.0
FIND_FRONT_TRIES = 64  # connections spread by a hash of the port pair: 2**-63 to miss one
PROMPT = "the quick brown fox jumps over the lazy dog " * 6  # ~66 tokens: 4 full blocks


# In process: the engine host and fronts' RemoteEngine over socketpairs


async def _engine_with_fronts(
    deployment, fronts: int, config: EngineConfig | None = None
) -> tuple[EngineHost, asyncio.Task, list]:
    host = EngineHost(
        deployment, config or EngineConfig(), max_messages_per_s=40_000.0, grace_s=1.0
    )
    pairs = [socket.socketpair() for _ in range(fronts)]
    tasks = [asyncio.create_task(host.serve([a for a, _ in pairs]))]
    remotes = []
    for _, b in pairs:
        remote = RemoteEngine(*await asyncio.open_unix_connection(sock=b))
        await remote.connect()
        remotes.append(remote)
    return host, tasks[0], remotes


def _request(request_id: str, prompt: tuple[int, ...], max_tokens: int) -> Request:
    return Request(request_id=request_id, prompt_ids=prompt, max_tokens=max_tokens, ignore_eos=True)


async def _drain(stream) -> list:
    return [event async for event in stream]


async def test_fronts_share_one_kv_pool(h100_8b):
    host, serving, (a, b) = await _engine_with_fronts(h100_8b, 2)
    prompt = tuple(range(1, 100))  # 6 full blocks of 16
    first = await _drain(a.submit(_request("a", prompt, 4)))
    second = await _drain(b.submit(_request("b", prompt, 4)))
    assert first[-1].cached_tokens == 0
    assert second[-1].cached_tokens == 96  # what front A's request left in the pool
    assert [type(e) for e in second] == [TokenGroup] * 4 + [Finished]
    assert host.engine.stats().prefix_cache.hits == 96
    for remote in (a, b):
        await remote.close()
    await asyncio.wait_for(serving, EXIT_TIMEOUT_S)


async def test_a_closed_front_frees_everything_its_streams_held(h100_8b):
    host, serving, (a, b) = await _engine_with_fronts(h100_8b, 2)
    held = [a.submit(_request(f"a{i}", tuple(range(1, 200)), 5000)) for i in range(3)]
    kept = b.submit(_request("b", tuple(range(300, 400)), 5000))
    for stream in (*held, kept):
        assert isinstance(await stream.next_event(), TokenGroup)
    assert host.engine.stats().running == 4
    await a.close()  # front A's process is gone: its socket closes
    await wait_until(
        lambda: host.engine.stats().running == 1, EXIT_TIMEOUT_S, why=host.engine.stats
    )
    stats = host.engine.stats()
    assert stats.requests_aborted == 3
    assert isinstance(await kept.next_event(), TokenGroup)  # front B's stream goes on
    kept.close()
    await b.close()
    await asyncio.wait_for(serving, EXIT_TIMEOUT_S)
    stats = host.engine.stats()
    assert (stats.running, stats.waiting, stats.kv_used_tokens) == (0, 0, 0)


async def test_an_id_live_on_another_front_is_refused_by_the_engine(h100_8b):
    _, serving, (a, b) = await _engine_with_fronts(h100_8b, 2)
    live = a.submit(_request("same", tuple(range(1, 50)), 5000))
    assert isinstance(await live.next_event(), TokenGroup)
    with pytest.raises(DuplicateRequestError):  # the front's own check
        a.submit(_request("same", tuple(range(1, 50)), 4))
    with pytest.raises(DuplicateRequestError, match="already in flight"):
        await b.submit(_request("same", tuple(range(1, 50)), 4)).next_event()
    live.close()
    for remote in (a, b):
        await remote.close()
    await asyncio.wait_for(serving, EXIT_TIMEOUT_S)


async def test_abort_by_id_reaches_the_stream_on_any_front(h100_8b):
    _, serving, (a, b) = await _engine_with_fronts(h100_8b, 2)
    local = a.submit(_request("local", tuple(range(1, 50)), 5000))
    remote = a.submit(_request("elsewhere", tuple(range(1, 50)), 5000))
    for stream in (local, remote):
        assert isinstance(await stream.next_event(), TokenGroup)
    assert a.abort("local")  # this front's own: answered at once
    assert not b.abort("elsewhere")  # another front's: carried out, but not known here
    for stream in (local, remote):
        events = await _drain(stream)
        assert events[-1].reason is FinishReason.ABORT
    for front in (a, b):
        await front.close()
    await asyncio.wait_for(serving, EXIT_TIMEOUT_S)


async def test_kv_events_reach_a_subscribed_front(h100_8b):
    _, serving, (a,) = await _engine_with_fronts(h100_8b, 1)
    events = []
    unsubscribe = a.subscribe_kv_events(events.append)
    await _drain(a.submit(_request("a", tuple(range(1, 100)), 2)))
    # Blocks are stored when the step that computes them is scheduled: before its tokens.
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert sum(len(e.block_hashes) for e in stored) == 6
    unsubscribe()
    await a.close()
    await asyncio.wait_for(serving, EXIT_TIMEOUT_S)


async def test_lifecycle_calls_reach_the_engine_and_every_front_hears_the_state(h100_8b):
    host, serving, (a, b) = await _engine_with_fronts(h100_8b, 2)
    await _drain(a.submit(_request("a", tuple(range(1, 100)), 2)))
    assert host.engine.stats().prefix_cache.queries > 0
    assert await b.reset_prefix_cache()
    assert not host.engine.core.kv.pool.cached
    held = a.submit(_request("held", tuple(range(1, 50)), 5000))
    assert isinstance(await held.next_event(), TokenGroup)
    assert not await b.reset_prefix_cache()  # a request holds KV
    with pytest.raises(LifecycleError, match="in flight"):
        await b.sleep(1)
    held.close()  # aborted in the engine; a closed remote stream hears nothing more
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while host.engine.stats().running:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await a.sleep(2)
    while not b.lifecycle.sleeping:  # the other front hears it too
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert a.lifecycle.sleep_level == 2 and host.engine.lifecycle.sleeping
    with pytest.raises(NotReadyError):
        b.submit(_request("b", (1, 2), 1))
    await b.wake_up()
    assert not b.lifecycle.sleeping
    await _drain(b.submit(_request("b", (1, 2), 1)))
    for front in (a, b):
        await front.close()
    await asyncio.wait_for(serving, EXIT_TIMEOUT_S)


async def test_admission_on_one_front_counts_the_queue_another_front_filled(h100_8b):
    _, serving, (a, b) = await _engine_with_fronts(h100_8b, 2, EngineConfig(max_num_seqs=1))
    running = a.submit(_request("running", tuple(range(1, 50)), 5000))
    assert isinstance(await running.next_event(), TokenGroup)
    queued = a.submit(_request("queued", tuple(range(1, 50)), 4))  # no slot: it waits
    # The engine tells every front when its queue changes.
    await wait_until(lambda: b.waiting() == 1, EXIT_TIMEOUT_S, every_s=0.005)
    guard = GuardedEngine(b, GuardConfig(max_waiting=1))
    with pytest.raises(OverloadedError, match="1 requests waiting"):
        guard.submit(_request("refused", tuple(range(1, 50)), 4))
    running.close()
    assert [type(e) for e in await _drain(queued)][-1] is Finished
    for front in (a, b):
        await front.close()
    await asyncio.wait_for(serving, EXIT_TIMEOUT_S)


# As a user runs it: the process tree


class Tree:
    """A running `serve --api-servers N` and what its ready file says."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.ready_file = tmp_path / "ready.json"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "memorywall",
                "serve",
                *args,
                "--ready-file",
                str(self.ready_file),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "stderr.log", "w"),  # noqa: SIM115 - closed with the process
        )
        self.log = tmp_path / "stderr.log"
        self.ready = ServerReady.from_dict(
            wait_for(self.ready_file, self.process, timeout_s=START_TIMEOUT_S)
        )
        self.children = _children(self.process.pid)

    def connect_to_each_front(self, count: int) -> dict[int, http.client.HTTPConnection]:
        """One kept-alive connection per front, by index."""
        found: dict[int, http.client.HTTPConnection] = {}
        for _ in range(FIND_FRONT_TRIES):
            conn = http.client.HTTPConnection("127.0.0.1", self.ready.http_port, timeout=30)
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            index = int(response.getheader(FRONT_HEADER))
            if index in found:
                conn.close()
            else:
                found[index] = conn
            if len(found) == count:
                return found
        raise AssertionError(f"only fronts {sorted(found)} answered {FIND_FRONT_TRIES} connections")


@pytest.fixture
def tree(tmp_path) -> Iterator:
    started: list[Tree] = []

    def start(*args: str) -> Tree:
        started.append(Tree(tmp_path, *args))
        return started[-1]

    yield start
    for t in started:
        if t.process.poll() is None:
            t.process.kill()  # the children see their parent go and stop by themselves
        t.process.wait(timeout=EXIT_TIMEOUT_S)
        _wait_gone(t.children)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_gone(pids: list[int]) -> None:
    block_until(
        lambda: not any(_alive(p) for p in pids),
        EXIT_TIMEOUT_S,
        every_s=0.05,
        why=lambda: [p for p in pids if _alive(p)],
    )


def _post(conn: http.client.HTTPConnection, body: dict) -> http.client.HTTPResponse:
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    return conn.getresponse()


def _stream(conn: http.client.HTTPConnection, max_tokens: int) -> tuple[list, float]:
    """(arrival after the request was sent, modelled times) of each chunk with tokens, and
    the model's own decode time per token (host stalls taken out)."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    t0 = time.monotonic()
    response = _post(conn, body)
    assert response.status == 200
    chunks, decode_s = [], None
    while line := response.readline():
        if line.startswith(b"data: {"):
            extra = json.loads(line[6:])["memorywall"]
            if "modelled_times_s" in extra:
                chunks.append((time.monotonic() - t0, extra["modelled_times_s"]))
            else:
                decode_s = extra["timing"]["decode_s"] - extra["lag"]["decode_host_stall_s"]
    return chunks, decode_s / (max_tokens - 1)


def _cached_tokens(conn: http.client.HTTPConnection) -> int:
    response = _post(conn, {"prompt": PROMPT, "max_tokens": 2, "ignore_eos": True})
    assert response.status == 200
    return json.loads(response.read())["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_two_fronts_stream_modelled_times_and_share_the_kv_pool(tree):
    t = tree(*H100_8B, "--port", "0", "--http-port", "0", "--api-servers", "2")
    assert len(t.children) >= 3  # the engine, two fronts (and multiprocessing's tracker)
    fronts = t.connect_to_each_front(2)
    # A prompt sent through front 0, then through front 1, hits the blocks front 0 left.
    assert _cached_tokens(fronts[0]) == 0
    assert _cached_tokens(fronts[1]) == 64
    step_s = 1.0 / t.ready.predicted_tokens_per_s_per_user
    for conn in fronts.values():
        chunks, model_tpot_s = _stream(conn, 48)
        # Decode at batch 1 and context ~100: near the card's prediction (context 1024).
        assert step_s * 0.8 < model_tpot_s < step_s * 1.2
        times = [time for _, ts in chunks for time in ts]
        assert len(times) == 48
        assert times == sorted(times)
        for arrived_s, ts in chunks:
            # Never before the model's time (the server stamped arrival after we sent), and
            # not long after it, even on a loaded 2-core machine.
            assert ts[-1] - 0.001 <= arrived_s <= ts[-1] + 0.5
        conn.close()
    # gRPC on the same ports: a stream, and the engine's state from whichever front answers.
    with grpc.insecure_channel(t.ready.grpc_target) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        request = pb.GenerateRequest(token_count=100, max_tokens=8, ignore_eos=True)
        replies = list(stub.Generate(request, timeout=EXIT_TIMEOUT_S))
        times = [x for r in replies[:-1] for x in r.chunk.modelled_times_s]
        assert len(times) == 8 and times == sorted(times)
        assert replies[-1].finished.usage.completion_tokens == 8

        # Every request through every front, as the engine counts them (pushed every 0.1 s).
        def all_finished() -> pb.ServerInfo | None:
            info = stub.GetServerInfo(pb.GetServerInfoRequest())
            return info if info.requests_finished >= 5 else None

        info = block_until(all_finished, EXIT_TIMEOUT_S, every_s=0.05)
        assert info.kv_total_tokens == t.ready.kv_capacity_tokens
        assert (info.requests_finished, info.running) == (5, 0)


def test_sigterm_to_the_parent_stops_every_process(tree):
    t = tree(*H100_8B, "--port", "0", "--http-port", "0", "--api-servers", "2")
    children = t.children
    t.process.send_signal(signal.SIGTERM)
    assert t.process.wait(timeout=EXIT_TIMEOUT_S) == 0
    _wait_gone(children)
    assert not t.ready_file.exists()
    assert "Traceback" not in t.log.read_text()


def _serving_pid(conn: http.client.HTTPConnection, candidates: list[int]) -> int:
    """The process holding the server end of `conn` (Linux: /proc/net/tcp, then fds)."""
    local_port = conn.sock.getsockname()[1]
    server_port = conn.sock.getpeername()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == (
            local_port
        ):
            inode = fields[9]
    assert inode is not None
    for pid in candidates:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except FileNotFoundError:
                continue
    raise AssertionError(f"no process among {candidates} holds socket {inode}")


def _metric(conn: http.client.HTTPConnection, line_start: str) -> float:
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    text = response.read().decode()
    assert response.status == 200
    values = [float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line_start)]
    assert len(values) == 1, line_start
    return values[0]


def test_a_killed_front_frees_its_streams_and_the_rest_stops(tree):
    t = tree(*H100_8B, "--port", "0", "--http-port", "0", "--api-servers", "2", "--grace", "5")
    fronts = t.connect_to_each_front(2)
    body = {"prompt": PROMPT, "max_tokens": 20_000, "ignore_eos": True, "stream": True}
    held = _post(fronts[0], body)  # headers only: the stream runs on in the engine
    spare = t.connect_to_each_front(2)  # a second connection to front 1, for /metrics
    spare[0].close()
    kept_conn = spare[1]
    kept = _post(fronts[1], body)
    assert held.status == kept.status == 200
    running = 'vllm:num_requests_running{engine="0",model_name="llama-3.1-8b"}'
    aborted = 'vllm:request_success_total{engine="0",finished_reason="abort"'
    block_until(lambda: _metric(kept_conn, running) == 2, EXIT_TIMEOUT_S, every_s=0.05)
    os.kill(_serving_pid(fronts[0], t.children), signal.SIGKILL)
    # The engine frees front 0's stream at once; front 1's runs on through the drain.
    block_until(lambda: _metric(kept_conn, running) == 1, EXIT_TIMEOUT_S, every_s=0.02)
    assert _metric(kept_conn, aborted) == 1
    assert t.process.wait(timeout=EXIT_TIMEOUT_S) == 1  # the parent stopped everything
    _wait_gone(t.children)
    assert "front 0" in t.log.read_text()


def test_api_servers_0_is_a_one_line_usage_error(capsys):
    assert main(["serve", *H100_8B, "--port", "0", "--api-servers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--api-servers" in err and ">= 1" in err


def test_a_port_in_use_is_a_one_line_error_and_nothing_is_left_running():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        serve = [sys.executable, "-m", "memorywall", "serve", *H100_8B, "--port", "0"]
        result = subprocess.run(
            [*serve, "--http-port", port, "--api-servers", "2"],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S + EXIT_TIMEOUT_S,
        )
    assert result.returncode == 2
    # One line: the engine, already up, stopped when its fronts went (not killed after waiting).
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"memorywall: error: cannot serve HTTP on 127.0.0.1:{port}")
