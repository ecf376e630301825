"""The plan's search space: candidate deployments on each profile, and the core's
steady-state estimate of what each delivers under an SLO (the order they are tried in)."""

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
from memorywall.core.deployment import layouts
from memorywall.errors import MemorywallError
from memorywall.loadgen.bench import BenchConfig, Level
from memorywall.loadgen.slo import Slo
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.sim.simulate import LevelRun, simulate_level


@dataclass(frozen=True, kw_only=True)
class Space:
    """What is searched, on each hardware profile."""

    hardware: tuple[Hardware, ...]
    precisions: tuple[Precision, ...] = (Precision.BF16, Precision.FP8)
    kv_precision: Precision = Precision.BF16
    placements: tuple[Placement, ...] = (Placement.RESIDENT, Placement.STREAM)
    max_devices: int = 8
    max_num_seqs: tuple[int, ...] = (32, 128, 512)
    max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens
    tolerance: float = 0.1  # bisect until the break lies within this share of the held load
    # MoE models: also spread the experts over each layout's tensor-parallel group (EP).
    expert_parallel: bool = False


@dataclass(frozen=True, kw_only=True)
class Candidate:
    deployment: Deployment
    engine: EngineConfig

    @property
    def hardware(self) -> str:
        return self.deployment.hardware.name

    @property
    def devices(self) -> int:
        return self.deployment.devices

    @property
    def power_w(self) -> float:
        """Rated power (TDP) of its devices."""
        return self.deployment.devices * self.deployment.hardware.tdp_w

    @property
    def layout(self) -> Deployment:
        """What runs, bar the engine's batch limit."""
        return self.deployment

    @property
    def slots(self) -> int:
        """The most requests it runs at once."""
        return self.engine.max_num_seqs

    @property
    def kv_capacity_tokens(self) -> int:
        return self.deployment.kv_capacity_tokens

    def estimate(self, prompt: float, output: float, slo: Slo) -> Estimate | None:
        return estimate(self, prompt, output, slo)

    def simulate(self, config: BenchConfig, level: Level) -> LevelRun:
        return simulate_level(self.deployment, self.engine, config, level)

    def describe(self) -> str:
        d = self.deployment
        split = (
            f"TP{d.tensor_parallel}"
            + (f"xEP{d.expert_parallel}" if d.expert_parallel > 1 else "")
            + (f"xPP{d.pipeline_parallel}" if d.pipeline_parallel > 1 else "")
        )
        return (
            f"{d.devices} x {d.hardware.name} {split} {d.weight_precision.value} "
            f"{d.placement.value}, max {self.engine.max_num_seqs} seqs"
        )


@dataclass(frozen=True, kw_only=True)
class Skipped:
    """A layout left out before simulation, and why."""

    hardware: str
    layout: str
    reason: str


def candidates(model: ModelShape, space: Space) -> tuple[list[Candidate], list[Skipped]]:
    """Every layout of every profile that holds the weights, times every batch limit."""
    found: list[Candidate] = []
    skipped: list[Skipped] = []
    for hw in space.hardware:
        for precision in space.precisions:
            for placement in space.placements:
                what = f"{precision.value} {placement.value}"
                if placement is Placement.STREAM and hw.stream is None:
                    continue
                try:
                    fewest = plan_deployment(
                        hw,
                        model,
                        weight_precision=precision,
                        kv_precision=space.kv_precision,
                        placement=placement,
                    )
                except MemorywallError as e:
                    skipped.append(Skipped(hardware=hw.name, layout=what, reason=str(e)))
                    continue
                if fewest.devices > space.max_devices:
                    skipped.append(
                        Skipped(
                            hardware=hw.name,
                            layout=what,
                            reason=f"needs {fewest.devices} devices, over --max-devices "
                            f"{space.max_devices}",
                        )
                    )
                    continue
                n = fewest.devices
                while n <= space.max_devices:
                    for tp, _ in layouts(hw, model, n):
                        for ep in _expert_parallel(space, model, tp):
                            d = plan_deployment(
                                hw,
                                model,
                                devices=n,
                                weight_precision=precision,
                                kv_precision=space.kv_precision,
                                placement=placement,
                                tensor_parallel=tp,
                                expert_parallel=ep,
                            )
                            found += [
                                Candidate(
                                    deployment=d,
                                    engine=EngineConfig(
                                        max_num_seqs=seqs,
                                        max_num_batched_tokens=space.max_num_batched_tokens,
                                    ),
                                )
                                for seqs in space.max_num_seqs
                            ]
                    n *= 2
    return found, skipped


def _expert_parallel(space: Space, model: ModelShape, tp: int) -> tuple[int, ...]:
    """Expert-parallel degrees to try on a layout: 1, and with `space.expert_parallel` the
    whole tensor-parallel group where it splits a MoE model's experts."""
    moe = model.moe
    if space.expert_parallel and moe is not None and tp > 1 and moe.n_experts % tp == 0:
        return (1, tp)
    return (1,)


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """The core's steady state under the SLO: the best batch, its request rate, and the
    output tokens/s per device it gives. Optimistic: no queueing, prefill never shares a
    step with decode."""

    batch: int
    rate: float
    tok_s_per_device: float


def estimate(c: Candidate, prompt: float, output: float, slo: Slo) -> Estimate | None:
    """None when the KV cache cannot hold one request of the mean size."""
    d = c.deployment
    per_request = math.ceil(prompt + output)
    top = min(c.engine.max_num_seqs, d.kv_capacity_tokens // max(1, per_request))
    if top < 1:
        return None
    sm = StepModel(d)
    batches = np.arange(1, top + 1)
    context = np.array([round(prompt + output / 2)])
    tpot = sm.decode_sweep(batches, context).time_s / sm.tokens_per_decode_step
    prefill_s = sm.step_cost(Batch(prefill=(PrefillChunk(max(1, round(prompt))),))).time_s
    rate = 1.0 / (prefill_s + output * tpot / batches)
    ok = np.ones(top, dtype=bool)
    if slo.tpot_s is not None:
        ok &= tpot <= slo.tpot_s
    if slo.e2el_s is not None:
        ok &= prefill_s + (output - 1) * tpot <= slo.e2el_s
    if slo.ttft_s is not None and prefill_s > slo.ttft_s:
        ok[:] = False
    i = int(np.argmax(np.where(ok, rate, -1.0))) if ok.any() else 0
    rate_ok = float(rate[i]) if ok.any() else 0.0
    return Estimate(
        batch=int(batches[i]),
        rate=float(rate[i]),
        tok_s_per_device=rate_ok * output / d.devices,
    )
