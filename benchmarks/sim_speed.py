"""How fast `memorywall simulate` runs: modelled time per host second, and what it costs.

    python -m benchmarks.sim_speed            # full: 10,000 requests at 64 users (a few minutes)
    python -m benchmarks.sim_speed --quick    # smaller counts, for a smoke run

Four tables, Llama 3.1 8B, prompts 512 and outputs 128 tokens, closed loop:
1. the targets: 10,000 requests at 64 users on h100-sxm and wse-3, with fixed lengths
   (users stay in lock-step: long stretches of plain decoding) and with lengths spread
   +-90% (a request joins nearly every step); "engine" is the share of host CPU spent
   stepping the engine (the rest builds records and metrics; the whole command's
   start-up and files are `benchmarks.replay_compare`'s last row);
2. the scheduler's hot path per sequence per step: `schedule` + `complete` one step at a
   time, against the fast path that applies plain decode steps many at once;
3. cost against users (1 to 1,024) at a fixed number of requests;
4. cost against requests at 64 users;
5. cost against output length at 64 users (a request's fixed cost spread over more tokens).
Each point is the run with the least CPU time of `--repeat`. Speedup is modelled time
over the simulating process's wall time, and over its CPU time: on a dedicated host the
two agree; on a shared one (other processes on the same cores) wall time includes the
waits for a core, and CPU time is the code's own cost.
"""

from __future__ import annotations

import argparse
import platform
import time

from memorywall.core import Deployment, load_hardware, load_model, plan_deployment
from memorywall.loadgen.bench import BenchConfig, Level
from memorywall.loadgen.workload import Fixed, SyntheticWorkload, Uniform
from memorywall.server.engine.build import build_core
from memorywall.server.engine.offline import OfflineEngine
from memorywall.server.engine.scheduler import EngineConfig, Request
from memorywall.sim.simulate import LevelRun, simulate_level

MODEL = "llama-3.1-8b"
HARDWARE = ("h100-sxm", "wse-3")
TARGETS = {"h100-sxm": 200.0, "wse-3": 50.0}  # x real time, issue 12
PROMPT, OUTPUT = 512, 128
OUTPUTS = (128, 512, 2048)  # table 5: a request's own cost against its tokens' cost


def deployment(hardware: str) -> Deployment:
    return plan_deployment(load_hardware(hardware), load_model(MODEL))


def run(
    hardware: str,
    users: int,
    requests: int,
    repeat: int,
    *,
    spread: bool = False,
    output: int = OUTPUT,
) -> LevelRun:
    """`spread`: lengths uniform over +-90% of the means, so users finish at different
    steps and nearly every step admits a request (fixed lengths keep them in lock-step)."""
    lengths = (
        (Uniform(PROMPT, 0.9), Uniform(output, 0.9)) if spread else (Fixed(PROMPT), Fixed(output))
    )
    config = BenchConfig(
        target="sim",
        workload=SyntheticWorkload(*lengths),
        num_prompts=requests,
        warmup=1,
    )
    level = Level(f"c{users}", users, None)
    runs = [
        simulate_level(deployment(hardware), EngineConfig(), config, level) for _ in range(repeat)
    ]
    return min(runs, key=lambda r: r.cpu_s)  # the least CPU time, as the module says


def row(lr: LevelRun, *cells: str) -> str:
    per_request_us = lr.cpu_s / lr.result["num_prompts"] * 1e6
    return (
        f"| {' | '.join(cells)} | {lr.modelled_s:,.1f} s | {lr.wall_s:,.2f} s "
        f"| {lr.cpu_s:,.2f} s ({lr.engine_cpu_s / lr.cpu_s:.0%} engine) "
        f"| {lr.speedup:,.0f}x | **{lr.modelled_s / lr.cpu_s:,.0f}x** "
        f"| {lr.tokens / lr.cpu_s:,.0f} | {per_request_us:,.0f} us "
        f"| {lr.cpu_s / lr.steps * 1e6:,.1f} us |"
    )


HEAD = (
    "| modelled | host wall | host CPU | speedup (wall) | speedup (CPU) "
    "| tokens per CPU second | CPU per request | CPU per step |"
)
RULE = "---|" * (HEAD.count("|") - 1)


def hot_path(hardware: str, batch: int, fast: bool, steps: int = 200) -> float:
    """Host CPU seconds per sequence per decode step, `batch` sequences decoding together
    (their prefill steps included)."""
    core, _ = build_core(deployment(hardware), EngineConfig(max_num_seqs=batch))
    engine = OfflineEngine(core, fast=fast)
    for i in range(batch):
        prompt = tuple(range(1000 + i * 64, 1064 + i * 64))
        request = Request(request_id=str(i), prompt_ids=prompt, max_tokens=steps, ignore_eos=True)
        engine.submit(request, 0.0)
    t0 = time.process_time()
    engine.run()
    return (time.process_time() - t0) / core.counters.steps / batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (smoke run)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per point; best kept")
    args = parser.parse_args()
    big = 2_000 if args.quick else 10_000
    small = 500 if args.quick else 2_000
    print(f"machine: {platform.machine()}, Python {platform.python_version()}")
    print(f"Llama 3.1 8B, prompt {PROMPT}, output {OUTPUT} tokens, closed loop\n")

    print(f"1. {big:,} requests at 64 users\n")
    print(f"| hardware | target {HEAD}")
    print(f"|---|---|{RULE}")
    for spread in (False, True):
        for hw in HARDWARE:
            lr = run(hw, 64, big, args.repeat, spread=spread)
            target = f">= {TARGETS[hw]:g}x" + (", lengths spread" if spread else "")
            print(row(lr, hw, target), flush=True)

    hot_path(HARDWARE[0], 1, True)  # first use imports numpy.random: not the hot path
    print("\n2. Scheduler hot path, host CPU per sequence per decode step\n")
    print("| hardware | batch | step by step | fast path |")
    print("|---|---|---|---|")
    for hw in HARDWARE:
        for batch in (1, 64, 1024):
            slow, fast = hot_path(hw, batch, False), hot_path(hw, batch, True)
            print(f"| {hw} | {batch} | {slow * 1e6:.2f} us | {fast * 1e6:.3f} us |", flush=True)

    print(f"\n3. Cost against users, {small:,} requests\n")
    print(f"| hardware | users {HEAD}")
    print(f"|---|---|{RULE}")
    for hw in HARDWARE:
        for users in (1, 4, 16, 64, 256, 1024):
            print(row(run(hw, users, small, args.repeat), hw, str(users)), flush=True)

    print("\n4. Cost against requests, 64 users\n")
    print(f"| hardware | requests {HEAD}")
    print(f"|---|---|{RULE}")
    for hw in HARDWARE:
        for n in (small // 4, small, big):
            print(row(run(hw, 64, n, args.repeat), hw, f"{n:,}"), flush=True)

    print(f"\n5. Cost against output length, 64 users, {small:,} requests\n")
    print(f"| hardware | output tokens {HEAD}")
    print(f"|---|---|{RULE}")
    for hw in HARDWARE:
        for output in OUTPUTS:
            lr = run(hw, 64, small, args.repeat, output=output)
            print(row(lr, hw, f"{output:,}"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
