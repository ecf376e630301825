"""A canned, deterministic memorywall engine for the client tests, on 127.0.0.1 port 0.

Behaviour is chosen by request_id:
- `status:<CODE>` (Generate or Abort): fail with that gRPC status, details `fake <CODE>`.
- `slow:<name>`: one token every SLOW_TOKEN_S until max_tokens, an Abort, or cancellation.
- `nofinish`: stream one chunk and end without a Finished message.
- anything else: max_tokens tokens at once, CHUNK_TOKENS per message; a token listed in
  sampling.stop_token_ids ends the request with STOP.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc

CHUNK_TOKENS = 2
SLOW_TOKEN_S = 0.02
FIRST_TOKEN_ID = 100
PREFILL_S = 0.05
TPOT_S = 0.01
SERVICE = "memorywall.v1.Engine"

MODEL_INFO = pb.ModelInfo(
    model="fake-1b", context_window=4096, vocab_size=32000, eos_token_ids=[2, 3],
    hardware="fake-gpu", devices=2, tensor_parallel=2, pipeline_parallel=1,
    weight_precision="bf16", kv_precision="fp8", placement="hbm", deployment="tp2",
    kv_capacity_tokens=1_000_000, max_num_seqs=64, max_num_batched_tokens=8192,
    predicted_tokens_per_s_per_user=123.5,
)  # fmt: skip


def token(i: int) -> tuple[int, str, float]:
    """The fake's i-th output token: id, text, modelled time in seconds."""
    return FIRST_TOKEN_ID + i, f" t{i}", PREFILL_S + TPOT_S * i


def prompt_tokens(request: pb.GenerateRequest) -> int:
    kind = request.WhichOneof("prompt")
    if kind == "text":
        return len(request.text.split())
    return len(request.token_ids.ids) if kind == "token_ids" else request.token_count


class FakeEngine(engine_pb2_grpc.EngineServicer):
    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.finished = 0
        self._aborts: dict[str, asyncio.Event] = {}
        self._lock = threading.Lock()
        self._cancelled: dict[str, threading.Event] = collections.defaultdict(threading.Event)

    def cancelled(self, request_id: str) -> threading.Event:
        """Set when the server saw the client cancel `request_id`; waitable from any thread."""
        with self._lock:
            return self._cancelled[request_id]

    async def Generate(self, request, context) -> AsyncIterator[pb.GenerateResponse]:
        self.requests.append(request)
        rid = request.request_id
        if rid.startswith("status:"):
            code = grpc.StatusCode[rid.removeprefix("status:")]
            await context.abort(code, f"fake {code.name}")
        try:
            async for msg in self._generate(request):
                yield msg
        except (asyncio.CancelledError, GeneratorExit):
            # CancelledError if the client cancelled while we awaited; GeneratorExit if
            # it did while we were suspended at a yield (grpc then drops the generator).
            self.cancelled(rid).set()
            raise

    async def _generate(self, request) -> AsyncIterator[pb.GenerateResponse]:
        rid = request.request_id
        if rid == "nofinish":
            yield self._chunk(rid, range(1))
            return
        if rid.startswith("slow:"):
            async for msg in self._slow(request):
                yield msg
            return
        n, reason = request.max_tokens, pb.FINISH_REASON_LENGTH
        stops = set(request.sampling.stop_token_ids)
        for i in range(n):
            if token(i)[0] in stops:
                n, reason = i + 1, pb.FINISH_REASON_STOP
                break
        for start in range(0, n, CHUNK_TOKENS):
            yield self._chunk(rid, range(start, min(start + CHUNK_TOKENS, n)))
        yield self._finished(request, n, reason)

    async def _slow(self, request) -> AsyncIterator[pb.GenerateResponse]:
        rid = request.request_id
        aborted = self._aborts[rid] = asyncio.Event()
        try:
            for i in range(request.max_tokens):
                if aborted.is_set():
                    yield self._finished(request, i, pb.FINISH_REASON_ABORT)
                    return
                yield self._chunk(rid, range(i, i + 1))
                await asyncio.sleep(SLOW_TOKEN_S)
            yield self._finished(request, request.max_tokens, pb.FINISH_REASON_LENGTH)
        finally:
            del self._aborts[rid]

    @staticmethod
    def _chunk(rid: str, indices: range) -> pb.GenerateResponse:
        ids, texts, times = zip(*(token(i) for i in indices), strict=True)
        chunk = pb.TokenChunk(token_ids=ids, text="".join(texts), modelled_times_s=times)
        return pb.GenerateResponse(request_id=rid, chunk=chunk)

    def _finished(self, request, n: int, reason: int) -> pb.GenerateResponse:
        self.finished += 1
        ttft_s = token(0)[2] if n else 0.0
        e2e_s = token(n - 1)[2] if n else 0.0
        timing = pb.RequestTiming(
            queue_s=0.001, prefill_s=ttft_s - 0.001, decode_s=e2e_s - ttft_s,
            ttft_s=ttft_s, e2e_s=e2e_s, preemptions=0,
        )  # fmt: skip
        usage = pb.Usage(prompt_tokens=prompt_tokens(request), completion_tokens=n)
        lag = pb.RequestLag(host_stall_s=0.002, decode_host_stall_s=0.001, max_lag_s=0.0005)
        finished = pb.Finished(
            finish_reason=reason, usage=usage, timing=timing, energy_j=0.5 * n,
            sampling=request.sampling, lag=lag,
        )  # fmt: skip
        return pb.GenerateResponse(request_id=request.request_id, finished=finished)

    async def Abort(self, request, context) -> pb.AbortResponse:
        for rid in request.request_ids:
            if rid.startswith("status:"):
                code = grpc.StatusCode[rid.removeprefix("status:")]
                await context.abort(code, f"fake {code.name}")
        aborted = [rid for rid in request.request_ids if rid in self._aborts]
        for rid in aborted:
            self._aborts[rid].set()
        return pb.AbortResponse(aborted=aborted)

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        return MODEL_INFO

    async def GetServerInfo(self, request, context) -> pb.ServerInfo:
        done = self.finished
        lag = pb.LagStats(
            samples=done, mean_s=0.001 if done else 0.0, p50_s=0.001 if done else 0.0,
            p99_s=0.002 if done else 0.0, max_s=0.003 if done else 0.0, threshold_s=0.05,
        )  # fmt: skip
        return pb.ServerInfo(
            running=len(self._aborts), waiting=0, kv_used_tokens=10, kv_total_tokens=1000,
            kv_usage_fraction=0.01, lag=lag, uptime_s=1.5, requests_finished=done, steps=7,
            tokens_generated=sum(r.max_tokens for r in self.requests), modelled_energy_j=2.5,
            stream_interval_s=0.0,
        )  # fmt: skip


@dataclass
class FakeServer:
    target: str
    engine: FakeEngine
    health: health_aio.HealthServicer
    server: grpc.aio.Server

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else (
            health_pb2.HealthCheckResponse.NOT_SERVING)  # fmt: skip
        for service in ("", SERVICE):
            await self.health.set(service, status)

    async def stop(self) -> None:
        await self.server.stop(grace=None)


async def start_fake() -> FakeServer:
    """Serve a fresh FakeEngine and health service on 127.0.0.1, an OS-chosen port."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    engine, health = FakeEngine(), health_aio.HealthServicer()
    engine_pb2_grpc.add_EngineServicer_to_server(engine, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fake = FakeServer(f"127.0.0.1:{port}", engine, health, server)
    await fake.set_serving(True)
    return fake


class ThreadedFake:
    """A FakeServer on its own event loop in a daemon thread, for the blocking client."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.fake = self.call(start_fake())

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a coroutine on the server's loop and wait for it (at most 5 s)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=5)

    def close(self) -> None:
        self.call(self.fake.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
