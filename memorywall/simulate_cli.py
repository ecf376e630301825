"""`memorywall simulate`: serve's deployment and engine options, bench's load options.

Writes what `memorywall bench --out` writes (a JSON file and a per-request JSONL
file per level, `summary.json`, the two PNG plots), so `memorywall bench compare`
sets simulated sweeps beside measured ones. What the simulation cost in host
time goes to `wall_time.json` alone, so the result files depend on the seed only.
"""

from __future__ import annotations

import argparse
import json
import time

from memorywall.core import Deployment
from memorywall.loadgen.bench import levels, machine, write_level
from memorywall.loadgen.cli import format_result, sweep_config, workload_from_args, write_sweep
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.pd.offline import PdFleet
from memorywall.simulate import LevelRun, simulate_level

WALL_TIME = "wall_time.json"


def run(
    args: argparse.Namespace,
    deployment: Deployment,
    engine_config: EngineConfig,
    *,
    fleet: PdFleet | None = None,
) -> int:
    """Simulate every level (on the split `fleet` when one is given, `simulate_pd`); raises
    `loadgen.cli.BenchError` for bad load options."""
    from memorywall.simulate_pd import simulate_pd_level

    workload, slo = workload_from_args(args)
    target = deployment.describe() if fleet is None else fleet.describe()
    config = sweep_config(args, workload, slo, target=target)
    runs = []
    for level in levels(config):
        if fleet is None:
            lr = simulate_level(deployment, engine_config, config, level)
        else:
            lr = simulate_pd_level(fleet, config, level)
        runs.append(lr)
        print(format_result(lr.result), flush=True)
        print(f"  {speed_line(lr)}", flush=True)
        if args.out:
            write_level(args.out, lr.result, lr.records)
    if args.out:
        results = [lr.result for lr in runs]
        write_sweep(args.out, config.label, results)
        (args.out / WALL_TIME).write_text(json.dumps(wall_report(runs), indent=2))
        print(f"wrote {args.out}/")
    return 0


def speed_line(lr: LevelRun) -> str:
    return (
        f"simulated {lr.modelled_s:,.3f} s of engine time in {lr.wall_s:,.3f} s "
        f"({lr.speedup:,.0f}x real time, {lr.tokens / lr.wall_s:,.0f} tokens per host second, "
        f"{lr.steps:,} steps)"
    )


def wall_report(runs: list[LevelRun]) -> dict:
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "levels": [
            {
                "level": lr.result["level"],
                "wall_s": lr.wall_s,
                "cpu_s": lr.cpu_s,
                "modelled_s": lr.modelled_s,
                "speedup": lr.speedup,
                "steps": lr.steps,
                "tokens": lr.tokens,
                "tokens_per_wall_s": lr.tokens / lr.wall_s if lr.wall_s > 0 else None,
            }
            for lr in runs
        ],
    }
