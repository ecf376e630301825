"""Automatic prefix caching: the block pool's hash-chained cache and the core's use of it."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from engine_fakes import FakeClock, FakeStepModel
from prometheus_client.parser import text_string_to_metric_families

from memorywall.cli import build_parser
from memorywall.server.app import EmulatorServer, ServerConfig
from memorywall.server.engine.build import build_core
from memorywall.server.engine.kv import (
    AllBlocksCleared,
    BlockPool,
    BlockRemoved,
    BlockStored,
    hash_block_tokens,
)
from memorywall.server.engine.live import AsyncEngine
from memorywall.server.engine.scheduler import (
    EngineConfig,
    EngineCore,
    FinishReason,
    ModelLimits,
    Request,
    SeqState,
    Step,
)
from memorywall.server.fronts.metrics import PrometheusMetrics
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc

B = 16  # block size
TIMEOUT_S = 10.0
MAX_STEPS = 100_000


def make_core(*, caching: bool = True, kv_blocks: int = 4096, **config) -> EngineCore:
    limits = ModelLimits(
        kv_capacity_tokens=kv_blocks * B,
        max_context=8192,
        vocab_size=32_000,
        eos_token_ids=frozenset({0}),
    )
    config = EngineConfig(block_size=B, enable_prefix_caching=caching, **config)
    return EngineCore(FakeStepModel(), limits, config)


def request(rid: str, prompt: tuple[int, ...], max_tokens: int = 4) -> Request:
    return Request(request_id=rid, prompt_ids=prompt, max_tokens=max_tokens, ignore_eos=True)


SHARED = tuple(range(1000, 1000 + 3 * B))  # a 3-block prefix


def step(core: EngineCore, now: float) -> tuple[Step, float]:
    s = core.schedule(now)
    assert s is not None
    core.complete(s)
    return s, s.end_s


def run_all(core: EngineCore, now: float = 0.0) -> float:
    for _ in range(MAX_STEPS):
        if not core.has_work():
            return now
        _, now = step(core, now)
    raise AssertionError("livelock")


def first_chunk_of(core: EngineCore, seq: SeqState, s: Step):
    """The prefill chunk of `seq` in step `s` (the last batch the fake model saw)."""
    prefills = [(q, n) for q, n, d in s.scheduled if not d]
    i = [q for q, _ in prefills].index(seq)
    return core.step_model.batches[-1].prefill[i]


# --- hits and their cost ----------------------------------------------------------------------


@pytest.mark.parametrize("caching", [True, False])
def test_second_request_sharing_a_3_block_prefix_prefills_only_its_tail(caching):
    core = make_core(caching=caching)
    a = core.add(request("a", (*SHARED, 1, 2, 3, 4, 5)), 0.0)
    run_all(core)
    b = core.add(request("b", (*SHARED, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16)), 1.0)
    s, _ = step(core, 1.0)
    chunk = first_chunk_of(core, b, s)
    run_all(core, s.end_s)
    assert a.cached_tokens == 0
    if caching:
        assert b.cached_tokens == 48
        assert (chunk.new_tokens, chunk.cached_tokens) == (10, 48)
        assert s.cost.time_s == pytest.approx(0.01 + 1e-4 * 10)
    else:
        assert b.cached_tokens == 0
        assert (chunk.new_tokens, chunk.cached_tokens) == (58, 0)
        assert s.cost.time_s == pytest.approx(0.01 + 1e-4 * 58)
    assert len(b.output_ids) == 4


def test_hit_shortens_the_real_models_prefill(wse3_8b):
    prompt = tuple(range(1, 2001))

    def second_prefill_s(caching: bool) -> tuple[float, int]:
        core, _ = build_core(wse3_8b, EngineConfig(enable_prefix_caching=caching))
        core.add(request("a", prompt), 0.0)
        now = run_all(core)
        b = core.add(request("b", (*prompt, 5, 6, 7)), now)
        s, _ = step(core, now)
        return s.cost.time_s, b.cached_tokens

    cached_s, hit = second_prefill_s(True)
    full_s, none = second_prefill_s(False)
    assert (hit, none) == (2000 // B * B, 0)
    assert cached_s < full_s / 5


def test_full_prompt_hit_recomputes_the_last_block():
    core = make_core()
    core.add(request("a", SHARED), 0.0)
    now = run_all(core)
    b = core.add(request("b", SHARED), now)
    s, _ = step(core, now)
    chunk = first_chunk_of(core, b, s)
    assert b.cached_tokens == 32  # whole blocks, never the last token
    assert (chunk.new_tokens, chunk.cached_tokens, chunk.last) == (16, 32, True)
    assert len(b.output_ids) == 1  # its first token sampled in that step
    # One token past the blocks: all three blocks hit, one token computed.
    c = core.add(request("c", (*SHARED, 9)), s.end_s)
    s, _ = step(core, s.end_s)
    assert c.cached_tokens == 48
    assert (first_chunk_of(core, c, s).new_tokens, len(c.output_ids)) == (1, 1)


def test_generated_tokens_are_cached_as_their_blocks_fill():
    core = make_core()
    a = core.add(request("a", tuple(range(1, 21)), max_tokens=40), 0.0)
    run_all(core)
    # A follow-up turn: the whole first conversation is its prefix.
    history = a.request.prompt_ids + tuple(a.output_ids)  # 60 tokens: 3 full blocks
    b = core.add(request("b", (*history, 3, 4)), 10.0)
    run_all(core, 10.0)
    assert b.cached_tokens == 48


def test_requests_in_one_step_share_blocks_cached_by_the_earlier():
    core = make_core()
    a = core.add(request("a", (*SHARED, 1)), 0.0)
    b = core.add(request("b", (*SHARED, 2)), 0.0)
    s, _ = step(core, 0.0)
    assert {q for q, _, _ in s.scheduled} == {a, b}
    assert (a.cached_tokens, b.cached_tokens) == (0, 48)
    assert a.block_ids[:3] == b.block_ids[:3]


# --- reference counts, release, eviction ------------------------------------------------------


def test_concurrent_sharers_hold_one_reference_each():
    core = make_core()
    pool = core.kv.pool
    seqs = []
    now = 0.0
    for i in range(3):
        seqs.append(core.add(request(f"r{i}", (*SHARED, i + 1), max_tokens=50), now))
        _, now = step(core, now)
    shared = seqs[0].block_ids[:3]
    assert all(s.block_ids[:3] == shared for s in seqs)
    assert [pool.ref_counts[b] for b in shared] == [3, 3, 3]
    # Shared blocks count once: 3 shared + a 4th block each.
    assert pool.used_blocks == 3 + 3
    core.abort("r1")
    assert [pool.ref_counts[b] for b in shared] == [2, 2, 2]
    run_all(core, now)
    assert [pool.ref_counts[b] for b in shared] == [0, 0, 0]
    assert pool.used_blocks == 0 and pool.free_blocks == pool.total_blocks
    assert pool.lookup(seqs[0].block_hashes, 3) == list(shared)  # still cached


def test_abort_releases_references_and_keeps_blocks_cached():
    core = make_core()
    a = core.add(request("a", (*SHARED, 1), max_tokens=50), 0.0)
    _, now = step(core, 0.0)
    held = list(a.block_ids)
    core.abort("a")
    assert list(a.block_ids) == [] and a.blocks == 0
    assert all(core.kv.pool.ref_counts[b] == 0 for b in held)
    assert core.kv.pool.free_blocks == core.kv.pool.total_blocks
    b = core.add(request("b", (*SHARED, 2)), now)
    step(core, now)
    assert b.cached_tokens == 48
    assert list(b.block_ids[:3]) == held[:3]


def test_preemption_releases_and_readmission_finds_its_own_blocks():
    core = make_core(kv_blocks=6)
    seqs = [
        core.add(request(f"r{i}", tuple(range(100 * i + 1, 100 * i + 33)), max_tokens=40), 0.0)
        for i in range(3)
    ]  # 2 blocks of prompt each, 5 blocks to finish: they cannot all run at once
    now = 0.0
    preempted = False
    for _ in range(MAX_STEPS):
        if not core.has_work():
            break
        _, now = step(core, now)
        for s in seqs:
            if s in core.waiting:
                preempted |= s.preemptions > 0
                assert list(s.block_ids) == [] and s.blocks == 0 and s.computed == 0
        assert sum(core.kv.pool.ref_counts) == sum(len(s.block_ids) for s in seqs)
    assert preempted
    stats = core.prefix_cache_stats()
    assert stats.requests == 3 and stats.hits == 0
    assert stats.preempted_requests == core.counters.preemptions
    assert stats.preempted_hits > 0  # recompute found blocks it had computed
    assert all(s.finish_reason is FinishReason.LENGTH for s in seqs)
    assert all(s.cached_tokens == 0 for s in seqs)  # cached_tokens is the first admission's
    assert core.kv.pool.free_blocks == core.kv.pool.total_blocks


def test_eviction_takes_empty_blocks_first_then_least_recently_freed():
    pool = BlockPool(total_blocks=4, block_size=2)
    events = []
    pool.subscribe(events.append)
    a, b = pool.allocate(2), pool.allocate(2)
    ha = [hash_block_tokens(None, (1, 2)), hash_block_tokens(None, (3, 4))]
    hb = [hash_block_tokens(None, (5, 6)), hash_block_tokens(None, (7, 8))]
    pool.cache(a, [ha[0]], 0, 1, lambda s, e: (1, 2)[s:e])  # a's second block stays uncached
    pool.cache(b, hb, 0, 2, lambda s, e: (5, 6, 7, 8)[s:e])
    pool.release(b)  # freed first: evicted first; its tail before its head
    pool.release(a)
    assert pool.free_blocks == 4 and pool.cached_free_blocks == 3
    events.clear()
    assert list(pool.allocate(1)) == [a[1]]  # the uncached block: nothing evicted
    assert events == []
    assert list(pool.allocate(2)) == [b[1], b[0]]
    assert events == [BlockRemoved((hb[1],)), BlockRemoved((hb[0],))]
    assert pool.lookup(hb, 2) == [] and pool.lookup(ha, 2) == [a[0]]
    assert pool.allocate(2) is None  # one free block left; nothing taken
    assert pool.free_blocks == 1


def test_a_hit_on_a_free_block_takes_it_out_of_the_eviction_queue():
    pool = BlockPool(total_blocks=2, block_size=1)
    x = pool.allocate(2)
    hashes = [hash_block_tokens(None, (1,)), hash_block_tokens(None, (2,))]
    pool.cache(x, hashes, 0, 2, lambda s, e: (1, 2)[s:e])
    pool.release(x)
    hit = pool.lookup(hashes, 1)
    assert pool.free_among(hit) == 1
    pool.touch(hit)
    assert pool.free_blocks == 1 and pool.ref_counts[x[0]] == 1
    assert list(pool.allocate(1)) == [x[1]]  # the only evictable one
    assert pool.allocate(1) is None
    with pytest.raises(AssertionError):
        pool.release([x[1], x[1]])


def test_block_stored_events_name_consecutive_blocks_and_their_parent():
    core = make_core()
    events = []
    unsubscribe = core.kv.subscribe(events.append)
    a = core.add(request("a", (*SHARED, 1, 2), max_tokens=20), 0.0)
    _s, now = step(core, 0.0)
    assert events == [
        BlockStored(
            block_hashes=tuple(a.block_hashes[:3]),
            parent_block_hash=None,
            token_ids=SHARED,
            block_size=B,
        )
    ]
    run_all(core, now)  # 50 + 20 tokens: block 3 fills while decoding
    assert events[1] == BlockStored(
        block_hashes=(a.block_hashes[3],),
        parent_block_hash=a.block_hashes[2],
        token_ids=(1, 2, *a.output_ids[:14]),
        block_size=B,
    )
    assert len(events) == 2
    unsubscribe()
    assert core.kv.pool.reset_prefix_cache()
    assert len(events) == 2
    events2 = []
    core.kv.subscribe(events2.append)
    core.add(request("b", (*SHARED, 1), max_tokens=20), now)
    step(core, now)
    assert not core.kv.pool.reset_prefix_cache()  # b holds blocks
    run_all(core, now)
    assert core.kv.pool.reset_prefix_cache()
    assert events2[-1] == AllBlocksCleared()
    assert not core.kv.pool.cached and core.kv.pool.cached_free_blocks == 0


def test_without_subscribers_no_event_is_built():
    pool = BlockPool(total_blocks=2, block_size=1)
    x = pool.allocate(1)

    def explode(s, e):
        raise AssertionError("token ids fetched with nobody listening")

    pool.cache(x, [hash_block_tokens(None, (1,))], 0, 1, explode)


# --- a random workload with shared prefixes ---------------------------------------------------


def check_pool(core: EngineCore, snapshot: dict) -> None:
    pool = core.kv.pool
    refs = pool.ref_counts
    live = list(core.live.values())
    held = [b for s in live for b in s.block_ids]
    assert pool.used_blocks + pool.free_blocks == pool.total_blocks
    assert all(r >= 0 for r in refs)
    assert sum(refs) == len(held)
    assert len(set(held)) == pool.used_blocks
    assert sum(1 for r in refs if r > 0) == pool.used_blocks
    # Each cached hash names one block, and that block carries it.
    assert len(set(pool.cached.values())) == len(pool.cached)
    for h, block in pool.cached.items():
        assert pool.block_hashes[block] == h
    assert sum(1 for h in pool.block_hashes if h is not None) == len(pool.cached)
    # The eviction queue holds exactly the unreferenced cached blocks.
    assert all(refs[b] == 0 and pool.block_hashes[b] is not None for b in pool._lru)
    assert all(refs[b] == 0 and pool.block_hashes[b] is None for b in pool._empty)
    never_used = pool.total_blocks - len(refs)
    assert never_used + len(pool._lru) + len(pool._empty) == pool.free_blocks
    # No referenced block was evicted: a held block keeps the hash it had.
    now = {}
    for s in live:
        for i, b in enumerate(s.block_ids):
            h = pool.block_hashes[b]
            if h is not None:
                assert h == s.block_hashes[i]
                now[(id(s), i, b)] = h
    for key, h in now.items():
        if key in snapshot:
            assert snapshot[key] == h
    for key in [k for k in snapshot if k not in now]:
        del snapshot[key]
    snapshot.update(now)


def random_workload(
    seed: int, caching: bool = True, check: bool = True
) -> tuple[EngineCore, list[SeqState]]:
    rng = random.Random(seed)
    core = make_core(caching=caching, kv_blocks=rng.randint(26, 50), max_num_seqs=rng.randint(2, 8))
    prefixes = [tuple(rng.randrange(1, 32_000) for _ in range(rng.randint(1, 80))) for _ in "abc"]
    arrivals = []
    for i in range(40):
        tail = tuple(rng.randrange(1, 32_000) for _ in range(rng.randint(0, 40)))
        prompt = (rng.choice(prefixes) + tail)[:300] or (1,)
        abort_after = rng.choice([None, None, None, rng.randint(0, 30)])
        arrivals.append((rng.randint(0, 40), request(f"r{i}", prompt, rng.randint(1, 80))))
        arrivals[-1] += (abort_after,)
    arrivals.sort(key=lambda x: x[0])
    added: list[SeqState] = []
    abort_at: dict[int, list[str]] = {}
    snapshot: dict = {}
    now = 0.0
    for step_no in range(MAX_STEPS):
        while arrivals and arrivals[0][0] <= step_no:
            _, req, abort_after = arrivals.pop(0)
            added.append(core.add(req, now))
            if abort_after is not None:
                abort_at.setdefault(step_no + abort_after, []).append(req.request_id)
        for rid in abort_at.pop(step_no, []):
            core.abort(rid)
        if check:
            check_pool(core, snapshot)
        if not core.has_work():
            if not arrivals:
                break
            continue
        s = core.schedule(now)
        assert s is not None
        if check:
            check_pool(core, snapshot)
        core.complete(s)
        now = s.end_s
        if check:
            check_pool(core, snapshot)
    assert not core.live
    assert core.kv.pool.free_blocks == core.kv.pool.total_blocks
    return core, added


@pytest.mark.parametrize("seed", range(12))
def test_invariants_hold_after_every_step_of_a_shared_prefix_workload(seed):
    core, added = random_workload(seed)
    stats = core.prefix_cache_stats()
    assert stats.requests == sum(1 for s in added if s.first_scheduled_s is not None)
    assert stats.hits == sum(s.cached_tokens for s in added)
    assert 0 <= stats.hits <= stats.queries
    assert stats.hit_rate == stats.hits / stats.queries


def test_same_seed_same_hit_rate():
    cores = [random_workload(s, check=False)[0] for s in (0, 0, 3)]
    runs = [core.prefix_cache_stats() for core in cores]
    assert cores[0].counters.preemptions > 0  # the workload exercises preemption too
    assert runs[0] == runs[1]
    assert runs[0].hits > 0
    assert runs[0] != runs[2]


@pytest.mark.parametrize("seed", range(3))
def test_no_prefix_caching_reports_no_cached_tokens(seed):
    core, added = random_workload(seed, caching=False)
    stats = core.prefix_cache_stats()
    assert (stats.requests, stats.queries, stats.hits, stats.hit_rate) == (0, 0, 0, None)
    assert not core.kv.pool.cached
    assert all(s.cached_tokens == 0 for s in added)


def test_serve_flag_turns_prefix_caching_off():
    parser = build_parser()
    base = ["serve", "--hardware", "wse-3", "--model", "llama-3.1-8b"]
    assert parser.parse_args(base).prefix_caching is True
    assert parser.parse_args([*base, "--no-prefix-caching"]).prefix_caching is False
    assert EngineConfig().enable_prefix_caching is True


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize("caching", [True, False])
async def test_grpc_usage_reports_cached_tokens(wse3_8b, caching):
    server = EmulatorServer(
        wse3_8b,
        EngineConfig(enable_prefix_caching=caching),
        ServerConfig(port=0, load_format="dummy"),
    )
    await server.start()
    channel = grpc.aio.insecure_channel(server.target, options=[("grpc.enable_http_proxy", 0)])
    try:
        stub = engine_pb2_grpc.EngineStub(channel)

        async def usage(rid: str) -> pb.Usage:
            req = pb.GenerateRequest(
                request_id=rid,
                token_ids=pb.TokenIds(ids=list(range(1, 101))),
                max_tokens=3,
                ignore_eos=True,
            )
            responses = [r async for r in stub.Generate(req)]
            return responses[-1].finished.usage

        first = await asyncio.wait_for(usage("first"), TIMEOUT_S)
        second = await asyncio.wait_for(usage("second"), TIMEOUT_S)
    finally:
        await channel.close()
        await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)
    assert (first.prompt_tokens, first.cached_tokens) == (100, 0)
    assert (second.prompt_tokens, second.cached_tokens) == (100, 96 if caching else 0)


async def test_prometheus_counts_prefix_cache_tokens(wse3_8b):
    core, _ = build_core(wse3_8b, EngineConfig())
    metrics = PrometheusMetrics.for_deployment(wse3_8b, model_name="m")
    engine = AsyncEngine(core, clock=FakeClock(), max_messages_per_s=16_000, observers=[metrics])
    await engine.start()
    try:
        for rid in ("a", "b"):
            stream = engine.submit(request(rid, tuple(range(1, 101)), max_tokens=2))
            events = await asyncio.wait_for(_drain(stream), TIMEOUT_S)
    finally:
        await engine.stop()
    assert events[-1].cached_tokens == 96
    body, _ = metrics.render()
    samples = {
        s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
    }
    assert samples["vllm:prefix_cache_queries_total"] == 200
    assert samples["vllm:prefix_cache_hits_total"] == 96
    assert core.prefix_cache_stats().hit_rate == 96 / 200


async def _drain(stream):
    return [event async for event in stream]
