"""Hostile protobuf fields (hypothesis, bounded example counts) against vLLM's and
TensorRT-LLM's worker services of one `memorywall serve --grpc-services X` process each.

Every answer is a client error (INVALID_ARGUMENT and its family), UNIMPLEMENTED for what
the emulator does not model, or a normal answer when the input happens to be valid:
never INTERNAL or UNKNOWN; and the server logs no error.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smg_grpc_proto.generated import trtllm_service_pb2 as tpb
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb

from memorywall import ready

EXAMPLES = 40  # per test; CI-sized
READ_TIMEOUT_S = 3.0  # a valid request with a long output is left after this
START_TIMEOUT_S = 60.0
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,  # n > 1, beams, multimodal, PD halves: not emulated
}
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
UINT32 = st.integers(0, 2**32 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
TEXT = st.text(max_size=100)
IDS = st.lists(UINT32 | st.integers(0, 1000), max_size=50)


@dataclass
class Worker:
    target: str
    log: Path


def _start(tmp: Path, service: str) -> tuple[subprocess.Popen, Worker]:
    ready_file, log = tmp / f"{service}.ready.json", tmp / f"{service}.log"
    cmd = [sys.executable, "-m", "memorywall", "serve", "--hardware", "wse-3"]
    cmd += ["--model", "llama-3.1-8b", "--port", "0", "--grace", "1"]
    cmd += ["--grpc-services", service, "--ready-file", str(ready_file)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    info = ready.ServerReady.from_dict(ready.wait_for(ready_file, proc, timeout_s=START_TIMEOUT_S))
    assert info.grpc_services == (service,)
    return proc, Worker(info.grpc_target, log)


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> Iterator[dict[str, Worker]]:
    tmp = tmp_path_factory.mktemp("fuzz-workers")
    procs, out = [], {}
    try:
        for service in ("vllm", "trtllm"):
            proc, out[service] = _start(tmp, service)
            procs.append(proc)
        yield out
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


def call(worker: Worker, method: str, request) -> grpc.StatusCode:
    with grpc.insecure_channel(worker.target) as channel:
        stub = channel.unary_stream(method, request_serializer=type(request).SerializeToString)
        try:
            for _ in stub(request, timeout=READ_TIMEOUT_S):
                pass
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


@st.composite
def vllm_requests(draw) -> vpb.GenerateRequest:
    s = vpb.SamplingParams(
        top_p=draw(FLOATS),
        top_k=draw(UINT32),
        min_tokens=draw(UINT32 | st.integers(0, 8)),
        stop_token_ids=draw(st.lists(UINT32, max_size=3)),
        ignore_eos=draw(st.booleans()),
        n=draw(st.integers(0, 3)),
        logit_bias=draw(st.dictionaries(INT32, FLOATS, max_size=3)),
    )
    if draw(st.booleans()):
        s.max_tokens = draw(UINT32 | st.integers(0, 8))
    if draw(st.booleans()):
        s.temperature = draw(FLOATS)
    if draw(st.booleans()):
        s.seed = draw(INT32)
    r = vpb.GenerateRequest(request_id=draw(TEXT), sampling_params=s, stream=draw(st.booleans()))
    prompt = draw(st.sampled_from(["ids", "text", "none"]))
    if prompt == "ids":
        r.tokenized.input_ids.extend(draw(IDS))
    elif prompt == "text":
        r.text = draw(TEXT)
    if draw(st.integers(0, 9)) == 0:
        r.kv_transfer_params_json = draw(TEXT)
    if draw(st.booleans()):
        r.data_parallel_rank = draw(INT32)
    return r


@st.composite
def trtllm_requests(draw) -> tpb.GenerateRequest:
    c = tpb.SamplingConfig(
        beam_width=draw(st.integers(-2, 3)),
        num_return_sequences=draw(st.integers(0, 3)),
        min_tokens=draw(UINT32 | st.integers(0, 8)),
        temperature=draw(FLOATS),
    )
    return tpb.GenerateRequest(
        request_id=draw(TEXT),
        tokenized=tpb.TokenizedInput(input_token_ids=draw(IDS)),
        sampling_config=c,
        max_tokens=draw(UINT32 | st.integers(0, 8)),
        streaming=draw(st.booleans()),
        stop_token_ids=draw(st.lists(UINT32, max_size=3)),
        ignore_eos=draw(st.booleans()),
        stop=draw(st.lists(TEXT, max_size=2)),
        bad_token_ids=draw(st.lists(UINT32, max_size=2)),
    )


@FUZZ
@given(request=vllm_requests())
def test_vllm_fields_get_client_errors(workers, request):
    code = call(workers["vllm"], "/vllm.grpc.engine.VllmEngine/Generate", request)
    assert code in ALLOWED, code


@FUZZ
@given(request=trtllm_requests())
def test_trtllm_fields_get_client_errors(workers, request):
    code = call(workers["trtllm"], "/trtllm.TrtllmService/Generate", request)
    assert code in ALLOWED, code


@FUZZ
@given(raw=st.binary(max_size=512), service=st.sampled_from(["vllm", "trtllm"]))
def test_raw_bytes_as_messages_get_client_errors(workers, raw, service):
    method = {
        "vllm": "/vllm.grpc.engine.VllmEngine/Generate",
        "trtllm": "/trtllm.TrtllmService/Generate",
    }[service]
    with grpc.insecure_channel(workers[service].target) as channel:
        stub = channel.unary_stream(method)
        try:
            for _ in stub(raw, timeout=READ_TIMEOUT_S):
                pass
        except grpc.RpcError as e:
            assert e.code() in ALLOWED, e.code()


def test_zz_workers_logged_no_error(workers):
    for worker in workers.values():
        log = worker.log.read_text()
        assert "ERROR" not in log and "Traceback" not in log, log[-2000:]
