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

# A run has a fixed cost (costing its steps, listing KV events) of about two normal steps of
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
    events = _kv_events(core, steps)
    free = core.pool.free_blocks
    needed = 0
    for j, _, kind, count in events:
        if kind == _GROW:
            needed += count
            if needed > free:
                steps = min(steps, j)  # that step preempts: leave it to `schedule`
                break
    if steps < min_steps:
        return None
    _apply(core, events, steps, ends, energies_j)
    return DecodeRun(sequences=list(running), end_times_s=ends[1 : steps + 1])


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


def _kv_events(core: EngineCore, steps: int) -> list[tuple[int, int, int, int]]:
    """(step, position in the batch, grow or cache, blocks) in the order `schedule` meets
    them: a sequence grows by a block when its next token passes its blocks' end, and
    offers a block to the prefix cache the step that fills it."""
    size = core.config.block_size
    caching = core.config.enable_prefix_caching
    events = []
    for i, seq in enumerate(core.running):
        c, blocks = seq.computed, seq.blocks
        j = max(0, blocks * size - c)
        while j < steps:
            need = blocks_for(min(c + j + 1, seq.max_kv_tokens), size) - blocks
            if need <= 0:
                break
            events.append((j, i, _GROW, need))
            blocks += need
            j = blocks * size - c
        if caching:
            cached = seq.cached_blocks
            j = max(0, (cached + 1) * size - c - 1)
            while j < steps:
                cached = (c + j + 1) // size
                events.append((j, i, _CACHE, cached))
                j = (cached + 1) * size - c - 1
    events.sort()
    return events


def _kv_in_bulk(core: EngineCore, events: list[tuple[int, int, int, int]]) -> bool:
    """Apply the run's KV events with one allocation and one cache call per sequence,
    when that ends as taking them one by one would; else change nothing, return False.

    Equal when nobody watches the events' order, and none of the blocks the run fills is
    cached already (by another block, or by another sequence in the run): then evicting
    before caching can change no duplicate check, and the blocks handed out are the same
    ones in the same order (allocation order is the events' order)."""
    pool = core.pool
    if pool.has_subscribers:
        return False
    running = core.running
    size = core.config.block_size
    cache_to: dict[int, int] = {}
    grows: list[tuple[int, int]] = []
    for _, i, kind, count in events:
        if kind == _GROW:
            grows.append((i, count))
        else:
            cache_to[i] = count
    fresh = []
    for i, full in cache_to.items():
        seq = running[i]
        hashes = extend_block_hashes(seq.block_hashes, full, size, seq.token_ids)
        fresh += hashes[seq.cached_blocks : full]
    if not pool.cached.keys().isdisjoint(fresh) or len(set(fresh)) < len(fresh):
        return False
    new = pool.allocate(sum(count for _, count in grows)) if grows else []
    at = 0
    for i, count in grows:
        seq = running[i]
        seq.block_ids += new[at : at + count]
        seq.blocks += count
        at += count
    for i, full in cache_to.items():
        core._cache(running[i], full)
    return True


def _apply(
    core: EngineCore,
    events: list[tuple[int, int, int, int]],
    steps: int,
    ends: list[float],
    energies_j: list[float],
) -> None:
    running = core.running
    n = len(running)
    for seq in running:
        seq.output_ids.extend(seq.tokens.next_each(steps))
    taken = list(itertools.takewhile(lambda e: e[0] < steps, events))
    if not _kv_in_bulk(core, taken):
        pool = core.pool
        for _, i, kind, count in taken:
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
