"""A hidden stack to calibrate against: known constants, noisy step times, points held out.

The hidden stack is the shipped H100 profile with other efficiencies, floors
and kernel costs (`HIDDEN`), the kind of difference a user's own serving
stack shows. Step times are drawn from it with multiplicative Gaussian noise
(2%, seeded) on a grid of decode batches 1-128 at contexts 512-16k and
prefills 128-8k; the held-out grid has other batches, contexts and prompt
lengths. `run` fits the base profile to the fit grid and scores the held-out
one (`benchmarks/calibrate.py` prints it; `tests/test_calibrate.py` bounds it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memorywall.calibrate.fit import (
    MAX_STD,
    SPECS,
    Estimate,
    Observation,
    Spec,
    StepRow,
    fit_observations,
    predictor,
    with_constants,
)
from memorywall.core import Deployment, StepModel, load_hardware, load_model, plan_deployment
from memorywall.core.hardware import Hardware

HIDDEN = {  # constants of the hidden stack that differ from the shipped H100 profile
    "efficiency.weight_read": 0.80,
    "efficiency.kv_read": 0.62,
    "efficiency.compute": 0.70,
    "efficiency.attention": 0.40,
    "efficiency.overlap": 0.15,
    "latency.per_layer_s": 1.2e-4,
    "latency.per_step_s": 3.0e-4,
    "kernels.kv_stream_bytes_per_s": 1.3e11,
    "kernels.split_k_s": 9.0e-6,
    "kernels.activation_bytes_per_hidden": 100.0,
}
NOISE = 0.02
FIT_BATCHES, FIT_CONTEXTS = (1, 4, 16, 64, 128), (512, 2048, 8192, 16384)
FIT_PREFILLS = (128, 384, 768, 1536, 3072, 8192)
HELD_BATCHES, HELD_CONTEXTS = (2, 8, 32, 96), (1024, 4096, 12288)
HELD_PREFILLS = (256, 1024, 4096, 6144)


@dataclass(frozen=True)
class SyntheticResult:
    estimates: tuple[Estimate, ...]
    held_out_errors: np.ndarray  # fitted prediction over the noisy held-out time, minus one
    before_errors: np.ndarray  # the base profile's, same points
    band: tuple[float, float]

    @property
    def median(self) -> float:
        return float(np.median(np.abs(self.held_out_errors)))

    @property
    def max(self) -> float:
        return float(np.max(np.abs(self.held_out_errors)))


def hidden_stack(base: Hardware | None = None, hidden: dict[str, float] = HIDDEN) -> Hardware:
    base = base or load_hardware("h100-sxm")
    specs = tuple(s for s in SPECS if s.name in hidden)
    return with_constants(base, specs, [hidden[s.name] for s in specs])


def grid(held_out: bool) -> list[tuple[int, int, int]]:
    """(batch, context, new_tokens) of the fit grid, or of the held-out one."""
    batches, contexts, prefills = (
        (HELD_BATCHES, HELD_CONTEXTS, HELD_PREFILLS)
        if held_out
        else (FIT_BATCHES, FIT_CONTEXTS, FIT_PREFILLS)
    )
    return [(b, c, 0) for c in contexts for b in batches] + [(0, 0, n) for n in prefills]


def draw(hardware: Hardware, rows, noise: float, rng: np.random.Generator) -> list[StepRow]:
    """Step times of `rows` on `hardware` (Llama 3.1 8B), times (1 + N(0, noise))."""
    sm = StepModel(deployment(hardware))
    out = []
    for b, c, n in rows:
        s = sm.step_cost(StepRow(b, c, n, 1.0).as_batch()).time_s
        out.append(StepRow(b, c, n, s * (1.0 + noise * rng.standard_normal())))
    return out


def deployment(hardware: Hardware) -> Deployment:
    return plan_deployment(hardware, load_model("llama-3.1-8b"))


def run(
    seed: int = 0,
    resamples: int = 100,
    noise: float = NOISE,
    specs: tuple[Spec, ...] = SPECS,
    hidden: dict[str, float] = HIDDEN,
    max_std: float = MAX_STD,
    base: Hardware | None = None,
    extra: tuple[tuple[int, int, int], ...] = (),
) -> SyntheticResult:
    """Fit the shipped H100 profile's `specs` constants to the hidden stack's fit grid; score
    the held-out grid. `base` is the profile fitted (and the hidden stack's start), the
    shipped H100 by default; `extra` are more (batch, context, new_tokens) fit steps."""
    rng = np.random.default_rng(seed)
    base = base or load_hardware("h100-sxm")
    truth = hidden_stack(base, hidden)
    fit_rows = draw(truth, grid(False) + list(extra), noise, rng)
    held_rows = draw(truth, grid(True), noise, rng)
    steps = fit_rows + held_rows
    obs = [
        Observation(f"step b={s.batch} ctx={s.context} new={s.new_tokens}", "step", s.seconds, h)
        for s, h in zip(steps, [False] * len(fit_rows) + [True] * len(held_rows), strict=True)
    ]
    predict = predictor(deployment(base), steps, [], None)
    fitted, estimates, band, _ = fit_observations(
        base, predict, obs, resamples, seed, specs, max_std
    )
    measured = np.array([s.seconds for s in held_rows])
    held = slice(len(fit_rows), None)
    return SyntheticResult(
        estimates,
        predict(fitted)[held] / measured - 1.0,
        predict(base)[held] / measured - 1.0,
        band,
    )
