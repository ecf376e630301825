"""The OpenAI HTTP front against the gRPC front of the same engine, as `bench --workers` sees them.

    python -m benchmarks.http_fidelity [--runs h100-sxm:256,wse-3:64,h100-sxm:1024]
                                       [--workers 2] [--requests-per-user 2]

One `memorywall serve --http-port 0` process per run serves both fronts from
one engine (`--max-num-seqs` at least the users). At each run's concurrency,
the load generator (`memorywall bench`'s code, its requests spread over
`--workers` client processes) runs the same closed-loop workload (256-token
prompts, 128 output tokens) through `--backend memorywall-grpc` and
`--backend openai-completions`, and the table prints the measured mean TTFT,
mean and p99 TPOT, p99 ITL, the modelled TTFT and TPOT (the timeline the engine
ran), the output token rate, the server process's CPU time (user + system, from
/proc) per token it generated during the run, whether the run marked itself
suspect, the host stalls the server counted during the run (any stall: the host
fell behind and the modelled timeline moved later, so the run is degraded), and
the machine's 1-minute load average before it.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import grpc

from benchmarks._serve import serving
from benchmarks.message_cost import cpu_s
from memorywall.loadgen.bench import BenchConfig, Level, ServerFacts, run_level
from memorywall.loadgen.target import Backend
from memorywall.loadgen.workload import Fixed, SyntheticWorkload
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc as pb_grpc

MODEL = "llama-3.1-8b"


def _stalls(target: str) -> tuple[int, float, int]:
    """The server's host stalls so far (count, seconds) and the tokens it generated."""
    with grpc.insecure_channel(target) as channel:
        info = pb_grpc.EngineStub(channel).GetServerInfo(pb.GetServerInfoRequest())
    return info.host_stall.stalls, info.host_stall.stalled_s, info.tokens_generated


def _run(
    target: str, backend: Backend, users: int, facts: ServerFacts, workers: int, per_user: int
) -> dict:
    config = BenchConfig(
        target=target,
        backend=backend,
        model=MODEL if backend.is_openai else None,
        workload=SyntheticWorkload(Fixed(256), Fixed(128)),
        num_prompts=per_user * users,
        concurrency=(users,),
        warmup=min(users, 8),
        workers=workers,
        label=backend.value,
    )
    result, _ = run_level(config, Level(f"c{users}", users, None), facts)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", default="h100-sxm:256,wse-3:64,h100-sxm:1024")
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--requests-per-user", type=int, default=2)
    args = parser.parse_args()
    print(
        f"# HTTP vs gRPC fronts through bench --workers {args.workers}: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}\n"
    )
    print(
        "| backend | users | front | load | TTFT | TPOT mean / p99 | ITL p99 "
        "| modelled TTFT / TPOT | TPOT vs modelled | output tok/s | server CPU per token "
        "| suspect | host stalls |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in args.runs.split(","):
        hw, users = run.split(":")
        n = int(users)
        facts = ServerFacts(hardware=hw, model=MODEL, devices=1, emulated=True)
        serve_args = ["--hardware", hw, "--model", MODEL, "--http-port", "0"]
        with serving(*serve_args, "--max-num-seqs", str(max(256, n))) as ready:
            fronts = (
                ("gRPC", ready.grpc_target, Backend.MEMORYWALL_GRPC),
                ("HTTP", ready.http_url, Backend.OPENAI_COMPLETIONS),
            )
            for front, target, backend in fronts:
                load = os.getloadavg()[0]
                before, cpu_0 = _stalls(ready.grpc_target), cpu_s(ready.pid)
                r = _run(target, backend, n, facts, args.workers, args.requests_per_user)
                after, cpu_1 = _stalls(ready.grpc_target), cpu_s(ready.pid)
                stalls, lost = after[0] - before[0], after[1] - before[1]
                # Warm-up included: the server's CPU over every token it generated meanwhile.
                tokens = after[2] - before[2]
                per_token = f"{(cpu_1 - cpu_0) / tokens * 1e6:.1f} us" if tokens else "-"
                share = lost / r["duration"] if r["duration"] else 0.0
                marked = f"{stalls} ({share:.1%} of the run)" if stalls else "0"
                tpot_err = r["mean_tpot_ms"] / r["mean_modelled_tpot_ms"] - 1
                print(
                    f"| {hw} | {n} | {front} | {load:.1f} | {r['mean_ttft_ms']:.2f} ms "
                    f"| {r['mean_tpot_ms']:.3f} / {r['p99_tpot_ms']:.3f} ms "
                    f"| {r['p99_itl_ms']:.2f} ms "
                    f"| {r['mean_modelled_ttft_ms']:.2f} / {r['mean_modelled_tpot_ms']:.3f} ms "
                    f"| {tpot_err:+.2%} | {r['output_throughput']:,.0f} | {per_token} "
                    f"| {'; '.join(r['suspect']) or '-'} | {marked} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
