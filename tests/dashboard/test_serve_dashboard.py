"""`serve --dashboard`: the page under /dashboard/ of a worker's HTTP front, its snapshot
read from the worker's own metrics in-process, and its URL in the ready file."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from memorywall.server.app import EmulatorServer, ready_info
from memorywall.server.config import ServerConfig
from memorywall.server.engine.scheduler import EngineConfig

TIMEOUT_S = 30.0


@pytest.fixture
async def server(wse3_8b):
    config = ServerConfig(port=0, http_port=0, load_format="dummy", dashboard=True, grpc=False)
    server = EmulatorServer(wse3_8b, EngineConfig(), config)
    await server.start()
    yield server
    await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)


async def snapshot(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(f"{url}/dashboard/api/snapshot") as r:
        assert r.status == 200
        return await r.json()


async def test_the_worker_serves_its_own_dashboard(server):
    url = server.http_url
    ready = ready_info(server)
    assert ready.dashboard_url == f"{url}/dashboard/"
    assert ready.as_dict()["dashboard_url"] == ready.dashboard_url
    assert f"{url}/dashboard/ (dashboard)" in server.addresses
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"{url}/dashboard", allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (302, "/dashboard/")
        async with session.get(f"{url}/dashboard/") as r:
            assert r.status == 200
            assert "dashboard.js" in await r.text()
        body = {"model": "llama-3.1-8b", "prompt": [1, 2, 3, 4], "max_tokens": 64}
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while True:  # the poller scrapes once a second: load until a rate shows
            replies = [session.post(f"{url}/v1/completions", json=body) for _ in range(4)]
            for reply in await asyncio.gather(*replies):
                assert reply.status == 200
                reply.release()
            [w] = (await snapshot(session, url))["workers"]
            f = w["figures"]
            if f is not None and f["tokens_per_s"]:
                break
            assert asyncio.get_running_loop().time() < deadline, w
            await asyncio.sleep(0.3)
    assert (w["hardware"], w["devices"], w["model"], w["up"]) == ("wse-3", 1, "llama-3.1-8b", True)
    assert f["tokens_per_s"] > 0
    assert f["energy_per_token_j"] > 0
    assert f["power_w"] > 0


def test_a_config_with_a_dashboard_and_no_http_front_is_refused():
    from memorywall.errors import ConfigError

    with pytest.raises(ConfigError, match="--dashboard: it is served on the HTTP front"):
        ServerConfig(dashboard=True)
