"""SSE chunks written from the per-request template are byte for byte what encoding the whole
chunk object gives, for any text, ids and times; and the request's lag reaches the final chunk."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memorywall.server.engine.api import Finished, FinishReason, Request, TokenGroup
from memorywall.server.fronts.openai_api import Call, Choice, Endpoint
from memorywall.server.fronts.openai_reply import Reply, sse


def reply(endpoint: Endpoint, *, continuous_usage: bool = False, include_usage: bool = False):
    request = Request(
        request_id="0123456789abcdef", prompt_ids=(1, 2, 3), max_tokens=64, stop_token_ids={9}
    )
    call = Call(
        choices=(Choice(request),),
        endpoint=endpoint,
        stream=True,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        min_interval_s=0.0,
    )
    return Reply(call, 'llama "3.1" 8b', 1767000000)


def group(text: str, ids: list[int], times: list[float], reason=None) -> TokenGroup:
    return TokenGroup(
        token_ids=tuple(ids),
        text=text,
        times_s=tuple(times),
        prompt_tokens=3,
        cached_tokens=0,
        completion_tokens=len(ids),
        finish_reason=reason,
    )


@settings(max_examples=200, deadline=None)
@given(
    endpoint=st.sampled_from(Endpoint),
    text=st.text(),
    ids=st.lists(st.integers(0, 200_000), min_size=1, max_size=4),
    times=st.lists(
        st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=4,
    ),
)
def test_template_bytes_equal_the_whole_object_encoded(endpoint, text, ids, times):
    r = reply(endpoint)
    g = group(text, ids, times)
    fast = r.group_event(g)
    assert fast == sse(r.group_chunk(g))
    assert json.loads(fast[len(b"data: ") :])["memorywall"]["modelled_times_s"] == list(times)


@pytest.mark.parametrize("endpoint", list(Endpoint))
@pytest.mark.parametrize(
    "reason", [None, FinishReason.LENGTH, FinishReason.STOP, FinishReason.ABORT]
)
@pytest.mark.parametrize("continuous_usage", [False, True])
def test_every_kind_of_group_encodes_as_its_object(endpoint, reason, continuous_usage):
    r = reply(endpoint, continuous_usage=continuous_usage)
    g = group(" the", [1820, 9], [0.5, 0.25], reason)
    event = r.group_event(g)
    expected = r.group_chunk(g)  # with the group counted, as group_event encodes it
    assert json.loads(event[len(b"data: ") :]) == expected
    finish = expected["choices"][0]["finish_reason"]
    assert finish == (reason.value if reason in (FinishReason.LENGTH, FinishReason.STOP) else None)
    assert r.finish_reason == finish


def test_the_final_usage_chunk_carries_the_request_lag():
    r = reply(Endpoint.COMPLETIONS, include_usage=True)
    f = Finished(
        request_id="0123456789abcdef",
        reason=FinishReason.LENGTH,
        prompt_tokens=3,
        completion_tokens=2,
        cached_tokens=0,
        queue_s=0.0,
        prefill_s=0.1,
        decode_s=0.2,
        ttft_s=0.1,
        e2e_s=0.3,
        preemptions=0,
        energy_j=1.0,
        last_token_id=5,
        host_stall_s=0.03,
        decode_host_stall_s=0.02,
        max_lag_s=0.031,
    )
    events = r.end_events(f).split(b"\n\n")
    usage = json.loads(events[-3][len(b"data: ") :])
    assert usage["memorywall"]["lag"] == {
        "host_stall_s": 0.03,
        "decode_host_stall_s": 0.02,
        "max_lag_s": 0.031,
    }
