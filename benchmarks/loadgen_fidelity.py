"""Can the load generator be trusted? Four measurements, one command:

    python -m benchmarks.loadgen_fidelity [--quick]

1. Release accuracy: asyncio-throttle (the design's listed limiter) against the
   absolute-deadline scheduler the load generator uses, asked for N req/s.
2. Transport floor: first-message latency of a gRPC stream whose server answers
   at once: what every client-side TTFT contains beyond the server's model.
3. Agreement with the emulator's plan: mean TTFT and TPOT measured by
   `memorywall bench` against the modelled values, concurrency 1..64, on h100-sxm
   and wse-3 serving Llama 3.1 8B.
4. Capacity: the highest open-loop request rate and closed-loop token rate one
   load-generator process and two worker processes measure before the run
   marks itself suspect (send lag or client CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time

import grpc
import numpy as np
from asyncio_throttle import Throttler

from benchmarks._serve import emulator
from memorywall.loadgen import arrivals
from memorywall.loadgen.bench import BenchConfig, Level, ServerFacts, run_level
from memorywall.loadgen.workload import Fixed, SyntheticWorkload
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc as pb_grpc


async def _throttle_release(rate: float, n: int) -> np.ndarray:
    throttler = Throttler(rate_limit=int(rate), period=1.0)
    times = []
    for _ in range(n):
        async with throttler:
            times.append(time.perf_counter())
    return np.array(times)


async def _deadline_release(rate: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    offsets = arrivals.constant(rate, n)
    start = time.perf_counter()
    times = []
    for off in offsets:
        delay = start + off - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        times.append(time.perf_counter())
    return np.array(times), start + offsets


def release_accuracy(quick: bool) -> None:
    print("\n## 1. Release accuracy (no server; timestamps only)\n")
    print(
        "| asked req/s | asyncio-throttle achieved | deadline scheduler achieved | "
        "deadline p99 lateness |"
    )
    print("|---|---|---|---|")
    for rate in (50, 100, 500, 1000) if not quick else (100, 500):
        n = int(rate * 2)
        t = asyncio.run(_throttle_release(rate, n))
        # The throttle lets rate_limit through at once, then paces: rate over the whole run.
        throttle_rate = (n - 1) / (t[-1] - t[0])
        d, planned = asyncio.run(_deadline_release(rate, n))
        late = np.percentile(d - planned, 99) * 1e3
        print(
            f"| {rate} | {throttle_rate:,.1f} | {(n - 1) / (d[-1] - d[0]):,.1f} | {late:.2f} ms |"
        )


async def _first_message_latency(target: str, n: int) -> np.ndarray:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.EngineStub(channel)
        await stub.GetServerInfo(pb.GetServerInfoRequest())
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            async for _msg in stub.Generate(pb.GenerateRequest(token_count=1, max_tokens=1)):
                out.append(time.perf_counter() - t0)
                break
        return np.array(out)


def transport_floor() -> None:
    print("\n## 2. Transport floor\n")
    # wse-3 + 8B: a 1-token prompt's prefill is ~0.6 ms of modelled time; subtract it.
    with emulator("--hardware", "wse-3", "--model", "llama-3.1-8b") as target:
        lat = asyncio.run(_first_message_latency(target, 200))
    print(
        f"first message of a 1-token request, 200 calls: p50 {np.median(lat) * 1e3:.2f} ms, "
        f"mean {lat.mean() * 1e3:.2f} ms (includes ~0.6 ms of modelled prefill)"
    )


def _config(target: str, **kw) -> BenchConfig:
    base = dict(
        target=target,
        workload=SyntheticWorkload(Fixed(128), Fixed(128)),
        num_prompts=64,
        warmup=2,
        label="bench",
    )
    return BenchConfig(**(base | kw))


def agreement(quick: bool) -> None:
    print("\n## 3. Measured against the emulator's modelled values\n")
    print(
        "| backend | users | TTFT measured | TTFT modelled | diff | TPOT measured | "
        "TPOT modelled | diff | client CPU | suspect |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for hw in ("h100-sxm", "wse-3"):
        with emulator("--hardware", hw, "--model", "llama-3.1-8b") as target:
            facts = ServerFacts(hardware=hw, model="llama-3.1-8b", devices=1, emulated=True)
            for c in (1, 4, 16, 64) if not quick else (1, 16):
                n = max(32, 2 * c) if not quick else max(16, c)
                config = _config(target, num_prompts=n, concurrency=(c,))
                r, _ = run_level(config, Level(f"c{c}", c, None), facts)
                ttft_d = r["mean_ttft_ms"] - r["mean_modelled_ttft_ms"]
                tpot_d = r["mean_tpot_ms"] / r["mean_modelled_tpot_ms"] - 1
                print(
                    f"| {hw} | {c} | {r['mean_ttft_ms']:.2f} ms "
                    f"| {r['mean_modelled_ttft_ms']:.2f} ms "
                    f"| {ttft_d:+.2f} ms | {r['mean_tpot_ms']:.3f} ms "
                    f"| {r['mean_modelled_tpot_ms']:.3f} ms | {tpot_d:+.2%} "
                    f"| {r['client_cpu_fraction']:.0%} | {'; '.join(r['suspect']) or '-'} |",
                    flush=True,
                )


def capacity(quick: bool) -> None:
    print("\n## 4. Capacity before the run marks itself suspect\n")
    print(
        "| mode | workers | load | achieved | output tok/s | p99 send lag | client CPU | suspect |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with emulator(
        "--hardware", "wse-3", "--model", "llama-3.1-8b", "--max-num-seqs", "1024"
    ) as target:
        facts = ServerFacts(hardware="wse-3", model="llama-3.1-8b", devices=1, emulated=True)
        for workers in (1, 2):
            for rate in (50, 100, 200, 400) if not quick else (100,):
                config = _config(
                    target,
                    workload=SyntheticWorkload(Fixed(32), Fixed(8)),
                    num_prompts=int(rate * 3),
                    request_rates=(rate,),
                    workers=workers,
                    warmup=0,
                )
                r, _ = run_level(config, Level(f"rate{rate}", None, rate), facts)
                print(
                    f"| open loop | {workers} | {rate} req/s "
                    f"| {r['request_throughput']:,.1f} req/s "
                    f"| {r['output_throughput']:,.0f} | {r['p99_send_lag_ms']:.2f} ms "
                    f"| {r['client_cpu_fraction']:.0%} | {'; '.join(r['suspect']) or '-'} |",
                    flush=True,
                )
            for users in (16, 64) if not quick else (16,):
                config = _config(
                    target,
                    workload=SyntheticWorkload(Fixed(32), Fixed(512)),
                    num_prompts=users * 2,
                    concurrency=(users,),
                    workers=workers,
                    warmup=0,
                )
                r, _ = run_level(config, Level(f"c{users}", users, None), facts)
                print(
                    f"| closed loop | {workers} | {users} users "
                    f"| {r['request_throughput']:,.1f} req/s "
                    f"| {r['output_throughput']:,.0f} | - | {r['client_cpu_fraction']:.0%} "
                    f"| {'; '.join(r['suspect']) or '-'} |",
                    flush=True,
                )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(
        f"# loadgen fidelity: {platform.machine()}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    release_accuracy(args.quick)
    transport_floor()
    agreement(args.quick)
    capacity(args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
