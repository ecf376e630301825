"""`memorywall simulate`: serve's deployment and engine options, bench's load options.

Writes what `memorywall bench --out` writes (a JSON file and a per-request JSONL
file per level, `summary.json`, the two PNG plots unless `--no-plots`), so
`memorywall bench compare` sets simulated sweeps beside measured ones. What the
simulation cost in host time goes to `wall_time.json` alone, so the result files depend
on the seed only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

from memorywall.argtypes import positive_int
from memorywall.cli import serve_options
from memorywall.cli.deployment import (
    add_deployment_arguments,
    add_engine_arguments,
    deployment_from_args,
    engine_config_from_args,
)
from memorywall.cli.pd_options import add_link_arguments
from memorywall.cli.usage import UsageError
from memorywall.core import Deployment
from memorywall.core.deployment import DeploymentNames
from memorywall.core.kv_transfer import parse_link
from memorywall.loadgen.bench import BenchConfig, Level, levels, machine, write_level
from memorywall.loadgen.options import add_load_arguments
from memorywall.server.engine import kernel
from memorywall.server.engine.lora import LoraConfig
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.pd.offline import PdFleet
from memorywall.sim.simulate import LevelRun, check_models, simulate_level

WALL_TIME = "wall_time.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="the bench workload on the serving engine on a virtual clock: bench's result "
        "files, far faster than real time",
    )
    add_deployment_arguments(p)
    add_engine_arguments(p)
    add_load_arguments(p)
    add_pd_arguments(p)
    serve_options.add_lora_arguments(p, serving=False)
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="levels simulated at once, each in its own process (same results; default 1)",
    )
    p.set_defaults(func=command, label="sim")


def add_pd_arguments(p: argparse.ArgumentParser) -> None:
    """The disaggregated deployment `memorywall.sim.pd` simulates."""
    g = p.add_argument_group(
        "disaggregated deployment (the deployment above becomes the decode pool)"
    )
    g.add_argument("--prefill-hardware", help="prefill pool's hardware: turns disaggregation on")
    g.add_argument(
        "--prefill-devices", type=positive_int, help="devices per prefill worker (default: fewest)"
    )
    g.add_argument("--prefill-workers", type=positive_int, default=1, help="prefill workers (x)")
    g.add_argument("--decode-workers", type=positive_int, default=1, help="decode workers (y)")
    add_link_arguments(
        g,
        link_help="the link between the pools: nvlink, nic (each side's external I/O) or GB/s",
        overlap_help="send layer i's KV while layer i+1 prefills",
    )


def fleet_from_args(
    args: argparse.Namespace, decode: Deployment, engine: EngineConfig
) -> PdFleet | None:
    """The split fleet the options name, or None without `--prefill-hardware`."""
    if args.prefill_hardware is None:
        return None
    prefill = DeploymentNames(
        hardware=args.prefill_hardware,
        model=args.model,
        devices=args.prefill_devices,
        weight_precision=decode.weight_precision.value,
        kv_precision=decode.kv_precision.value,
    ).build()
    return PdFleet(
        prefill=prefill,
        prefill_workers=args.prefill_workers,
        decode=decode,
        decode_workers=args.decode_workers,
        link=parse_link(args.kv_link),
        layer_overlap=args.kv_layer_overlap,
        engine=engine,
    )


def command(args: argparse.Namespace) -> int:
    from memorywall.loadgen.cli import BenchError

    deployment, engine_config = deployment_from_args(args), engine_config_from_args(args)
    try:
        fleet = fleet_from_args(args, deployment, engine_config)
        return run(args, deployment, engine_config, fleet=fleet)
    except BenchError as e:
        raise UsageError(str(e)) from None


def run(
    args: argparse.Namespace,
    deployment: Deployment,
    engine_config: EngineConfig,
    *,
    fleet: PdFleet | None = None,
) -> int:
    """Simulate every level (on the split `fleet` when one is given, `memorywall.sim.pd`); raises
    `loadgen.cli.BenchError` for bad load options."""
    # Imported here: `memorywall --help` need not load the bench CLI.
    from memorywall.loadgen.cli import format_result, sweep_config, workload_from_args, write_sweep

    workload, slo = workload_from_args(args)
    lora = serve_options.lora_config(args, deployment.model, serving=False)
    if lora is not None and fleet is not None:
        raise UsageError("--lora-modules: not with a disaggregated fleet (--prefill-hardware)")
    try:
        models = (r.model for r in getattr(workload, "requests", ()))
        check_models(models, deployment.model.name, lora)
    except ValueError as e:
        raise UsageError(str(e)) from None
    target = deployment.describe() if fleet is None else fleet.describe()
    config = sweep_config(args, workload, slo, target=target)
    runs = []
    for lr in level_runs(deployment, engine_config, config, fleet, jobs=args.jobs, lora=lora):
        runs.append(lr)
        print(format_result(lr.result), flush=True)
        print(f"  {speed_line(lr)}", flush=True)
        if args.out:
            write_level(args.out, lr.result, lr.records)
    if args.out:
        results = [lr.result for lr in runs]
        write_sweep(args.out, config.label, results, plot=args.plots)
        (args.out / WALL_TIME).write_text(json.dumps(wall_report(runs), indent=2))
        print(f"wrote {args.out}/")
    return 0


def level_runs(
    deployment: Deployment,
    engine_config: EngineConfig,
    config: BenchConfig,
    fleet: PdFleet | None,
    *,
    jobs: int = 1,
    lora: LoraConfig | None = None,
) -> Iterator[LevelRun]:
    """Each level's run, in level order. With `jobs` > 1 that many levels run at once, each
    in its own process: a level's engine, clock and seed are its own, so the results are
    the ones one process gives; only the host time each level took differs."""
    todo = levels(config)
    jobs = min(jobs, len(todo))
    if jobs <= 1:
        for level in todo:
            yield simulate_one(deployment, engine_config, config, level, fleet, lora)
        return
    # spawn, not fork: a child starts clean instead of inheriting this process's threads.
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = [
            pool.submit(simulate_one, deployment, engine_config, config, level, fleet, lora)
            for level in todo
        ]
        for future in futures:
            yield future.result()
    finally:
        pool.shutdown(cancel_futures=True)


def simulate_one(
    deployment: Deployment,
    engine_config: EngineConfig,
    config: BenchConfig,
    level: Level,
    fleet: PdFleet | None,
    lora: LoraConfig | None = None,
) -> LevelRun:
    """One level, on `fleet` when given, else on `deployment` (serving `lora`'s adapters)."""
    if fleet is None:
        return simulate_level(deployment, engine_config, config, level, lora=lora)
    from memorywall.sim.pd import simulate_pd_level

    return simulate_pd_level(fleet, config, level)


def speed_line(lr: LevelRun) -> str:
    return (
        f"simulated {lr.modelled_s:,.3f} s of engine time in {lr.wall_s:,.3f} s "
        f"({lr.speedup:,.0f}x real time, {lr.tokens / lr.wall_s:,.0f} tokens per host second, "
        f"{lr.steps:,} steps)"
        # Said on the line the speed is read from: without the kernel it is several times slower.
        + ("" if kernel.enabled() else "; pure-Python engine: the compiled kernel is off")
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
