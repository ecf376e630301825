"""The split fleet on a virtual clock: the live halves' timeline without sockets."""

from __future__ import annotations

import itertools

import pytest

from memorywall.core import Batch, PrefillChunk, StepModel
from memorywall.core.kv_transfer import kv_link, kv_transfer
from memorywall.errors import ContextLengthError
from memorywall.server.engine.scheduler import Request
from memorywall.server.pd.cosim import PdOfflineEngine
from memorywall.server.pd.offline import PdFleet, simulate_aggregated, simulate_pd


def request(i: int, prompt_len: int = 1000, max_tokens: int = 8) -> Request:
    return Request(
        request_id=f"r{i}",
        prompt_ids=tuple(range(1 + i, prompt_len + 1 + i)),
        max_tokens=max_tokens,
        ignore_eos=True,
    )


def step_s(deployment, batch: Batch) -> float:
    return StepModel(deployment).step_cost(batch).time_s


def test_one_request_is_prefill_then_transfer_then_a_decode_step(h100_8b, wse3_8b):
    fleet = PdFleet(prefill=h100_8b, prefill_workers=1, decode=wse3_8b, decode_workers=1, link=10.0)
    (t,) = simulate_pd(fleet, [(2.0, request(0))])
    prefill_s = step_s(h100_8b, Batch(prefill=[PrefillChunk(1000)]))
    transfer = kv_transfer(h100_8b, kv_link(h100_8b, wse3_8b, 10.0), 1000)
    first_s = step_s(wse3_8b, Batch(prefill=[PrefillChunk(1, 999)]))
    assert t.prefill_end_s == pytest.approx(2.0 + prefill_s, abs=1e-12)
    assert t.transfer == transfer
    assert t.landed_s == pytest.approx(t.prefill_end_s + transfer.exposed_s, abs=1e-12)
    assert t.timeline.arrival_s == 2.0
    assert t.timeline.first_token_s == pytest.approx(t.landed_s + first_s, abs=1e-12)
    assert t.timeline.completion_tokens == 8 and len(t.timeline.group_times_s) == 8


def test_requests_spread_round_robin_and_every_token_is_kept(h100_8b, wse3_8b):
    fleet = PdFleet(prefill=h100_8b, prefill_workers=2, decode=wse3_8b, decode_workers=1)
    requests = [(0.001 * i, request(i, prompt_len=200, max_tokens=16)) for i in range(12)]
    split = simulate_pd(fleet, requests)
    assert [t.timeline.completion_tokens for t in split] == [16] * 12
    # Two prefill workers take turns, so neighbours do not queue behind each other.
    ends = [t.prefill_end_s for t in split]
    assert ends[1] < ends[2]
    assert fleet.devices == 3 and fleet.power_w == pytest.approx(2 * 700 + 23_000)
    whole = simulate_aggregated(wse3_8b, 1, requests)
    assert [t.completion_tokens for t in whole] == [16] * 12


def test_a_request_the_prefill_refuses_ends_with_its_error(h100_8b, wse3_8b):
    fleet = PdFleet(prefill=h100_8b, prefill_workers=1, decode=wse3_8b, decode_workers=1)
    too_long = request(0, prompt_len=h100_8b.model.max_context + 1)
    (t,) = simulate_pd(fleet, [(0.0, too_long)])
    assert t.transfer is None and isinstance(t.timeline.error, ContextLengthError)


def test_a_closed_loop_user_sends_each_request_when_the_last_one_ends(h100_8b, wse3_8b):
    fleet = PdFleet(prefill=h100_8b, prefill_workers=1, decode=wse3_8b, decode_workers=2)
    engine = PdOfflineEngine(fleet)
    done = []

    def next_one(timeline) -> None:
        done.append(timeline)
        if len(done) < 4:
            engine.submit(request(len(done), prompt_len=300, max_tokens=4), timeline.last_token_s)

    engine.on_finish = next_one
    engine.submit(request(0, prompt_len=300, max_tokens=4), 0.0)
    engine.run()
    assert [t.request_id for t in done] == ["r0", "r1", "r2", "r3"]
    transfer = kv_transfer(h100_8b, kv_link(h100_8b, wse3_8b), 300)
    prefill_s = step_s(h100_8b, Batch(prefill=[PrefillChunk(300)]))
    first_s = step_s(wse3_8b, Batch(prefill=[PrefillChunk(1, 299)]))
    for before, t in itertools.pairwise(done):
        assert t.arrival_s == before.last_token_s  # one user, one request at a time
    for t in done:  # alone on the fleet: nothing queues
        ttft = t.first_token_s - t.arrival_s
        assert ttft == pytest.approx(prefill_s + transfer.exposed_s + first_s, abs=1e-12)
        assert t.completion_tokens == 4
    assert engine.now_s == done[-1].last_token_s
    totals = engine.totals()
    assert totals.tokens_generated == 16 and totals.preemptions == 0
    assert totals.steps == 4 + 4 * 4  # a prefill, four decodes
