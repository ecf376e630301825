"""The wafer-scale vs GPU study, end to end, from one command:

    python -m benchmarks.study [--out docs/study] [--quick] [--report-only | --power-only]

For Llama 3.1 8B, Llama 3.1 70B and gpt-oss-120b (MoE) on wse-3, h100-sxm and
b200 (device counts from the core), the primary figures come from the offline
simulator (`memorywall.sim.simulate`: the serving engine on a virtual clock, exact,
no client to fall behind): closed-loop users 1 to 1,024. A few levels also run
live (`memorywall serve` + `memorywall bench`) as a spot check, each beside the
simulation of the same workload and seed, with the error between them. Then
`memorywall plan` answers one SLO per model: the cheapest deployment per backend.
Last, `memorywall plan --power-budget 250MW` asks what a data-centre contract's power
buys on a wafer, a GPU rack and an ASIC route (the claims table's last row;
`study_claims` computes the others from the core).
`study_report` draws the plots and writes the page from `results.json` alone.

The run checks itself: wherever the live client kept up, measured mean TPOT must
match the simulated mean TPOT within `TPOT_BOUND`; if not, it says which and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import study_report
from benchmarks._serve import emulator
from memorywall.argtypes import power_watts
from memorywall.core import load_hardware, load_model, plan_deployment
from memorywall.loadgen.bench import BenchConfig, Level, ServerFacts, levels, machine, run_level
from memorywall.loadgen.slo import parse_slo
from memorywall.loadgen.workload import Fixed, SyntheticWorkload, TraceWorkload
from memorywall.plan.budget import PowerBudget
from memorywall.plan.planner import LoadKind, Query, Space, plan
from memorywall.plan.report import as_json, pareto_plot
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.sim.simulate import simulate_level

MODELS = study_report.MODELS
BACKENDS = tuple(study_report.BACKEND_COLOURS)
USERS = tuple(2**i for i in range(11))  # 1 to 1,024
PROMPT, OUTPUT = 512, 128
SEED = 0
WAVES = 2  # requests per level: this many per user (at least MIN_REQUESTS)
MIN_REQUESTS = 8
# Live spot checks: (model, backend, users), run live and simulated alike.
SPOT_CHECKS = (
    *(("llama-3.1-8b", hw, users) for hw in BACKENDS for users in (1, 16)),
    ("llama-3.1-70b", "wse-3", 4),
    ("gpt-oss-120b", "h100-sxm", 4),
)
TPOT_BOUND = 0.02  # the server issue's fidelity bound, live against simulated
# The planner's question per model: p99 bounds, open-loop Poisson arrivals.
SLOS = {
    "llama-3.1-8b": "ttft=500ms,tpot=25ms",
    "llama-3.1-70b": "ttft=1s,tpot=50ms",
    "gpt-oss-120b": "ttft=1s,tpot=25ms",
}
# Narrower than the CLI's default search, to keep the study to minutes: the engine's
# default batch limit only, and the highest held load bisected to 15%.
PLAN_SPACE = {"max_devices": 8, "max_num_seqs": (EngineConfig().max_num_seqs,), "tolerance": 0.15}
PLAN_PROMPTS = 200
# The power-budget question: one model on a wafer, a GPU rack and an ASIC route.
POWER_MODEL = "llama-3.1-70b"
POWER_BACKENDS = ("wse-3", "gb200-nvl72", "tpu-v7")
POWER_BUDGET = "250MW"


def _workload() -> SyntheticWorkload:
    return SyntheticWorkload(Fixed(PROMPT), Fixed(OUTPUT))


def _config(hw: str, model: str, users: int, target: str = "simulated") -> BenchConfig:
    return BenchConfig(
        target=target,
        workload=_workload(),
        num_prompts=max(MIN_REQUESTS, WAVES * users),
        concurrency=(users,),
        warmup=1,
        seed=SEED,
        label=f"{hw} {model}",
    )


def _simulated(hw: str, model: str, users: int) -> dict:
    """One closed-loop level on the offline simulator, with its modelled energy."""
    deployment = plan_deployment(load_hardware(hw), load_model(model))
    run = simulate_level(
        deployment,
        EngineConfig(seed=SEED),
        _config(hw, model, users),
        Level(f"c{users}", users, None),
    )
    r = run.result
    r["modelled_energy_j_per_output_token"] = run.energy_j / run.tokens if run.tokens else None
    r["tdp_w"] = deployment.hardware.tdp_w
    r["sim_wall_s"] = run.wall_s
    r["sim_modelled_s"] = run.modelled_s
    return r


def simulate_all(models, backends, users) -> list[dict]:
    rows = []
    for model in models:
        for hw in backends:
            started = time.perf_counter()
            rows += [_simulated(hw, model, u) for u in users]
            print(
                f"simulated {hw:9} {model:14} users {users[0]}-{users[-1]} "
                f"in {time.perf_counter() - started:5.1f} s",
                flush=True,
            )
    return rows


def spot_check(model: str, hw: str, users: int) -> dict:
    """One level live against a fresh emulator, and the same level simulated."""
    deployment = plan_deployment(load_hardware(hw), load_model(model))
    facts = ServerFacts(hardware=hw, model=model, devices=deployment.devices, emulated=True)
    serve_args = ("--hardware", hw, "--model", model, "--devices", str(deployment.devices))
    with emulator(*serve_args, "--seed", str(SEED)) as target:
        live, records = run_level(
            _config(hw, model, users, target), Level(f"c{users}", users, None), facts
        )
    sim = _simulated(hw, model, users)
    replay = _replayed(deployment, records)
    row = {"model": model, "hardware": hw, "devices": deployment.devices, "users": users}
    for key in ("mean_ttft_ms", "mean_tpot_ms", "p99_ttft_ms", "p99_tpot_ms", "output_throughput"):
        row[f"live_{key}"] = live.get(key)
        row[f"sim_{key}"] = sim.get(key)
        row[f"replay_{key}"] = replay.get(key)
    row["live_modelled_ttft_ms"] = live.get("mean_modelled_ttft_ms")
    row["live_modelled_tpot_ms"] = live.get("mean_modelled_tpot_ms")
    row["suspect"] = list(live["suspect"])
    server = row["live_modelled_tpot_ms"]
    if server and row["replay_mean_tpot_ms"]:
        # Same engine, same arrivals: the live server's own timeline differs from the
        # replay only where its host woke late and the timeline moved later.
        drift = server / row["replay_mean_tpot_ms"] - 1
        if abs(drift) > TPOT_BOUND:
            row["suspect"].append(
                f"server host limited: its own timeline's TPOT is {drift:+.1%} from the "
                "replay of its arrivals (its host started steps late)"
            )
    for name in ("ttft", "tpot"):
        a, b = row[f"live_mean_{name}_ms"], row[f"replay_mean_{name}_ms"]
        row[f"{name}_error"] = a / b - 1 if a is not None and b else None
    print(
        f"live      {hw:9} {model:14} c{users:<4} TPOT {row['live_mean_tpot_ms']:.3f} ms "
        f"(replayed {row['replay_mean_tpot_ms']:.3f}, {row['tpot_error']:+.2%}; "
        f"simulated {row['sim_mean_tpot_ms']:.3f}) TTFT {row['live_mean_ttft_ms']:.2f} ms "
        f"(replayed {row['replay_mean_ttft_ms']:.2f}, simulated {row['sim_mean_ttft_ms']:.2f})"
        f"{'  SUSPECT' if row['suspect'] else ''}",
        flush=True,
    )
    return row


def _replayed(deployment, records) -> dict:
    """The live level's arrivals (its records as a trace: when the live engine received
    each request) on the offline engine."""
    trace = TraceWorkload.from_records([r.as_dict() for r in records], "live spot check")
    config = BenchConfig(
        target="simulated", workload=trace, num_prompts=len(trace), warmup=1, seed=SEED
    )
    return simulate_level(deployment, EngineConfig(seed=SEED), config, levels(config)[0]).result


def sanity(spots: list[dict]) -> list[str]:
    """Live levels the client kept up with whose TPOT strays from the simulation."""
    return [
        f"{s['model']} {s['hardware']} c{s['users']}: TPOT {s['tpot_error']:+.1%} from simulated"
        for s in spots
        if not s["suspect"] and s["tpot_error"] is not None and abs(s["tpot_error"]) > TPOT_BOUND
    ]


def plan_model(model: str, backends, out: Path) -> dict:
    """The planner's answer for the model's SLO, and its Pareto plot."""
    query = Query(
        model=load_model(model),
        workload=_workload(),
        slo=parse_slo(SLOS[model]),
        load=LoadKind.RATE,
        num_prompts=PLAN_PROMPTS,
        seed=SEED,
    )
    space = Space(hardware=tuple(load_hardware(hw) for hw in backends), **PLAN_SPACE)
    started = time.perf_counter()
    result = plan(query, space)
    pareto_plot(result, out / f"plan_{model}.png")
    doc = as_json(result)
    doc["slo_text"] = SLOS[model]
    doc["wall_s"] = time.perf_counter() - started
    print(f"planned   {model:14} in {doc['wall_s']:5.1f} s", flush=True)
    return doc


def power_plan(
    out: Path,
    model: str = POWER_MODEL,
    backends: tuple[str, ...] = POWER_BACKENDS,
    space: dict | None = None,
    prompts: int = PLAN_PROMPTS,
) -> dict:
    """`memorywall plan --power-budget`: each backend's fleet within the budget, at the
    model's SLO; its plot (with the budget panel) beside the others."""
    query = Query(
        model=load_model(model),
        workload=_workload(),
        slo=parse_slo(SLOS[model]),
        load=LoadKind.RATE,
        num_prompts=prompts,
        seed=SEED,
    )
    search = Space(hardware=tuple(load_hardware(hw) for hw in backends), **(space or PLAN_SPACE))
    budget = PowerBudget(watts=power_watts(POWER_BUDGET))
    started, cpu = time.perf_counter(), time.process_time()
    result = plan(query, search)
    pareto_plot(result, out / "power_budget.png", budget)
    doc = as_json(result, budget)
    doc["slo_text"] = SLOS[model]
    doc["wall_s"] = time.perf_counter() - started
    doc["cpu_s"] = time.process_time() - cpu
    print(f"power     {model:14} in {doc['wall_s']:5.1f} s ({doc['cpu_s']:.1f} s CPU)", flush=True)
    return doc


def config() -> dict:
    """The run's own settings, for the page to state."""
    return {
        "prompt_tokens": PROMPT,
        "output_tokens": OUTPUT,
        "users": list(USERS),
        "waves": WAVES,
        "min_requests": MIN_REQUESTS,
        "warmup": 1,
        "seed": SEED,
        "engine": {
            "max_num_seqs": EngineConfig().max_num_seqs,
            "max_num_batched_tokens": EngineConfig().max_num_batched_tokens,
        },
        "tpot_bound": TPOT_BOUND,
        "slos": SLOS,
        "plan_space": {k: list(v) if isinstance(v, tuple) else v for k, v in PLAN_SPACE.items()},
        "plan_prompts": PLAN_PROMPTS,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("docs/study"))
    parser.add_argument("--quick", action="store_true", help="users 1-64, one spot check")
    parser.add_argument("--report-only", action="store_true", help="redraw from saved results")
    parser.add_argument(
        "--power-only",
        action="store_true",
        help="rerun the power-budget plan alone, keep the rest of the saved results",
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    started = time.perf_counter()
    if args.report_only or args.power_only:
        data = json.loads(results_file.read_text())
        if args.power_only:
            data["power_budget"] = power_plan(args.out)
            results_file.write_text(json.dumps(data, indent=2))
    else:
        models, backends = args.models.split(","), args.backends.split(",")
        users = USERS[:7] if args.quick else USERS
        timings = {}
        t = time.perf_counter()
        simulated = simulate_all(models, backends, users)
        timings["simulation_s"] = time.perf_counter() - t
        t = time.perf_counter()
        spots = [
            spot_check(m, hw, u)
            for m, hw, u in SPOT_CHECKS[: 1 if args.quick else None]
            if m in models and hw in backends
        ]
        timings["live_s"] = time.perf_counter() - t
        t = time.perf_counter()
        plans = {m: plan_model(m, backends, args.out) for m in models}
        power = power_plan(args.out)
        timings["plan_s"] = time.perf_counter() - t
        data = {
            "config": {**config(), "users": list(users)},
            "simulated": simulated,
            "spot_checks": spots,
            "plans": plans,
            "power_budget": power,
            "timings": timings,
            "elapsed_s": time.perf_counter() - started,
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "failures": sanity(spots),
        }
        results_file.write_text(json.dumps(data, indent=2))
    study_report.write(data, args.out)
    print(f"study written to {args.out}/ in {time.perf_counter() - started:.0f} s")
    if data["failures"]:
        print(
            "SANITY CHECK FAILED: live and simulated disagree where the client kept up:",
            file=sys.stderr,
        )
        for f in data["failures"]:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
