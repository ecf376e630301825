"""Does the emulator deliver tokens when the core says it should?

    python benchmarks/server_fidelity.py [--quick]

For each backend and concurrency: start `memorywall serve` in its own
process, run that many closed-loop streams from this process (each request
follows the last), and compare what the client observes with the server's
modelled timeline, which the core computed for the exact batches the
requests were in:
- TPOT: (last token - first token) / (tokens - 1), client clock vs modelled.
- tok/s per stream: 1 / TPOT.
- TTFT: client (send -> first token) vs modelled (arrival -> first token);
  the difference is transport plus server overhead, reported as is.
- Lateness: each token's receive time minus its modelled time, with both
  clocks aligned on the request's first token (so it shows jitter and drift,
  not the TTFT offset).
Also printed: the core's steady-state prediction for a batch of that size
(`memorywall predict --batch C --context P+O/2`), and the server's own lag
statistics and grouping interval.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np

from benchmarks._serve import emulator
from memorywall.core import load_hardware, load_model, plan_deployment, predict
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc as pb_grpc

PROMPT = 128
OUTPUT = 256


@dataclass
class Record:
    sent: float
    received: list[float]
    modelled: list[float]
    modelled_ttft_s: float
    modelled_decode_s: float


async def _one(stub: pb_grpc.EngineStub, output: int) -> Record:
    received: list[float] = []
    modelled: list[float] = []
    sent = time.perf_counter()
    request = pb.GenerateRequest(token_count=PROMPT, max_tokens=output, ignore_eos=True)
    async for msg in stub.Generate(request):
        now = time.perf_counter()
        if msg.HasField("chunk"):
            received += [now] * len(msg.chunk.token_ids)
            modelled += list(msg.chunk.modelled_times_s)
        else:
            timing = msg.finished.timing
    return Record(sent, received, modelled, timing.ttft_s, timing.decode_s)


async def _closed_loop(target: str, concurrency: int, per_stream: int, output: int):
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.EngineStub(channel)
        await _one(stub, 4)  # warm-up

        async def user() -> list[Record]:
            return [await _one(stub, output) for _ in range(per_stream)]

        users = asyncio.gather(*(user() for _ in range(concurrency)))
        # Sample the grouping interval while the streams are live.
        await asyncio.sleep(0.05)
        live = await stub.GetServerInfo(pb.GetServerInfoRequest())
        runs = await users
        info = await stub.GetServerInfo(pb.GetServerInfoRequest())
    return [r for run in runs for r in run], info, live.stream_interval_s


def _summarise(records: list[Record]) -> dict[str, float]:
    tpot = np.array([(r.received[-1] - r.received[0]) / (len(r.received) - 1) for r in records])
    m_tpot = np.array([r.modelled_decode_s / (len(r.received) - 1) for r in records])
    ttft = np.array([r.received[0] - r.sent for r in records])
    m_ttft = np.array([r.modelled_ttft_s for r in records])
    late = np.concatenate(
        [
            (np.array(r.received) - r.received[0]) - (np.array(r.modelled) - r.modelled[0])
            for r in records
        ]
    )
    return {
        "tpot_ms": tpot.mean() * 1e3,
        "model_tpot_ms": m_tpot.mean() * 1e3,
        "tpot_err": tpot.mean() / m_tpot.mean() - 1,
        "rate_err": (1 / tpot).mean() / (1 / m_tpot).mean() - 1,
        "ttft_ms": ttft.mean() * 1e3,
        "model_ttft_ms": m_ttft.mean() * 1e3,
        "late_p50_ms": np.percentile(late, 50) * 1e3,
        "late_p99_ms": np.percentile(late, 99) * 1e3,
        "tok_s": sum(len(r.received) for r in records)
        / (max(r.received[-1] for r in records) - min(r.sent for r in records)),
    }


HEADER = (
    "| backend | streams | client TPOT | modelled TPOT | err | predicted (core, uniform batch) "
    "| client TTFT | modelled TTFT | lateness p50 / p99 | server lag p99 | grouping | tok/s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def measure(hw: str, levels: list[int], per_stream: int, extra: list[str]) -> Iterator[str]:
    """One Markdown row per concurrency level against a fresh `memorywall serve`."""
    deployment = plan_deployment(load_hardware(hw), load_model("llama-3.1-8b"))
    with emulator("--hardware", hw, "--model", "llama-3.1-8b", *extra) as target:
        for c in levels:
            records, info, interval_s = asyncio.run(_closed_loop(target, c, per_stream, OUTPUT))
            s = _summarise(records)
            ideal = predict(deployment, batch=c, context=PROMPT + OUTPUT // 2).decode_step_s
            yield (
                f"| {hw} | {c} | {s['tpot_ms']:.3f} ms | {s['model_tpot_ms']:.3f} ms "
                f"| {s['tpot_err']:+.2%} | {ideal * 1e3:.3f} ms | {s['ttft_ms']:.2f} ms "
                f"| {s['model_ttft_ms']:.2f} ms "
                f"| {s['late_p50_ms']:.2f} / {s['late_p99_ms']:.2f} ms "
                f"| {info.lag.p99_s * 1e3:.2f} ms | {interval_s * 1e3:.2f} ms "
                f"| {s['tok_s']:,.0f} |"
            )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests per stream")
    parser.add_argument("--backends", default="h100-sxm,wse-3")
    parser.add_argument("--levels", help="comma-separated concurrency levels")
    parser.add_argument("--max-messages-per-s", help="passed to memorywall serve")
    args = parser.parse_args()
    default_levels = {"h100-sxm": "1,4,16,64,128,256", "wse-3": "1,4,8,16,32,64,128"}
    print(f"# {platform.machine()}, {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    print(HEADER)
    extra = ["--max-messages-per-s", args.max_messages_per_s] if args.max_messages_per_s else []
    for hw in args.backends.split(","):
        levels = [int(x) for x in (args.levels or default_levels[hw]).split(",")]
        for row in measure(hw, levels, 1 if args.quick else 2, extra):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
