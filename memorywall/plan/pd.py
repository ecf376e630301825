"""The plan's disaggregated candidates: prefill on a GPU pool, decode on wafers, one link.

For each GPU profile and wafer profile searched, each weight precision and wafer
placement, `x` prefill workers (`PdSpace.prefill_workers`) of the fewest GPUs that
hold the model feed `y` decode workers of the fewest wafers, and each candidate
runs on the offline split fleet (`memorywall.sim.pd`: the live halves'
timeline, the link shared by transfers at once) under the same load search and
SLO as aggregated ones. Its devices and power count both pools.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from memorywall.core import (
    Batch,
    Deployment,
    Hardware,
    ModelShape,
    Placement,
    Precision,
    PrefillChunk,
    StepModel,
    plan_deployment,
)
from memorywall.core.hardware import DeviceKind
from memorywall.core.kv_transfer import LinkKind, kv_link, kv_transfer
from memorywall.errors import MemorywallError
from memorywall.loadgen.bench import BenchConfig, Level
from memorywall.loadgen.slo import Slo
from memorywall.plan.space import Estimate, Skipped, Space
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.pd.offline import PdFleet
from memorywall.sim.pd import simulate_pd_level
from memorywall.sim.simulate import LevelRun


@dataclass(frozen=True, kw_only=True)
class PdSpace:
    """What is searched of disaggregated fleets (xPyD: x prefill, y decode workers)."""

    prefill_workers: tuple[int, ...] = (1, 2, 4, 8)
    decode_workers: int = 1
    link: LinkKind | float = LinkKind.NIC


def backend(prefill: str, decode: str) -> str:
    """How a split's rows are labelled: apart from either hardware's own."""
    return f"PD {prefill}->{decode}"


@dataclass(frozen=True, kw_only=True)
class PdCandidate:
    fleet: PdFleet

    @property
    def engine(self) -> EngineConfig:
        return self.fleet.engine

    @property
    def hardware(self) -> str:
        return backend(self.fleet.prefill.hardware.name, self.fleet.decode.hardware.name)

    @property
    def devices(self) -> int:
        return self.fleet.devices

    @property
    def power_w(self) -> float:
        return self.fleet.power_w

    @property
    def layout(self) -> PdFleet:
        """What runs, bar the engine's batch limit."""
        return PdFleet(
            prefill=self.fleet.prefill,
            prefill_workers=self.fleet.prefill_workers,
            decode=self.fleet.decode,
            decode_workers=self.fleet.decode_workers,
            link=self.fleet.link,
        )

    @property
    def slots(self) -> int:
        return self.engine.max_num_seqs * self.fleet.decode_workers

    @property
    def kv_capacity_tokens(self) -> int:
        return self.fleet.decode.kv_capacity_tokens

    def describe(self) -> str:
        f = self.fleet
        p, d = f.prefill, f.decode
        link = kv_link(p, d, f.link)
        return (
            f"PD {f.prefill_workers}P x {p.devices} {p.hardware.name} "
            f"{p.weight_precision.value} + {f.decode_workers}D x {d.devices} {d.hardware.name} "
            f"{d.weight_precision.value} {d.placement.value}, {link.describe()}, "
            f"max {self.engine.max_num_seqs} seqs"
        )

    def estimate(self, prompt: float, output: float, slo: Slo) -> Estimate | None:
        return estimate_pd(self, prompt, output, slo)

    def simulate(self, config: BenchConfig, level: Level) -> LevelRun:
        return simulate_pd_level(self.fleet, config, level)


def pd_candidates(
    model: ModelShape, space: Space, pd: PdSpace
) -> tuple[list[PdCandidate], list[Skipped]]:
    """Every GPU prefill pool and wafer decode pool in `space`, times the worker counts and
    batch limits."""
    found: list[PdCandidate] = []
    skipped: list[Skipped] = []
    for gpu in (h for h in space.hardware if h.kind is DeviceKind.GPU):
        for wafer in (h for h in space.hardware if h.kind is DeviceKind.WAFER):
            label = backend(gpu.name, wafer.name)
            for precision in space.precisions:
                pools = [(gpu, Placement.RESIDENT)] + [
                    (wafer, placement)
                    for placement in space.placements
                    if placement is Placement.RESIDENT or wafer.stream is not None
                ]
                fewest = [_fewest(hw, model, space, precision, where, label) for hw, where in pools]
                skipped += [f for f in fewest if isinstance(f, Skipped)]
                prefill, *decodes = fewest
                if isinstance(prefill, Skipped):
                    continue
                found += [
                    PdCandidate(
                        fleet=PdFleet(
                            prefill=prefill,
                            prefill_workers=x,
                            decode=decode,
                            decode_workers=pd.decode_workers,
                            link=pd.link,
                            engine=EngineConfig(
                                max_num_seqs=seqs,
                                max_num_batched_tokens=space.max_num_batched_tokens,
                            ),
                        )
                    )
                    for decode in decodes
                    if not isinstance(decode, Skipped)
                    for x in pd.prefill_workers
                    for seqs in space.max_num_seqs
                ]
    return found, skipped


def _fewest(
    hw: Hardware,
    model: ModelShape,
    space: Space,
    precision: Precision,
    placement: Placement,
    label: str,
) -> Deployment | Skipped:
    """The fewest devices of `hw` that hold the model, or why none do within the space."""
    what = f"{hw.name} {precision.value} {placement.value}"
    try:
        d = plan_deployment(
            hw,
            model,
            weight_precision=precision,
            kv_precision=space.kv_precision,
            placement=placement,
        )
    except MemorywallError as e:
        return Skipped(hardware=label, layout=what, reason=str(e))
    if d.devices > space.max_devices:
        reason = f"needs {d.devices} devices, over --max-devices {space.max_devices}"
        return Skipped(hardware=label, layout=what, reason=reason)
    return d


def estimate_pd(c: PdCandidate, prompt: float, output: float, slo: Slo) -> Estimate | None:
    """The core's steady state of the split: requests/s is the least of what the prefill
    workers, the decode workers (at the best batch under the TPOT bound) and the decode
    workers' links carry. Optimistic: no queueing. None when a decode worker's KV cannot
    hold one request of the mean size."""
    f = c.fleet
    p, d = f.prefill, f.decode
    per_request = math.ceil(prompt + output)
    top = min(c.engine.max_num_seqs, d.kv_capacity_tokens // max(1, per_request))
    if top < 1:
        return None
    sm = StepModel(d)
    batches = np.arange(1, top + 1)
    context = np.array([round(prompt + output / 2)])
    tpot = sm.decode_sweep(batches, context).time_s / sm.tokens_per_decode_step
    tokens = max(1, round(prompt))
    prefill_s = StepModel(p).step_cost(Batch(prefill=(PrefillChunk(tokens),))).time_s
    link = kv_link(p, d, f.link)
    transfer = kv_transfer(p, link, tokens)
    wire_s = transfer.bytes / link.receive_bytes_per_s
    decode_rate = f.decode_workers * batches / (output * tpot)
    rate = np.minimum(decode_rate, min(f.prefill_workers / prefill_s, f.decode_workers / wire_s))
    first_s = prefill_s + transfer.exposed_s
    ok = np.ones(top, dtype=bool)
    if slo.tpot_s is not None:
        ok &= tpot <= slo.tpot_s
    if slo.e2el_s is not None:
        ok &= first_s + output * tpot <= slo.e2el_s
    if slo.ttft_s is not None and first_s > slo.ttft_s:
        ok[:] = False
    i = int(np.argmax(np.where(ok, rate, -1.0))) if ok.any() else 0
    rate_ok = float(rate[i]) if ok.any() else 0.0
    return Estimate(
        batch=int(batches[i]) * f.decode_workers,
        rate=float(rate[i]),
        tok_s_per_device=rate_ok * output / f.devices,
    )
