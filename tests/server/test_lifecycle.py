"""Lifecycle with physics: the weights' load at startup and wake-up timed by the core,
/sleep, /wake_up, /is_sleeping, /reset_prefix_cache and SGLang's FlushCache; on the twin,
then the real engine against the core's figure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
from engine_fakes import model_card
from smg_grpc_proto.generated import common_pb2, sglang_scheduler_pb2_grpc

from memorywall.core import Deployment
from memorywall.errors import ConfigError, InvalidRequestError, LifecycleError, NotReadyError
from memorywall.server.app import EmulatorServer
from memorywall.server.config import ServerConfig
from memorywall.server.engine.api import AllBlocksCleared, Phase, Request
from memorywall.server.engine.lifecycle import Lifecycle
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.engine.twin import TwinEngine
from memorywall.server.fronts.http_front import HttpSite, OpenAIFront
from memorywall.server.fronts.sglang_servicer import SglangServicer, add_to_server
from memorywall.server.fronts.tokenizer import ApproximateTokenizer

CARD = model_card()
LOAD_S = 0.05


class FakeWait:
    """Records each wait instead of sleeping."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


# --- the state machine -----------------------------------------------------------------------


async def test_load_sleep_and_wake_take_the_load_time_and_free_kv():
    wait, freed = FakeWait(), []
    life = Lifecycle(2.5, wait, lambda: freed.append(1) or True)
    assert life.state.phase is Phase.LOADING and not life.state.loaded
    with pytest.raises(NotReadyError, match="loading"):
        life.check_serving()
    await life.load()
    assert wait.waits == [2.5] and life.state.phase is Phase.READY
    life.check_serving()
    await life.sleep(1, busy=False)
    assert life.state.sleeping and life.state.sleep_level == 1 and freed == [1]
    await life.sleep(2, busy=False)  # deeper: the weights go too
    assert life.state.sleep_level == 2 and wait.waits == [2.5]  # sleeping is instant
    with pytest.raises(NotReadyError, match="sleeping"):
        life.check_serving()
    await life.wake_up()
    assert wait.waits == [2.5, 2.5] and life.state.phase is Phase.READY
    await life.wake_up()  # awake: nothing to do
    assert wait.waits == [2.5, 2.5]


async def test_sleep_refuses_bad_levels_and_busy_engines():
    life = Lifecycle(0.0, FakeWait(), lambda: True)
    assert life.state.phase is Phase.READY  # dummy weights: ready at once
    for level in (0, 3, "1"):
        with pytest.raises(InvalidRequestError, match="level"):
            await life.sleep(level, busy=False)
    with pytest.raises(LifecycleError, match="in flight"):
        await life.sleep(1, busy=True)
    held = Lifecycle(0.0, FakeWait(), lambda: False)
    with pytest.raises(LifecycleError, match="held"):
        await held.sleep(1, busy=False)
    assert not held.state.sleeping


async def test_a_cancelled_wake_up_stays_asleep():
    life = Lifecycle(10.0, asyncio.sleep, lambda: True)
    life.state = type(life.state)(Phase.READY)
    await life.sleep(2, busy=False)
    task = asyncio.create_task(life.wake_up())
    await asyncio.sleep(0.01)
    assert life.state.phase is Phase.WAKING and life.state.sleeping
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert life.state.phase is Phase.SLEEPING and life.state.sleep_level == 2


def test_load_format_is_checked():
    with pytest.raises(ConfigError, match="load_format: expected one of auto"):
        ServerConfig(load_format="tensorizer")


# --- over HTTP and SGLang's gRPC, on the twin ------------------------------------------------


@pytest.fixture
async def http_twin() -> AsyncIterator[tuple[TwinEngine, str]]:
    twin = TwinEngine(load_s=LOAD_S)
    site = HttpSite(OpenAIFront(twin, CARD, ApproximateTokenizer(CARD.vocab_size)).app())
    port = await site.start("127.0.0.1", 0)
    yield twin, f"http://127.0.0.1:{port}"
    await site.stop()


async def test_http_health_sleep_wake_and_reset(http_twin):
    twin, url = http_twin
    body = {"prompt": "hi", "max_tokens": 2}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/health") as r:
            assert r.status == 503  # loading
        async with s.post(f"{url}/v1/completions", json=body) as r:
            assert r.status == 503 and "loading" in (await r.json())["error"]["message"]
        await twin.load()
        async with s.get(f"{url}/health") as r:
            assert r.status == 200
        async with s.post(f"{url}/sleep", params={"level": "3"}) as r:
            assert r.status == 400 and (await r.json())["error"]["message"].startswith("level")
        async with s.post(f"{url}/sleep", params={"level": "2"}) as r:
            assert r.status == 200
        async with s.get(f"{url}/is_sleeping") as r:
            assert await r.json() == {"is_sleeping": True}
        async with s.get(f"{url}/health") as r:
            assert r.status == 200  # vLLM's: alive while asleep
        async with s.post(f"{url}/v1/completions", json=body) as r:
            assert r.status == 503 and "wake_up" in (await r.json())["error"]["message"]
        start = time.monotonic()
        async with s.post(f"{url}/wake_up") as r:
            assert r.status == 200
        assert time.monotonic() - start >= LOAD_S
        async with s.get(f"{url}/is_sleeping") as r:
            assert await r.json() == {"is_sleeping": False}
        async with s.post(f"{url}/v1/completions", json=body) as r:
            assert r.status == 200
        async with s.post(f"{url}/reset_prefix_cache") as r:
            assert r.status == 200 and twin.prefix_resets == 2  # the sleep's and this one
        twin.gate.clear()  # a request holds the engine: no sleep, no reset
        stream = twin.submit(Request(request_id="held", prompt_ids=(1, 2), max_tokens=5))
        async with s.post(f"{url}/reset_prefix_cache") as r:
            assert r.status == 409 and "hold KV" in (await r.json())["error"]["message"]
        async with s.post(f"{url}/sleep") as r:
            assert r.status == 409
        stream.close()


async def test_sglang_flush_cache_and_health_follow_the_lifecycle():
    twin = TwinEngine(load_s=LOAD_S)
    cleared = []
    twin.subscribe_kv_events(cleared.append)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    add_to_server(SglangServicer(twin, CARD), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
        from smg_grpc_proto.generated import sglang_scheduler_pb2 as spb

        health = await stub.HealthCheck(spb.HealthCheckRequest())
        assert not health.healthy and health.message == "loading"
        await twin.load()
        assert (await stub.HealthCheck(spb.HealthCheckRequest())).healthy
        out = await stub.FlushCache(common_pb2.FlushCacheRequest())
        assert out.success and cleared == [AllBlocksCleared()]
        twin.gate.clear()
        stream = twin.submit(Request(request_id="held", prompt_ids=(1, 2), max_tokens=5))
        out = await stub.FlushCache(common_pb2.FlushCacheRequest())
        assert not out.success and "KV" in out.message
        stream.close()
    await server.stop(grace=None)


# --- the real engine: the core's load time ---------------------------------------------------


async def test_startup_and_wake_up_take_the_cores_load_time(wse3_8b: Deployment):
    load_s = wse3_8b.weight_load_s
    expected = wse3_8b.weight_bytes / wse3_8b.hardware.weight_load_link.bandwidth_bytes_per_s
    assert load_s == pytest.approx(expected, rel=1e-3)  # 16 GB over 150 GB/s: ~0.11 s
    server = EmulatorServer(wse3_8b, EngineConfig(), ServerConfig(port=0, http_port=0))
    start = time.monotonic()
    await server.start()
    startup = time.monotonic() - start
    try:
        assert server.load_s == load_s
        assert load_s <= startup <= load_s + 1.0  # the rest: binding the ports
        engine = server.guarded
        await engine.sleep(1)
        with pytest.raises(NotReadyError):
            engine.submit(Request(request_id="r", prompt_ids=(1,), max_tokens=1))
        start = time.monotonic()
        await engine.wake_up()
        woke = time.monotonic() - start
        assert load_s <= woke <= 1.05 * load_s
    finally:
        await server.stop(grace_s=0.0)


async def test_dummy_weights_are_ready_at_once(wse3_8b: Deployment):
    config = ServerConfig(port=0, load_format="dummy")
    server = EmulatorServer(wse3_8b, EngineConfig(), config)
    assert server.load_s == 0.0 and server.engine.lifecycle.phase is Phase.READY
