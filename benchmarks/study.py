"""The wafer-scale vs GPU study, end to end, from one command:

    python -m benchmarks.study [--out docs/study] [--quick]

For Llama 3.1 8B, Llama 3.1 70B and gpt-oss-120b (MoE), start an emulated
server for wse-3, h100-sxm and b200 in turn (device counts from the core),
drive each with the same closed-loop concurrency sweep and open-loop rate
sweep, and record what `memorywall bench` measures beside the server's
modelled timeline and modelled energy; then measure the emulator itself (lag
and lateness at load, `benchmarks/server_fidelity.py`). `study_report` draws the plots and
writes the page. The run checks itself: wherever the load generator kept up,
measured mean TPOT must match the modelled TPOT within the server issue's 2%;
if not, it says which and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import server_fidelity, study_report
from benchmarks._serve import emulator
from memorywall.client import Client
from memorywall.core import load_hardware, load_model, plan_deployment
from memorywall.loadgen.bench import BenchConfig, Level, ServerFacts, run_level
from memorywall.loadgen.workload import Fixed, SyntheticWorkload

MODELS = study_report.MODELS
BACKENDS = ("wse-3", "h100-sxm", "b200")
CONCURRENCY = (1, 4, 16, 64)
RATES = (2.0, 8.0)
PROMPT, OUTPUT = 512, 128
TPOT_BOUND = 0.02  # the server issue's fidelity bound
# The emulator's own figures (benchmarks/server_fidelity.py), at a few levels.
EMULATOR_LEVELS = {"wse-3": [1, 16, 64], "h100-sxm": [1, 64, 256]}


def _requests(level: Level, quick: bool) -> int:
    """Two waves of users per closed-loop level (at least 4 requests); 24 open-loop arrivals."""
    if level.request_rate is not None:
        return 12 if quick else 24
    return max(2, level.concurrency) if quick else max(4, 2 * level.concurrency)


def run_backend(hw: str, model: str, quick: bool) -> list[dict]:
    deployment = plan_deployment(load_hardware(hw), load_model(model))
    facts = ServerFacts(hardware=hw, model=model, devices=deployment.devices, emulated=True)
    levels = [Level(f"c{c}", c, None) for c in CONCURRENCY]
    levels += [Level(f"rate{r:g}", None, r) for r in RATES]
    results = []
    serve_args = ("--hardware", hw, "--model", model, "--devices", str(deployment.devices))
    with emulator(*serve_args) as target, Client(target) as client:
        for level in levels:
            config = BenchConfig(
                target=target,
                workload=SyntheticWorkload(Fixed(PROMPT), Fixed(OUTPUT)),
                num_prompts=_requests(level, quick),
                concurrency=(level.concurrency,) if level.concurrency else (),
                request_rates=(level.request_rate,) if level.request_rate else (),
                warmup=1,
                label=f"{hw} {model}",
            )
            before = client.server_info()
            result, _ = run_level(config, level, facts)
            after = client.server_info()
            tokens = after.tokens_generated - before.tokens_generated
            energy = after.modelled_energy_j - before.modelled_energy_j
            result["modelled_energy_j_per_output_token"] = energy / tokens if tokens else None
            result["tdp_w"] = deployment.hardware.tdp_w
            results.append(result)
            print(
                f"{hw:9} {model:14} {level.name:8} "
                f"TPOT {result['mean_tpot_ms']:8.3f} ms "
                f"(modelled {result['mean_modelled_tpot_ms']:8.3f}) "
                f"TTFT {result['mean_ttft_ms']:8.2f} ms "
                f"(modelled {result['mean_modelled_ttft_ms']:8.2f})"
                f"{'  SUSPECT' if result['suspect'] else ''}",
                flush=True,
            )
    return results


def sanity(results: list[dict]) -> list[str]:
    """Levels the client kept up with whose measured TPOT strays from the model."""
    failures = []
    for r in results:
        if r["suspect"] or r["mean_tpot_ms"] is None:
            continue
        err = r["mean_tpot_ms"] / r["mean_modelled_tpot_ms"] - 1
        if abs(err) > TPOT_BOUND:
            failures.append(f"{r['label']} {r['level']}: TPOT {err:+.1%} from the model")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("docs/study"))
    parser.add_argument("--quick", action="store_true", help="fewer requests per level")
    parser.add_argument("--report-only", action="store_true", help="redraw from saved results")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    started = time.perf_counter()
    if args.report_only:
        data = json.loads(results_file.read_text())
    else:
        models, backends = args.models.split(","), args.backends.split(",")
        results = [r for m in models for hw in backends for r in run_backend(hw, m, args.quick)]
        emulator_rows = [
            row
            for hw, levels in EMULATOR_LEVELS.items()
            for row in server_fidelity.measure(hw, levels, 1, [])
        ]
        data = {
            "results": results,
            "emulator_rows": emulator_rows,
            "elapsed_s": time.perf_counter() - started,
            "date": time.strftime("%Y-%m-%d"),
            "machine": results[0]["machine"] if results else "",
            "failures": sanity(results),
        }
        results_file.write_text(json.dumps(data, indent=2))
    study_report.write(data, args.out)
    print(f"study written to {args.out}/ in {time.perf_counter() - started:.0f} s")
    if data["failures"]:
        print(
            "SANITY CHECK FAILED: measured and modelled disagree where the client kept up:",
            file=sys.stderr,
        )
        for f in data["failures"]:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
