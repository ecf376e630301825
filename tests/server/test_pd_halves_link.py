"""Live halves sharing the link: transfers at once from one prefill worker, or into one
decode worker, take turns on it, as the offline split fleet has them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from test_pd_halves import drain

from memorywall.core.kv_transfer import kv_link, kv_transfer
from memorywall.server.engine.build import build_core
from memorywall.server.engine.live import AsyncEngine
from memorywall.server.engine.scheduler import EngineConfig, Request
from memorywall.server.pd import Bootstrap, Disaggregation, PdConfig, Role
from memorywall.server.pd.metrics import KvTransferMetrics

TIMEOUT_S = 30.0
PROMPT = 1000
LINK_GBPS = 1.0  # 131 ms per 1000-token prompt: far longer than any host hiccup


def request(i: int) -> Request:
    return Request(
        request_id=f"r{i}",
        prompt_ids=tuple(range(1 + 10_000 * i, PROMPT + 1 + 10_000 * i)),
        max_tokens=4,
        ignore_eos=True,
    )


@pytest.fixture
async def workers(h100_8b, wse3_8b) -> AsyncIterator:
    made: list[tuple[Disaggregation, AsyncEngine]] = []

    async def make(role: Role) -> Disaggregation:
        deployment = h100_8b if role is Role.PREFILL else wse3_8b
        core, _ = build_core(deployment, EngineConfig())
        engine = AsyncEngine(core, max_messages_per_s=16_000)
        await engine.start()
        config = PdConfig(role=role, link=LINK_GBPS, bootstrap_port=0)
        observer = KvTransferMetrics(deployment.model.name) if role is Role.DECODE else None
        pd = Disaggregation(engine, deployment, config, observer=observer)
        await pd.start("127.0.0.1")
        made.append((pd, engine))
        return pd

    yield make
    for pd, engine in made:
        await pd.stop()
        await engine.stop()


@pytest.mark.parametrize(("prefills", "decodes"), [(2, 1), (1, 2)], ids=["ingress", "egress"])
async def test_two_transfers_at_once_take_turns_on_the_shared_end(
    workers, h100_8b, wse3_8b, prefills, decodes
):
    ps = [await workers(Role.PREFILL) for _ in range(prefills)]
    ds = [await workers(Role.DECODE) for _ in range(decodes)]
    t0 = ds[0].engine.now()
    halves = []
    for i in range(2):
        p, d = ps[i % prefills], ds[i % decodes]
        b = Bootstrap(host="127.0.0.1", port=p.bootstrap_port, room=i)
        halves += [p.submit(request(i), b, arrival_s=t0), d.submit(request(i), b, arrival_s=t0)]
    done = [f for _, f in await asyncio.gather(*(drain(h, TIMEOUT_S) for h in halves))]
    p_done, d_done = done[0::2], done[1::2]
    idle = kv_transfer(h100_8b, kv_link(h100_8b, wse3_8b, LINK_GBPS), PROMPT)
    wire_s = PROMPT * 131_072 / (LINK_GBPS * 1e9)
    for p, d in zip(p_done, d_done, strict=True):
        assert p.kv_transfer_s == pytest.approx(d.kv_transfer_s, rel=1e-12)
        assert d.completion_tokens == 4
    # Whichever booked second lands one wire time after the first (the prefills end within
    # a host hiccup of each other, far less than the wire time).
    landed = sorted(t0 + p.ttft_s + p.kv_transfer_s for p in p_done)
    assert landed[1] - landed[0] == pytest.approx(wire_s, abs=1e-6)
    assert min(p.kv_transfer_s for p in p_done) == pytest.approx(idle.exposed_s, rel=1e-6)
    assert max(p.kv_transfer_s for p in p_done) > idle.exposed_s + 0.5 * wire_s
    for pd in (*ps, *ds):
        assert pd.engine.stats().kv_used_tokens == 0
    # /metrics: each whole transfer, the wait included
    total_s = sum(
        next(x.value for x in seconds.samples if x.name.endswith("_sum"))
        for seconds, _ in (list(d.observer.collect()) for d in ds)
    )
    waited_s = sum(p.kv_transfer_s for p in p_done) - 2 * idle.exposed_s
    assert total_s == pytest.approx(2 * idle.time_s + waited_s, rel=1e-6)
