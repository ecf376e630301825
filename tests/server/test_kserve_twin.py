"""KServe v2 / Triton fronts against the in-memory engine twin, driven by the official
tritonclient (gRPC and HTTP) and by hand-built messages where a client would refuse to
send them (fuzzed fields, bad bodies)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import grpc
import numpy as np
import pytest
import tritonclient.grpc
import tritonclient.grpc.aio as tgrpc
import tritonclient.http.aio as thttp
from engine_fakes import model_card
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polling import wait_until

from memorywall.kserve import grpc_service_pb2 as pb
from memorywall.kserve import grpc_service_pb2_grpc
from memorywall.server.engine.twin import TwinEngine
from memorywall.server.fronts.grpc_gate import GrpcGate
from memorywall.server.fronts.http_front import HttpSite, OpenAIFront
from memorywall.server.fronts.kserve_grpc import KServeServicer, add_to_server
from memorywall.server.fronts.kserve_http import KServeHttp
from memorywall.server.fronts.tokenizer import ApproximateTokenizer

TIMEOUT_S = 10.0
CARD = model_card(hardware="twin", deployment="twin")
TOKENIZER = ApproximateTokenizer(CARD.vocab_size)


@pytest.fixture
async def kserve() -> AsyncIterator[tuple[TwinEngine, str, str]]:
    """The twin behind both fronts: (twin, gRPC host:port, HTTP host:port)."""
    twin = TwinEngine(ttft_s=0.05, itl_s=0.01)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=[GrpcGate()])
    add_to_server(KServeServicer(twin, CARD, TOKENIZER), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    app = OpenAIFront(twin, CARD, TOKENIZER).app()
    KServeHttp(twin, CARD, TOKENIZER).add_routes(app)
    site = HttpSite(app)
    http_port = await site.start("127.0.0.1", 0)
    yield twin, f"127.0.0.1:{port}", f"127.0.0.1:{http_port}"
    await site.stop()
    await server.stop(grace=None)


def llm_inputs(module, text: str, *, stream: bool, sampling: dict | None = None) -> list:
    """vLLM-backend inputs as tritonclient builds them."""
    prompt = module.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    flag = module.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([stream], dtype=bool))
    params = module.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps(sampling or {}).encode()], dtype=np.object_))
    return [prompt, flag, params]


def flag_input(module, name: str, value: bool):
    t = module.InferInput(name, [1], "BOOL")
    t.set_data_from_numpy(np.array([value], dtype=bool))
    return t


# --- gRPC with tritonclient ----------------------------------------------------------------


async def test_tritonclient_grpc_health_and_metadata(kserve):
    twin, address, _ = kserve
    client = tgrpc.InferenceServerClient(address)
    try:
        assert await client.is_server_live()
        assert await client.is_server_ready()
        assert await client.is_model_ready("m")
        assert not await client.is_model_ready("other")
        meta = await client.get_model_metadata("m", as_json=True)
        assert {"text_input", "stream", "sampling_parameters"} <= {
            i["name"] for i in meta["inputs"]
        }
        assert "text_output" in {o["name"] for o in meta["outputs"]}
        config = await client.get_model_config("m", as_json=True)
        assert config["config"]["model_transaction_policy"]["decoupled"] is True
        server = await client.get_server_metadata(as_json=True)
        assert server["name"] == "memorywall"
        with pytest.raises(Exception, match="not served here"):
            await client.get_model_metadata("other")
        await twin.drain(0.0)
        assert not await client.is_server_ready()
        assert not await client.is_model_ready("m")
        with pytest.raises(Exception, match="shutting down") as e:
            await client.infer("m", llm_inputs(tgrpc, "x", stream=False))
        assert e.value.status() == "StatusCode.UNAVAILABLE"
    finally:
        await client.close()


async def _stream(client, requests: list[dict]) -> list:
    async def inputs():
        for r in requests:
            yield r

    return [(result, error) async for result, error in client.stream_infer(inputs())]


def sync_stream(address: str, request: dict, expect: int) -> list:
    """tritonclient's threaded gRPC client (the asyncio one cannot ask for the empty final
    response): `expect` callbacks of one streamed request."""
    import queue

    got: queue.Queue = queue.Queue()
    client = tritonclient.grpc.InferenceServerClient(address)
    try:
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        client.async_stream_infer(**request)
        out = [got.get(timeout=TIMEOUT_S) for _ in range(expect)]
        client.stop_stream()
    finally:
        client.close()
    assert got.empty()
    return out


async def test_model_stream_infer_gives_one_response_per_token_then_the_final_flag(kserve):
    twin, address, _ = kserve
    n = 6
    request = {
        "model_name": "m",
        "inputs": [
            *llm_inputs(tritonclient.grpc, "hello there", stream=True,
                        sampling={"max_tokens": n, "ignore_eos": True}),
            flag_input(tritonclient.grpc, "return_num_output_tokens", True),
            flag_input(tritonclient.grpc, "return_finish_reason", True),
        ],
        "request_id": "r1",
        "enable_empty_final_response": True,
    }  # fmt: skip
    got = await asyncio.to_thread(sync_stream, address, request, n + 1)
    assert [e for _, e in got] == [None] * (n + 1)
    tokens, final = [r for r, _ in got[:-1]], got[-1][0]
    texts = [r.as_numpy("text_output")[0].decode() for r in tokens]
    assert len(texts) == n and all(texts)
    assert [int(r.as_numpy("num_output_tokens")[0]) for r in tokens] == [1] * n
    assert [r.as_numpy("finish_reason")[0].decode() for r in tokens] == ["None"] * (n - 1) + [
        "length"
    ]
    flags = [r.get_response().parameters["triton_final_response"].bool_param for r, _ in got]
    assert flags == [False] * n + [True]
    params = final.get_response().parameters
    assert not final.get_response().outputs  # the empty final response
    assert params["memorywall_completion_tokens"].int64_param == n
    assert params["memorywall_ttft_s"].double_param == pytest.approx(0.05)
    assert {r.get_response().id for r, _ in got} == {"r1"}
    assert twin.aborted == []


async def test_stream_without_empty_final_flags_the_last_token(kserve):
    _, address, _ = kserve
    client = tgrpc.InferenceServerClient(address)
    try:
        request = {
            "model_name": "m",
            "inputs": llm_inputs(tgrpc, "abc", stream=True, sampling={"max_tokens": 3}),
        }
        got = await asyncio.wait_for(_stream(client, [request, dict(request)]), TIMEOUT_S)
    finally:
        await client.close()
    assert len(got) == 6 and all(e is None for _, e in got)  # two requests on one stream
    finals = [r for r, _ in got if "triton_final_response" in r.get_response().parameters]
    assert len(finals) == 2
    assert all(r.as_numpy("text_output")[0] for r in finals)


async def test_model_infer_answers_once_with_the_prompt_prepended(kserve):
    _, address, _ = kserve
    client = tgrpc.InferenceServerClient(address)
    try:
        inputs = llm_inputs(tgrpc, "prompt", stream=False, sampling={"max_tokens": 4})
        inputs.append(flag_input(tgrpc, "return_num_input_tokens", True))
        outputs = [tgrpc.InferRequestedOutput(n) for n in ("text_output", "token_ids")]
        result = await client.infer("m", inputs, outputs=outputs)
        assert result.as_numpy("text_output")[0].decode().startswith("prompt")
        assert result.as_numpy("token_ids").shape == (4,)
        assert result.as_numpy("num_input_tokens") is None  # not among the requested outputs
        with pytest.raises(Exception, match="ModelStreamInfer"):
            await client.infer("m", llm_inputs(tgrpc, "x", stream=True))
    finally:
        await client.close()


async def test_tensorrt_llm_ensemble_names(kserve):
    twin, address, _ = kserve
    client = tgrpc.InferenceServerClient(address)
    try:
        prompt = tgrpc.InferInput("text_input", [1, 1], "BYTES")
        prompt.set_data_from_numpy(np.array([[b"what is ml?"]], dtype=np.object_))
        max_tokens = tgrpc.InferInput("max_tokens", [1, 1], "INT32")
        max_tokens.set_data_from_numpy(np.array([[5]], dtype=np.int32))
        words = []
        for name in ("stop_words", "bad_words"):
            t = tgrpc.InferInput(name, [1, 1], "BYTES")
            t.set_data_from_numpy(np.array([[b""]], dtype=np.object_))
            words.append(t)
        result = await client.infer("m", [prompt, max_tokens, *words])
        assert result.as_numpy("text_output")[0]
        assert twin.submitted[-1].max_tokens == 5
    finally:
        await client.close()


# --- errors: INVALID_ARGUMENT naming the field, never UNKNOWN ------------------------------


def _raw_bytes(*values: bytes) -> bytes:
    return b"".join(len(v).to_bytes(4, "little") + v for v in values)


def _request(**inputs: tuple[str, list[int], bytes]) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="m")
    for name, (datatype, shape, raw) in inputs.items():
        r.inputs.add(name=name, datatype=datatype, shape=shape)
        r.raw_input_contents.append(raw)
    return r


@pytest.mark.parametrize(
    ("request_", "names"),
    [
        (_request(prompt=("BYTES", [1], _raw_bytes(b"x"))), "'prompt'"),
        (_request(text_input=("INT32", [1], b"\0\0\0\0")), "'text_input'"),
        (
            _request(text_input=("BYTES", [1], _raw_bytes(b"x")), stream=("BYTES", [1], b"")),
            "'stream'",
        ),
        (_request(text_input=("BYTES", [2], _raw_bytes(b"x"))), "'text_input'"),
        (_request(text_input=("BYTES", [1], b"\xff\xff\xff\x7f")), "'text_input'"),
        (_request(text_input=("BYTES", [1], _raw_bytes(b"\xff"))), "'text_input'"),
        (
            _request(
                text_input=("BYTES", [1], _raw_bytes(b"x")),
                sampling_parameters=("BYTES", [1], _raw_bytes(b'{"max_tokens": 0}')),
            ),
            "max_tokens",
        ),
        (
            _request(
                text_input=("BYTES", [1], _raw_bytes(b"x")),
                sampling_parameters=("BYTES", [1], _raw_bytes(b'{"nope": 1}')),
            ),
            "nope",
        ),
        (_request(text_input=("FP99", [1], b"")), "'text_input'"),
    ],
)
async def test_bad_tensors_are_invalid_argument_naming_the_tensor(kserve, request_, names):
    twin, address, _ = kserve
    async with grpc.aio.insecure_channel(address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ModelInfer(request_)
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert names in e.value.details()
        # In a stream the error is answered in the stream, which carries on.
        good = _request(text_input=("BYTES", [1], _raw_bytes(b"hi")))
        responses = [r async for r in stub.ModelStreamInfer(iter([request_, good]))]
    assert names in responses[0].error_message
    assert not responses[-1].error_message
    assert len(twin.submitted) == 1


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=200))
async def test_fuzzed_messages_never_answer_unknown(kserve, data):
    _, address, _ = kserve
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            await asyncio.wait_for(call(data), TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


async def test_the_client_cancelling_a_stream_aborts_its_request(kserve):
    twin, address, _ = kserve
    twin.gate.clear()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = _request(
            text_input=("BYTES", [1], _raw_bytes(b"hold")),
            stream=("BOOL", [1], b"\x01"),
            sampling_parameters=("BYTES", [1], _raw_bytes(b'{"max_tokens": 50}')),
        )
        call = stub.ModelStreamInfer(iter([request]))
        await wait_until(lambda: twin.stats().running == 1, TIMEOUT_S)
        call.cancel()
        await wait_until(lambda: len(twin.aborted) == 1, TIMEOUT_S)
    assert twin.stats().running == 0


# --- HTTP ----------------------------------------------------------------------------------


async def test_tritonclient_http_health_metadata_and_infer(kserve):
    _, _, address = kserve
    client = thttp.InferenceServerClient(address)
    try:
        assert await client.is_server_live()
        assert await client.is_server_ready()
        assert await client.is_model_ready("m")
        meta = await client.get_model_metadata("m")
        assert "text_input" in {i["name"] for i in meta["inputs"]}
        assert "text_output" in {o["name"] for o in meta["outputs"]}
        config = await client.get_model_config("m")
        assert config["max_batch_size"] == 0
        inputs = llm_inputs(thttp, "prompt", stream=False, sampling={"max_tokens": 3})
        result = await client.infer("m", inputs)
        assert result.as_numpy("text_output")[0].decode().startswith("prompt")
        assert result.get_response()["parameters"]["memorywall_completion_tokens"] == 3
    finally:
        await client.close()


async def test_generate_stream_gives_one_event_per_token(kserve):
    _, _, address = kserve
    body = {"text_input": "hello", "max_tokens": 5, "parameters": {"ignore_eos": True}}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://{address}/v2/models/m/generate_stream", json=body) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/event-stream"
            raw = await r.read()
        events = [json.loads(e[6:]) for e in raw.split(b"\n\n") if e]
        assert len(events) == 5 and all(e["text_output"] for e in events)
        assert events[-1]["memorywall_completion_tokens"] == 5
        async with s.post(f"http://{address}/v2/models/m/generate", json=body) as r:
            one = await r.json()
        assert one["text_output"].startswith("hello")
        assert one["memorywall_finish_reason"] == "length"


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[]",
        b'{"text_input": 3}',
        b'{"text_input": "x", "nope": 1}',
        b'{"text_input": "x", "max_tokens": "many"}',
        b'{"text_input": "x", "parameters": {"temperature": "hot"}}',
        b'{"text_input": "x", "parameters": []}',
        b'{"text_input": "x", "stream": "yes"}',
        b'{"text_input": "x", "sampling_parameters": "{"}',
        b'{"text_input": "x", "max_tokens": 1e400}',
    ],
)
async def test_bad_generate_bodies_are_400(kserve, body):
    _, _, address = kserve
    async with aiohttp.ClientSession() as s:
        for route in ("generate", "generate_stream", "infer"):
            async with s.post(f"http://{address}/v2/models/m/{route}", data=body) as r:
                assert r.status == 400, (route, await r.text())
                assert "error" in await r.json()


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["text_input", "inputs", "name", "datatype", "shape", "data",
                             "parameters", "max_tokens", "stream", "outputs", "x"]),
            inner,
            max_size=4,
        ),
        max_leaves=8,
    )
)  # fmt: skip
async def test_fuzzed_json_bodies_are_never_500(kserve, body):
    _, _, address = kserve
    raw = json.dumps(body).encode()
    async with aiohttp.ClientSession() as s:
        for route in ("generate", "infer"):
            async with s.post(f"http://{address}/v2/models/m/{route}", data=raw) as r:
                assert r.status in (200, 400, 404), (route, raw, await r.text())


@pytest.mark.parametrize(
    "body",
    [
        # Triton's vLLM backend README
        {"text_input": "What is Triton?", "parameters": {"stream": False, "temperature": 0}},
        # TensorRT-LLM backend README (ensemble)
        {"text_input": "What is ML?", "max_tokens": 20, "bad_words": "", "stop_words": "",
         "pad_id": 2, "end_id": 2},
    ],
)  # fmt: skip
async def test_the_upstream_readmes_generate_bodies_work(kserve, body):
    _, _, address = kserve
    url = f"http://{address}/v2/models/m/generate"
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        reply = await r.json()
    assert reply["text_output"].startswith(body["text_input"])
    assert reply["memorywall_completion_tokens"] == body.get("max_tokens", 16)
