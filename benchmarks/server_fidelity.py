"""Does the emulator deliver every token when the core says it should, on each front?

    python -m benchmarks.server_fidelity [--runs h100-sxm:256,wse-3:64,h100-sxm:1024]
                                         [--fronts grpc,http] [--workers 2] [--requests 2]
                                         [--api-servers N]

For each run (backend and number of streams) a fresh `memorywall serve` (gRPC
and HTTP on one engine, `--max-num-seqs` at least the streams) is driven by
`--workers` client processes, each running its share of closed-loop users
(256-token prompts, 128 output tokens, `--requests` requests each, after one
warm-up). Every token's receive time is kept with its modelled time (the
engine's, seconds after arrival), so the table compares, per front:
- TPOT: client (last token - first) / (tokens - 1) against the model alone
  (`decode_s - decode_host_stall_s` from each request's final message) and
  against the timeline the engine ran (host stalls included);
- ITL p99: gaps between consecutive tokens as received (a grouped token counts
  a 0 gap) against the gaps between their modelled times;
- lateness p99: each token's receive time minus its modelled time, clocks
  aligned on the request's first token;
- bursts: the share of messages that reached the client closer to the one
  before than their modelled gap (less 1 ms or half the gap): catch-up;
- tokens per message, output tokens/s, and host stalls during the run (count
  and share of the run's wall time; any stall marks the run degraded);
- load: the machine's 1-minute load average before the run (others share it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np

from benchmarks._serve import serving
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc as pb_grpc

PROMPT = 256
OUTPUT = 128
MODEL = "llama-3.1-8b"


@dataclass
class Record:
    """One request as a client saw it; times on the client's monotonic clock, seconds."""

    sent_s: float
    received_s: list[float] = field(default_factory=list)  # per token
    modelled_s: list[float] = field(default_factory=list)  # per token, after arrival
    starts: list[int] = field(default_factory=list)  # per message: index of its first token
    decode_s: float = 0.0
    decode_host_stall_s: float = 0.0


async def _grpc_request(stub: pb_grpc.EngineStub, output: int) -> Record:
    record = Record(time.perf_counter())
    request = pb.GenerateRequest(token_count=PROMPT, max_tokens=output, ignore_eos=True)
    async for msg in stub.Generate(request):
        now = time.perf_counter()
        if msg.HasField("chunk"):
            record.starts.append(len(record.received_s))
            record.received_s += [now] * len(msg.chunk.token_ids)
            record.modelled_s += msg.chunk.modelled_times_s
        else:
            record.decode_s = msg.finished.timing.decode_s
            record.decode_host_stall_s = msg.finished.lag.decode_host_stall_s
    return record


async def _http_request(session, url: str, output: int, key: int) -> Record:
    prompt = [(key * 7919 + j * 104729) % 100_000 + 1 for j in range(PROMPT)]  # no cache hits
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": output,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    record = Record(time.perf_counter())
    async with session.post(f"{url}/v1/completions", json=body) as response:
        async for line in response.content:
            now = time.perf_counter()
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            extra = chunk.get("memorywall", {})
            if "token_ids" in extra:
                record.starts.append(len(record.received_s))
                record.received_s += [now] * len(extra["token_ids"])
                record.modelled_s += extra["modelled_times_s"]
            elif "timing" in extra:
                record.decode_s = extra["timing"]["decode_s"]
                record.decode_host_stall_s = extra["lag"]["decode_host_stall_s"]
    return record


async def _worker_async(front: str, address: str, users: int, requests: int, seed: int):
    if front == "grpc":
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.EngineStub(channel)
            await _grpc_request(stub, 4)

            async def user(_: int) -> list[Record]:
                return [await _grpc_request(stub, OUTPUT) for _ in range(requests)]

            return await asyncio.gather(*(user(u) for u in range(users)))
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await _http_request(session, address, 4, seed * 1_000_000)

        async def user(u: int) -> list[Record]:
            base = seed * 1_000_000 + u * 1000
            return [
                await _http_request(session, address, OUTPUT, base + i) for i in range(requests)
            ]

        return await asyncio.gather(*(user(u) for u in range(users)))


def _worker(conn, *args) -> None:
    runs = asyncio.run(_worker_async(*args))
    conn.send([r for run in runs for r in run])


def drive(front: str, address: str, users: int, workers: int, requests: int) -> list[Record]:
    """Closed-loop users split over `workers` client processes."""
    ctx = mp.get_context("spawn")
    procs = []
    for w in range(workers):
        share = users // workers + (1 if w < users % workers else 0)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, front, address, share, requests, w + 1))
        proc.start()
        procs.append((proc, parent))
    records = []
    for proc, parent in procs:
        records += parent.recv()
        proc.join()
    return records


def summarise(records: list[Record]) -> dict[str, float]:
    tpot, model, timeline, gaps, m_gaps, late = [], [], [], [], [], []
    bursts = boundaries = 0
    for r in records:
        n = len(r.received_s)
        rec, mod = np.array(r.received_s), np.array(r.modelled_s)
        tpot.append((rec[-1] - rec[0]) / (n - 1))
        timeline.append(r.decode_s / (n - 1))
        model.append((r.decode_s - r.decode_host_stall_s) / (n - 1))
        gaps.append(np.diff(rec))
        m_gaps.append(np.diff(mod))
        late.append((rec - rec[0]) - (mod - mod[0]))
        # A catch-up burst: a message closer to the last than its modelled gap allows
        # (less the engine's own tolerance: 1 ms, or half the gap).
        i = np.array(r.starts[1:])
        got, due = rec[i] - rec[i - 1], mod[i] - mod[i - 1]
        bursts += int(np.sum(got < due - np.minimum(0.001, due / 2)))
        boundaries += len(i)
    tpot_mean, model_mean = float(np.mean(tpot)), float(np.mean(model))
    tokens = sum(len(r.received_s) for r in records)
    span = max(r.received_s[-1] for r in records) - min(r.sent_s for r in records)
    return {
        "tpot_ms": tpot_mean * 1e3,
        "model_tpot_ms": model_mean * 1e3,
        "tpot_err": tpot_mean / model_mean - 1,
        "timeline_err": tpot_mean / float(np.mean(timeline)) - 1,
        "itl_p99_ms": float(np.percentile(np.concatenate(gaps), 99)) * 1e3,
        "model_itl_p99_ms": float(np.percentile(np.concatenate(m_gaps), 99)) * 1e3,
        "late_p99_ms": float(np.percentile(np.concatenate(late), 99)) * 1e3,
        "tokens_per_message": tokens / sum(len(r.starts) for r in records),
        "bursts": bursts / boundaries if boundaries else 0.0,
        "tok_s": tokens / span,
        "span_s": span,
    }


def host_stall(target: str) -> pb.HostStall:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.EngineStub(channel).GetServerInfo(pb.GetServerInfoRequest()).host_stall


HEADER = (
    "| backend | streams | front | load | client TPOT | model TPOT | err | err vs timeline "
    "| ITL p99 client / model | lateness p99 | bursts | tokens/msg | tok/s | host stalls |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def measure(
    hw: str,
    levels: list[int],
    requests: int,
    extra: list[str],
    *,
    fronts: tuple[str, ...] = ("grpc",),
    workers: int = 2,
) -> Iterator[str]:
    """One Markdown row per level and front against one fresh `memorywall serve ARGS`."""
    args = ["--hardware", hw, "--model", MODEL, "--http-port", "0"]
    args += ["--max-num-seqs", str(max(256, *levels)), *extra]
    with serving(*args) as ready:
        for users in levels:
            for front in fronts:
                address = ready.grpc_target if front == "grpc" else ready.http_url
                load = os.getloadavg()[0]
                before = host_stall(ready.grpc_target)
                records = drive(front, address, users, workers, requests)
                after = host_stall(ready.grpc_target)
                s = summarise(records)
                stalls = after.stalls - before.stalls
                lost = after.stalled_s - before.stalled_s
                marked = f"{stalls} ({lost / s['span_s']:.1%} of the run)" if stalls else "0"
                yield (
                    f"| {hw} | {users} | {front} | {load:.1f} | {s['tpot_ms']:.3f} ms "
                    f"| {s['model_tpot_ms']:.3f} ms | {s['tpot_err']:+.2%} "
                    f"| {s['timeline_err']:+.2%} "
                    f"| {s['itl_p99_ms']:.2f} / {s['model_itl_p99_ms']:.2f} ms "
                    f"| {s['late_p99_ms']:.2f} ms | {s['bursts']:.2%} "
                    f"| {s['tokens_per_message']:.2f} "
                    f"| {s['tok_s']:,.0f} | {marked} |"
                )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", default="h100-sxm:256,wse-3:64,h100-sxm:1024")
    parser.add_argument("--fronts", default="grpc,http")
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--requests", type=int, default=2, help="requests per user")
    parser.add_argument(
        "--api-servers", type=int, default=1, help="the server's front processes (serve's flag)"
    )
    args = parser.parse_args()
    print(
        f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}; {args.workers} client processes; "
        f"serve --api-servers {args.api_servers}; "
        f"{PROMPT}-token prompts, {OUTPUT} output tokens\n"
    )
    print(HEADER)
    fronts = tuple(args.fronts.split(","))
    for run in args.runs.split(","):
        hw, users = run.split(":")
        extra = ["--api-servers", str(args.api_servers)]
        rows = measure(hw, [int(users)], args.requests, extra, fronts=fronts, workers=args.workers)
        for row in rows:
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
