"""A starved engine's lag reaches every wire: the final gRPC message of each request and
GetServerInfo, on the live engine driven by a stepping clock that stalls once."""

from __future__ import annotations

import asyncio

import pytest
from engine_fakes import SteppingClock

from memorywall.server.engine.build import build_core
from memorywall.server.engine.live import AsyncEngine
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.fronts.grpc_servicer import EngineServicer
from memorywall.v1 import engine_pb2 as pb

TIMEOUT_S = 10.0
STALL_S = 0.030


class Context:
    """The few ServicerContext calls Generate makes on a healthy stream."""

    def invocation_metadata(self):
        return ()

    async def send_initial_metadata(self, metadata) -> None:
        pass

    async def abort(self, code, details, trailing_metadata=()):
        raise AssertionError(f"aborted: {code} {details}")


async def test_grpc_final_message_and_server_info_carry_the_host_stall(wse3_8b):
    core, card = build_core(wse3_8b, EngineConfig())
    engine = AsyncEngine(
        core,
        clock=SteppingClock(stalls={30: STALL_S}),
        max_messages_per_s=1e6,
        cpu_time=lambda: 0.0,  # never busy: every token goes out alone
    )
    await engine.start()
    servicer = EngineServicer(engine, card)
    try:
        request = pb.GenerateRequest(
            request_id="r", token_count=100, max_tokens=80, ignore_eos=True
        )

        async def read() -> list[pb.GenerateResponse]:
            return [m async for m in servicer.Generate(request, Context())]

        messages = await asyncio.wait_for(read(), TIMEOUT_S)
        info = await servicer.GetServerInfo(pb.GetServerInfoRequest(), None)
    finally:
        await asyncio.wait_for(engine.stop(), TIMEOUT_S)
    final = messages[-1].finished
    assert final.lag.host_stall_s == pytest.approx(STALL_S)
    assert final.lag.decode_host_stall_s == pytest.approx(STALL_S)
    assert final.lag.max_lag_s == pytest.approx(STALL_S, rel=0.01)
    # The timing includes the stall; less it, the model's own decode time.
    times = [t for m in messages[:-1] for t in m.chunk.modelled_times_s]
    assert final.timing.decode_s == pytest.approx(times[-1] - times[0])
    assert info.host_stall.stalls == 1
    assert info.host_stall.stalled_s == pytest.approx(STALL_S)
    assert info.host_stall.degraded
    assert info.host_stall.window_s > 0
