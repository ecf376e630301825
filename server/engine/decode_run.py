"""Many decode steps at once: the offline driver's fast path through `EngineCore`.

Stepping `schedule`/`complete` costs Python work per sequence per step, which is
more than a wafer step lasts. But while every running sequence decodes one token
a step and nothing joins or leaves the batch, the steps are fully determined by
the state at the start: `advance_decode` applies k of them in one go, per
sequence rather than per step, and leaves the engine exactly as k calls of
`schedule` and `complete` would (same tokens, KV blocks and prefix-cache entries
in the same order, same float sums; `tests/sim/test_decode_run.py` checks it).

It declines (returns None), and the caller steps normally, unless:
- no speculation, and every running sequence is decoding with no stop tokens to
  watch for (`ignore_eos`, or none given);
- the token budget covers the batch, and nothing waits that could be admitted
  (the queue is empty, or the batch is at `max_num_seqs`);
- at least `MIN_STEPS` steps (one from `BIG_BATCH` sequences) remain before any
  sequence samples its last token,
  an arrival could join (`admit_by_s`), or the KV pool runs out of blocks.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

import numpy as np

from memorywall.core import Batch
from memorywall.server.engine.kv import blocks_for, extend_block_hashes
from memorywall.server.engine.scheduler import EngineCore, Sequence, StepCostModel

# A run has a fixed cost (costing its steps, counting its KV blocks) of about two normal steps of
# a small batch; a normal step costs more per sequence, so a big batch gains from one step.
MIN_STEPS = 2
BIG_BATCH = 8  # from this many sequences a run of one step pays
FIRST_CHUNK = 16  # steps costed before looking for the horizon, doubling after


@dataclass(frozen=True, slots=True)
class DecodeRun:
    """Steps applied at once: each of `sequences` got one token at the end of each step."""

    sequences: list[Sequence]  # in running order
    end_times_s: list[float]


def advance_decode(core: EngineCore, start_s: float, admit_by_s: float) -> DecodeRun | None:
    """Apply the decode steps from `start_s` on that need no decision, or return None.

    `admit_by_s`: the next arrival; no step starting at or after it is taken while
    the batch has room, since that arrival would join it.
    """
    running = core.running
    n = len(running)
    config = core.config
    full = n >= config.max_num_seqs
    if not n or core.limits.draft_tokens or n > config.max_num_batched_tokens:
        return None
    if core.waiting and not full:
        return None
    min_steps = 1 if n >= BIG_BATCH else MIN_STEPS
    steps = math.inf
    for seq in running:
        done = len(seq.output_ids)
        if not done or seq.computed != seq.prompt_len + done - 1:
            return None  # still prefilling
        if seq.watches_stops:
            return None
        left = seq.stop_at - done - 1  # its last token is for `complete`
        if left < min_steps:
            return None  # checked as it goes: a busy batch usually has one about to end
        steps = min(steps, left)
    horizon_s = math.inf if full else admit_by_s
    if horizon_s <= start_s:
        return None
    ends, energies_j = _timeline(core, start_s, steps, horizon_s)
    steps = min(steps, bisect.bisect_left(ends, horizon_s, hi=len(ends) - 1))
    growth = _Growth.of(core, steps)
    free = core.pool.free_blocks
    if growth.blocks > free:
        steps = min(steps, growth.step_of(free))  # that step preempts: leave it to `schedule`
        growth = _Growth.of(core, steps)
    if steps < min_steps:
        return None
    _apply(core, growth, steps, ends, energies_j)
    return DecodeRun(sequences=list(running), end_times_s=ends[1 : steps + 1])


@dataclass(frozen=True, slots=True)
class _Growth:
    """The blocks a run's sequences grow by, found without listing its steps: a decoding
    sequence holding `b` blocks for `c` computed tokens needs a new block at steps
    `b * size - c`, then every `size` steps, up to what its last token needs."""

    counts: list[int]  # new blocks per sequence, in running order
    steps: np.ndarray  # the step each new block is needed at, sequence by sequence

    @property
    def blocks(self) -> int:
        return len(self.steps)

    @classmethod
    def of(cls, core: EngineCore, steps: int) -> _Growth:
        size = core.config.block_size
        counts, firsts = [], []
        for seq in core.running:
            c, b = seq.computed, seq.blocks
            counts.append(max(0, blocks_for(min(c + steps, seq.max_kv_tokens), size) - b))
            firsts.append(b * size - c)  # blocks hold all computed tokens: never negative
        counts_a = np.asarray(counts)
        total = int(counts_a.sum())
        starts = np.cumsum(counts_a) - counts_a
        within = np.arange(total) - np.repeat(starts, counts_a)
        return cls(counts, np.repeat(np.asarray(firsts), counts_a) + within * size)

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


def _timeline(
    core: EngineCore, start_s: float, steps: int, horizon_s: float
) -> tuple[list[float], list[float]]:
    """Step boundaries (`ends[j]`: step j's start) and energies, costed in growing chunks
    until `steps` are costed or a step starts at `horizon_s`."""
    contexts = [seq.computed for seq in core.running]
    ends, energies = [start_s], []
    while len(energies) < steps and ends[-1] < horizon_s:
        done = len(energies)
        # With no horizon every step is taken: cost them in one call.
        chunk = steps - done if horizon_s == math.inf else min(steps - done, max(FIRST_CHUNK, done))
        times, more = _costs(core.step_model, [c + done for c in contexts], chunk)
        ends += itertools.accumulate(times, initial=ends[-1])
        del ends[-chunk - 1]  # the chunk's initial value, already there
        energies += more
    return ends, energies


def _costs(model: StepCostModel, contexts: list[int], steps: int) -> tuple[list, list]:
    """Each step's time and energy; the core's vectorised form when it has one."""
    run = getattr(model, "decode_run", None)
    if run is not None:
        times, energies = run(contexts, steps)
        return [float(t) for t in times], [float(e) for e in energies]
    times, energies = [], []
    for j in range(steps):
        cost = model.step_cost(Batch(decode_contexts=[c + j for c in contexts]))
        times.append(cost.time_s)
        energies.append(cost.energy_j)
    return times, energies


_GROW, _CACHE = 0, 1


def _kv_events(core: EngineCore, growth: _Growth, steps: int) -> list[tuple[int, int, int, int]]:
    """(step, position in the batch, grow or cache, blocks) in the order `schedule` meets
    them: the run's new blocks one at a time, and a block offered to the prefix cache the
    step that fills it."""
    grows = zip(growth.steps.tolist(), growth.owners().tolist(), strict=True)
    events = [(j, i, _GROW, 1) for j, i in grows]
    if core.config.enable_prefix_caching:
        size = core.config.block_size
        for i, seq in enumerate(core.running):
            c, cached = seq.computed, seq.cached_blocks
            j = max(0, (cached + 1) * size - c - 1)
            while j < steps:
                cached = (c + j + 1) // size
                events.append((j, i, _CACHE, cached))
                j = (cached + 1) * size - c - 1
    events.sort()
    return events


def _kv_in_bulk(core: EngineCore, growth: _Growth, steps: int) -> bool:
    """Apply the run's KV changes with one allocation and one cache call per sequence,
    when that ends as taking them one by one would; else change nothing, return False.

    Equal when nobody watches the events' order, and none of the blocks the run fills is
    cached already (by another block, or by another sequence in the run): then evicting
    before caching can change no duplicate check, and the blocks handed out are the same
    ones in the same order (`_Growth.allocation_order`). A sequence's last cached block
    after the run is the last its tokens fill."""
    pool = core.pool
    if pool.has_subscribers:
        return False
    size = core.config.block_size
    cache_to = []
    if core.config.enable_prefix_caching:
        fresh = []
        for seq in core.running:
            full = (seq.computed + steps) // size
            if full > seq.cached_blocks:
                hashes = extend_block_hashes(seq.block_hashes, full, size, seq.token_ids)
                fresh += hashes[seq.cached_blocks : full]
                cache_to.append((seq, full))
        if not pool.cached.keys().isdisjoint(fresh) or len(set(fresh)) < len(fresh):
            return False
    if growth.blocks:
        new = np.asarray(pool.allocate(growth.blocks))[growth.allocation_order()].tolist()
        at = 0
        for seq, count in zip(core.running, growth.counts, strict=True):
            if count:
                seq.block_ids += new[at : at + count]
                seq.blocks += count
                at += count
    for seq, full in cache_to:
        core._cache(seq, full)
    return True


def _apply(
    core: EngineCore, growth: _Growth, steps: int, ends: list[float], energies_j: list[float]
) -> None:
    running = core.running
    n = len(running)
    for seq in running:
        seq.output_ids.extend(seq.tokens.next_each(steps))
    if not _kv_in_bulk(core, growth, steps):
        pool = core.pool
        for _, i, kind, count in _kv_events(core, growth, steps):
            seq = running[i]
            if kind == _GROW:
                seq.block_ids += pool.allocate(count)
                seq.blocks += count
            else:
                core._cache(seq, count)
    # Sums in the order `complete` adds them, so floats agree to the last bit.
    per_token = np.empty((steps + 1, n))
    per_token[0] = [seq.energy_j for seq in running]
    per_token[1:] = (np.asarray(energies_j[:steps]) / n)[:, None]
    seq_energy = np.add.accumulate(per_token, axis=0)[-1].tolist()
    last_s = ends[steps]
    for seq, energy in zip(running, seq_energy, strict=True):
        seq.computed += steps
        seq.last_token_s = last_s
        seq.energy_j = energy
    counters = core.counters
    counters.steps += steps
    counters.tokens_generated += n * steps
    for e in energies_j[:steps]:
        counters.energy_j += e
