"""The I/O-free base: request building, proto conversion, stream assembly, public surface."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest

import memorywall.client
from memorywall.client import (
    FinishReason,
    GenerateArgs,
    HostStall,
    LagStats,
    ModelInfo,
    ProtocolError,
    RequestLag,
    RequestTiming,
    SamplingParams,
    ServerInfo,
    Usage,
    build_generate_request,
)
from memorywall.client._convert import StreamAssembler
from memorywall.v1 import engine_pb2 as pb

PUBLIC = [
    "STATUS_ERRORS", "AlreadyExists", "AsyncClient", "AsyncGenerateStream", "Cancelled",
    "Client", "ClientError", "DeadlineExceeded", "FinishReason", "GenerateArgs",
    "GenerateResult", "GenerateStream", "HostStall", "InvalidRequest", "LagStats", "ModelInfo",
    "NotFound",
    "ProtocolError", "RequestLag", "RequestTiming", "ResourceExhausted", "SamplingParams",
    "ServerInfo",
    "StreamNotFinished", "Tls", "TokenChunk", "Unauthenticated", "Unavailable", "Unimplemented",
    "Usage",
    "build_generate_request",
]  # fmt: skip


def test_all_is_pinned():
    assert sorted(memorywall.client.__all__) == sorted(PUBLIC)
    assert all(hasattr(memorywall.client, name) for name in PUBLIC)


def test_client_imports_neither_server_nor_core():
    code = (
        "import sys, memorywall.client; "
        "bad = [m for m in sys.modules if m.startswith(('memorywall.server', 'memorywall.core'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_generate_args_match_the_builder():
    params = set(inspect.signature(build_generate_request).parameters)
    assert set(GenerateArgs.__annotations__) == params | {"timeout_s"}


@pytest.mark.parametrize(
    ("ours", "proto"),
    [(ModelInfo, pb.ModelInfo), (ServerInfo, pb.ServerInfo), (LagStats, pb.LagStats),
     (HostStall, pb.HostStall),
     (Usage, pb.Usage), (RequestTiming, pb.RequestTiming), (RequestLag, pb.RequestLag),
     (SamplingParams, pb.SamplingParams)],
)  # fmt: skip
def test_dataclasses_mirror_the_proto(ours, proto):
    assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in proto.DESCRIPTOR.fields]


def test_finish_reasons_cover_the_proto():
    named = {v.name for v in pb.FinishReason.DESCRIPTOR.values} - {"FINISH_REASON_UNSPECIFIED"}
    assert {f"FINISH_REASON_{r.name}" for r in FinishReason} == named


def test_request_defaults():
    req = build_generate_request(prompt="hi", max_tokens=3)
    assert req.WhichOneof("prompt") == "text" and req.text == "hi"
    assert len(req.request_id) == 32 and set(req.request_id) <= set("0123456789abcdef")
    assert req.request_id != build_generate_request(prompt="hi", max_tokens=3).request_id
    assert (req.min_tokens, req.ignore_eos, req.model) == (0, False, "")
    assert not req.sampling.HasField("temperature")


def test_request_carries_every_argument():
    sampling = SamplingParams(
        temperature=0.25, top_p=0.5, top_k=40, min_p=0.125, presence_penalty=0.0,
        frequency_penalty=1.0, repetition_penalty=1.5, seed=2**63, stop=("a",),
        stop_token_ids=(7,),
    )  # fmt: skip
    req = build_generate_request(
        prompt_tokens=64, max_tokens=8, min_tokens=8, ignore_eos=True, request_id="x",
        model="m", sampling=sampling, min_interval_s=0.5,
    )  # fmt: skip
    assert req.token_count == 64 and (req.max_tokens, req.min_tokens) == (8, 8)
    assert (req.request_id, req.model, req.ignore_eos) == ("x", "m", True)
    assert req.stream_options.min_interval_s == 0.5
    echoed = {f.name: getattr(req.sampling, f.name) for f in dataclasses.fields(SamplingParams)}
    assert {k: tuple(v) if k.startswith("stop") else v for k, v in echoed.items()} == (
        dataclasses.asdict(sampling)
    )


def _chunk(ids, times):
    return pb.GenerateResponse(
        request_id="r", chunk=pb.TokenChunk(token_ids=ids, modelled_times_s=times)
    )


def _finished(reason=pb.FINISH_REASON_LENGTH):
    return pb.GenerateResponse(request_id="r", finished=pb.Finished(finish_reason=reason))


@pytest.mark.parametrize(
    "messages",
    [
        [_chunk([1, 2], [0.1])],
        [_finished(pb.FINISH_REASON_UNSPECIFIED)],
        [_finished(), _chunk([1], [0.1])],
        [pb.GenerateResponse(request_id="r")],
    ],
    ids=["times-mismatch", "unspecified-reason", "after-finished", "empty"],
)
def test_assembler_rejects_contract_breaks(messages):
    assembler = StreamAssembler("r", sent_ns=0)
    with pytest.raises(ProtocolError):
        for i, msg in enumerate(messages):
            assembler.feed(msg, received_ns=i + 1)


def test_assembler_needs_finished():
    assembler = StreamAssembler("r", sent_ns=0)
    assembler.feed(_chunk([1], [0.1]), received_ns=1)
    with pytest.raises(ProtocolError):
        assembler.end()
    assembler.feed(_finished(), received_ns=2)
    assert assembler.end().token_ids == (1,)


def test_a_finished_without_lag_gives_no_lag():
    assembler = StreamAssembler("r", sent_ns=0)
    assembler.feed(_finished(), received_ns=1)
    assert assembler.end().lag is None
