"""The compiled kernel (`_kernel.c`) against its pure-Python reference, on randomised
workloads: block hashes, the block pool op by op (state and events), token draws, and
whole engines (offline, with prefix sharing, preemption, aborts and kept KV)."""

from __future__ import annotations

import os
import random
from array import array
from types import SimpleNamespace

import pytest
from engine_fakes import FakeStepModel

from memorywall.cli import main
from memorywall.cli.simulate import speed_line
from memorywall.core.lora import LoraAdapter
from memorywall.server.engine import kernel
from memorywall.server.engine.kv import (
    ROOT_HASH,
    BlockPool,
    CompiledBlockPool,
    KVEvent,
    extend_block_hashes,
    make_block_pool,
    tokens_of,
)
from memorywall.server.engine.offline import OfflineEngine
from memorywall.server.engine.scheduler import EngineConfig, EngineCore, ModelLimits, Request
from memorywall.server.engine.tokens import _TABLE, CompiledTokenSource, TokenSource

if kernel.compiled is None and os.environ.get("MEMORYWALL_CI") == "1":
    pytest.fail("the compiled kernel is not built (pip install -e . builds it)", pytrace=False)
pytestmark = pytest.mark.skipif(
    kernel.compiled is None, reason="the compiled kernel is not built (pip install -e .)"
)


def test_block_hashes_are_cpythons_over_random_tokens_and_parents():
    rng = random.Random(1)
    for _ in range(2_000):
        size = rng.choice([1, 2, 3, 16, 17])
        top = rng.choice([2, 32_000, 2**31, 2**62])  # past 2**61 - 1: int hashes wrap
        n = rng.randrange(0, 6 * size)
        prompt = tuple(rng.randrange(top) for _ in range(rng.randint(1, n + 1)))
        output = [rng.randrange(top) for _ in range(n + 1 - len(prompt))]
        blocks = (len(prompt) + len(output)) // size
        # A random parent (any signed 64-bit value) as an existing chain's last hash.
        start = [rng.randrange(-(2**63), 2**63)] if blocks and rng.random() < 0.5 else []
        full = rng.randint(len(start), blocks)
        want = extend_block_hashes(list(start), full, size, tokens_of(prompt, output))
        got = kernel.compiled.extend_hashes(list(start), full, size, ROOT_HASH, prompt, output)
        assert got == want, (size, prompt, output, start)
        if top < 2**63:  # the engine's form: output ids as machine integers, read in place
            ids = array("q", output)
            got = kernel.compiled.extend_hashes(list(start), full, size, ROOT_HASH, prompt, ids)
            assert got == want, (size, prompt, output, start)
            ref = extend_block_hashes(list(start), full, size, tokens_of(prompt, ids))
            assert ref == want


# Ints whose hashes take each path of the kernel's in-place read (0, one and two 30-bit
# digits, either sign, -1 whose hash is -2) and of PyObject_Hash (past two digits, past
# 2**61 - 1 where int hashes wrap, bools, anything else).
EDGE_INTS = [0, 1, -1, -2, 2**30 - 1, 2**30, -(2**30), 2**60 - 1, 2**60, -(2**60) + 1]
EDGE_INTS += [2**61 - 2, 2**61 - 1, 2**61, 2**62, -(2**62), 2**63 - 1, -(2**63)]


def _edge_int(rng: random.Random) -> int:
    if rng.random() < 0.5:
        return rng.choice(EDGE_INTS)
    bits = rng.randint(1, 63)
    return rng.randrange(-(2**bits), 2**bits)


def test_block_hashes_read_every_kind_of_token_as_cpython_hashes_it():
    rng = random.Random(3)
    for _ in range(3_000):
        size = rng.choice([1, 2, 5, 16])
        prompt = tuple(_edge_int(rng) for _ in range(rng.randint(1, 3 * size)))
        output = [_edge_int(rng) for _ in range(rng.randint(0, 3 * size))]
        full = (len(prompt) + len(output)) // size
        want = extend_block_hashes([], full, size, tokens_of(prompt, output))
        for ids in (output, array("q", output)):
            got = kernel.compiled.extend_hashes([], full, size, ROOT_HASH, prompt, ids)
            assert got == want, (size, prompt, output)
    # A prompt holding other objects still hashes as CPython hashes it.
    prompt = (True, 2**70, -(2**65), 7)
    want = extend_block_hashes([], 2, 2, tokens_of(prompt, []))
    assert kernel.compiled.extend_hashes([], 2, 2, ROOT_HASH, prompt, array("q")) == want


def test_block_hashes_refuse_output_ids_of_another_width():
    with pytest.raises(TypeError, match="array\\('q'\\)"):
        kernel.compiled.extend_hashes([], 1, 2, ROOT_HASH, (1,), array("i", [2]))


def test_hash_tuple_is_cpythons_hash():
    rng = random.Random(4)
    for _ in range(5_000):
        prompt = tuple(_edge_int(rng) for _ in range(rng.randint(0, 20)))
        key = (rng.randrange(2**64), rng.random() < 0.5, _edge_int(rng), prompt)
        assert kernel.compiled.hash_tuple(key) == hash(key)
        assert kernel.compiled.hash_tuple(prompt) == hash(prompt)
    nested = (1, ("a", 2.5, (3,)), None)  # anything else goes through PyObject_Hash
    assert kernel.compiled.hash_tuple(nested) == hash(nested)
    with pytest.raises(TypeError):
        kernel.compiled.hash_tuple([1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unhashable"):
        kernel.compiled.hash_tuple((1, ([],)))


def _snapshot(pool: BlockPool) -> tuple:
    return (
        pool.free_blocks,
        pool.used_blocks,
        pool.cached_free_blocks,
        list(pool.ref_counts),
        list(pool.block_hashes),
        dict(pool.cached),
        list(pool._lru),
        list(pool._empty),
    )


def _either_form(rng: random.Random, hashes: list[int]) -> list[int] | array[int]:
    """Block hashes as a list or as the engine keeps them, an array('q')."""
    return array("q", hashes) if rng.random() < 0.5 else hashes


def _pool_ops(seed: int) -> None:
    """One random sequence of pool operations, applied to both pools and compared."""
    rng = random.Random(seed)
    total, size = rng.randint(1, 40), rng.choice([1, 2, 4])
    ref, comp = BlockPool(total, size), CompiledBlockPool(total, size)
    events: tuple[list[KVEvent], list[KVEvent]] = ([], [])
    if rng.random() < 0.5:
        ref.subscribe(events[0].append)
        comp.subscribe(events[1].append)
    held: list[list[int]] = []
    names = [rng.randrange(-(2**63), 2**63) for _ in range(12)]  # few: hashes collide often
    for _ in range(rng.randint(1, 60)):
        op = rng.random()
        if op < 0.35:
            n = rng.randint(0, total + 1)
            got = (ref.allocate(n), comp.allocate(n))
            assert got[0] == got[1]
            if got[0]:
                held.append(got[0])
        elif op < 0.55 and held:
            blocks = held.pop(rng.randrange(len(held)))
            ref.release(blocks)
            comp.release(blocks if rng.random() < 0.5 else list(blocks))
        elif op < 0.75 and held:
            blocks = rng.choice(held)
            hashes = [rng.choice(names) for _ in blocks]
            start = rng.randint(0, len(blocks))
            end = rng.randint(start, len(blocks))
            tokens = tuple(range(len(blocks) * size))

            def token_ids(a: int, b: int, tokens: tuple[int, ...] = tokens) -> tuple[int, ...]:
                return tokens[a:b]

            ref.cache(blocks, hashes, start, end, token_ids)
            comp.cache(blocks, _either_form(rng, hashes), start, end, token_ids)
        elif op < 0.9:
            hashes = [rng.choice(names) for _ in range(rng.randint(0, 5))]
            hits = ref.lookup(hashes, rng.randint(0, 5))
            either = _either_form(rng, hashes)
            assert comp.lookup(either, len(hashes)) == ref.lookup(hashes, len(hashes))
            assert comp.any_cached(either) == ref.any_cached(hashes)
            if hits and rng.random() < 0.5:  # admit from the hit, as `KVManager._admit` does
                assert comp.free_among(hits) == ref.free_among(hits)
                need = rng.randint(0, 3)
                taken = ref.take(hits, need)
                assert comp.take(hits, need) == taken
                if taken is not None:
                    held.append(taken)
        else:
            assert ref.reset_prefix_cache() == comp.reset_prefix_cache()
        assert _snapshot(ref) == _snapshot(comp)
        assert events[0] == events[1]


def test_pool_matches_the_reference_op_by_op_over_thousands_of_seeds():
    for seed in range(3_000):
        _pool_ops(seed)


def test_block_tables_are_machine_integers_in_both_pools():
    for pool in (BlockPool(8, 2), CompiledBlockPool(8, 2)):
        blocks = pool.allocate(3)
        assert isinstance(blocks, array) and blocks.typecode == "q"
        pool.cache(blocks, array("q", [11, 12, 13]), 0, 2, lambda a, b: tuple(range(a, b)))
        pool.release(blocks)
        taken = pool.take(pool.lookup(array("q", [11, 12]), 2), 1)
        assert isinstance(taken, array) and list(taken) == [0, 1, 2]


def test_pool_refuses_block_ids_it_never_handed_out():
    pool = CompiledBlockPool(8, 2)
    pool.allocate(2)
    for bad in ([5], array("q", [5]), array("q", [-1])):
        with pytest.raises(IndexError, match="never handed out"):
            pool.release(bad)
    with pytest.raises(TypeError, match="array\\('q'\\)"):
        pool.release(array("i", [0]))


def test_pool_refuses_a_double_release_as_the_reference_does():
    for pool in (BlockPool(4, 1), CompiledBlockPool(4, 1)):
        blocks = pool.allocate(2)
        pool.release(blocks)
        with pytest.raises(AssertionError, match="released more often"):
            pool.release(blocks)


def test_token_draws_match_the_reference():
    rng = random.Random(2)
    for _ in range(2_000):
        seed = rng.randrange(2**64)
        vocab = rng.choice([1, 2, 7, 32_000, 128_256])
        eos = frozenset(rng.sample(range(vocab), min(vocab - 1, rng.randint(0, 3))))
        ref, comp = TokenSource(seed, vocab, eos), CompiledTokenSource(seed, vocab, eos)
        n = rng.choice([1, 5, 300])
        ref.expect(n)
        comp.expect(n)
        for _ in range(rng.randint(1, 4)):
            k = rng.randint(1, 2 * n)
            want = ref.next_ids(k)
            assert type(want) is list and comp.next_ids(k) == want
            want = ref.next_each(k)
            assert type(want) is array and want.typecode == "q"
            assert comp.next_each(k) == want
    # Across a table boundary: draws 4,000 to 4,200 span two blocks of the table.
    ref, comp = TokenSource(5, 1000, frozenset()), CompiledTokenSource(5, 1000, frozenset())
    ref._drawn = comp._drawn = len(_TABLE) - 96
    assert comp._draw(200) == ref._draw(200)


ADAPTER = LoraAdapter(name="a", lora_id=1, rank=8, target_modules=("q_proj",), params=1)


def _limits(rng: random.Random) -> ModelLimits:
    return ModelLimits(
        kv_capacity_tokens=rng.randint(30, 120) * 4,
        max_context=4096,
        vocab_size=rng.choice([50, 32_000]),
        eos_token_ids=frozenset({0}),
        draft_tokens=rng.choice([0, 0, 0, 2]),
        acceptance_rate=0.6,
    )


def _engine_run(seed: int, compiled: bool) -> tuple:
    """A random offline workload: shared prefixes (cache hits), KV pressure (preemption),
    stop tokens, kept KV, LoRA adapters' own hash roots, the decode-run fast path or not.
    Everything it produced."""
    rng = random.Random(seed)
    limits = _limits(rng)
    config = EngineConfig(
        block_size=4,
        max_num_seqs=rng.randint(1, 12),
        max_num_batched_tokens=rng.choice([16, 64, 4096]),
        seed=seed,
        enable_prefix_caching=rng.random() < 0.8,
    )
    with kernel.use(compiled):
        core = EngineCore(FakeStepModel(), limits, config)
    assert isinstance(core.kv.pool, CompiledBlockPool) is compiled
    events: list[KVEvent] = []
    if rng.random() < 0.3:
        core.kv.subscribe(events.append)
    engine = OfflineEngine(core, fast=rng.random() < 0.7)
    prefixes = [tuple(rng.randrange(1, 50) for _ in range(rng.randint(1, 24))) for _ in "ab"]
    for i in range(rng.randint(1, 30)):
        prompt = rng.choice(prefixes) + tuple(
            rng.randrange(1, 50) for _ in range(rng.randint(0, 9))
        )
        request = Request(
            request_id=str(i),
            prompt_ids=prompt,
            max_tokens=rng.randint(1, 40),
            ignore_eos=rng.random() < 0.7,
            stop_token_ids=frozenset({7}) if rng.random() < 0.2 else frozenset(),
            keep_kv=rng.random() < 0.1,
            # An adapter's blocks hash from a root of their own (`kv.hash_root`).
            lora=rng.choice([None, None, ADAPTER]),
        )
        engine.submit(request, rng.random() * 0.3)
    # A kept request's KV goes back when it finishes (as a transfer's end frees it): held
    # on, it could leave too few blocks for the rest to ever run.
    engine.on_finish = lambda t: core.kv.release_kept(t.request_id)
    engine.run()
    out = [
        (
            t.request_id,
            t.group_times_s,
            t.group_tokens,
            t.completion_tokens,
            t.cached_tokens,
            t.preemptions,
            t.energy_j,
            t.reason,
            None if t.error is None else str(t.error),
        )
        for t in [*engine.timelines.values(), *engine.refused]
    ]
    pool = core.kv.pool
    return out, engine.totals(), core.prefix_cache_stats(), events, _snapshot(pool)


def test_engines_with_and_without_the_kernel_agree_over_many_seeds():
    for seed in range(300):
        assert _engine_run(seed, True) == _engine_run(seed, False), seed


def test_without_the_kernel_the_engine_says_so_once(monkeypatch, capsys):
    monkeypatch.setattr(kernel, "compiled", None)
    monkeypatch.setattr(kernel, "_enabled", False)
    monkeypatch.setattr(kernel, "_noticed", False)
    assert type(make_block_pool(8, 4)) is BlockPool
    make_block_pool(8, 4)
    err = capsys.readouterr().err
    assert err.count("compiled kernel: not built") == 1
    assert "pip install -e ." in err
    with pytest.raises(RuntimeError, match="not built"), kernel.use(True):
        pass


def test_switched_off_it_is_quiet_and_pure(monkeypatch, capsys):
    monkeypatch.setattr(kernel, "_noticed", False)
    with kernel.use(False):
        assert type(make_block_pool(8, 4)) is BlockPool
        assert "off" in kernel.status()
    assert capsys.readouterr().err == ""
    assert type(make_block_pool(8, 4)) is CompiledBlockPool
    assert kernel.status().startswith("compiled kernel: on")


def test_doctor_says_whether_the_kernel_is_on(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == kernel.status()
    assert "compiled kernel: on" in out


def test_simulate_speed_line_says_when_the_engine_runs_without_the_kernel():
    lr = SimpleNamespace(
        modelled_s=2.0, wall_s=1.0, speedup=2.0, tokens=10, steps=3, cpu_s=0.9, engine_cpu_s=0.5
    )
    assert speed_line(lr).endswith("3 steps)")
    with kernel.use(False):
        assert speed_line(lr).endswith("; pure-Python engine: the compiled kernel is off")
