"""KServe v2 / Triton end to end: EmulatorServer (real engine, real performance core) driven
by the official tritonclient, and parity with memorywall.v1 for one seed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as tgrpc

from memorywall.server.app import EmulatorServer, ServerConfig
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc

TIMEOUT_S = 20.0
PROMPT = "The memory wall moves bytes between compute and storage, step after step."


@pytest.fixture
async def servers(h100_8b) -> AsyncIterator[list[EmulatorServer]]:
    """Two fresh servers of one deployment and seed (no request of one warms the other's
    prefix cache), each with gRPC and HTTP."""
    started = []
    for _ in range(2):
        server = EmulatorServer(h100_8b, EngineConfig(), ServerConfig(port=0, http_port=0))
        await server.start()
        started.append(server)
    yield started
    for server in started:
        await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)


def _inputs(text: str, max_tokens: int, *, stream: bool = True) -> list:
    prompt = tgrpc.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    flag = tgrpc.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([stream], dtype=bool))
    sampling = tgrpc.InferInput("sampling_parameters", [1], "BYTES")
    body = json.dumps({"max_tokens": max_tokens, "ignore_eos": True})
    sampling.set_data_from_numpy(np.array([body.encode()], dtype=np.object_))
    return [prompt, flag, sampling]


async def _kserve_stream(target: str, model: str, text: str, max_tokens: int):
    """(responses, receipt times) of one ModelStreamInfer request."""
    client = tgrpc.InferenceServerClient(target)
    outputs = [
        tgrpc.InferRequestedOutput(n) for n in ("text_output", "token_ids", "modelled_times_s")
    ]

    async def requests():
        yield {"model_name": model, "inputs": _inputs(text, max_tokens), "outputs": outputs}

    got, times = [], []
    try:
        async for result, error in client.stream_infer(requests()):
            times.append(time.perf_counter())
            assert error is None, error
            got.append(result)
    finally:
        await client.close()
    return got, times


async def test_tritonclient_stream_of_n_tokens_gives_n_responses_at_the_core_tpot(servers):
    server = servers[0]
    model = server.card.model
    client = tgrpc.InferenceServerClient(server.target)
    try:
        assert await client.is_server_live() and await client.is_server_ready()
        meta = await client.get_model_metadata(model, as_json=True)
        assert meta["inputs"][0]["name"] == "text_input"
        assert "text_output" in {o["name"] for o in meta["outputs"]}
    finally:
        await client.close()
    n = 64

    async def stream():
        c = tgrpc.InferenceServerClient(server.target)

        async def requests():
            yield {"model_name": model, "inputs": _inputs(PROMPT, n)}

        out = []
        try:
            async for result, error in c.stream_infer(requests()):
                out.append((time.perf_counter(), result, error))
        finally:
            await c.close()
        return out

    got = await asyncio.wait_for(stream(), TIMEOUT_S)
    assert [e for _, _, e in got] == [None] * n
    assert all(r.as_numpy("text_output")[0] for _, r, _ in got)
    last = got[-1][1].get_response().parameters
    assert last["triton_final_response"].bool_param
    assert last["memorywall_completion_tokens"].int64_param == n
    modelled_tpot_s = last["memorywall_decode_s"].double_param / (n - 1)
    client_tpot_s = (got[-1][0] - got[0][0]) / (n - 1)
    # The target is 5% (see the README's measured numbers); a loaded 2-core test
    # machine gets a generous bound.
    assert client_tpot_s == pytest.approx(modelled_tpot_s, rel=0.25)


async def test_parity_with_memorywall_v1_for_one_seed(servers):
    v1_server, kserve_server = servers
    n = 12
    async with grpc.aio.insecure_channel(v1_server.target) as channel:
        request = pb.GenerateRequest(text=PROMPT, max_tokens=n, ignore_eos=True)
        stream = engine_pb2_grpc.EngineStub(channel).Generate(request)
        responses = [r async for r in stream]
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    finished = responses[-1].finished
    v1_ids = [t for c in chunks for t in c.token_ids]
    v1_times = [t for c in chunks for t in c.modelled_times_s]

    got, _ = await asyncio.wait_for(
        _kserve_stream(kserve_server.target, kserve_server.card.model, PROMPT, n), TIMEOUT_S
    )
    ids = [int(t) for r in got for t in r.as_numpy("token_ids")]
    times = [float(t) for r in got for t in r.as_numpy("modelled_times_s")]
    summary = got[-1].get_response().parameters
    assert ids == v1_ids
    # The same modelled times, unless a loaded host stalled either engine: then its timeline
    # moved later by at most the stall it reports.
    stalls_s = finished.lag.host_stall_s + summary["memorywall_host_stall_s"].double_param
    assert all(abs(a - b) <= stalls_s + 1e-9 for a, b in zip(times, v1_times, strict=True))
    assert summary["memorywall_prompt_tokens"].int64_param == finished.usage.prompt_tokens
    assert summary["memorywall_completion_tokens"].int64_param == n
    for key in ("ttft_s", "e2e_s"):
        v1 = getattr(finished.timing, key)
        assert abs(summary[f"memorywall_{key}"].double_param - v1) <= stalls_s + 1e-9

    # generate_stream, on the server that has now seen the prompt: one event per token,
    # and the prefix cache answers the repeat.
    body = {"text_input": PROMPT, "max_tokens": n, "parameters": {"ignore_eos": True}}
    url = f"{kserve_server.http_url}/v2/models/{kserve_server.card.model}/generate_stream"
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        assert r.status == 200
        events = [json.loads(e[6:]) for e in (await r.read()).split(b"\n\n") if e]
    assert len(events) == n
    assert events[-1]["memorywall_completion_tokens"] == n
    assert events[-1]["memorywall_cached_tokens"] > 0
