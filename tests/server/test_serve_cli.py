"""`memorywall serve` as a user runs it: a subprocess on 127.0.0.1 port 0, stopped by signal."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc

SERVE = [sys.executable, "-m", "memorywall", "serve"]
WSE3_8B = ["--hardware", "wse-3", "--model", "llama-3.1-8b"]
READY_RE = re.compile(r"memorywall serving (?P<deployment>.+) on 127\.0\.0\.1:(?P<port>\d+): ")
START_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 10.0


@dataclass
class Served:
    process: subprocess.Popen
    lines: queue.Queue = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    def wait_for_line(self, pattern: re.Pattern, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no line matching {pattern.pattern!r} in: {self.seen}"
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            assert line is not None, f"server exited early: {self.seen}"
            self.seen.append(line)
            if match := pattern.search(line):
                return match

    def rest(self) -> list[str]:
        """Every stderr line after the process has exited."""
        while (line := self.lines.get(timeout=EXIT_TIMEOUT_S)) is not None:
            self.seen.append(line)
        return self.seen


def start_serve(*args: str) -> Served:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [*SERVE, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    served = Served(process)

    def pump() -> None:
        for line in process.stderr:
            served.lines.put(line.rstrip("\n"))
        served.lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return served


@pytest.fixture
def serve() -> Iterator:
    started: list[Served] = []

    def start(*args: str) -> Served:
        served = start_serve(*args)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
        served.process.wait(timeout=EXIT_TIMEOUT_S)


def generate(port: int) -> list[pb.GenerateResponse]:
    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]
    ) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        request = pb.GenerateRequest(text="hello wafer", max_tokens=12, ignore_eos=True)
        return list(stub.Generate(request, timeout=EXIT_TIMEOUT_S))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_logs_deployment_serves_and_exits_cleanly_on_signal(serve, sig):
    served = serve(*WSE3_8B, "--port", "0")
    ready = served.wait_for_line(READY_RE, START_TIMEOUT_S)
    line = served.seen[-1]
    assert ready["deployment"] == "llama-3.1-8b on 1 x wse-3 (TP1, weights bf16 resident, KV bf16)"
    port = int(ready["port"])
    assert 0 < port < 65536
    predicted = re.search(r"predicted ([\d,.]+) tok/s per user", line)
    assert predicted is not None, line
    assert float(predicted[1].replace(",", "")) == pytest.approx(1800, rel=0.05)

    responses = generate(port)
    assert sum(len(r.chunk.token_ids) for r in responses[:-1]) == 12
    assert responses[-1].finished.usage.completion_tokens == 12

    served.process.send_signal(sig)
    assert served.process.wait(timeout=EXIT_TIMEOUT_S) == 0
    lines = served.rest()
    assert any("shutting down" in line for line in lines)
    assert not any("Traceback" in line for line in lines)


PORT_0 = ["--port", "0"]  # were an argument wrongly accepted, nothing binds a fixed port


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([*WSE3_8B, "--port", "70000"], "--port"),
        ([*WSE3_8B, "--port", "-1"], "--port"),
        ([*WSE3_8B, *PORT_0, "--max-num-seqs", "0"], "--max-num-seqs"),
        ([*WSE3_8B, *PORT_0, "--max-num-batched-tokens", "0"], "--max-num-batched-tokens"),
        ([*WSE3_8B, *PORT_0, "--grace", "0"], "--grace"),
        (["--hardware", "no-such-chip", "--model", "llama-3.1-8b", *PORT_0], "no-such-chip"),
        (["--hardware", "wse-3", "--model", "no-such-model", *PORT_0], "no-such-model"),
        ([*WSE3_8B, *PORT_0, "--stream-interval", "0"], "--stream-interval"),
        ([*WSE3_8B, *PORT_0, "--stream-interval", "2.5"], "--stream-interval"),
        ([*WSE3_8B, *PORT_0, "--stream-interval", "often"], "--stream-interval"),
        ([*WSE3_8B, *PORT_0, "--grpc-services", "nope"], "--grpc-services"),
        ([*WSE3_8B, *PORT_0, "--grpc-services", ""], "--grpc-services"),
        ([*WSE3_8B, *PORT_0, "--grpc-services", "memorywall,,vllm"], "--grpc-services"),
        ([*WSE3_8B, *PORT_0, "--grpc-services", "sglang,vllm"], "two engines"),
        ([*WSE3_8B, *PORT_0, "--grpc-services", "vllm", "--role", "decode"], "add sglang"),
        ([*WSE3_8B, *PORT_0, "--load-format", "tensorizer"], "--load-format"),
    ],
    ids=[
        "port-70000",
        "port-negative",
        "max-num-seqs-0",
        "batched-0",
        "grace-0",
        "hw",
        "model",
        "stream-interval-0",
        "stream-interval-2.5",
        "stream-interval-word",
        "services-unknown",
        "services-empty",
        "services-blank-item",
        "services-two-engines",
        "services-pd-without-sglang",
        "load-format",
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, words):
    result = subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("memorywall: error:")
    assert words in lines[0]
    assert result.stdout == ""


def test_port_in_use_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*SERVE, *WSE3_8B, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        f"memorywall: error: cannot serve on 127.0.0.1:{port}"
    )
