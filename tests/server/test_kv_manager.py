"""`KVManager`'s public contract, without a scheduler: room or nothing, prefix hits,
eviction order, kept KV, free, and a decode run's growth in bulk."""

from __future__ import annotations

import pytest

from memorywall.server.engine.kv import BlockPool, BlockRemoved, BlockStored
from memorywall.server.engine.kv_manager import KVManager
from memorywall.server.engine.scheduler import Request, SeqState
from memorywall.server.engine.tokens import TokenSource

B = 16  # block size


def manager(blocks: int, *, caching: bool = True) -> KVManager:
    return KVManager(BlockPool(blocks, B), enable_prefix_caching=caching)


def seq(rid: str, prompt: tuple[int, ...], *, max_tokens: int = 8, keep_kv=False) -> SeqState:
    r = Request(
        request_id=rid, prompt_ids=prompt, max_tokens=max_tokens, ignore_eos=True, keep_kv=keep_kv
    )
    return SeqState(request=r, arrival_s=0.0, tokens=TokenSource(7, 32_000, frozenset()), stop_at=8)


def admit(kv: KVManager, s: SeqState) -> bool:
    """As `EngineCore.schedule` admits: the whole prompt in one chunk, from its cached prefix."""
    hit = kv.get_computed_blocks(s)
    ok = kv.allocate_slots(s, s.total_tokens, s.total_tokens, new_computed=hit)
    if ok:
        s.computed = s.total_tokens
    return ok


def prompt(first: int, tokens: int = 2 * B + 1) -> tuple[int, ...]:
    return tuple(range(first, first + tokens))  # 33 tokens: two full blocks and one token


def state(kv: KVManager) -> tuple:
    p = kv.pool
    return (p.free_blocks, list(p.ref_counts), dict(p.cached), list(p.block_hashes))


def test_an_admission_that_does_not_fit_takes_nothing():
    kv = manager(5)
    a = seq("a", prompt(0))
    assert admit(kv, a) and a.blocks == 3 and kv.free_blocks == 2
    kv.free(a)  # a's two full blocks stay cached, free
    b = seq("b", prompt(100))
    assert admit(kv, b)  # a's partial block and two never used: a's prefix stays cached
    before = state(kv)
    # a's prompt again hits both its cached blocks, but they are free, so they count
    # against the room: one new block and two cached wanted, two free.
    again = seq("a2", prompt(0))
    assert kv.get_computed_blocks(again).num_tokens == 2 * B
    assert not admit(kv, again)
    assert state(kv) == before
    assert (again.blocks, list(again.block_ids), again.cached_blocks) == (0, [], 0)
    assert kv.stats.requests == 2  # the failed admission's lookup is not counted


def test_growth_that_does_not_fit_takes_and_caches_nothing():
    kv = manager(4)
    a, b = seq("a", prompt(0, B)), seq("b", prompt(100, B))
    assert admit(kv, a) and admit(kv, b)
    assert kv.allocate_slots(a, 3 * B, B)  # two more blocks: the pool is full
    before = state(kv)
    assert not kv.allocate_slots(b, 2 * B, B)
    assert state(kv) == before
    assert (b.blocks, b.cached_blocks) == (1, 1)


def test_a_repeated_prompt_hits_its_cached_prefix_and_counts_it():
    kv = manager(16)
    a = seq("a", prompt(0))
    assert admit(kv, a)
    first = list(a.block_ids)
    kv.free(a)
    b = seq("b", prompt(0))
    hit = kv.get_computed_blocks(b)
    assert hit.num_tokens == 2 * B
    assert admit(kv, b)
    assert list(b.block_ids[:2]) == list(first[:2]) and b.cached_blocks == 2
    assert (kv.stats.requests, kv.stats.queries, kv.stats.hits) == (2, 66, 32)
    # An exact multiple of the block size leaves its last token to compute.
    c = seq("c", prompt(0, 2 * B))
    assert kv.get_computed_blocks(c).num_tokens == B


def test_a_preempted_sequences_lookup_counts_apart():
    kv = manager(16)
    a = seq("a", prompt(0))
    assert admit(kv, a)
    kv.free(a)
    a.preemptions, a.computed = 1, 0
    assert admit(kv, a)
    s = kv.stats
    assert (s.requests, s.preempted_requests, s.preempted_hits) == (1, 1, 2 * B)


def test_empty_blocks_go_before_eviction_and_eviction_takes_tails_first():
    kv = manager(6)
    a, b = seq("a", prompt(0)), seq("b", prompt(100))
    assert admit(kv, a) and admit(kv, b)
    events = []
    kv.subscribe(events.append)
    a_tail = a.block_ids[1]
    kv.free(a)
    kv.free(b)
    # Three wanted: the two partial (hash-less) blocks first, then one eviction, the least
    # recently freed block's tail: a's second block.
    c = seq("c", prompt(200, 3 * B))
    assert kv.allocate_slots(c, 3 * B, 0, new_computed=kv.get_computed_blocks(c))
    assert a_tail in c.block_ids
    assert [e for e in events if isinstance(e, BlockRemoved)] == [
        BlockRemoved((a.block_hashes[1],))
    ]
    assert kv.get_computed_blocks(seq("a2", prompt(0))).num_tokens == B
    assert kv.get_computed_blocks(seq("b2", prompt(100))).num_tokens == 2 * B


def test_free_gives_back_references_and_keeps_the_prefix_findable():
    kv = manager(8)
    a = seq("a", prompt(0))
    assert admit(kv, a)
    kv.free(a)
    assert (a.blocks, list(a.block_ids), a.cached_blocks) == (0, [], 0)
    assert kv.free_blocks == 8 and kv.used_tokens == 0
    assert kv.pool.cached_free_blocks == 2


@pytest.mark.parametrize("caching", [True, False])
def test_kept_blocks_stay_used_until_released(caching):
    kv = manager(8, caching=caching)
    p = seq("p", prompt(0), keep_kv=True)
    assert admit(kv, p)
    kv.keep(p)
    assert (p.blocks, list(p.block_ids)) == (0, [])
    assert kv.is_kept("p") and kv.used_tokens == 3 * B
    assert kv.release_kept("p") and not kv.release_kept("p")
    assert not kv.is_kept("p") and kv.used_tokens == 0
    assert (kv.pool.cached_free_blocks == 2) is caching


def test_with_caching_off_nothing_is_hashed_found_or_counted():
    kv = manager(8, caching=False)
    a = seq("a", prompt(0))
    assert admit(kv, a)
    kv.free(a)
    b = seq("b", prompt(0))
    assert kv.get_computed_blocks(b).num_tokens == 0
    assert admit(kv, b)
    assert list(b.block_hashes) == [] and not kv.pool.cached and kv.stats.requests == 0


def decoding(kv: KVManager, rid: str, first: int, tokens: int) -> SeqState:
    """A sequence admitted with `tokens` prompt tokens and one output token, decoding."""
    s = seq(rid, prompt(first, tokens), max_tokens=64)
    assert admit(kv, s)
    s.output_ids.append(5)
    return s


def test_a_decode_run_grows_as_its_steps_would_one_by_one():
    def batch(kv: KVManager) -> list[SeqState]:
        return [decoding(kv, "a", 0, 30), decoding(kv, "b", 100, 17)]

    bulk, stepped = manager(32), manager(32)
    seqs, ref = batch(bulk), batch(stepped)
    steps = 20
    growth = bulk.plan_decode_run(seqs, steps)
    assert growth.run_steps == steps and growth.blocks == 3
    for s, r in zip(seqs, ref, strict=True):  # the run's tokens exist before its KV
        s.output_ids.extend([9] * steps)
        r.output_ids.extend([9] * steps)
    bulk.allocate_decode_run(growth)
    for s in seqs:
        s.computed += steps
    for _ in range(steps):
        for r in ref:
            assert stepped.allocate_slots(r, r.computed + 1, r.computed + 1)
            r.computed += 1
    assert state(bulk) == state(stepped)
    for s, r in zip(seqs, ref, strict=True):
        assert (s.block_ids, s.cached_blocks, s.block_hashes) == (
            r.block_ids,
            r.cached_blocks,
            r.block_hashes,
        )


def test_a_decode_run_stops_before_the_step_the_pool_cannot_cover():
    kv = manager(5)
    a = decoding(kv, "a", 0, 30)  # 2 blocks for 30 computed: new ones at steps 2, 18, 34
    b = decoding(kv, "b", 100, 17)  # 2 blocks for 17 computed: at steps 15, 31
    assert kv.free_blocks == 1
    growth = kv.plan_decode_run([a, b], 40)
    assert growth.run_steps == 15 and growth.blocks == 1  # step 15 would need a second
    assert kv.free_blocks == 1  # planning takes nothing


def test_a_decode_run_with_subscribers_emits_as_stepping_would():
    kv = manager(16)
    events: list = []
    kv.subscribe(events.append)
    a = decoding(kv, "a", 0, 30)
    del events[:]
    growth = kv.plan_decode_run([a], 20)
    a.output_ids.extend([9] * 20)
    kv.allocate_decode_run(growth)
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert [e.block_hashes for e in stored] == [(a.block_hashes[1],), (a.block_hashes[2],)]
