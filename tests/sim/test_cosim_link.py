"""The split fleet on a virtual clock with a shared link and prefill-side KV held until the
transfer lands, against timelines computed by hand."""

from __future__ import annotations

import pytest

from memorywall.core.kv_transfer import kv_link, kv_transfer
from memorywall.server.engine.kv import BlockPool
from memorywall.server.engine.kv_manager import KVManager
from memorywall.server.engine.scheduler import EngineConfig, Request
from memorywall.server.pd.cosim import PdOfflineEngine
from memorywall.server.pd.offline import PdFleet, simulate_pd

PROMPT = 1000
LINK_GBPS = 10.0  # 13.1 ms for a 1000-token prompt of llama-3.1-8b


def request(i: int, prompt_len: int = PROMPT) -> Request:
    return Request(
        request_id=f"r{i}",
        prompt_ids=tuple(range(1 + 10_000 * i, prompt_len + 1 + 10_000 * i)),
        max_tokens=4,
        ignore_eos=True,
    )


def wire_s(prompt_len: int = PROMPT) -> float:
    return prompt_len * 131_072 / (LINK_GBPS * 1e9)


def test_two_prefills_into_one_decode_worker_queue_on_its_ingress(h100_8b, wse3_8b):
    """2 prefill workers end together; one decode worker's ingress takes one KV at a time."""
    fleet = PdFleet(
        prefill=h100_8b, prefill_workers=2, decode=wse3_8b, decode_workers=1, link=LINK_GBPS
    )
    a, b = simulate_pd(fleet, [(0.0, request(0)), (0.0, request(1))])
    idle = kv_transfer(h100_8b, kv_link(h100_8b, wse3_8b, LINK_GBPS), PROMPT)
    assert a.prefill_end_s == pytest.approx(b.prefill_end_s)
    assert a.transfer == idle and a.transfer.wait_s == 0
    assert b.transfer.wait_s == pytest.approx(wire_s(), rel=1e-9)
    assert b.transfer.exposed_s == pytest.approx(idle.exposed_s + wire_s(), rel=1e-9)
    assert b.landed_s - a.landed_s == pytest.approx(wire_s(), rel=1e-9)
    assert b.timeline.first_token_s > b.landed_s  # the wait shows in its TTFT


def test_two_decode_workers_each_with_their_own_ingress_do_not_wait_over_nics(h100_8b, wse3_8b):
    """Over NICs each h100_8b sends at 50 GB/s into its own wafer: nothing shared."""
    fleet = PdFleet(prefill=h100_8b, prefill_workers=2, decode=wse3_8b, decode_workers=2)
    out = simulate_pd(fleet, [(0.0, request(0)), (0.0, request(1))])
    assert [t.transfer.wait_s for t in out] == [0.0, 0.0]


@pytest.mark.parametrize("caching", [True, False], ids=["prefix cache", "no cache"])
def test_prefill_worker_holds_the_prompt_kv_until_it_lands(h100_8b, wse3_8b, caching):
    """A prefill worker with KV for one prompt: the second prompt's prefill starts only
    when the first's KV has landed on the decode worker, not when the first prefill ends."""
    fleet = PdFleet(
        prefill=h100_8b,
        prefill_workers=1,
        decode=wse3_8b,
        decode_workers=1,
        link=LINK_GBPS,
        engine=EngineConfig(enable_prefix_caching=caching),
    )
    engine = PdOfflineEngine(fleet)
    core = engine.prefills[0].core
    # 1,120 tokens of KV: one prompt at a time
    core.kv = KVManager(BlockPool(70, core.config.block_size), enable_prefix_caching=caching)
    engine.submit(request(0), 0.0)
    engine.submit(request(1), 0.0)
    engine.run()
    first, second = engine.timelines["r0"], engine.timelines["r1"]
    landed = engine.phases["r0"].prefill_end_s + engine.phases["r0"].transfer.exposed_s
    assert engine.phases["r0"].prefill_end_s < landed
    assert second.first_scheduled_s == pytest.approx(landed, abs=1e-12)
    assert first.completion_tokens == second.completion_tokens == 4
    assert core.kv.pool.used_blocks == 0  # every hold released
    # ...and, with prefix caching, full blocks kept for reuse
    assert (core.kv.pool.cached_free_blocks >= PROMPT // 16) is caching


def test_a_repeated_prompt_finds_its_prefix_cached_after_the_hold(h100_8b, wse3_8b):
    fleet = PdFleet(
        prefill=h100_8b, prefill_workers=1, decode=wse3_8b, decode_workers=1, link=LINK_GBPS
    )
    again = Request(request_id="again", prompt_ids=request(0).prompt_ids, max_tokens=4)
    first, second = simulate_pd(fleet, [(0.0, request(0)), (1.0, again)])
    assert first.timeline.cached_tokens == 0
    assert second.timeline.cached_tokens == (PROMPT - 1) // 16 * 16


def test_decode_runs_taken_at_once_give_the_same_timelines(h100_8b, wse3_8b):
    """The decode worker's fast path (`decode_run`) leaves every timeline as stepping does."""
    fleet = PdFleet(prefill=h100_8b, prefill_workers=2, decode=wse3_8b, decode_workers=1)
    out = {}
    for fast in (True, False):
        engine = PdOfflineEngine(fleet, fast=fast)
        for i in range(24):
            r = Request(
                request_id=f"r{i}",
                prompt_ids=tuple(range(1 + 1000 * i, 200 + 1000 * i)),
                max_tokens=60 + 7 * i,
                ignore_eos=True,
            )
            engine.submit(r, 0.05 * (i % 3))
        engine.run()
        out[fast] = {k: (t.group_times_s, t.group_tokens) for k, t in engine.timelines.items()}
    assert out[True] == out[False]
