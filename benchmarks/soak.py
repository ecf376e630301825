"""Soak: hours-long behaviour in minutes' terms. Mixed load with cancellations and injected
faults against one `memorywall serve` process, sampled as it runs.

    python -m benchmarks.soak                    # 30 minutes
    python -m benchmarks.soak --duration 300     # 5 minutes

`--users` closed-loop users (half gRPC, half OpenAI HTTP) send requests of random
length; one in ten is cancelled at a random point; the server injects every fault
kind (`--faults`). Every 10 s the server's RSS (/proc VmRSS), its emulation lag
(p99 of the last 65,536 token groups, `GetServerInfo`) and its queue are sampled.
Passes when RSS after the warm-up (the first fifth) grows by less than 5% and the
lag's p99 in the second half is no worse than twice the first half's (plus 1 ms),
and the server ends idle.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections import Counter
from pathlib import Path

import aiohttp

from benchmarks._serve import serving
from memorywall.client import AsyncClient, ClientError
from memorywall.ready import ServerReady

MODEL = "llama-3.1-8b"
FAULTS = "error:0.02,abort:0.02:8,stall:0.02:0.5,slow:0.02:2"
SAMPLE_S = 10.0
MAX_RSS_GROWTH = 0.05


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def grpc_user(ready: ServerReady, rng: random.Random, until: float, out: Counter) -> None:
    async with AsyncClient(ready.grpc_target, timeout_s=60) as client:
        while time.monotonic() < until:
            tokens = rng.randint(8, 256)
            cancel_s = rng.uniform(0, 1) if rng.random() < 0.1 else None

            async def one(n: int = tokens) -> None:
                async with client.generate(prompt_tokens=rng.randint(16, 512), max_tokens=n) as s:
                    async for _ in s:
                        pass

            try:
                if cancel_s is None:
                    await one()
                    out["grpc ok"] += 1
                else:
                    await asyncio.wait_for(one(), cancel_s)
                    out["grpc ok"] += 1
            except TimeoutError:
                out["grpc cancelled"] += 1
            except ClientError as e:
                out[f"grpc {e.code.name}"] += 1


async def http_user(
    session: aiohttp.ClientSession, ready: ServerReady, rng: random.Random, until: float, out
) -> None:
    while time.monotonic() < until:
        body = {
            "model": MODEL,
            "prompt": "x " * rng.randint(16, 512),
            "max_tokens": rng.randint(8, 256),
            "stream": True,
        }
        cancel_s = rng.uniform(0, 1) if rng.random() < 0.1 else None

        async def one(b: dict = body) -> int:
            async with session.post(f"{ready.http_url}/v1/completions", json=b) as r:
                await r.read()
                return r.status

        try:
            status = await (one() if cancel_s is None else asyncio.wait_for(one(), cancel_s))
            out[f"http {status}"] += 1
        except TimeoutError:
            out["http cancelled"] += 1


async def sampler(ready: ServerReady, until: float, samples: list[dict]) -> None:
    async with AsyncClient(ready.grpc_target, timeout_s=10) as client:
        start = time.monotonic()
        while time.monotonic() < until:
            info = await client.server_info()
            samples.append(
                {
                    "t_s": time.monotonic() - start,
                    "rss_bytes": rss_bytes(ready.pid),
                    "lag_p99_s": info.lag.p99_s,
                    "running": info.running,
                    "waiting": info.waiting,
                }
            )
            await asyncio.sleep(SAMPLE_S)


async def soak(ready: ServerReady, duration_s: float, users: int, seed: int) -> tuple:
    until = time.monotonic() + duration_s
    out: Counter[str] = Counter()
    samples: list[dict] = []
    rngs = [random.Random(seed * 1000 + i) for i in range(users)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(
            sampler(ready, until, samples),
            *(grpc_user(ready, rngs[i], until, out) for i in range(users // 2)),
            *(http_user(session, ready, rngs[i], until, out) for i in range(users // 2, users)),
        )
    async with AsyncClient(ready.grpc_target, timeout_s=10) as client:
        for _ in range(300):
            info = await client.server_info()
            if (info.running, info.waiting, info.kv_used_tokens) == (0, 0, 0):
                break
            await asyncio.sleep(0.1)
    return out, samples, info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=1800.0, help="seconds of load")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--hardware", default="h100-sxm")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    server_args = ["--hardware", args.hardware, "--model", MODEL, "--http-port", "0"]
    server_args += ["--faults", FAULTS, "--fault-seed", str(args.seed)]
    with serving(*server_args) as ready:
        out, samples, final = asyncio.run(soak(ready, args.duration, args.users, args.seed))
    warm = [s for s in samples if s["t_s"] >= args.duration / 5]
    half = [s for s in samples if s["t_s"] >= args.duration / 2]
    first = [s for s in samples if s["t_s"] < args.duration / 2]
    growth = warm[-1]["rss_bytes"] / warm[0]["rss_bytes"] - 1
    # The lag window is empty (None) until token groups flow.
    lag_first = statistics.median(s["lag_p99_s"] for s in first if s["lag_p99_s"] is not None)
    lag_second = statistics.median(s["lag_p99_s"] for s in half if s["lag_p99_s"] is not None)
    idle = (final.running, final.waiting, final.kv_used_tokens) == (0, 0, 0)
    print(
        f"# soak: {args.hardware} / {MODEL}, {args.duration:.0f} s, {args.users} users, "
        f"faults {FAULTS}, {time.strftime('%Y-%m-%d')}\n"
    )
    print("outcomes: " + ", ".join(f"{k} {v:,}" for k, v in sorted(out.items())))
    print(
        f"RSS after warm-up {warm[0]['rss_bytes'] / 2**20:.0f} MiB -> end "
        f"{warm[-1]['rss_bytes'] / 2**20:.0f} MiB ({growth:+.1%}); peak "
        f"{max(s['rss_bytes'] for s in samples) / 2**20:.0f} MiB"
    )
    print(
        f"lag p99 (median of samples): first half {lag_first * 1e3:.2f} ms, "
        f"second half {lag_second * 1e3:.2f} ms; ended idle: {idle}"
    )
    ok = growth < MAX_RSS_GROWTH and lag_second <= 2 * lag_first + 1e-3 and idle
    ok = ok and not any(k.endswith(("INTERNAL", "UNKNOWN", " 500")) for k in out)
    print("PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
