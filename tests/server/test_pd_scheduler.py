"""Admission of a disaggregated decode request: its prompt's KV has arrived from a prefill
worker, so only its last prompt token runs here, one step before its first token."""

from __future__ import annotations

import pytest
from engine_fakes import FakeStepModel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_scheduler import check_invariants

from memorywall.core import PrefillChunk
from memorywall.errors import DuplicateRequestError
from memorywall.server.engine.scheduler import (
    EngineConfig,
    EngineCore,
    FinishReason,
    ModelLimits,
    Request,
)

BLOCK = 16


def make_core(kv_tokens: int = 64 * 1024, caching: bool = True) -> EngineCore:
    limits = ModelLimits(
        kv_capacity_tokens=kv_tokens,
        max_context=8192,
        vocab_size=32_000,
        eos_token_ids=frozenset({0}),
    )
    config = EngineConfig(block_size=BLOCK, enable_prefix_caching=caching)
    return EngineCore(FakeStepModel(), limits, config)


def request(rid: str, prompt_len: int, max_tokens: int = 4, **kw) -> Request:
    return Request(
        request_id=rid,
        prompt_ids=tuple(range(1, prompt_len + 1)),
        max_tokens=max_tokens,
        ignore_eos=True,
        **kw,
    )


@pytest.mark.parametrize("caching", [True, False])
def test_transferred_kv_leaves_one_prompt_token_and_holds_blocks_for_all(caching):
    core = make_core(caching=caching)
    seq = core.add(request("d", prompt_len=100, kv_transferred=True), 0.0)
    step = core.schedule(0.0)
    assert step.scheduled == [(seq, 1, False)]
    assert core.step_model.batches[-1].prefill == [PrefillChunk(1, 99, True)]
    assert seq.blocks == 7  # ceil(100 / 16): the whole prompt's KV is here
    assert core.kv_used_tokens == 7 * BLOCK
    assert seq.cached_tokens == 0  # transferred, not found in this worker's prefix cache
    (emission,) = core.complete(step)
    assert emission.time_s == step.end_s  # the first token, one step after the KV landed
    assert len(seq.output_ids) == 1
    while core.has_work():
        step = core.schedule(step.end_s)
        core.complete(step)
    assert seq.finish_reason is FinishReason.LENGTH and len(seq.output_ids) == 4
    assert core.kv.pool.used_blocks == 0


def test_prefix_lookup_counts_only_real_hits():
    core = make_core()
    first = core.add(request("a", prompt_len=64, max_tokens=1), 0.0)
    while core.has_work():
        core.complete(core.schedule(0.0))
    assert first.finish_reason is not None
    seq = core.add(request("d", prompt_len=64, kv_transferred=True), 1.0)
    core.schedule(1.0)
    assert seq.computed == 63
    assert seq.cached_tokens == 48  # the three full blocks before the last token
    assert core.kv.stats.hits == 48


def test_a_preempted_transferred_request_recomputes_its_prompt():
    core = make_core(kv_tokens=6 * BLOCK, caching=False)
    a = core.add(request("a", prompt_len=40, max_tokens=40), 0.0)
    b = core.add(request("b", prompt_len=40, max_tokens=40, kv_transferred=True), 0.0)
    now = 0.0
    while b.preemptions == 0 and core.has_work():
        step = core.schedule(now)
        core.complete(step)
        now = step.end_s
    assert b.preemptions == 1
    readmitted = False
    while core.has_work():
        step = core.schedule(now)
        if any(s is b for s, _, _ in step.scheduled) and b.computed == 0:
            # Readmitted: the whole prompt and what it generated run again here.
            (n,) = [n for s, n, _ in step.scheduled if s is b]
            assert n == b.total_tokens
            readmitted = True
        core.complete(step)
        now = step.end_s
    assert readmitted
    assert a.finish_reason is b.finish_reason is FinishReason.LENGTH
    assert core.kv.pool.used_blocks == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(
        st.tuples(st.integers(1, 150), st.integers(1, 40), st.booleans()),  # prompt, out, moved
        min_size=1,
        max_size=16,
    ),
    kv_blocks=st.integers(14, 40),
    caching=st.booleans(),
)
def test_kv_accounting_holds_after_every_step_with_transferred_requests(specs, kv_blocks, caching):
    """Used + free = total, each block held once, and every sequence holds the KV of what it
    has computed, the transferred prompts included; all KV back when done."""
    core = make_core(kv_tokens=kv_blocks * BLOCK, caching=caching)
    added = []
    for i, (prompt, out, moved) in enumerate(specs):
        out = min(out, kv_blocks * BLOCK - prompt)
        added.append(core.add(request(f"r{i}", prompt, out, kv_transferred=moved), 0.0))
    now = 0.0
    for _ in range(100_000):
        check_invariants(core, added)
        for seq in core.running:
            assert seq.blocks * BLOCK >= seq.computed
        if not core.has_work():
            break
        step = core.schedule(now)
        check_invariants(core, added)
        for seq, n, _ in step.scheduled:
            assert seq.blocks * BLOCK >= seq.computed + n or n == 0
        core.complete(step)
        now = step.end_s
    else:
        raise AssertionError("livelock")
    assert core.kv.pool.used_blocks == 0
    assert all(len(s.output_ids) == s.request.max_tokens for s in added)


def run_out(core: EngineCore, now: float = 0.0) -> float:
    while core.has_work():
        step = core.schedule(now)
        core.complete(step)
        now = step.end_s
    return now


@pytest.mark.parametrize("caching", [True, False])
def test_a_prefill_that_holds_its_kv_keeps_its_blocks_until_released(caching):
    """A disaggregated prefill (`keep_kv`) keeps its blocks, counted as used, after it
    finishes: the transfer is still reading them. Released, they free (full blocks stay in
    the prefix cache); its id stays taken until then."""
    core = make_core(kv_tokens=128 * BLOCK, caching=caching)
    seq = core.add(request("p", prompt_len=100, max_tokens=1, keep_kv=True), 0.0)
    run_out(core)
    assert core.kv_used_tokens == 7 * BLOCK  # the prompt and its one sampled token
    check_invariants(core, [seq])
    with pytest.raises(DuplicateRequestError):
        core.add(request("p", prompt_len=10), 1.0)
    assert core.kv.release_kept("p") and not core.kv.release_kept("p")
    assert core.kv_used_tokens == 0
    assert (core.kv.pool.cached_free_blocks == 6) is caching
    check_invariants(core, [seq])


def test_held_kv_keeps_a_waiting_request_out_until_released():
    core = make_core(kv_tokens=10 * BLOCK)
    core.add(request("p", prompt_len=100, max_tokens=1, keep_kv=True), 0.0)
    end = run_out(core)
    other = Request(request_id="q", prompt_ids=tuple(range(500, 600)), max_tokens=1)
    core.add(other, end)
    assert core.schedule(end) is None  # 7 of 10 blocks held: no room for another 7
    core.kv.release_kept("p")
    assert core.schedule(end) is not None


def test_an_aborted_prefill_holds_nothing():
    core = make_core()
    core.add(request("p", prompt_len=100, keep_kv=True), 0.0)
    core.schedule(0.0)
    core.abort("p")
    assert core.kv_used_tokens == 0 and not core.kv.release_kept("p")
