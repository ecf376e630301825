"""Many decode steps at once: the offline driver's fast path through `EngineCore`.

Stepping `schedule`/`complete` costs Python work per sequence per step, which is
more than a wafer step lasts. But while every running sequence decodes one token
a step and nothing joins or leaves the batch, the steps are fully determined by
the state at the start: `advance_decode` applies k of them in one go, per
sequence rather than per step, and leaves the engine exactly as k calls of
`schedule` and `complete` would (same tokens, KV blocks and prefix-cache entries
in the same order, same float sums; `tests/sim/test_decode_run.py` checks it).

It declines (returns None), and the caller steps normally, unless:
- no speculation, no LoRA adapter in the batch, and every running sequence is
  decoding with no stop tokens to watch for (`ignore_eos`, or none given);
- the token budget covers the batch, and nothing waits that could be admitted
  (the queue is empty, or the batch is at `max_num_seqs`);
- at least `MIN_STEPS` steps (one from `BIG_BATCH` sequences) remain before any
  sequence samples its last token,
  an arrival could join (`admit_by_s`), or the KV pool runs out of blocks.

`plan_decode` costs such a run without applying it and `apply_decode` applies its
first steps: the live driver (`live_decode`) sleeps through a planned run step by
step and applies the steps it took when the run closes.
"""

from __future__ import annotations

import bisect
import itertools
import math
import sys
from dataclasses import dataclass
from typing import final

import numpy as np

from memorywall.core import Batch
from memorywall.server.engine.kv_manager import DecodeGrowth
from memorywall.server.engine.scheduler import EngineCore, SeqState, StepCostModel

# A run has a fixed cost (costing its steps, counting its KV blocks) of about two normal steps of
# a small batch; a normal step costs more per sequence, so a big batch gains from one step.
MIN_STEPS = 2
BIG_BATCH = 8  # from this many sequences a run of one step pays
FIRST_CHUNK = 16  # steps costed before looking for the horizon, doubling after


@final  # drivers tell it from a loop.Stepped by `type(x) is DecodeRun` (fast, exact)
@dataclass(frozen=True, slots=True)
class DecodeRun:
    """Steps applied at once: each of `sequences` got one token at the end of each step."""

    sequences: list[SeqState]  # in running order
    end_times_s: list[float]


def advance_decode(core: EngineCore, start_s: float, admit_by_s: float) -> DecodeRun | None:
    """Apply the decode steps from `start_s` on that need no decision, or return None.

    `admit_by_s`: the next arrival; no step starting at or after it is taken while
    the batch has room, since that arrival would join it.
    """
    plan = plan_decode(core, start_s, admit_by_s)
    if plan is None:
        return None
    apply_decode(core, plan, plan.steps)
    return DecodeRun(sequences=plan.sequences, end_times_s=plan.ends[1:])


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """The steps `advance_decode` would apply, costed but not applied: step j runs from
    `ends[j]` to `ends[j + 1]` (`times_s[j]` long, `energies_j[j]` spent), and each of
    `sequences` gets one token at its end. Valid while the batch and its KV stand."""

    sequences: list[SeqState]  # in running order
    steps: int
    ends: list[float]  # steps + 1 boundaries, `ends[0]` the start
    times_s: list[float]
    energies_j: list[float]
    growth: DecodeGrowth  # the KV the `steps` steps grow by


def plan_decode(
    core: EngineCore,
    start_s: float,
    admit_by_s: float,
    max_steps: int = sys.maxsize,
    min_steps: int | None = None,
) -> DecodePlan | None:
    """Cost the steps `advance_decode` would apply from `start_s` (at most `max_steps`),
    changing nothing; None where it would decline (see the module's docstring), or where
    fewer than `min_steps` (default: `MIN_STEPS`, one from `BIG_BATCH` sequences) would
    be taken."""
    running = core.running
    n = len(running)
    config = core.config
    full = n >= config.max_num_seqs
    if not n or core.limits.draft_tokens or n > config.max_num_batched_tokens:
        return None
    if core.waiting and not full:
        return None
    if core.lora is not None and any(seq.request.lora is not None for seq in running):
        return None  # adapters add their own cost to each step (`EngineCore.lora`)
    last = running[-1]  # the latest admitted: the one most likely still prefilling
    if not last.output_ids or last.computed != last.prompt_len + len(last.output_ids) - 1:
        return None  # what the loop below finds, without walking the batch to it
    if min_steps is None:
        min_steps = 1 if n >= BIG_BATCH else MIN_STEPS
    steps = sys.maxsize  # no bound yet: the loop takes the least of the sequences'
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
    steps = min(steps, max_steps)
    ends, times, energies_j = _timeline(core, start_s, steps, horizon_s)
    steps = min(steps, bisect.bisect_left(ends, horizon_s, hi=len(ends) - 1))
    growth = core.kv.plan_decode_run(running, steps)  # cut short where KV runs out
    steps = growth.run_steps
    if steps < min_steps:
        return None
    return DecodePlan(
        list(running), steps, ends[: steps + 1], times[:steps], energies_j[:steps], growth
    )


def apply_decode(core: EngineCore, plan: DecodePlan, steps: int, *, drawn: bool = False) -> None:
    """Apply the first `steps` of `plan` (at most its own) as `steps` calls of `schedule`
    and `complete` would, the batch unchanged since it was planned. `drawn`: each
    sequence's `steps` tokens are in its `output_ids` already (the live driver hands them
    to streams as it goes)."""
    assert steps <= plan.steps and len(core.running) == len(plan.sequences)
    growth = plan.growth if steps == plan.steps else core.kv.plan_decode_run(plan.sequences, steps)
    _apply(core, growth, plan.ends, plan.energies_j, drawn=drawn)


def _timeline(
    core: EngineCore, start_s: float, steps: int, horizon_s: float
) -> tuple[list[float], list[float], list[float]]:
    """Step boundaries (`ends[j]`: step j's start), times and energies, costed in growing
    chunks until `steps` are costed or a step starts at `horizon_s`."""
    contexts = [seq.computed for seq in core.running]
    ends: list[float] = [start_s]
    all_times: list[float] = []
    energies: list[float] = []
    while len(energies) < steps and ends[-1] < horizon_s:
        done = len(energies)
        # With no horizon every step is taken: cost them in one call.
        chunk = steps - done if horizon_s == math.inf else min(steps - done, max(FIRST_CHUNK, done))
        times, more = _costs(core.step_model, [c + done for c in contexts], chunk)
        ends += itertools.accumulate(times, initial=ends[-1])
        del ends[-chunk - 1]  # the chunk's initial value, already there
        all_times += times
        energies += more
    return ends, all_times, energies


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


def _apply(
    core: EngineCore,
    growth: DecodeGrowth,
    ends: list[float],
    energies_j: list[float],
    drawn: bool = False,
) -> None:
    running = core.running
    n = len(running)
    steps = growth.run_steps
    if not drawn:
        for seq in running:
            seq.output_ids.extend(seq.tokens.next_each(steps))
    core.kv.allocate_decode_run(growth)  # after the tokens: their full blocks are hashed
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
