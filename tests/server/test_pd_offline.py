"""The split fleet on a virtual clock: the live halves' timeline without sockets."""

from __future__ import annotations

import pytest

from memorywall.core import Batch, PrefillChunk, StepModel
from memorywall.core.kv_transfer import kv_link, kv_transfer
from memorywall.errors import ContextLengthError
from memorywall.server.engine.scheduler import Request
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
    assert t.decode.arrival_s == pytest.approx(t.prefill_end_s + transfer.exposed_s, abs=1e-12)
    assert t.decode.first_token_s == pytest.approx(t.decode.arrival_s + first_s, abs=1e-12)
    assert t.decode.completion_tokens == 8 and len(t.decode.group_times_s) == 8


def test_requests_spread_round_robin_and_every_token_is_kept(h100_8b, wse3_8b):
    fleet = PdFleet(prefill=h100_8b, prefill_workers=2, decode=wse3_8b, decode_workers=1)
    requests = [(0.001 * i, request(i, prompt_len=200, max_tokens=16)) for i in range(12)]
    split = simulate_pd(fleet, requests)
    assert [t.decode.completion_tokens for t in split] == [16] * 12
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
    assert t.transfer is None and isinstance(t.decode.error, ContextLengthError)
