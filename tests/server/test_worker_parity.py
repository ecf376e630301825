"""Every worker protocol is one engine: for one seed and one prompt, memorywall.v1, SGLang's,
vLLM's and TensorRT-LLM's services give the same token ids, usage and modelled times, and
the same faults, admission, draining, TLS and API-key answers through the one status table.

Each protocol runs on a server of its own (`grpc_services=(protocol,)`, as `serve
--grpc-services` gives), fresh for every check, so no prefix cache carries over.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from smg_grpc_proto.generated import sglang_scheduler_pb2 as spb
from smg_grpc_proto.generated import (
    sglang_scheduler_pb2_grpc,
    trtllm_service_pb2_grpc,
    vllm_engine_pb2_grpc,
)
from smg_grpc_proto.generated import trtllm_service_pb2 as tpb
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from test_security import KEY, pki  # noqa: F401  (the module's PKI fixture)

from memorywall.server.app import EmulatorServer, ServerConfig
from memorywall.server.engine.api import Finished
from memorywall.server.engine.guard import GuardConfig
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.fronts.tls import TlsConfig
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc

TIMEOUT_S = 10.0
SEED = 7
PROMPT = [1000 + 7 * i for i in range(48)]
MAX_TOKENS = 12
PROTOCOLS = ("memorywall", "sglang", "vllm", "trtllm")
FAULT = "x-memorywall-fault"


@dataclass(frozen=True)
class Outcome:
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str


async def _memorywall(channel, rid: str, metadata) -> Outcome:
    request = pb.GenerateRequest(
        request_id=rid,
        token_ids=pb.TokenIds(ids=PROMPT),
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
    )
    ids: list[int] = []
    async for r in engine_pb2_grpc.EngineStub(channel).Generate(
        request, metadata=metadata, timeout=TIMEOUT_S
    ):
        if r.HasField("chunk"):
            ids.extend(r.chunk.token_ids)
        else:
            f = r.finished
            reason = pb.FinishReason.Name(f.finish_reason).removeprefix("FINISH_REASON_").lower()
            u = f.usage
            return Outcome(
                tuple(ids), u.prompt_tokens, u.completion_tokens, u.cached_tokens, reason
            )
    raise AssertionError("no final message")


async def _smg(stub, request, metadata) -> Outcome:
    ids: list[int] = []
    async for r in stub.Generate(request, metadata=metadata, timeout=TIMEOUT_S):
        if r.HasField("chunk"):
            ids.extend(r.chunk.token_ids)
        else:
            c = r.complete
            return Outcome(
                tuple(ids), c.prompt_tokens, c.completion_tokens, c.cached_tokens, c.finish_reason
            )
    raise AssertionError("no final message")


async def _sglang(channel, rid: str, metadata) -> Outcome:
    request = spb.GenerateRequest(
        request_id=rid,
        tokenized=spb.TokenizedInput(input_ids=PROMPT),
        sampling_params=spb.SamplingParams(max_new_tokens=MAX_TOKENS, ignore_eos=True),
        stream=True,
    )
    return await _smg(sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel), request, metadata)


async def _vllm(channel, rid: str, metadata) -> Outcome:
    request = vpb.GenerateRequest(
        request_id=rid,
        tokenized=vpb.TokenizedInput(input_ids=PROMPT),
        sampling_params=vpb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
        stream=True,
    )
    return await _smg(vllm_engine_pb2_grpc.VllmEngineStub(channel), request, metadata)


async def _trtllm(channel, rid: str, metadata) -> Outcome:
    request = tpb.GenerateRequest(
        request_id=rid,
        tokenized=tpb.TokenizedInput(input_token_ids=PROMPT),
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
        streaming=True,
    )
    return await _smg(trtllm_service_pb2_grpc.TrtllmServiceStub(channel), request, metadata)


GENERATE: dict[str, Callable[..., Awaitable[Outcome]]] = {
    "memorywall": _memorywall,
    "sglang": _sglang,
    "vllm": _vllm,
    "trtllm": _trtllm,
}


class FinishSpy:
    """An engine observer that keeps every request's `Finished` (its modelled times)."""

    def __init__(self) -> None:
        self.finished: list[Finished] = []

    def watch(self, stats) -> None: ...

    def on_step(self, step) -> None: ...

    def on_lag(self, lag_s: float) -> None: ...

    def on_finish(self, finished: Finished) -> None:
        self.finished.append(finished)


Serve = Callable[..., Awaitable[EmulatorServer]]


@pytest.fixture
async def serve(wse3_8b) -> AsyncIterator[Serve]:
    servers: list[EmulatorServer] = []

    async def start(protocol: str, **config: Any) -> EmulatorServer:
        config = {"port": 0, "grpc_services": (protocol,), **config}
        server = EmulatorServer(wse3_8b, EngineConfig(seed=SEED), ServerConfig(**config))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)


async def generate(server: EmulatorServer, protocol: str, metadata=(), channel=None) -> Outcome:
    if channel is not None:
        return await GENERATE[protocol](channel, "parity", metadata)
    async with grpc.aio.insecure_channel(server.target) as ch:
        return await GENERATE[protocol](ch, "parity", metadata)


async def refusal(server, protocol, metadata=(), channel=None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await generate(server, protocol, metadata, channel)
    return e.value


def modelled(f: Finished) -> tuple[float, float]:
    """TTFT and decode time as the model gives them, host stalls taken out."""
    return (f.ttft_s - (f.host_stall_s - f.decode_host_stall_s), f.decode_s - f.decode_host_stall_s)


async def test_every_protocol_gives_the_same_tokens_usage_and_modelled_times(serve):
    outcomes: dict[str, Outcome] = {}
    times: dict[str, tuple[float, float]] = {}
    for protocol in PROTOCOLS:
        server = await serve(protocol)
        spy = FinishSpy()
        server.engine.observers.append(spy)
        outcomes[protocol] = await generate(server, protocol)
        assert len(spy.finished) == 1
        times[protocol] = modelled(spy.finished[0])
    reference = outcomes["memorywall"]
    assert len(reference.token_ids) == MAX_TOKENS
    assert (reference.prompt_tokens, reference.completion_tokens) == (len(PROMPT), MAX_TOKENS)
    assert reference.finish_reason == "length"
    for protocol in PROTOCOLS:
        assert outcomes[protocol] == reference, protocol
        assert times[protocol] == pytest.approx(times["memorywall"], rel=1e-9), protocol


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_faults_and_admission_answer_the_same_status_on_every_protocol(serve, protocol):
    server = await serve(protocol, guard=GuardConfig(allow_fault_headers=True))
    error = await refusal(server, protocol, metadata=((FAULT, "error:1:internal"),))
    assert error.code() is grpc.StatusCode.INTERNAL and "fault injected" in error.details()
    assert dict(error.trailing_metadata())[FAULT] == "error:internal"
    # A refused header without --allow-fault-headers, and a malformed one: both the client's.
    error = await refusal(server, protocol, metadata=((FAULT, "nonsense"),))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT

    full = await serve(protocol, guard=GuardConfig(max_waiting=0, retry_after_s=2.0))
    error = await refusal(full, protocol)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(error.trailing_metadata())["grpc-retry-pushback-ms"] == "2000"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_draining_refuses_new_requests_as_unavailable(serve, protocol):
    server = await serve(protocol)
    await generate(server, protocol)
    await server.guarded.drain(0.0)
    error = await refusal(server, protocol)
    assert error.code() is grpc.StatusCode.UNAVAILABLE and "shutting down" in error.details()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_tls_and_the_api_key_guard_every_protocol(serve, pki, protocol):  # noqa: F811
    tls = TlsConfig(cert=pki.server_cert, key=pki.server_key)
    server = await serve(protocol, tls=tls, api_key=KEY)
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    async with grpc.aio.secure_channel(server.target, credentials) as channel:
        for key in (None, "sk-wrong"):
            metadata = () if key is None else (("authorization", f"Bearer {key}"),)
            error = await refusal(server, protocol, metadata, channel)
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        outcome = await generate(server, protocol, (("authorization", f"Bearer {KEY}"),), channel)
        assert outcome.completion_tokens == MAX_TOKENS
    with pytest.raises(grpc.aio.AioRpcError) as e:  # plaintext to a TLS port
        async with grpc.aio.insecure_channel(server.target) as channel:
            await generate(server, protocol, (("authorization", f"Bearer {KEY}"),), channel)
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
