"""How fast the core answers: one engine step, and a vectorised 10,000-point sweep.

    python benchmarks/core_speed.py

The engine calls `StepModel.step_cost` once per scheduled step, so its cost is
the emulator's per-step CPU overhead.
"""

from __future__ import annotations

import platform
import time
from functools import partial

import numpy as np

from memorywall.core import (
    Batch,
    PrefillChunk,
    StepModel,
    load_hardware,
    load_model,
    plan_deployment,
)

DEPLOYMENTS = [
    ("h100-sxm", "llama-3.1-8b"),
    ("wse-3", "llama-3.1-70b"),
    ("b200", "qwen3-235b-a22b"),
    ("h200", "gpt-oss-120b"),
]


def _per_call_s(fn, repeat: int) -> float:
    """Best of five timings of `repeat` calls, per call."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best


def main() -> int:
    print(f"machine: {platform.machine()}, Python {platform.python_version()}")
    print("| deployment | step_cost, batch 1 | batch 64 mixed | batch 256 | 10,000-point sweep |")
    print("|---|---|---|---|---|")
    one = Batch(decode_contexts=(1000,))
    mixed = Batch(decode_contexts=tuple(range(500, 563)), prefill=(PrefillChunk(512, 1024),))
    big = Batch(decode_contexts=tuple(range(1000, 1256)))
    b = np.arange(1, 101)[:, None]
    c = np.linspace(128, 32768, 100)[None, :]
    for hw, model in DEPLOYMENTS:
        sm = StepModel(plan_deployment(load_hardware(hw), load_model(model)))
        steps = [_per_call_s(partial(sm.step_cost, batch), 2000) for batch in (one, mixed, big)]
        sweep = _per_call_s(partial(sm.decode_sweep, b, c), 20)
        cells = " | ".join(f"{s * 1e6:.1f} us" for s in steps)
        print(f"| {model} on {hw} | {cells} | {sweep * 1e3:.2f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
