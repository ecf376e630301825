"""The worker services the smg gateway speaks, as `Target`s: SGLang's scheduler, vLLM's
engine (`vllm serve --grpc`) and TensorRT-LLM's worker service, over gRPC.

Stubs come from the `smg-grpc-proto` package, as a gateway's. Each sends the
request's prompt ids (`loadgen/prompts.py`: the same ids the OpenAI targets and
shared-prefix workloads build), `ignore_eos` and its output length, streams, and
fills the record the way `GrpcTarget` does: the send time just before the call,
each chunk stamped on receipt with how many ids it carries, usage from the final
message. These protocols carry no modelled timeline, so `modelled_*` stay None.
Every failure (a status, a stream that ends without its final message) becomes
`record.error`, never an exception.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from smg_grpc_proto.generated import sglang_scheduler_pb2 as sglang_pb
from smg_grpc_proto.generated import (
    sglang_scheduler_pb2_grpc,
    trtllm_service_pb2_grpc,
    vllm_engine_pb2_grpc,
)
from smg_grpc_proto.generated import trtllm_service_pb2 as trtllm_pb
from smg_grpc_proto.generated import vllm_engine_pb2 as vllm_pb

from memorywall.loadgen.prompts import spec_token_ids
from memorywall.loadgen.records import RequestRecord, RequestSpec
from memorywall.loadgen.target import Access, Backend

MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class Protocol:
    """How one worker service asks for a generation and says what came back."""

    stub: Callable[[grpc.aio.Channel], Any]
    request: Callable[[str, list[int], int], Any]  # (request id, prompt ids, max tokens)
    health: Callable[[Any], Any]  # stub -> awaitable HealthCheck
    model_name: Callable[[Any], Any]  # stub -> awaitable of the served model's name

    @staticmethod
    def chunk_ids(response) -> tuple[int, ...] | None:
        """A streamed message's new ids, or None if it is the final one."""
        if response.HasField("chunk"):
            return tuple(response.chunk.token_ids)
        return None

    @staticmethod
    def usage(response) -> Usage:
        c = response.complete
        return Usage(c.prompt_tokens, c.completion_tokens, c.cached_tokens, c.finish_reason)


async def _sglang_model(stub) -> str:
    return (await stub.GetModelInfo(sglang_pb.GetModelInfoRequest())).served_model_name


async def _vllm_model(stub) -> str:
    return (await stub.GetModelInfo(vllm_pb.GetModelInfoRequest())).served_model_name


async def _trtllm_model(stub) -> str:
    return (await stub.GetModelInfo(trtllm_pb.GetModelInfoRequest())).model_id


PROTOCOLS: dict[Backend, Protocol] = {
    Backend.SGLANG_GRPC: Protocol(
        stub=sglang_scheduler_pb2_grpc.SglangSchedulerStub,
        request=lambda rid, ids, n: sglang_pb.GenerateRequest(
            request_id=rid,
            tokenized=sglang_pb.TokenizedInput(input_ids=ids),
            sampling_params=sglang_pb.SamplingParams(max_new_tokens=n, ignore_eos=True),
            stream=True,
        ),
        health=lambda stub: stub.HealthCheck(sglang_pb.HealthCheckRequest()),
        model_name=_sglang_model,
    ),
    Backend.VLLM_GRPC: Protocol(
        stub=vllm_engine_pb2_grpc.VllmEngineStub,
        request=lambda rid, ids, n: vllm_pb.GenerateRequest(
            request_id=rid,
            tokenized=vllm_pb.TokenizedInput(input_ids=ids),
            sampling_params=vllm_pb.SamplingParams(max_tokens=n, ignore_eos=True),
            stream=True,
        ),
        health=lambda stub: stub.HealthCheck(vllm_pb.HealthCheckRequest()),
        model_name=_vllm_model,
    ),
    Backend.TRTLLM_GRPC: Protocol(
        stub=trtllm_service_pb2_grpc.TrtllmServiceStub,
        request=lambda rid, ids, n: trtllm_pb.GenerateRequest(
            request_id=rid,
            tokenized=trtllm_pb.TokenizedInput(input_token_ids=ids),
            max_tokens=n,
            ignore_eos=True,
            streaming=True,
        ),
        health=lambda stub: stub.HealthCheck(trtllm_pb.HealthCheckRequest()),
        model_name=_trtllm_model,
    ),
}


def channel(address: str, access: Access) -> grpc.aio.Channel:
    """A channel to `address`, secure when `access` asks for TLS."""
    tls = access.grpc_tls()
    if tls is not None:
        return grpc.aio.secure_channel(address, tls.credentials())
    return grpc.aio.insecure_channel(address)


class SmgWorkerTarget:
    """A worker speaking SGLang's, vLLM's or TensorRT-LLM's gRPC service."""

    def __init__(
        self,
        address: str,
        backend: Backend,
        *,
        timeout_s: float | None = None,
        prompt_salt: int | None = None,
        access: Access | None = None,
    ) -> None:
        self.address = address
        self.protocol = PROTOCOLS[backend]
        self.access = access or Access()
        self.timeout_s = timeout_s
        self.prompt_salt = secrets.randbits(63) if prompt_salt is None else prompt_salt
        self.metadata = tuple((k.lower(), v) for k, v in self.access.headers().items())
        self.channel = channel(address, self.access)
        self.stub = self.protocol.stub(self.channel)

    async def connect(self) -> None:
        """Open the channel now, so the first measured request does not pay for the handshake."""
        await self.protocol.health(self.stub)

    async def model_name(self) -> str:
        return await self.protocol.model_name(self.stub)

    async def send(self, spec: RequestSpec, record: RequestRecord) -> None:
        """Stream one request into `record`; a failure becomes `record.error`."""
        request = self.protocol.request(
            f"bench-{self.prompt_salt:x}-{spec.index}",
            spec_token_ids(spec, self.prompt_salt),
            spec.output_tokens,
        )
        usage = None
        try:
            record.sent_ns = time.perf_counter_ns()
            call = self.stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata)
            async for response in call:
                now = time.perf_counter_ns()
                ids = self.protocol.chunk_ids(response)
                if ids is None:
                    usage = self.protocol.usage(response)
                    record.finished_ns = now
                elif ids:
                    record.add_chunk(now, len(ids))
        except grpc.aio.AioRpcError as e:
            record.error = f"{e.code().name}: {e.details()}"[:MAX_ERROR_CHARS]
            return
        if usage is None:
            record.error = "stream ended without its final message"
            return
        record.usage_prompt_tokens = usage.prompt_tokens
        record.usage_completion_tokens = usage.completion_tokens
        record.usage_cached_tokens = usage.cached_tokens

    async def aclose(self) -> None:
        await self.channel.close()
