"""The one owner of an engine's KV state, as vLLM v1's `KVCacheManager`.

`KVManager` alone allocates and frees blocks (through its `BlockPool`, or the compiled
`CompiledBlockPool`), keeps each sequence's blocks and prefix hashes, enters full blocks
into the prefix cache, counts lookups, and keeps a finished `Request.keep_kv` request's
blocks until `release_kept`. The scheduler asks it for room (`allocate_slots` answers
False and takes nothing when there is none) and decides whom to preempt; the decode-run
fast path plans and applies many steps' growth through `plan_decode_run` and
`allocate_decode_run`. Neither sees a block id.

A sequence's KV fields (`blocks`, `block_ids`, `block_hashes`, `cached_blocks` on
`SeqState`) stay on the sequence, written here alone: a slot read is the cheapest
access on the scheduler's per-step path, where a dict keyed by sequence would add a
lookup per sequence per step.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from memorywall.server.engine.kv import (
    KVEvent,
    KVPool,
    PrefixCacheStats,
    blocks_for,
)
from memorywall.server.engine.tokens import ids_array

if TYPE_CHECKING:
    from memorywall.server.engine.scheduler import SeqState


@dataclass(slots=True)
class ComputedBlocks:
    """A sequence's longest cached prefix, found by `get_computed_blocks`: opaque blocks
    (no reference taken yet) and the `num_tokens` they hold."""

    _blocks: list[int]
    num_tokens: int


class KVManager:
    """Blocks, prefix cache and kept KV of one engine, over one `BlockPool`."""

    def __init__(self, pool: KVPool, *, enable_prefix_caching: bool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        # Finished `keep_kv` requests' blocks, by request id; read-only outside this class.
        self.kept: dict[str, array[int]] = {}
        self._none = ComputedBlocks([], 0)

    # what it holds

    @property
    def free_blocks(self) -> int:
        return self.pool.free_blocks

    @property
    def used_tokens(self) -> int:
        return self.pool.used_blocks * self.block_size

    @property
    def capacity_tokens(self) -> int:
        return self.pool.capacity_tokens

    def subscribe(self, callback: Callable[[KVEvent], None]) -> Callable[[], None]:
        """`BlockPool.subscribe`: KV events from now on; returns the unsubscribe function."""
        return self.pool.subscribe(callback)

    def is_kept(self, request_id: str) -> bool:
        return request_id in self.kept

    # admission and growth

    def get_computed_blocks(self, seq: SeqState) -> ComputedBlocks:
        """The cached blocks of `seq`'s longest cached prefix, leaving its last token to
        compute; none with prefix caching off. Takes no reference and counts nothing."""
        if not self.caching:
            return self._none
        size = self.block_size
        total = seq.total_tokens
        pool = self.pool
        hashes = pool.hash_blocks(
            seq.block_hashes, total // size, seq.request.prompt_ids, seq.output_ids, seq.hash_root
        )
        hits = pool.lookup(hashes, (total - 1) // size)
        return ComputedBlocks(hits, len(hits) * size)

    def allocate_slots(
        self,
        seq: SeqState,
        kv_tokens: int,
        filled_tokens: int,
        new_computed: ComputedBlocks | None = None,
    ) -> bool:
        """Blocks for `seq`'s first `kv_tokens` tokens, and its first `filled_tokens`
        tokens' full blocks (the step being planned computes them) offered to the prefix
        cache. False, with nothing taken or cached, when too few blocks are free.

        `new_computed` admits a sequence holding no blocks: it takes a reference on its
        cached prefix (`get_computed_blocks`) and the rest fresh, and the lookup counts
        in `stats` (only an admission that succeeds counts).
        """
        if new_computed is not None:
            return self._admit(seq, kv_tokens, filled_tokens, new_computed)
        size = self.block_size
        if kv_tokens > seq.blocks * size:
            need = blocks_for(kv_tokens, size) - seq.blocks
            new = self.pool.allocate(need)
            if new is None:
                return False
            seq.block_ids += new
            seq.blocks += need
        if self.caching and filled_tokens // size > seq.cached_blocks:
            self.cache_full_blocks(seq, filled_tokens // size)
        return True

    def _admit(
        self, seq: SeqState, kv_tokens: int, filled_tokens: int, hit: ComputedBlocks
    ) -> bool:
        """`allocate_slots` for a sequence holding no blocks, from its cached prefix."""
        size = self.block_size
        pool = self.pool
        hits = hit._blocks
        blocks = pool.take(hits, blocks_for(kv_tokens, size) - len(hits))
        if blocks is None:
            return False
        seq.block_ids = blocks
        seq.blocks = len(blocks)
        seq.cached_blocks = len(hits)
        if self.caching:
            self._count_lookup(seq, hit.num_tokens)
            if filled_tokens // size > seq.cached_blocks:
                self.cache_full_blocks(seq, filled_tokens // size)
        return True

    def _count_lookup(self, seq: SeqState, hit_tokens: int) -> None:
        stats = self.stats
        total = seq.total_tokens
        if seq.preemptions:
            stats.preempted_requests += 1
            stats.preempted_queries += total
            stats.preempted_hits += hit_tokens
        else:
            stats.requests += 1
            stats.queries += total
            stats.hits += hit_tokens

    def cache_full_blocks(self, seq: SeqState, full_blocks: int) -> None:
        """Offer `seq`'s first `full_blocks` blocks (computed, or computed by the step
        being planned) to the prefix cache."""
        pool = self.pool
        hashes = pool.hash_blocks(
            seq.block_hashes, full_blocks, seq.request.prompt_ids, seq.output_ids, seq.hash_root
        )
        pool.cache(seq.block_ids, hashes, seq.cached_blocks, full_blocks, seq.token_ids)
        seq.cached_blocks = full_blocks

    # release

    def free(self, seq: SeqState) -> None:
        """Give back `seq`'s references; its cached blocks stay findable until evicted."""
        self.pool.release(seq.block_ids)
        seq.block_ids = ids_array()
        seq.blocks = 0
        seq.cached_blocks = 0

    def keep(self, seq: SeqState) -> None:
        """Move a finished `keep_kv` sequence's blocks, references and all, to `kept`
        under its request id, until `release_kept`: a KV transfer still reads them."""
        self.kept[seq.request.request_id] = seq.block_ids
        seq.block_ids = ids_array()
        seq.blocks = 0
        seq.cached_blocks = 0

    def release_kept(self, request_id: str) -> bool:
        """Free the blocks a finished `keep_kv` request kept (its full blocks stay in the
        prefix cache, as any finished request's); False if it keeps none."""
        blocks = self.kept.pop(request_id, None)
        if blocks is None:
            return False
        self.pool.release(blocks)
        return True

    # many decode steps at once (`decode_run`)

    def plan_decode_run(self, seqs: list[SeqState], steps: int) -> DecodeGrowth:
        """The blocks `seqs`, each decoding one token a step, grow by over at most `steps`
        steps: cut short before the first step the free blocks do not cover (that step
        preempts, which is `schedule`'s to do). Changes nothing."""
        growth = DecodeGrowth.of(seqs, steps, self.block_size)
        free = self.pool.free_blocks
        if growth.blocks > free:
            growth = DecodeGrowth.of(seqs, min(steps, growth.step_of(free)), self.block_size)
        return growth

    def allocate_decode_run(self, growth: DecodeGrowth) -> None:
        """Apply a planned run's KV changes, leaving blocks, prefix cache and events as
        `allocate_slots` would leave them over its steps one by one. The sequences'
        tokens of the run must be generated already (their full blocks are hashed)."""
        if not self._decode_run_in_bulk(growth):
            pool = self.pool
            seqs = growth.seqs
            for _, i, kind, count in self._decode_run_events(growth):
                seq = seqs[i]
                if kind == _GROW:
                    grown = pool.allocate(count)
                    assert grown is not None  # the plan cut the run where KV runs out
                    seq.block_ids += grown
                    seq.blocks += count
                else:
                    self.cache_full_blocks(seq, count)

    def _decode_run_events(self, growth: DecodeGrowth) -> list[tuple[int, int, int, int]]:
        """(step, position in the batch, grow or cache, blocks) in the order `schedule`
        meets them: the run's new blocks one at a time, and a block offered to the prefix
        cache the step that fills it."""
        steps = growth.run_steps
        grows = zip(growth.steps.tolist(), growth.owners().tolist(), strict=True)
        events = [(j, i, _GROW, 1) for j, i in grows]
        if self.caching:
            size = self.block_size
            for i, seq in enumerate(growth.seqs):
                c, cached = seq.computed, seq.cached_blocks
                j = max(0, (cached + 1) * size - c - 1)
                while j < steps:
                    cached = (c + j + 1) // size
                    events.append((j, i, _CACHE, cached))
                    j = (cached + 1) * size - c - 1
        events.sort()
        return events

    def _decode_run_in_bulk(self, growth: DecodeGrowth) -> bool:
        """Apply the run's KV changes with one allocation and one cache call per sequence,
        when that ends as taking them one by one would; else change nothing, return False.

        Equal when nobody watches the events' order, and none of the blocks the run fills
        is cached already (by another block, or by another sequence in the run): then
        evicting before caching can change no duplicate check, and the blocks handed out
        are the same ones in the same order (`DecodeGrowth.allocation_order`). A
        sequence's last cached block after the run is the last its tokens fill."""
        pool = self.pool
        if pool.has_subscribers:
            return False
        size = self.block_size
        steps = growth.run_steps
        cache_to = []
        if self.caching:
            fresh = ids_array()
            for seq in growth.seqs:
                full = (seq.computed + steps) // size
                if full > seq.cached_blocks:
                    hashes = pool.hash_blocks(
                        seq.block_hashes,
                        full,
                        seq.request.prompt_ids,
                        seq.output_ids,
                        seq.hash_root,
                    )
                    fresh.extend(hashes[seq.cached_blocks : full])
                    cache_to.append((seq, full))
            if pool.any_cached(fresh) or len(set(fresh)) < len(fresh):
                return False
        if growth.blocks:
            got = pool.allocate(growth.blocks)
            assert got is not None  # the plan cut the run where KV runs out
            new = ids_array()
            new.frombytes(np.frombuffer(got, np.int64)[growth.allocation_order()].tobytes())
            at = 0
            for seq, count in zip(growth.seqs, growth.counts, strict=True):
                if count:
                    seq.block_ids += new[at : at + count]  # array slices: two copies in C
                    seq.blocks += count
                    at += count
        # `cache_full_blocks`, inlined: the hashes are made above.
        for seq, full in cache_to:
            pool.cache(seq.block_ids, seq.block_hashes, seq.cached_blocks, full, seq.token_ids)
            seq.cached_blocks = full
        return True


_GROW, _CACHE = 0, 1


@dataclass(frozen=True, slots=True)
class DecodeGrowth:
    """The blocks a decode run's sequences grow by over `run_steps` steps, found without
    listing its steps: a decoding sequence holding `b` blocks for `c` computed tokens
    needs a new block at steps `b * size - c`, then every `size` steps, up to what its
    last token needs. Valid while the batch and its KV stand as planned."""

    seqs: list[SeqState]  # the batch, in running order
    run_steps: int
    counts: list[int]  # new blocks per sequence, in running order
    steps: np.ndarray  # the step each new block is needed at, sequence by sequence

    @property
    def blocks(self) -> int:
        return len(self.steps)

    @classmethod
    def of(cls, seqs: list[SeqState], steps: int, size: int) -> DecodeGrowth:
        counts, firsts = [], []
        for seq in seqs:
            c, b = seq.computed, seq.blocks
            counts.append(max(0, blocks_for(min(c + steps, seq.max_kv_tokens), size) - b))
            firsts.append(b * size - c)  # blocks hold all computed tokens: never negative
        counts_a = np.asarray(counts)
        total = int(counts_a.sum())
        starts = np.cumsum(counts_a) - counts_a
        within = np.arange(total) - np.repeat(starts, counts_a)
        at = np.repeat(np.asarray(firsts), counts_a) + within * size
        return cls(seqs, steps, counts, at)

    def step_of(self, block: int) -> int:
        """The step that needs the run's `block`-th new block (0-based, in step order)."""
        return int(np.partition(self.steps, block)[block])

    def owners(self) -> np.ndarray:
        """Each new block's sequence, as its position in the batch."""
        return np.repeat(np.arange(len(self.counts)), self.counts)

    def allocation_order(self) -> np.ndarray:
        """Each new block's place among the run's allocations: step by step, and within a
        step in running order, as `schedule` would ask for them."""
        ranks = np.empty(self.blocks, np.int64)
        ranks[np.lexsort((self.owners(), self.steps))] = np.arange(self.blocks)
        return ranks
