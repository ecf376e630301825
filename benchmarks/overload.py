"""Overload and cancellation storms against one `memorywall serve` process.

    python -m benchmarks.overload                       # 10,000 streams, 5,000 cancelled
    python -m benchmarks.overload --streams 2000 --storm 1000 --workers 2

1. Overload: `--streams` concurrent requests through gRPC, then through OpenAI
   HTTP, each from `memorywall bench`'s closed loop split over `--workers`
   processes (the code path of `memorywall bench --workers`). Every request
   must end with all its tokens or a clear status: never INTERNAL / 500, never
   a stream that stops without one.
2. Cancellation storm: `--storm` streams (half gRPC, half HTTP) from this
   process, each cancelled at a random point within a second.

After each phase the server must come back to zero running, zero waiting and
no KV in use (`GetServerInfo` and `/metrics`). Prints a table with the
outcomes, the time each phase took and the server's peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from pathlib import Path

import aiohttp

from benchmarks._serve import serving
from memorywall.client import AsyncClient
from memorywall.loadgen.bench import BenchConfig, Level, ServerFacts, run_level
from memorywall.loadgen.records import RequestRecord
from memorywall.loadgen.target import Backend
from memorywall.loadgen.workload import Fixed, SyntheticWorkload
from memorywall.ready import ServerReady

IDLE_TIMEOUT_S = 60.0
MODEL = "llama-3.1-8b"
# A failure is clear when it names a status the client can act on; anything else
# (INTERNAL, 500, CANCELLED by the server, a stream cut short) fails the run.
CLEAR = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "HTTP 429", "HTTP 503")


def outcome(record: RequestRecord) -> str:
    if record.error is None:
        complete = record.completion_tokens == record.output_tokens
        return "ok" if complete else "short"
    return record.error.split(":", 1)[0]


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc status")


async def idle(ready: ServerReady) -> tuple[float, dict]:
    """Seconds until the server reports nothing running, waiting or in KV; its gauges then."""
    start = time.perf_counter()
    async with AsyncClient(ready.grpc_target) as client:
        while True:
            info = await client.server_info()
            if (info.running, info.waiting, info.kv_used_tokens) == (0, 0, 0):
                break
            if time.perf_counter() - start > IDLE_TIMEOUT_S:
                raise SystemExit(f"server not idle after {IDLE_TIMEOUT_S:.0f} s: {info}")
            await asyncio.sleep(0.1)
    async with aiohttp.ClientSession() as s, s.get(f"{ready.http_url}/metrics") as r:
        text = await r.text()
    gauges = {}
    for line in text.splitlines():
        if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")):
            gauges[line.split("{", 1)[0]] = float(line.rsplit(" ", 1)[1])
    if any(gauges.values()):
        raise SystemExit(f"/metrics not back to zero: {gauges}")
    return time.perf_counter() - start, gauges


def overload(ready: ServerReady, backend: Backend, streams: int, workers: int) -> dict:
    config = BenchConfig(
        target=ready.grpc_target if backend is Backend.MEMORYWALL_GRPC else ready.http_url,
        backend=backend,
        model=MODEL if backend.is_openai else None,
        workload=SyntheticWorkload(Fixed(128), Fixed(32)),
        num_prompts=streams,
        concurrency=(streams,),
        workers=workers,
        timeout_s=600.0,
        label=f"overload-{backend.value}",
    )
    facts = ServerFacts(hardware=ready.hardware, model=ready.model, emulated=True)
    start = time.perf_counter()
    _, records = run_level(config, Level(f"c{streams}", streams, None), facts)
    wall_s = time.perf_counter() - start
    counts = Counter(outcome(r) for r in records)
    return {
        "phase": f"overload {backend.value}",
        "wall_s": wall_s,
        "counts": counts,
        "expected": {"ok", *CLEAR},
    }


async def storm(ready: ServerReady, streams: int, seed: int) -> dict:
    """Half gRPC, half HTTP; each cancelled at a uniform random point within a second."""
    rng = random.Random(seed)
    start = time.perf_counter()

    async def grpc_one(client: AsyncClient, after_s: float) -> str:
        async def read() -> None:
            async with client.generate(prompt_tokens=128, max_tokens=4000, ignore_eos=True) as s:
                async for _ in s:
                    pass

        try:
            await asyncio.wait_for(read(), after_s)
        except TimeoutError:
            return "cancelled"
        except Exception as e:  # a status is an outcome here
            return type(e).__name__
        return "finished"

    async def http_one(session: aiohttp.ClientSession, after_s: float) -> str:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 4000, "ignore_eos": True}

        async def read() -> str:
            async with session.post(
                f"{ready.http_url}/v1/completions", json={**body, "stream": True}
            ) as r:
                await r.read()
                return f"HTTP {r.status}"

        try:
            return await asyncio.wait_for(read(), after_s)
        except TimeoutError:
            return "cancelled"

    connector = aiohttp.TCPConnector(limit=0)
    async with (
        AsyncClient(ready.grpc_target) as client,
        aiohttp.ClientSession(connector=connector) as session,
    ):
        half = streams // 2
        outcomes = await asyncio.gather(
            *(grpc_one(client, rng.uniform(0, 1)) for _ in range(half)),
            *(http_one(session, rng.uniform(0, 1)) for _ in range(streams - half)),
        )
    return {
        "phase": "cancel storm",
        "wall_s": time.perf_counter() - start,
        "counts": Counter(outcomes),
        "expected": {"cancelled", "finished", "HTTP 200", *CLEAR},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=10_000, help="concurrent requests per front")
    p.add_argument("--storm", type=int, default=5_000, help="streams cancelled in the storm")
    p.add_argument("--workers", type=int, default=4, help="bench processes for the overload")
    p.add_argument("--hardware", default="h100-sxm")
    p.add_argument("--max-waiting", type=int, help="the server's admission bound (default none)")
    args = p.parse_args()
    extra = ["--max-waiting", str(args.max_waiting)] if args.max_waiting is not None else []
    rows = []
    with serving(
        "--hardware", args.hardware, "--model", MODEL, "--http-port", "0", *extra
    ) as ready:
        for backend in (Backend.MEMORYWALL_GRPC, Backend.OPENAI_COMPLETIONS):
            row = overload(ready, backend, args.streams, args.workers)
            row["idle_s"], _ = asyncio.run(idle(ready))
            rows.append(row)
        row = asyncio.run(storm(ready, args.storm, seed=1))
        row["idle_s"], _ = asyncio.run(idle(ready))
        rows.append(row)
        rss = peak_rss_bytes(ready.pid)
    print(
        f"# overload: {args.hardware} / {MODEL}, {args.streams:,} streams per front, "
        f"{args.workers} bench workers, storm {args.storm:,}, "
        f"max_waiting {args.max_waiting}, {time.strftime('%Y-%m-%d')}\n"
    )
    print("| phase | wall | outcomes | back to idle |")
    print("|---|---|---|---|")
    bad = []
    for row in rows:
        counts = row["counts"]
        text = ", ".join(f"{k} {v:,}" for k, v in counts.most_common())
        print(f"| {row['phase']} | {row['wall_s']:.1f} s | {text} | {row['idle_s']:.2f} s |")
        bad += [k for k in counts if k not in row["expected"]]
    print(f"\nserver peak RSS (VmHWM): {rss / 2**20:,.0f} MiB")
    if bad:
        print(f"FAILED: unclear outcomes {sorted(set(bad))}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
