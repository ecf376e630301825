"""`serve --grpc-services`: the names, what one port may combine, and a server that serves
exactly the services it names (reflection, health, the ready file)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memorywall.errors import ConfigError
from memorywall.server.app import EmulatorServer, ServerConfig, ready_info
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.grpc_services import (
    DEFAULT_GRPC_SERVICES,
    parse_services,
    smg_engine,
)
from memorywall.server.listeners import SERVICE_NAMES

TIMEOUT_S = 10.0


def test_parse_keeps_order_and_drops_repeats():
    assert parse_services("vllm") == ("vllm",)
    assert parse_services(" memorywall , trtllm,memorywall") == ("memorywall", "trtllm")
    # Today's port: smg --backend sglang finds SGLang's service; KServe goes with any.
    assert DEFAULT_GRPC_SERVICES == ("memorywall", "sglang", "kserve")
    assert parse_services("kserve,vllm") == ("kserve", "vllm")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "comma-separated"),
        ("vllm,", "comma-separated"),
        ("openai", "unknown service 'openai'"),
        ("sglang,vllm", "two engines"),
        ("vllm,trtllm", "two engines"),
    ],
)
def test_parse_refuses_with_a_reason(text, words):
    with pytest.raises(ValueError, match=words):
        parse_services(text)


def test_smg_engine_is_the_one_engine_service():
    assert smg_engine(("memorywall", "vllm")) == "vllm"
    assert smg_engine(("memorywall",)) is None


def test_config_checks_the_set_too():
    with pytest.raises(ConfigError, match="two engines"):
        ServerConfig(grpc_services=("sglang", "trtllm"))
    with pytest.raises(ConfigError, match="no gRPC service"):
        ServerConfig(grpc_services=())


async def _listed(target: str) -> set[str]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT_S):
            return {s.name for s in reply.list_services_response.service}
    raise AssertionError("no reflection reply")


@pytest.mark.parametrize(
    "services",
    [("vllm",), ("trtllm",), ("kserve",), ("memorywall", "vllm"), DEFAULT_GRPC_SERVICES],
)
async def test_a_server_serves_exactly_the_services_it_names(wse3_8b, services):
    server = EmulatorServer(wse3_8b, EngineConfig(), ServerConfig(port=0, grpc_services=services))
    await server.start()
    try:
        named = {SERVICE_NAMES[s] for s in services}
        listed = await _listed(server.target)
        assert listed - named == {
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        assert named <= listed
        async with grpc.aio.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in named:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            for name in set(SERVICE_NAMES.values()) - named:  # not served: unknown to health
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert e.value.code() is grpc.StatusCode.NOT_FOUND
                method = f"/{name}/Generate"
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in channel.unary_stream(method)(b"", timeout=TIMEOUT_S):
                        pass
                assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert ready_info(server).grpc_services == services
        assert ready_info(server).as_dict()["grpc_services"] == services
    finally:
        await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)
