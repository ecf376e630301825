"""`stream_interval=4` end to end: through the gRPC front of a single-process server, and
through the multi-process server's engine host and a front's link to it (in process)."""

from __future__ import annotations

import asyncio
import itertools
import socket

import grpc
import pytest

from memorywall.cli import build_parser
from memorywall.server.app import EmulatorServer, ServerConfig
from memorywall.server.engine.api import Finished, Request, TokenGroup
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.multi.engine_host import EngineHost
from memorywall.server.multi.remote import RemoteEngine
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc

TIMEOUT_S = 10.0
TOKENS = 30  # one message for the first token, seven of four, one of the last token
SIZES = [1, 4, 4, 4, 4, 4, 4, 4, 1]


def check_times(groups: list[tuple[float, ...]]) -> None:
    """Every token carries its own modelled time, one decode step after the one before."""
    times = list(itertools.chain.from_iterable(groups))
    assert len(times) == TOKENS
    assert all(b > a for a, b in itertools.pairwise(times))


async def test_grpc_sends_four_tokens_a_message_with_every_token_time(wse3_8b):
    config = ServerConfig(port=0, stream_interval=4)
    server = EmulatorServer(wse3_8b, EngineConfig(), config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            server.target, options=[("grpc.enable_http_proxy", 0)]
        ) as channel:
            stub = engine_pb2_grpc.EngineStub(channel)
            request = pb.GenerateRequest(
                request_id="n4", token_count=200, max_tokens=TOKENS, ignore_eos=True
            )

            async def read() -> list[pb.GenerateResponse]:
                return [r async for r in stub.Generate(request)]

            responses = await asyncio.wait_for(read(), TIMEOUT_S)
            info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT_S)
    finally:
        await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)
    chunks = [r.chunk for r in responses[:-1]]
    assert [r.WhichOneof("kind") for r in responses] == ["chunk"] * len(SIZES) + ["finished"]
    assert [len(c.token_ids) for c in chunks] == SIZES
    assert all(len(c.modelled_times_s) == len(c.token_ids) for c in chunks)
    check_times([tuple(c.modelled_times_s) for c in chunks])
    assert responses[-1].finished.usage.completion_tokens == TOKENS
    assert info.stream_interval_s > 0  # tokens wait for their message: three steps


def test_a_bad_interval_is_a_config_error():
    with pytest.raises(ValueError, match="stream_interval"):
        ServerConfig(stream_interval=0)


async def test_multi_process_engine_host_groups_for_its_fronts(h100_8b):
    host = EngineHost(
        h100_8b, EngineConfig(), max_messages_per_s=40_000.0, stream_interval=4, grace_s=1.0
    )
    a, b = socket.socketpair()
    serving = asyncio.create_task(host.serve([a]))
    remote = RemoteEngine(*await asyncio.open_unix_connection(sock=b))
    await remote.connect()
    request = Request(
        request_id="n4", prompt_ids=tuple(range(1, 100)), max_tokens=TOKENS, ignore_eos=True
    )
    events = await asyncio.wait_for(_drain(remote.submit(request)), TIMEOUT_S)
    await remote.close()
    await asyncio.wait_for(serving, TIMEOUT_S)
    groups = [e for e in events if isinstance(e, TokenGroup)]
    assert isinstance(events[-1], Finished)
    assert [len(g.token_ids) for g in groups] == SIZES
    check_times([g.times_s for g in groups])


async def _drain(stream) -> list:
    return [event async for event in stream]


@pytest.mark.parametrize(("value", "parsed"), [("4", 4), ("1", 1), ("auto", None)])
def test_serve_parses_stream_interval(value, parsed):
    base = ["serve", "--hardware", "wse-3", "--model", "llama-3.1-8b"]
    assert build_parser().parse_args([*base, "--stream-interval", value]).stream_interval == parsed
    assert build_parser().parse_args(base).stream_interval is None  # auto by default
