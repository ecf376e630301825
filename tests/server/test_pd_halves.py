"""Prefill and decode halves on two live engines in one process, meeting over loopback.

Modelled times are checked exactly against the core (prefill on an h100, the transfer over
the link, the first decode step on a wse-3); wall-clock waits are bounded generously.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from polling import wait_until

from memorywall.core import Batch, PrefillChunk, StepModel
from memorywall.core.kv_transfer import kv_link, kv_transfer
from memorywall.errors import InjectedUnavailableError, PartnerLostError, PartnerTimeoutError
from memorywall.server.engine.api import EngineClient, Finished, TokenGroup
from memorywall.server.engine.build import build_core
from memorywall.server.engine.faults import parse_rule
from memorywall.server.engine.guard import GuardConfig, GuardedEngine
from memorywall.server.engine.live import AsyncEngine
from memorywall.server.engine.scheduler import EngineConfig, Request
from memorywall.server.pd import Bootstrap, Disaggregation, PdConfig, Role
from memorywall.server.pd.metrics import KvTransferMetrics
from memorywall.server.pd.offline import PdFleet, simulate_pd

TIMEOUT_S = 20.0
PROMPT = 1000


@dataclass
class Pair:
    prefill: Disaggregation
    decode: Disaggregation
    metrics: KvTransferMetrics

    def bootstrap(self, room: int) -> Bootstrap:
        return Bootstrap(host="127.0.0.1", port=self.prefill.bootstrap_port, room=room)

    async def start_transfer(self, room: int) -> tuple[asyncio.Future, asyncio.Future]:
        """Both halves of one request, draining, once its KV transfer is planned (the
        prefill worker has the room and its booking)."""
        t0 = self.decode.engine.now()
        b = self.bootstrap(room)
        prefill = asyncio.ensure_future(drain(self.prefill.submit(request(), b, arrival_s=t0)))
        decode = asyncio.ensure_future(drain(self.decode.submit(request(), b, arrival_s=t0)))
        rooms = self.prefill.bootstrap.rooms
        await wait_until(lambda: room in rooms, TIMEOUT_S)
        await wait_until(lambda: rooms[room].plan.done(), TIMEOUT_S)
        return prefill, decode

    def kv_used(self) -> tuple[int, int]:
        return (
            self.prefill.engine.stats().kv_used_tokens,
            self.decode.engine.stats().kv_used_tokens,
        )


def request(rid: str = "r", prompt_len: int = PROMPT, max_tokens: int = 8) -> Request:
    return Request(
        request_id=rid,
        prompt_ids=tuple(range(1, prompt_len + 1)),
        max_tokens=max_tokens,
        ignore_eos=True,
    )


async def engine_for(deployment) -> AsyncEngine:
    core, _ = build_core(deployment, EngineConfig())
    engine = AsyncEngine(core, max_messages_per_s=16_000)
    await engine.start()
    return engine


@pytest.fixture
async def pair(h100_8b, wse3_8b) -> AsyncIterator:
    made: list[tuple[Disaggregation, AsyncEngine]] = []

    async def make(
        *, link=10.0, timeout_s: float = 5.0, layer_overlap: bool = False, faults: bool = False
    ) -> Pair:
        """`faults`: each worker's engine behind a guard that takes requests' own faults."""
        p_engine, d_engine = await engine_for(h100_8b), await engine_for(wse3_8b)

        def served(engine: AsyncEngine) -> EngineClient:
            if not faults:
                return engine
            return GuardedEngine(engine, GuardConfig(allow_fault_headers=True))

        prefill = Disaggregation(
            served(p_engine),
            h100_8b,
            PdConfig(role=Role.PREFILL, bootstrap_port=0, partner_timeout_s=timeout_s),
        )
        await prefill.start("127.0.0.1")
        metrics = KvTransferMetrics(wse3_8b.model.name)
        decode = Disaggregation(
            served(d_engine),
            wse3_8b,
            PdConfig(
                role=Role.DECODE,
                link=link,
                layer_overlap=layer_overlap,
                partner_timeout_s=timeout_s,
            ),
            observer=metrics,
        )
        made.extend([(prefill, p_engine), (decode, d_engine)])
        return Pair(prefill, decode, metrics)

    yield make
    for pd, engine in made:
        await pd.stop()
        await engine.stop()


async def drain(stream, timeout_s: float = TIMEOUT_S) -> tuple[list[TokenGroup], Finished]:
    async def read():
        return [event async for event in stream]

    try:
        events = await asyncio.wait_for(read(), timeout_s)
    finally:
        stream.close()
    assert isinstance(events[-1], Finished)
    return [e for e in events[:-1] if isinstance(e, TokenGroup)], events[-1]


def first_decode_step_s(deployment, prompt_len: int) -> float:
    batch = Batch(prefill=[PrefillChunk(1, prompt_len - 1, True)])
    return StepModel(deployment).step_cost(batch).time_s


async def test_halves_pair_by_room_and_ttft_is_prefill_plus_transfer_plus_a_step(
    pair, h100_8b, wse3_8b
):
    pd = await pair()
    t0 = pd.decode.engine.now()
    b = pd.bootstrap(room=41)
    (p_groups, p_done), (d_groups, d_done) = await asyncio.gather(
        drain(pd.prefill.submit(request(), b, arrival_s=t0)),
        drain(pd.decode.submit(request(), b, arrival_s=t0)),
    )
    assert [len(g.token_ids) for g in p_groups] == [1]  # the prefill samples the first token
    expected = kv_transfer(h100_8b, kv_link(h100_8b, wse3_8b, 10.0), PROMPT)
    assert expected.bytes == PROMPT * 131_072
    for done in (p_done, d_done):
        assert done.kv_transfer_s == pytest.approx(expected.exposed_s, rel=1e-9)
        assert done.kv_transfer_bytes == pytest.approx(expected.bytes)
    step = first_decode_step_s(wse3_8b, PROMPT)
    # A host stall on the decode worker (a loaded machine) moves its timeline later, counted.
    modelled_ttft_s = d_done.ttft_s - (d_done.host_stall_s - d_done.decode_host_stall_s)
    assert modelled_ttft_s == pytest.approx(p_done.ttft_s + expected.exposed_s + step, abs=1e-9)
    # Live and simulated agree: the offline split fleet gives the same first token.
    fleet = PdFleet(prefill=h100_8b, prefill_workers=1, decode=wse3_8b, decode_workers=1, link=10.0)
    (offline,) = simulate_pd(fleet, [(0.0, request())])
    p_stall_s = p_done.host_stall_s - p_done.decode_host_stall_s
    assert modelled_ttft_s - p_stall_s == pytest.approx(offline.timeline.first_token_s, abs=1e-9)
    assert d_done.completion_tokens == 8
    assert d_groups[0].token_ids[0] == p_groups[0].token_ids[0]
    assert d_groups[0].times_s[0] <= d_done.ttft_s + 1e-9
    assert pd.kv_used() == (0, 0)
    assert not pd.prefill.bootstrap.rooms
    seconds, sent = list(pd.metrics.collect())
    count = next(s for s in seconds.samples if s.name.endswith("_count"))
    assert count.value == 1
    assert sent.samples[0].value == pytest.approx(expected.bytes)


async def test_a_requests_fault_goes_with_each_half_to_its_engine(pair):
    pd = await pair(faults=True)
    with pytest.raises(InjectedUnavailableError):
        pd.prefill.submit(request("e"), pd.bootstrap(room=40), fault=parse_rule("error:1"))
    assert not pd.prefill.bootstrap.rooms  # refused holding nothing
    t0 = pd.decode.engine.now()
    b = pd.bootstrap(room=43)
    (_, p_done), (d_groups, d_done) = await asyncio.gather(
        drain(pd.prefill.submit(request(), b, arrival_s=t0)),
        drain(pd.decode.submit(request(), b, arrival_s=t0, fault=parse_rule("stall:1:0.25"))),
    )
    assert p_done.fault is None and d_done.fault == "stall:0.25"
    # The stall holds the decode half's first token, after the remote prefill and transfer.
    assert d_groups[0].times_s[0] >= p_done.ttft_s + d_done.kv_transfer_s + 0.25
    assert d_done.ttft_s >= d_groups[0].times_s[0] - 1e-9
    assert pd.kv_used() == (0, 0)


@pytest.mark.parametrize("decode_first", [False, True], ids=["prefill first", "decode first"])
async def test_either_half_may_come_first(pair, h100_8b, wse3_8b, decode_first):
    pd = await pair()
    b = pd.bootstrap(room=42)
    first, second = (pd.decode, pd.prefill) if decode_first else (pd.prefill, pd.decode)
    arrivals = {}
    arrivals[first] = first.engine.now()
    early = asyncio.ensure_future(drain(first.submit(request(), b, arrival_s=arrivals[first])))
    rooms = pd.prefill.bootstrap.rooms
    if decode_first:  # the decode half holds the room, waiting for its prefill half
        await wait_until(lambda: 42 in rooms and rooms[42].claimed, TIMEOUT_S)
    else:  # the prefill is over, its KV waiting for a decode half
        await wait_until(lambda: 42 in rooms and rooms[42].prefilled.done(), TIMEOUT_S)
    arrivals[second] = second.engine.now()
    late = asyncio.ensure_future(drain(second.submit(request(), b, arrival_s=arrivals[second])))
    results = dict(zip((first, second), await asyncio.gather(early, late), strict=True))
    (_, p_done), (_, d_done) = results[pd.prefill], results[pd.decode]
    transfer = kv_transfer(h100_8b, kv_link(h100_8b, wse3_8b, 10.0), PROMPT)
    step = first_decode_step_s(wse3_8b, PROMPT)
    prefill_end = arrivals[pd.prefill] + p_done.ttft_s
    if decode_first:  # the decode half waited for the prefill, then for the KV
        landed = prefill_end + transfer.exposed_s
    else:  # the prefill waited for its partner; the KV moved once the decode half came
        assert arrivals[pd.decode] > prefill_end
        assert d_done.ttft_s > transfer.time_s + step
        stall_s = d_done.host_stall_s - d_done.decode_host_stall_s
        landed = arrivals[pd.decode] + d_done.ttft_s - stall_s - step
    stall_s = d_done.host_stall_s - d_done.decode_host_stall_s  # before the first token
    first_token_s = arrivals[pd.decode] + d_done.ttft_s - stall_s
    assert first_token_s == pytest.approx(landed + step, abs=1e-6)
    assert d_done.completion_tokens == 8
    assert pd.kv_used() == (0, 0)
    assert not pd.prefill.bootstrap.rooms


async def test_layer_overlap_hides_the_transfer_behind_the_prefill(pair, h100_8b, wse3_8b):
    pd = await pair(link=100.0, layer_overlap=True)
    t0 = pd.decode.engine.now()
    b = pd.bootstrap(room=5)
    (_, p_done), (_, d_done) = await asyncio.gather(
        drain(pd.prefill.submit(request(), b, arrival_s=t0)),
        drain(pd.decode.submit(request(), b, arrival_s=t0)),
    )
    link = kv_link(h100_8b, wse3_8b, 100.0)
    expected = kv_transfer(h100_8b, link, PROMPT, prefill_s=p_done.prefill_s, layer_overlap=True)
    assert expected.exposed_s < expected.time_s
    assert d_done.kv_transfer_s == pytest.approx(expected.exposed_s, rel=1e-9)


async def test_a_prefill_without_decode_partner_times_out_and_frees_its_kv(pair):
    pd = await pair(timeout_s=0.5)
    stream = pd.prefill.submit(request(), pd.bootstrap(room=9), arrival_s=None)
    start = time.monotonic()
    with pytest.raises(PartnerTimeoutError, match="no decode worker claimed bootstrap room 9"):
        await drain(stream)
    assert 0.4 < time.monotonic() - start < 10.0
    assert pd.kv_used() == (0, 0)
    assert not pd.prefill.bootstrap.rooms


async def test_a_decode_without_prefill_partner_times_out(pair):
    pd = await pair(timeout_s=0.5)
    stream = pd.decode.submit(request(), pd.bootstrap(room=10), arrival_s=None)
    with pytest.raises(PartnerTimeoutError, match="no prefill half of bootstrap room 10"):
        await drain(stream)
    assert pd.kv_used() == (0, 0)
    assert not pd.prefill.bootstrap.rooms


async def test_a_decode_whose_prefill_worker_is_unreachable_is_unavailable(pair):
    pd = await pair()
    await pd.prefill.stop()
    stream = pd.decode.submit(request(), pd.bootstrap(room=11), arrival_s=None)
    with pytest.raises(PartnerLostError, match="cannot reach the prefill worker's bootstrap"):
        await drain(stream)


async def test_prefill_worker_gone_mid_transfer_ends_both_halves(pair):
    # 0.01 GB/s: 13 s to move 1000 tokens, so both halves are mid-transfer for a long while.
    pd = await pair(link=0.01)
    prefill, decode = await pd.start_transfer(room=12)
    await pd.prefill.stop()  # as its process dying does: the connection closes
    with pytest.raises(PartnerLostError, match="went away during the KV transfer"):
        await decode
    with pytest.raises(PartnerLostError, match="shutting down"):
        await prefill
    assert pd.kv_used() == (0, 0)


async def test_decode_half_gone_mid_transfer_ends_the_prefill_half(pair):
    pd = await pair(link=0.01)
    prefill, decode = await pd.start_transfer(room=13)
    decode.cancel()  # the client or the decode worker went away
    with pytest.raises(PartnerLostError, match="decode half of bootstrap room 13 went away"):
        await prefill
    assert pd.kv_used() == (0, 0)
    assert not pd.prefill.bootstrap.rooms


async def test_a_prefill_slower_than_the_timeout_still_pairs(pair):
    """The timeout is for a partner that never comes, not for a long (or queued) prefill."""
    pd = await pair(timeout_s=0.3)
    long_prompt = request(prompt_len=20_000, max_tokens=2)  # three chunks, ~0.8 s on an h100
    b = pd.bootstrap(room=14)
    (_, d_done), (_, p_done) = await asyncio.gather(
        drain(pd.decode.submit(long_prompt, b)),
        drain(pd.prefill.submit(long_prompt, b)),
    )
    assert p_done.ttft_s > 2 * 0.3
    assert d_done.completion_tokens == 2 and d_done.kv_transfer_bytes == 20_000 * 131_072


async def test_the_prefill_worker_holds_the_prompts_kv_until_it_lands(pair):
    """Its prefill is over (its first token out) while the KV still crosses the link: the
    prefill worker keeps the blocks being read until the decode worker says they landed."""
    pd = await pair(link=0.5)  # 1000 tokens of KV in ~0.26 s
    prefill, decode = await pd.start_transfer(room=14)
    if not pd.prefill.bootstrap.rooms[14].landed.done():
        assert pd.kv_used()[0] >= PROMPT  # mid-transfer: held
    await asyncio.gather(prefill, decode)
    assert pd.kv_used() == (0, 0)
