"""Capacity planning: the cheapest deployment per backend that holds a latency SLO.

For one model and workload, every candidate deployment (device count, tensor and
pipeline split, weight precision, resident or streamed weights, the engine's batch
limit) on each hardware profile is run on the offline simulator (`memorywall.sim.simulate`,
the engine that serves live) at rising load, to find the highest load at which the
SLO's bounds hold at the 99th percentile (and, open loop, the queue is not still
growing at the end of the run: a finite run can end before an overload's queue breaks
a TTFT bound). A candidate's worth is its goodput there: output tokens/s of requests
that met every bound, per device and per kW of rated power.

With `pd` (the CLI's `--pd`, for a GPU and a wafer both searched), disaggregated
fleets compete too: x prefill workers of each GPU profile feeding y decode workers of
each wafer profile over the link (`plan_pd`), simulated on the offline split fleet
under the same load search, and ranked under their own backend label ("PD gpu->wafer")
by the same measures, both pools' devices and power counted.

The search is pruned four ways:
- a layout that cannot hold the weights, or whose KV cache cannot hold one request, is
  skipped before any simulation;
- load stops rising once the SLO breaks (then bisects), or once goodput stops growing;
- a batch limit above the most requests a run ever had in flight gives the same runs as
  that run's limit, so it is reported as the same;
- candidates run in order of the core's steady-state estimate of their goodput per
  device (`estimate`), and one whose estimate is below `PRUNE_FRACTION` of the best
  goodput already simulated on its backend is not simulated. The estimate is not a
  bound: simulation has beaten it by up to ~1.5x (the wafer hides prefill in decode
  steps), hence the wide margin. This is the one prune that could drop an answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from memorywall.core import ModelShape
from memorywall.core.hardware import DeviceKind
from memorywall.errors import ConfigError
from memorywall.loadgen.bench import BenchConfig, Level
from memorywall.loadgen.slo import Slo
from memorywall.loadgen.workload import Workload
from memorywall.plan.pd import PdCandidate, PdSpace, backend, pd_candidates
from memorywall.plan.search import SATURATED_GAIN, Trial, in_flight, kept_up, search_load, slo_holds
from memorywall.plan.space import Candidate, Estimate, Skipped, Space, candidates
from memorywall.sim.simulate import LevelRun

if TYPE_CHECKING:
    from memorywall.cluster.pools import Pool

__all__ = [
    "Candidate",
    "Evaluation",
    "LoadKind",
    "PdCandidate",
    "PdSpace",
    "PlanResult",
    "Query",
    "Skipped",
    "Space",
    "Status",
    "Trial",
    "plan",
    "slo_holds",
]

PRUNE_FRACTION = 0.5
# Requests per level, at least this many times the users (closed loop) or the batch
# limit (open loop): the batch fills and drains more than once, so the run reaches a
# steady state.
FILLS = 2
# Open loop: arrivals span at least this many median request times (more requests if
# not, up to MAX_PROMPTS), so the middle of the run is past the fill.
SPAN_E2E, MAX_PROMPTS = 4.0, 16384
# Open loop: a level whose queue seemed to grow runs again with this many times the
# requests before it counts as broken.
CONFIRM_FACTOR = 3


class LoadKind(Enum):
    """How load rises: open-loop Poisson arrivals (requests/s) or closed-loop users."""

    RATE = "rate"
    USERS = "users"


@dataclass(frozen=True, kw_only=True)
class Query:
    """What is asked: a model, a workload, and the SLO's bounds (held at p99)."""

    model: ModelShape
    workload: Workload
    slo: Slo
    load: LoadKind = LoadKind.RATE
    num_prompts: int = 200
    seed: int = 0
    burstiness: float = 1.0
    target_rate: float | None = None  # requests/s the whole service must carry


class Status(Enum):
    HOLDS = "holds"
    UNREACHABLE = "unreachable"  # breaks even at the lightest load tried
    PRUNED = "pruned"  # the core's estimate is far below what another candidate reached
    SAME = "same"  # another batch limit gives the same runs


AnyCandidate = Candidate | PdCandidate


@dataclass(kw_only=True)
class Evaluation:
    candidate: AnyCandidate
    estimate_tok_s_per_device: float
    status: Status
    trials: list[Trial] = field(default_factory=list)
    note: str = ""

    @property
    def pick(self) -> Trial:
        """`best`, of an evaluation that holds the SLO (as every ranked one does)."""
        best = self.best
        if best is None:
            raise ValueError(f"{self.candidate.describe()}: no load held the SLO")
        return best

    @property
    def best(self) -> Trial | None:
        """The highest load that held (the lower one where goodput saturated)."""
        held = [t for t in self.trials if t.holds]
        if not held:
            return None
        top = max(held, key=lambda t: t.load)
        below = [t for t in held if t.load < top.load]
        if below:
            prev = max(below, key=lambda t: t.load)
            if top.goodput_tok_s < SATURATED_GAIN * prev.goodput_tok_s:
                return prev
        return top

    @property
    def goodput_tok_s(self) -> float | None:
        return self.best.goodput_tok_s if self.best else None

    @property
    def tok_s_per_device(self) -> float | None:
        g = self.goodput_tok_s
        return None if g is None else g / self.candidate.devices

    @property
    def tok_s_per_kw(self) -> float | None:
        g = self.goodput_tok_s
        return None if g is None else g / (self.candidate.power_w / 1e3)

    def replicas_for(self, target_rate: float) -> int | None:
        """Copies of this deployment that carry `target_rate` requests/s at the SLO."""
        best = self.best
        if best is None or not best.result.get("request_goodput"):
            return None
        return math.ceil(target_rate / best.result["request_goodput"])


@dataclass(kw_only=True)
class PlanResult:
    query: Query
    space: Space
    evaluations: list[Evaluation]
    skipped: list[Skipped]
    pd: PdSpace | None = None

    def backends(self) -> list[str]:
        """Each hardware searched, then each disaggregated split (GPU prefill, wafer decode)."""
        names = [h.name for h in self.space.hardware]
        if self.pd is None:
            return names
        kinds = {h.name: h.kind for h in self.space.hardware}
        gpus = [n for n in names if kinds[n] is DeviceKind.GPU]
        wafers = [n for n in names if kinds[n] is DeviceKind.WAFER]
        return names + [backend(g, w) for g in gpus for w in wafers]

    def ranked(self, hardware: str) -> list[Evaluation]:
        """Candidates on `hardware` that hold the SLO, cheapest first: fewest devices for
        the target rate when one is given, else most goodput per device."""
        held = [
            e
            for e in self.evaluations
            if e.candidate.hardware == hardware and e.status is Status.HOLDS
        ]
        target = self.query.target_rate

        def key(e: Evaluation) -> tuple:
            replicas = e.replicas_for(target) if target else 0
            need = math.inf if replicas is None else replicas * e.candidate.devices
            return (need, -(e.tok_s_per_device or 0.0), e.candidate.devices)

        return sorted(held, key=key)


class _Runner:
    """Simulates one candidate at a load, once per load."""

    def __init__(self, query: Query, c: AnyCandidate) -> None:
        self.query, self.candidate = query, c
        self.trials: dict[float, Trial] = {}

    def __call__(self, load: float) -> Trial:
        if load in self.trials:
            return self.trials[load]
        q, c = self.query, self.candidate
        rate = q.load is LoadKind.RATE
        users = None if rate else int(load)
        # Closed loop: each user several requests; open loop: enough to fill the batch.
        n = max(q.num_prompts, FILLS * (users or c.slots))
        run = self._simulate(load, n)
        sent, done, peak = in_flight(run.records)
        if rate and run.result.get("median_e2el_ms") and len(sent) > 1:
            # Open loop: arrivals must outlast a request several times over to reach
            # a steady state; run again, longer, if these did not.
            span_s = (sent[-1] - sent[0]) / 1e9
            need_s = SPAN_E2E * run.result["median_e2el_ms"] / 1e3
            if span_s < need_s and n < MAX_PROMPTS:
                n = min(MAX_PROMPTS, math.ceil(n * need_s / span_s))
                run = self._simulate(load, n)
                sent, done, peak = in_flight(run.records)
        holds = slo_holds(q.slo, run.result)
        if holds and rate and not kept_up(sent, done) and n < MAX_PROMPTS:
            # A short run's queue swings for a while; confirm an overload on a longer one.
            run = self._simulate(load, min(MAX_PROMPTS, CONFIRM_FACTOR * n))
            sent, done, peak = in_flight(run.records)
            holds = slo_holds(q.slo, run.result)
        trial = Trial(
            load=load,
            holds=holds and (not rate or kept_up(sent, done)),
            result=run.result,
            peak_in_flight=peak,
        )
        self.trials[load] = trial
        return trial

    def _simulate(self, load: float, n: int) -> LevelRun:
        q, c = self.query, self.candidate
        concurrency: tuple[int, ...] = ()
        rates: tuple[float, ...] = ()
        if q.load is LoadKind.RATE:
            rates, level = (load,), Level(f"rate{load:.6g}", None, load)
        else:
            users = int(load)
            concurrency, level = (users,), Level(f"c{users}", users, None)
        config = BenchConfig(
            target="simulated",
            workload=q.workload,
            num_prompts=n,
            concurrency=concurrency,
            request_rates=rates,
            burstiness=q.burstiness,
            seed=q.seed,
            slo=q.slo,
            label=c.describe(),
        )
        return c.simulate(config, level)


def _mean_lengths(query: Query) -> tuple[float, float]:
    specs = query.workload.specs(np.random.default_rng(query.seed), query.num_prompts)
    return (
        float(np.mean([s.prompt_tokens for s in specs])),
        float(np.mean([s.output_tokens for s in specs])),
    )


def plan(
    query: Query,
    space: Space,
    progress: Callable[[int, int], None] | None = None,
    *,
    pd: PdSpace | None = None,
    pool: Pool | None = None,
) -> PlanResult:
    """Evaluate every candidate, best estimate first; `progress(done, total)` after each.
    With `pd`, disaggregated fleets (GPU prefill, wafer decode) of `space`'s hardware too.
    With `pool`, the load searches run there, several at once, in waves (`waves`): the
    same evaluations as in order."""
    if not space.hardware:
        raise ConfigError("plan: no hardware to search")
    plain, skipped = candidates(query.model, space)
    found: list[AnyCandidate] = list(plain)
    if pd is not None:
        split, split_skipped = pd_candidates(query.model, space, pd)
        found += split
        skipped += split_skipped
    prompt, output = _mean_lengths(query)
    scored: list[tuple[AnyCandidate, Estimate]] = []
    for c in found:
        e = c.estimate(prompt, output, query.slo)
        if e is None:
            skipped.append(
                Skipped(
                    hardware=c.hardware,
                    layout=c.describe(),
                    reason=f"KV cache ({c.kv_capacity_tokens:,} tokens) cannot "
                    f"hold one request of {prompt + output:,.0f} tokens",
                )
            )
        else:
            scored.append((c, e))
    scored.sort(key=lambda ce: (-ce[1].tok_s_per_device, ce[0].devices))
    if progress:
        progress(0, len(scored))
    if pool is None:
        evaluations = _evaluate_in_order(query, space, scored, progress)
    else:
        from memorywall.plan.waves import evaluate_in_waves  # it builds on this module

        evaluations = evaluate_in_waves(query, space, scored, pool, progress)
    return PlanResult(query=query, space=space, evaluations=evaluations, skipped=skipped, pd=pd)


def _evaluate_in_order(
    query: Query,
    space: Space,
    scored: Sequence[tuple[AnyCandidate, Estimate]],
    progress: Callable[[int, int], None] | None,
) -> list[Evaluation]:
    """The sequential search: each candidate settled, or searched, in estimate order."""
    best_on: dict[str, float] = {}
    evaluations: list[Evaluation] = []
    for i, (c, est) in enumerate(scored):
        ev = settled(c, est, best_on, evaluations)
        if ev is None:
            ev = searched(c, est, search(query, space, c, est))
        record(ev, best_on, evaluations)
        if progress:
            progress(i + 1, len(scored))
    return evaluations


def record(ev: Evaluation, best_on: dict[str, float], evaluations: list[Evaluation]) -> None:
    """Append `ev` to the evaluations done and raise its backend's best goodput per device."""
    evaluations.append(ev)
    if ev.tok_s_per_device is not None:
        hw = ev.candidate.hardware
        best_on[hw] = max(best_on.get(hw, 0.0), ev.tok_s_per_device)


def settled(
    c: AnyCandidate, est: Estimate, best_on: dict[str, float], done: Sequence[Evaluation]
) -> Evaluation | None:
    """The candidate's evaluation if the ones `done` before it settle it without a search
    (pruned by its estimate, or the same runs as another batch limit), else None. Once
    settled, a candidate stays settled as more are done: `best_on` only rises, and a
    match among `done` stays one."""
    ev = Evaluation(
        candidate=c, estimate_tok_s_per_device=est.tok_s_per_device, status=Status.HOLDS
    )
    best = best_on.get(c.hardware)
    if best is not None and est.tok_s_per_device < PRUNE_FRACTION * best:
        ev.status = Status.PRUNED
        ev.note = (
            f"core estimate {est.tok_s_per_device:,.0f} tok/s per device is under "
            f"{PRUNE_FRACTION:.0%} of {best:,.0f} reached on {c.hardware}"
        )
        return ev
    for other in done:
        o = other.candidate
        if o.layout == c.layout and other.trials and other.status is not Status.SAME:
            peak = max(t.peak_in_flight for t in other.trials)
            if peak < min(o.engine.max_num_seqs, c.engine.max_num_seqs):
                ev.status, ev.trials = Status.SAME, other.trials
                ev.note = (
                    f"same runs as max {o.engine.max_num_seqs} seqs (never more than "
                    f"{peak} requests in flight)"
                )
                return ev
    return None


def search(query: Query, space: Space, c: AnyCandidate, est: Estimate) -> list[Trial]:
    """The candidate's load search, by load: a function of its arguments alone (what makes
    searches safe to run anywhere, in any order: `waves`)."""
    runner = _Runner(query, c)
    integer = query.load is LoadKind.USERS
    search_load(runner, est.batch if integer else est.rate / 2, integer, space.tolerance)
    return sorted(runner.trials.values(), key=lambda t: t.load)


def searched(c: AnyCandidate, est: Estimate, trials: list[Trial]) -> Evaluation:
    """The evaluation of a candidate whose load search gave `trials`."""
    ev = Evaluation(
        candidate=c,
        estimate_tok_s_per_device=est.tok_s_per_device,
        status=Status.HOLDS,
        trials=trials,
    )
    if ev.best is None:
        ev.status = Status.UNREACHABLE
        ev.note = "breaks at the lightest load tried"
    return ev
