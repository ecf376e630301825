"""The OpenAI HTTP front against the gRPC front of the same engine.

    python -m benchmarks.http_fidelity

One `memorywall serve --http-port 0` process per backend (h100-sxm, wse-3;
Llama 3.1 8B) serves both fronts from one engine. At concurrency 1, 16 and 64,
`memorywall bench` runs the same closed-loop workload through
`--backend memorywall-grpc` and `--backend openai-completions` and prints the
measured mean TTFT and TPOT of each, their difference, the modelled values,
the output token rate and whether the run marked itself suspect.
"""

from __future__ import annotations

import platform
import time

from benchmarks._serve import emulator_with_http
from memorywall.loadgen.bench import BenchConfig, Level, ServerFacts, run_level
from memorywall.loadgen.target import Backend
from memorywall.loadgen.workload import Fixed, SyntheticWorkload

LEVELS = (1, 16, 64)


def _run(target: str, backend: Backend, users: int, facts: ServerFacts) -> dict:
    config = BenchConfig(
        target=target,
        backend=backend,
        model="llama-3.1-8b" if backend.is_openai else None,
        workload=SyntheticWorkload(Fixed(128), Fixed(128)),
        num_prompts=max(8, 2 * users),
        concurrency=(users,),
        warmup=2,
        label=backend.value,
    )
    result, _ = run_level(config, Level(f"c{users}", users, None), facts)
    return result


def main() -> int:
    print(
        f"# HTTP vs gRPC fronts: {platform.machine()}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print(
        "| backend | users | front | TTFT | TPOT | TTFT vs gRPC | TPOT vs gRPC "
        "| modelled TTFT / TPOT | output tok/s | suspect |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for hw in ("h100-sxm", "wse-3"):
        facts = ServerFacts(hardware=hw, model="llama-3.1-8b", devices=1, emulated=True)
        with emulator_with_http("--hardware", hw, "--model", "llama-3.1-8b") as (grpc, http):
            for users in LEVELS:
                base = _run(grpc, Backend.MEMORYWALL_GRPC, users, facts)
                over = _run(http, Backend.OPENAI_COMPLETIONS, users, facts)
                for front, r in (("gRPC", base), ("HTTP", over)):
                    ttft_d = r["mean_ttft_ms"] / base["mean_ttft_ms"] - 1
                    tpot_d = r["mean_tpot_ms"] / base["mean_tpot_ms"] - 1
                    print(
                        f"| {hw} | {users} | {front} | {r['mean_ttft_ms']:.2f} ms "
                        f"| {r['mean_tpot_ms']:.3f} ms | {ttft_d:+.1%} | {tpot_d:+.2%} "
                        f"| {r['mean_modelled_ttft_ms']:.2f} / {r['mean_modelled_tpot_ms']:.3f} ms "
                        f"| {r['output_throughput']:,.0f} | {'; '.join(r['suspect']) or '-'} |",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
