"""`memorywall simulate`: serve's deployment and engine options, bench's load options.

Writes what `memorywall bench --out` writes (a JSON file and a per-request JSONL
file per level, `summary.json`), so `memorywall bench compare` sets simulated sweeps
beside measured ones; each message's time goes to a columnar `LABEL-LEVEL.tokens.npz`
beside the JSONL unless `--token-times jsonl` (inline, as bench writes it) or `none`,
and the two PNG plots are drawn only with `--plots`. What the simulation cost in host
time (each level's, and the whole command's from the process's start) goes to
`wall_time.json` alone, so the result files depend on the seed only.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

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
from memorywall.cluster.options import add_ray_argument
from memorywall.core import Deployment
from memorywall.core.deployment import DeploymentNames
from memorywall.core.kv_transfer import parse_link
from memorywall.loadgen.bench import BenchConfig, Level, levels, machine, write_level
from memorywall.loadgen.options import add_load_arguments
from memorywall.loadgen.records import TOKEN_TIMES
from memorywall.server.engine import kernel
from memorywall.server.engine.lora import LoraConfig
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.sim import host
from memorywall.sim.simulate import LevelRun, check_models, simulate_level

if TYPE_CHECKING:  # imported where used: a plain run needs neither the split fleet nor a pool
    from memorywall.server.pd.offline import PdFleet

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
    add_output_arguments(p)
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="levels simulated at once, each in its own process (same results; default 1)",
    )
    add_ray_argument(p, "simulate each level as a task (same result files)")
    p.set_defaults(func=command, label="sim")


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """What `--out` writes beyond the result files: plots only when asked for (matplotlib's
    import alone costs more than the rest of a 10,000-request level around its engine)."""
    p.set_defaults(plots=False)
    p.add_argument(
        "--plots",
        dest="plots",
        action="store_true",
        help="with --out, also draw bench's two PNG plots (off by default: about a second "
        "of CPU; --no-plots is accepted and is the default)",
    )
    p.add_argument(
        "--token-times",
        choices=TOKEN_TIMES,
        default="npz",
        help="with --out, where each message's time goes: npz (default) a columnar "
        "LABEL-LEVEL.tokens.npz beside the per-request JSONL; jsonl inline in its rows, "
        "as bench writes them (about 10x the host time); none not written",
    )


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
    from memorywall.server.pd.offline import PdFleet

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
    if args.ray is not None and args.jobs > 1:
        raise UsageError("--ray and --jobs: give one (the cluster's CPUs set the width)")
    runs = []
    for lr in level_runs(
        deployment, engine_config, config, fleet, jobs=args.jobs, lora=lora, ray=args.ray
    ):
        runs.append(lr)
        print(format_result(lr.result), flush=True)
        print(f"  {speed_line(lr)}", flush=True)
        if args.out:
            write_level(
                args.out, lr.result, lr.records, token_times=args.token_times, messages=lr.messages
            )
    if args.out:
        results = [lr.result for lr in runs]
        write_sweep(args.out, config.label, results, plot=args.plots)
    whole = host.since_start()
    print(command_line(runs, whole), flush=True)
    if args.out:
        (args.out / WALL_TIME).write_text(json.dumps(wall_report(runs, whole), indent=2))
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
    ray: str | None = None,
) -> Iterator[LevelRun]:
    """Each level's run, in level order. With `jobs` > 1 that many levels run at once, each
    in its own process: a level's engine, clock and seed are its own, so the results are
    the ones one process gives; only the host time each level took differs. With `ray` (a
    cluster's address) each level is a Ray task there, for the same reason."""
    todo = levels(config)
    if ray is not None:
        from memorywall.cluster.pools import ray_pool

        with ray_pool(ray) as cluster:
            tasks = [
                cluster.submit(simulate_one, deployment, engine_config, config, level, fleet, lora)
                for level in todo
            ]
            for task in tasks:
                yield task.result()
        return
    jobs = min(jobs, len(todo))
    if jobs <= 1:
        for level in todo:
            yield simulate_one(deployment, engine_config, config, level, fleet, lora)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

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
    """The level's host time: stepping the engine (with releasing requests), and the
    level's whole (records and metrics too); files and start-up are the command's line."""
    return (
        f"simulated {lr.modelled_s:,.3f} s of engine time in {lr.wall_s:,.3f} s of host time "
        f"for the level ({lr.speedup:,.0f}x real time; {lr.cpu_s:,.3f} s CPU, of which the "
        f"engine's steps {lr.engine_cpu_s:,.3f} s; {lr.tokens / lr.wall_s:,.0f} tokens per host "
        f"second, {lr.steps:,} steps)"
        # Said on the line the speed is read from: without the kernel it is several times slower.
        + ("" if kernel.enabled() else "; pure-Python engine: the compiled kernel is off")
    )


def command_line(runs: list[LevelRun], whole: host.HostCost) -> str:
    """The whole command's cost: start-up, imports, every level and the files so far."""
    modelled = sum(lr.modelled_s for lr in runs)
    since = "since the process started" if whole.from_start else "since start-up"
    return (
        f"whole command: {modelled:,.3f} s simulated in {whole.wall_s:,.2f} s wall "
        f"({_ratio(modelled, whole.wall_s)} real time), {whole.cpu_s:,.2f} s CPU "
        f"({_ratio(modelled, whole.cpu_s)}), {since}"
    )


def _ratio(modelled_s: float, host_s: float) -> str:
    return f"{modelled_s / host_s:,.0f}x" if host_s > 0 else "n/a"


def wall_report(runs: list[LevelRun], whole: host.HostCost) -> dict:
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        # Everything before the files' last write: start-up, imports, levels, files.
        "command": {
            "wall_s": whole.wall_s,
            "cpu_s": whole.cpu_s,
            "wall_from_process_start": whole.from_start,
            "modelled_s": sum(lr.modelled_s for lr in runs),
        },
        "levels": [
            {
                "level": lr.result["level"],
                "wall_s": lr.wall_s,
                "engine_s": lr.engine_s,
                "cpu_s": lr.cpu_s,
                "engine_cpu_s": lr.engine_cpu_s,
                "modelled_s": lr.modelled_s,
                "speedup": lr.speedup,
                "steps": lr.steps,
                "tokens": lr.tokens,
                "tokens_per_wall_s": lr.tokens / lr.wall_s if lr.wall_s > 0 else None,
            }
            for lr in runs
        ],
    }
