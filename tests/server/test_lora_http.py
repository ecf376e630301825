"""LoRA over HTTP, live: vLLM's endpoints and errors, adapters as models through the `openai`
client, three adapters with --max-loras 1 one after another, each load the core's time."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from memorywall.core import Deployment, StepModel
from memorywall.core.lora import LoraCost
from memorywall.core.work import Batch, PrefillChunk
from memorywall.server.app import EmulatorServer, ServerConfig
from memorywall.server.engine.lora import LoraConfig
from memorywall.server.engine.scheduler import EngineConfig

openai = pytest.importorskip("openai")

BIG = {"r": 512, "target_modules": "all-linear"}  # ~2.7 GB on Llama 8B: ~42 ms a load


def adapter(folder: Path, config: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return str(folder)


@pytest.fixture
async def server(tmp_path, h100_8b: Deployment) -> AsyncIterator[EmulatorServer]:
    modules = tuple((n, adapter(tmp_path / n, BIG)) for n in ("a", "b", "c"))
    lora = LoraConfig(max_loras=1, max_lora_rank=512, modules=modules)
    config = ServerConfig(port=0, grpc=False, http_port=0, load_format="dummy", lora=lora)
    s = EmulatorServer(h100_8b, EngineConfig(), config)
    await s.start()
    yield s
    await s.stop(grace_s=0.0)


async def _post(url: str, body: dict) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as r:
        return r.status, await r.text()


async def test_models_and_the_load_and_unload_endpoints(server, tmp_path):
    url = server.http_url
    async with aiohttp.ClientSession() as session, session.get(f"{url}/v1/models") as r:
        models = (await r.json())["data"]
    assert [m["id"] for m in models] == ["llama-3.1-8b", "a", "b", "c"]
    assert models[1]["parent"] == "llama-3.1-8b" and models[1]["root"] == str(tmp_path / "a")

    load = f"{url}/v1/load_lora_adapter"
    small = adapter(tmp_path / "small", {"r": 8, "target_modules": ["q_proj"]})
    assert await _post(load, {"lora_name": "s", "lora_path": small}) == (
        200,
        "Success: LoRA adapter 's' added successfully.",
    )
    for body, message in (
        ({"lora_name": "x"}, "Both 'lora_name' and 'lora_path' must be provided."),
        ({"lora_name": "s", "lora_path": small}, "The lora adapter 's' has already been loaded."),
        ({"lora_name": "y", "lora_path": str(tmp_path)}, "No adapter found for"),
    ):
        status, text = await _post(load, body)
        assert status == 400 and message in json.loads(text)["error"]["message"]
    big = adapter(tmp_path / "huge", {"r": 32, "target_modules": ["q_proj"]})
    server.lora.config = LoraConfig(max_lora_rank=16)  # as if served with the default rank
    status, text = await _post(load, {"lora_name": "h", "lora_path": big})
    assert status == 400
    assert "LoRA rank 32 is greater than max_lora_rank 16." in json.loads(text)["error"]["message"]

    unload = f"{url}/v1/unload_lora_adapter"
    assert await _post(unload, {"lora_name": "s"}) == (
        200,
        "Success: LoRA adapter 's' removed successfully.",
    )
    status, text = await _post(unload, {"lora_name": "s"})
    assert status == 400
    assert json.loads(text)["error"]["message"] == "The lora adapter 's' cannot be found."
    status, _ = await _post(unload, {})
    assert status == 400


async def test_openai_client_requests_an_adapter(server):
    client = openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0)
    try:
        out = await client.completions.create(model="b", prompt="hello", max_tokens=3)
        assert out.model == "b" and out.usage.completion_tokens >= 1
        chat = await client.chat.completions.create(
            model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert chat.model == "a"
        response = await client.responses.create(model="c", input="hi", max_output_tokens=2)
        assert response.model == "c" and response.usage.output_tokens >= 1
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="nope", prompt="hello", max_tokens=3)
    finally:
        await client.close()


async def test_max_loras_one_runs_three_adapters_one_after_another(server, h100_8b):
    client = openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0)

    async def ask(model: str, i: int) -> tuple[dict, int]:
        out = await client.completions.create(
            model=model,
            prompt=f"request {i} " * 32,  # distinct prompts: no prefix shared
            max_tokens=4,
            extra_body={"ignore_eos": True},
        )
        return out.model_extra["memorywall"], out.usage.prompt_tokens

    try:
        runs = await asyncio.gather(*(ask(m, i + 1) for i, m in enumerate("abc")))
    finally:
        await client.close()
    spans = []  # (start, end) of each on the engine's clock
    for r, _ in runs:
        t = r["timing"]
        received = t["received_monotonic_ns"] / 1e9
        spans.append((received + t["queue_s"], received + t["e2e_s"]))
    spans.sort()
    # One adapter at a time: each starts once the one before has finished.
    for before, after in itertools.pairwise(spans):
        assert after[0] >= before[1] - 1e-6
    cost = LoraCost(h100_8b)
    a = server.lora.get("a")
    load_s = cost.load_s(a)
    for r, prompt in runs:
        base_s = StepModel(h100_8b).step_cost(Batch(prefill=[PrefillChunk(prompt)])).time_s
        extra = r["timing"]["prefill_s"] - base_s
        kernels = cost.step([(a, prompt)]).time_s
        # A host stall before the first token moves it later (never earlier): slack above.
        stall = r["lag"]["host_stall_s"] - r["lag"]["decode_host_stall_s"]
        # Each adapter's first step loads it: the core's load time, within 5%.
        assert 0.95 * load_s <= extra - kernels <= 1.05 * load_s + stall


async def test_lora_requests_info_gauge(server):
    async with aiohttp.ClientSession() as session, session.get(f"{server.http_url}/metrics") as r:
        text = await r.text()
    line = next(x for x in text.splitlines() if x.startswith("vllm:lora_requests_info{"))
    assert 'max_lora="1"' in line and 'running_lora_adapters=""' in line
