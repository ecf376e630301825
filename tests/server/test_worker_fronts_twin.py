"""vLLM's and TensorRT-LLM's worker services against the in-memory engine twin: request
conversion, streamed and final messages, the shared status table, aborts, health,
loads, and what they refuse as not emulated."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from engine_fakes import model_card
from polling import wait_until
from smg_grpc_proto.generated import common_pb2, trtllm_service_pb2_grpc, vllm_engine_pb2_grpc
from smg_grpc_proto.generated import trtllm_service_pb2 as tpb
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb

from memorywall.server.engine.twin import TwinEngine
from memorywall.server.fronts import trtllm_servicer, vllm_servicer
from memorywall.server.fronts.grpc_gate import GrpcGate

TIMEOUT_S = 10.0
CARD = model_card(hardware="twin", deployment="twin")
IDS = list(range(1, 41))


@pytest.fixture
async def twin_channel() -> AsyncIterator[tuple[TwinEngine, grpc.aio.Channel]]:
    twin = TwinEngine(ttft_s=0.05, itl_s=0.01)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=[GrpcGate()])
    vllm_servicer.add_to_server(vllm_servicer.VllmServicer(twin, CARD), server)
    trtllm_servicer.add_to_server(trtllm_servicer.TrtllmServicer(twin, CARD), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield twin, channel
    await channel.close()
    await server.stop(grace=None)


async def _read(call) -> list:
    return [r async for r in call]


async def _error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await asyncio.wait_for(_read(call), TIMEOUT_S)
    return e.value


def vllm_request(rid="v", ids=IDS, stream=True, **sampling) -> vpb.GenerateRequest:
    sampling = {"max_tokens": 4, "ignore_eos": True, **sampling}
    return vpb.GenerateRequest(
        request_id=rid,
        tokenized=vpb.TokenizedInput(input_ids=ids),
        sampling_params=vpb.SamplingParams(**sampling),
        stream=stream,
    )


def trtllm_request(rid="t", ids=IDS, stream=True, max_tokens=4, **fields) -> tpb.GenerateRequest:
    return tpb.GenerateRequest(
        request_id=rid,
        tokenized=tpb.TokenizedInput(input_token_ids=ids),
        max_tokens=max_tokens,
        ignore_eos=True,
        streaming=stream,
        **fields,
    )


# --- vLLM's engine service ----------------------------------------------------------------


async def test_vllm_streams_chunks_then_a_final_message_without_the_ids(twin_channel):
    twin, channel = twin_channel
    stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
    responses = await asyncio.wait_for(_read(stub.Generate(vllm_request())), TIMEOUT_S)
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    assert [c.completion_tokens for c in chunks] == [1, 2, 3, 4]
    assert {c.prompt_tokens for c in chunks} == {40}
    final = responses[-1].complete
    assert final.finish_reason == "length" and final.completion_tokens == 4
    assert list(final.output_ids) == []  # streamed ids are not repeated
    request = twin.submitted[0]
    assert (request.request_id, request.prompt_ids, request.max_tokens) == ("v", tuple(IDS), 4)
    assert request.ignore_eos


async def test_vllm_non_streaming_sends_one_complete_with_every_id(twin_channel):
    _, channel = twin_channel
    stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
    responses = await _read(stub.Generate(vllm_request(stream=False)))
    assert [r.WhichOneof("response") for r in responses] == ["complete"]
    assert len(responses[0].complete.output_ids) == 4


async def test_vllm_defaults_max_tokens_to_what_the_context_leaves(twin_channel):
    twin, channel = twin_channel
    stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
    request = vllm_request(stream=False)
    request.sampling_params.ClearField("max_tokens")
    twin.gate.clear()  # hold the tokens: only the conversion is checked here
    call = stub.Generate(request)
    await wait_until(lambda: twin.submitted, TIMEOUT_S)
    assert twin.submitted[0].max_tokens == CARD.context_window - len(IDS)
    call.cancel()


async def test_vllm_text_prompts_become_stand_in_ids(twin_channel):
    twin, channel = twin_channel
    stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
    request = vpb.GenerateRequest(
        request_id="txt", text="hello world!", sampling_params=vpb.SamplingParams(max_tokens=2)
    )
    await _read(stub.Generate(request))
    assert len(twin.submitted[0].prompt_ids) == 3  # four characters per id


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (vllm_request(ids=[]), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (vllm_request(ids=[CARD.vocab_size]), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
        (vllm_request(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (vllm_request(n=2), grpc.StatusCode.UNIMPLEMENTED, "one sample"),
        (
            vpb.GenerateRequest(
                tokenized=vpb.TokenizedInput(input_ids=IDS), kv_transfer_params_json="{}"
            ),
            grpc.StatusCode.UNIMPLEMENTED,
            "disaggregation",
        ),
        (
            vpb.GenerateRequest(
                tokenized=vpb.TokenizedInput(input_ids=IDS), mm_inputs=vpb.MultimodalInputs()
            ),
            grpc.StatusCode.UNIMPLEMENTED,
            "multimodal",
        ),
    ],
)
async def test_vllm_bad_or_unsupported_requests_get_a_status(twin_channel, request_, code, words):
    twin, channel = twin_channel
    error = await _error(vllm_engine_pb2_grpc.VllmEngineStub(channel).Generate(request_))
    assert error.code() is code and words in error.details()
    assert twin.submitted == []  # refused before the engine held anything


async def test_vllm_cancel_and_abort_free_the_request(twin_channel):
    twin, channel = twin_channel
    stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
    twin.gate.clear()
    call = stub.Generate(vllm_request("held", max_tokens=50))
    await wait_until(lambda: twin.stats().running == 1, TIMEOUT_S)
    call.cancel()
    await wait_until(lambda: twin.aborted == ["held"], TIMEOUT_S)
    call = stub.Generate(vllm_request("rpc", max_tokens=50))
    await wait_until(lambda: twin.stats().running == 1, TIMEOUT_S)
    await stub.Abort(vpb.AbortRequest(request_ids=["rpc", "nope"]))
    assert twin.aborted == ["held", "rpc"]
    twin.gate.set()
    responses = await asyncio.wait_for(_read(call), TIMEOUT_S)
    assert responses[-1].complete.finish_reason == "abort"


async def test_vllm_health_loads_and_info(twin_channel):
    twin, channel = twin_channel
    stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
    assert (await stub.HealthCheck(vpb.HealthCheckRequest())).healthy
    info = await stub.GetModelInfo(vpb.GetModelInfoRequest())
    assert (info.served_model_name, info.vocab_size) == (CARD.model, CARD.vocab_size)
    assert list(info.eos_token_ids) == list(CARD.eos_token_ids)
    server = await stub.GetServerInfo(vpb.GetServerInfoRequest())
    assert server.server_type == "vllm-grpc" and server.max_num_seqs == CARD.max_num_seqs
    twin.gate.clear()
    call = stub.Generate(vllm_request("l", ids=[5] * 10))
    await wait_until(lambda: twin.stats().running == 1, TIMEOUT_S)
    loads = await stub.GetLoads(vpb.GetLoadsRequest())
    assert (loads.loads[0].num_running_reqs, loads.loads[0].num_used_tokens) == (1, 10)
    call.cancel()
    await wait_until(lambda: twin.aborted == ["l"], TIMEOUT_S)
    await twin.drain(0.0)
    health = await stub.HealthCheck(vpb.HealthCheckRequest())
    assert not health.healthy and "draining" in health.message
    error = await _error(stub.Generate(vllm_request("late")))
    assert error.code() is grpc.StatusCode.UNAVAILABLE


async def test_vllm_publishes_kv_events(twin_channel):
    _, channel = twin_channel
    stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
    events = stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest())
    await asyncio.wait_for(events.initial_metadata(), TIMEOUT_S)
    await _read(stub.Generate(vllm_request()))
    batch = await asyncio.wait_for(events.read(), TIMEOUT_S)
    assert [len(b.token_ids) for b in batch.events[0].stored.blocks] == [16, 16]
    events.cancel()


# --- TensorRT-LLM's worker service ------------------------------------------------------


async def test_trtllm_streams_deltas_then_a_cumulative_final_message(twin_channel):
    twin, channel = twin_channel
    stub = trtllm_service_pb2_grpc.TrtllmServiceStub(channel)
    responses = await asyncio.wait_for(_read(stub.Generate(trtllm_request())), TIMEOUT_S)
    assert {r.request_id for r in responses} == {"t"}
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    assert [len(c.token_ids) for c in chunks] == [1, 1, 1, 1]
    final = responses[-1].complete
    assert list(final.output_token_ids) == [t for c in chunks for t in c.token_ids]
    assert (final.finish_reason, final.prompt_tokens, final.completion_tokens) == ("length", 40, 4)
    assert twin.submitted[0].ignore_eos


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (trtllm_request(ids=[]), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (trtllm_request(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (
            trtllm_request(sampling_config=tpb.SamplingConfig(beam_width=4)),
            grpc.StatusCode.UNIMPLEMENTED,
            "beam",
        ),
        (
            trtllm_request(
                disaggregated_params=tpb.DisaggregatedParams(
                    request_type=tpb.DisaggregatedParams.REQUEST_TYPE_CONTEXT_ONLY
                )
            ),
            grpc.StatusCode.UNIMPLEMENTED,
            "disaggregation",
        ),
    ],
)
async def test_trtllm_bad_or_unsupported_requests_get_a_status(twin_channel, request_, code, words):
    twin, channel = twin_channel
    error = await _error(trtllm_service_pb2_grpc.TrtllmServiceStub(channel).Generate(request_))
    assert error.code() is code and words in error.details()
    assert twin.submitted == []


async def test_trtllm_abort_health_and_info(twin_channel):
    twin, channel = twin_channel
    stub = trtllm_service_pb2_grpc.TrtllmServiceStub(channel)
    assert (await stub.HealthCheck(tpb.HealthCheckRequest())).status == "OK"
    info = await stub.GetModelInfo(tpb.GetModelInfoRequest())
    assert (info.model_id, info.vocab_size, info.max_batch_size) == (
        CARD.model,
        CARD.vocab_size,
        CARD.max_num_seqs,
    )
    server = await stub.GetServerInfo(tpb.GetServerInfoRequest())
    assert server.tensor_parallel_size == CARD.tensor_parallel
    twin.gate.clear()
    call = stub.Generate(trtllm_request("held", max_tokens=50))
    await wait_until(lambda: twin.stats().running == 1, TIMEOUT_S)
    assert (await stub.Abort(tpb.AbortRequest(request_id="held"))).success
    assert not (await stub.Abort(tpb.AbortRequest(request_id="held"))).success
    twin.gate.set()
    responses = await asyncio.wait_for(_read(call), TIMEOUT_S)
    assert responses[-1].complete.finish_reason == "abort"
    await twin.drain(0.0)
    assert "draining" in (await stub.HealthCheck(tpb.HealthCheckRequest())).status
    error = await _error(stub.Generate(trtllm_request("late")))
    assert error.code() is grpc.StatusCode.UNAVAILABLE


async def test_both_ship_the_same_tokenizer(twin_channel):
    _, channel = twin_channel
    streams = (
        vllm_engine_pb2_grpc.VllmEngineStub(channel).GetTokenizer(common_pb2.GetTokenizerRequest()),
        trtllm_service_pb2_grpc.TrtllmServiceStub(channel).GetTokenizer(
            common_pb2.GetTokenizerRequest()
        ),
    )
    zips = []
    for stream in streams:
        chunks = await asyncio.wait_for(_read(stream), 60)
        assert chunks[-1].sha256 and not any(c.sha256 for c in chunks[:-1])
        zips.append(b"".join(c.data for c in chunks))
    assert zips[0] == zips[1] and zips[0][:2] == b"PK"
