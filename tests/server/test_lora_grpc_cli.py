"""LoRA on SGLang's worker service (`lora_id` names an adapter) and `serve`'s LoRA flags."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc

from memorywall.core import Deployment
from memorywall.server.app import EmulatorServer, ServerConfig
from memorywall.server.engine.lora import LoraConfig
from memorywall.server.engine.scheduler import EngineConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "lora"
TIMEOUT_S = 10.0


async def _server(deployment: Deployment, lora: LoraConfig | None) -> EmulatorServer:
    config = ServerConfig(port=0, load_format="dummy", lora=lora)
    server = EmulatorServer(deployment, EngineConfig(), config)
    await server.start()
    return server


@pytest.fixture
async def lora_server(wse3_8b) -> AsyncIterator[EmulatorServer]:
    lora = LoraConfig(modules=(("sql", str(EXAMPLES / "sql")),))
    server = await _server(wse3_8b, lora)
    yield server
    await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)


def _request(lora_id: str) -> pb.GenerateRequest:
    params = pb.SamplingParams(max_new_tokens=4, ignore_eos=True)
    return pb.GenerateRequest(
        request_id=f"r-{lora_id}",
        tokenized=pb.TokenizedInput(input_ids=list(range(100, 120))),
        sampling_params=params,
        lora_id=lora_id,
        stream=True,
    )


async def _generate(server: EmulatorServer, lora_id: str) -> list[pb.GenerateResponse]:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
        return [r async for r in stub.Generate(_request(lora_id), timeout=TIMEOUT_S)]


async def test_sglang_lora_id_runs_the_adapter(lora_server):
    responses = await _generate(lora_server, "sql")
    assert responses[-1].complete.completion_tokens == 4
    slots = lora_server.engine.core.lora
    assert slots is not None and [a.name for a in slots.resident()] == ["sql"]
    assert slots.loads == 1


async def test_sglang_unknown_lora_id_is_invalid_argument(lora_server):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _generate(lora_server, "nope")
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown adapter 'nope' (served: sql)" in e.value.details()


async def test_sglang_lora_id_without_lora_is_invalid_argument(wse3_8b):
    server = await _server(wse3_8b, None)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _generate(server, "sql")
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "LoRA is off (--enable-lora)" in e.value.details()
    finally:
        await server.stop(grace_s=0.0)


SERVE = [sys.executable, "-m", "memorywall", "serve", "--hardware", "wse-3"]
SERVE += ["--model", "llama-3.1-8b", "--port", "0"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--max-loras", "2"], "--max-loras: needs --enable-lora"),
        (["--lora-modules", f"sql={EXAMPLES / 'sql'}"], "--lora-modules: needs --enable-lora"),
        (["--enable-lora", "--max-loras", "0"], "--max-loras"),
        (["--enable-lora", "--max-lora-rank", "12"], "--max-lora-rank"),
        (["--enable-lora", "--lora-modules", "sql"], "expected name=path"),
        (["--enable-lora", "--lora-modules", f"c={EXAMPLES / 'code'}"], "LoRA rank 64 is"),
        (["--enable-lora", "--lora-modules", f"x={EXAMPLES}"], "No adapter found for"),
        (
            ["--enable-lora", "--lora-modules", f"a={EXAMPLES / 'sql'}", f"a={EXAMPLES / 'chat'}"],
            "a name given twice",
        ),
        (["--enable-lora", "--api-servers", "2"], "--enable-lora needs a single process"),
        (["--enable-lora", "--role", "decode"], "--enable-lora: not with --role decode"),
    ],
    ids=[
        "max-loras-alone",
        "modules-alone",
        "max-loras-0",
        "rank-12",
        "module-no-path",
        "rank-above-max",
        "not-a-folder",
        "name-twice",
        "api-servers",
        "role",
    ],
)
def test_bad_lora_flags_exit_2_with_one_line(args, words):
    result = subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("memorywall: error:"), result.stderr
    assert words in lines[0]
