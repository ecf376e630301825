"""Server CPU per streamed message, per front, against the floor of a null stream.

    python -m benchmarks.message_cost [--streams 64] [--tokens 400] [--repeats 3]
    python -m benchmarks.message_cost --ttft

One server process runs the live engine (llama-3.1-8b on h100-sxm by default)
behind the OpenAI HTTP front and the memorywall.v1 gRPC front, plus a null
stream on each port: pre-encoded messages of the same size, paced by one
timer for all streams at the engine's modelled decode step for that batch and
fanned out through an event per stream, as the engine wakes its streams, but
no engine, no encoding. A client process (on the other core) opens `--streams`
concurrent streams of `--tokens` tokens and counts messages. Server CPU (user +
system, from /proc) over messages is the cost per message; the null stream's is
what pacing and the transport cost by themselves.

`--ttft`: one user, sequential requests: client time to the first token minus
the model's own TTFT (the engine's, less any host stall before the first
token), against the null stream's first message (sent at once), on each front:
the overhead over the transport's own floor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from dataclasses import dataclass

GRPC_NULL = "/memorywall.bench.Null/Stream"
TICKS_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid`."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_S


class Ticker:
    """Wakes every waiter once per `period_s`, on absolute deadlines (the engine's clock)."""

    def __init__(self, period_s: float) -> None:
        from memorywall.server.engine.clock import MonotonicClock

        self.period_s = period_s
        self.clock = MonotonicClock()
        self.event = asyncio.Event()
        self.waiters = 0
        self.task: asyncio.Task | None = None

    async def _run(self) -> None:
        deadline = self.clock.now()
        while self.waiters:
            deadline += self.period_s
            await self.clock.sleep_until(deadline)
            event, self.event = self.event, asyncio.Event()
            event.set()
        self.task = None

    async def tick(self) -> None:
        if self.task is None:
            self.task = asyncio.create_task(self._run())
        await self.event.wait()


def _sse_sample(tokens: int) -> bytes:
    """A completions chunk the size the front writes for one token."""
    return (
        b'data: {"id":"cmpl-0123456789abcdef0123456789abcdef","object":"text_completion",'
        b'"created":1767000000,"model":"llama-3.1-8b","choices":[{"index":0,"text":" the",'
        b'"logprobs":null,"finish_reason":null,"stop_reason":null}],"memorywall":'
        b'{"token_ids":[1820],"modelled_times_s":[0.012345678901234]}}\n\n'
    )


async def _serve_async(conn, hardware: str) -> None:
    import grpc
    from aiohttp import web

    from memorywall.core import load_hardware, load_model, plan_deployment
    from memorywall.server.app import quiet_gc
    from memorywall.server.engine.build import build_core
    from memorywall.server.engine.live import AsyncEngine
    from memorywall.server.engine.scheduler import EngineConfig
    from memorywall.server.fronts.grpc_servicer import EngineServicer
    from memorywall.server.fronts.http_front import HttpSite, OpenAIFront
    from memorywall.server.fronts.tokenizer import load_tokenizer
    from memorywall.v1 import engine_pb2 as pb
    from memorywall.v1 import engine_pb2_grpc

    deployment = plan_deployment(load_hardware(hardware), load_model("llama-3.1-8b"))
    core, card = build_core(deployment, EngineConfig(max_num_seqs=1024))
    engine = AsyncEngine(core, max_messages_per_s=1e9)
    front = OpenAIFront(engine, card, load_tokenizer(None, card.vocab_size))
    app = front.app()
    sample = _sse_sample(1)
    tickers: dict[float, Ticker] = {}

    @contextlib.asynccontextmanager
    async def paced(period_s: float):
        if period_s not in tickers:  # one timer per period, built once (it opens a timerfd)
            tickers[period_s] = Ticker(period_s)
        ticker = tickers[period_s]
        ticker.waiters += 1
        try:
            yield ticker
        finally:
            ticker.waiters -= 1

    async def null_sse(request: web.Request) -> web.StreamResponse:
        n, period_s = int(request.query["n"]), float(request.query["period"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async with paced(period_s) as ticker:
            for _ in range(n):
                await (ticker.tick() if period_s else asyncio.sleep(0))
                await response.write(sample)
        await response.write(b"data: [DONE]\n\n")
        return response

    app.router.add_get("/null", null_sse)
    site = HttpSite(app)
    http_port = await site.start("127.0.0.1", 0)

    chunk = pb.GenerateResponse(
        request_id="0123456789abcdef0123456789abcdef",
        chunk=pb.TokenChunk(token_ids=[1820], text=" the", modelled_times_s=[0.0123456789]),
    ).SerializeToString()

    async def null_grpc(request: bytes, context):
        n, period_us = int.from_bytes(request[:4], "little"), int.from_bytes(request[4:], "little")
        async with paced(period_us / 1e6) as ticker:
            for _ in range(n):
                await (ticker.tick() if period_us else asyncio.sleep(0))
                yield chunk

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    engine_pb2_grpc.add_EngineServicer_to_server(EngineServicer(engine, card), server)
    null = grpc.method_handlers_generic_handler(
        "memorywall.bench.Null", {"Stream": grpc.unary_stream_rpc_method_handler(null_grpc)}
    )
    server.add_generic_rpc_handlers((null,))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await engine.start()
    await server.start()
    quiet_gc()
    conn.send((http_port, grpc_port))
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
    await server.stop(0)
    await site.stop()
    await engine.stop()


def _serve(conn, hardware: str) -> None:
    asyncio.run(_serve_async(conn, hardware))


# --- clients (own processes) --------------------------------------------------------------


async def _http_stream(
    session, url: str, body: dict | None, n: int, period_s: float = 0.0
) -> tuple[int, float]:
    """Messages received and seconds from send to the first one."""
    sent = time.perf_counter()
    first = 0.0
    count = 0
    if body is None:
        ctx = session.get(f"{url}/null", params={"n": str(n), "period": str(period_s)})
    else:
        ctx = session.post(f"{url}/v1/completions", json=body)
    async with ctx as response:
        async for data in response.content.iter_any():
            if not count:
                first = time.perf_counter() - sent
            count += data.count(b"data: ")
    return count - 1, first  # [DONE] is not a message


async def _grpc_stream(channel, null: bool, n: int, period_s: float = 0.0) -> tuple[int, float]:
    from memorywall.v1 import engine_pb2 as pb

    sent = time.perf_counter()
    first = 0.0
    count = 0
    if null:
        period_us = round(period_s * 1e6).to_bytes(4, "little")
        call = channel.unary_stream(GRPC_NULL)(n.to_bytes(4, "little") + period_us)
    else:
        request = pb.GenerateRequest(token_count=16, max_tokens=n, ignore_eos=True)
        call = channel.unary_stream("/memorywall.v1.Engine/Generate")(request.SerializeToString())
    async for _ in call:
        if not count:
            first = time.perf_counter() - sent
        count += 1
    return count - (0 if null else 1), first  # Finished is not a token message


async def _client_async(front: str, address: str, null: bool, streams: int, n: int, period_s):
    body = {
        "model": "llama-3.1-8b",
        "prompt": "hi",
        "max_tokens": n,
        "ignore_eos": True,
        "stream": True,
    }
    if front == "http":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            payload = None if null else body
            runs = [_http_stream(session, address, payload, n, period_s) for _ in range(streams)]
            return await asyncio.gather(*runs)
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        runs = [_grpc_stream(channel, null, n, period_s) for _ in range(streams)]
        return await asyncio.gather(*runs)


def _client(conn, *args) -> None:
    conn.send(asyncio.run(_client_async(*args)))


def run_client(front: str, address: str, null: bool, streams: int, n: int, period_s: float):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_client, args=(child, front, address, null, streams, n, period_s))
    proc.start()
    out = parent.recv()
    proc.join()
    return out


@dataclass
class Cost:
    messages: int
    tokens: int
    cpu_s: float
    wall_s: float

    @property
    def us_per_message(self) -> float:
        return self.cpu_s / self.messages * 1e6


def measure(
    server_pid: int, front: str, address: str, null: bool, streams: int, n: int, period_s: float
) -> Cost:
    before, started = cpu_s(server_pid), time.perf_counter()
    results = run_client(front, address, null, streams, n, period_s)
    wall = time.perf_counter() - started
    messages = sum(count for count, _ in results)
    return Cost(messages, streams * n, cpu_s(server_pid) - before, wall)


class Server:
    def __init__(self, hardware: str) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, hardware), daemon=True)
        self.proc.start()
        http_port, grpc_port = self._conn.recv()
        self.http = f"http://127.0.0.1:{http_port}"
        self.grpc = f"127.0.0.1:{grpc_port}"

    def address(self, front: str) -> str:
        return self.http if front == "http" else self.grpc

    def stop(self) -> None:
        self._conn.send(None)
        self.proc.join(timeout=10)


def cost_table(args) -> None:
    from memorywall.core import load_hardware, load_model, plan_deployment, predict

    deployment = plan_deployment(load_hardware(args.hardware), load_model("llama-3.1-8b"))
    period_s = predict(deployment, batch=args.streams, context=16 + args.tokens // 2).decode_step_s
    print(
        f"{args.streams} streams x {args.tokens} tokens, {args.hardware}: null streams paced "
        f"at {period_s * 1e3:.2f} ms (the core's decode step at that batch)\n"
    )
    print(
        "| front | stream | messages | tokens/message | server CPU | wall | per message "
        "| over the null floor |"
    )
    print("|---|---|---|---|---|---|---|---|")
    server = Server(args.hardware)
    try:
        for front in ("http", "grpc"):
            addr = server.address(front)
            pid = server.proc.pid
            measure(pid, front, addr, False, 4, 20, period_s)  # warm-up
            runs = {
                kind: [
                    measure(pid, front, addr, null, args.streams, args.tokens, period_s)
                    for _ in range(args.repeats)
                ]
                for kind, null in (("null", True), ("engine", False))
            }
            floor = statistics.median(c.us_per_message for c in runs["null"])
            for kind, costs in runs.items():
                us = statistics.median(c.us_per_message for c in costs)
                extra = "-" if kind == "null" else f"+{us - floor:.1f} us ({us / floor:.1f}x)"
                c = costs[0]
                print(
                    f"| {front} | {kind} | {c.messages:,} | {c.tokens / c.messages:.2f} "
                    f"| {statistics.median(x.cpu_s for x in costs):.2f} s "
                    f"| {statistics.median(x.wall_s for x in costs):.2f} s | {us:.1f} us "
                    f"| {extra} |",
                    flush=True,
                )
    finally:
        server.stop()


def ttft_table(args) -> None:
    server = Server(args.hardware)
    try:
        print("| front | null stream: first message | token stream: TTFT - modelled | overhead |")
        print("|---|---|---|---|")
        for front in ("http", "grpc"):
            ctx = mp.get_context("spawn")
            parent, child = ctx.Pipe()
            client = (child, front, server.address(front), args.samples)
            proc = ctx.Process(target=_ttft_client, args=client)
            proc.start()
            nulls, overs = parent.recv()
            proc.join()
            n, o = statistics.median(nulls), statistics.median(overs)
            print(
                f"| {front} | {n * 1e3:.3f} ms | {o * 1e3:.3f} ms | {(o - n) * 1e3:+.3f} ms |",
                flush=True,
            )
    finally:
        server.stop()


async def _ttft_http(session, address: str) -> float:
    """Client TTFT minus the modelled TTFT of one request (from its usage chunk)."""
    body = {
        "model": "llama-3.1-8b",
        "prompt": "hi",
        "max_tokens": 2,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first = modelled = None
    async with session.post(f"{address}/v1/completions", json=body) as response:
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            if first is None:
                first = time.perf_counter() - sent
            chunk = json.loads(line[6:])
            if "usage" in chunk and "memorywall" in chunk:
                summary = chunk["memorywall"]
                lag = summary["lag"]
                # The model's own TTFT: less any host stall before the first token.
                stalled = lag["host_stall_s"] - lag["decode_host_stall_s"]
                modelled = summary["timing"]["ttft_s"] - stalled
    return first - modelled


async def _ttft_grpc(channel) -> float:
    from memorywall.v1 import engine_pb2 as pb

    call = channel.unary_stream(
        "/memorywall.v1.Engine/Generate", response_deserializer=pb.GenerateResponse.FromString
    )
    request = pb.GenerateRequest(token_count=16, max_tokens=2, ignore_eos=True)
    sent = time.perf_counter()
    first = None
    async for msg in call(request.SerializeToString()):
        if first is None:
            first = time.perf_counter() - sent
        if msg.HasField("finished"):
            f = msg.finished
            stalled = f.lag.host_stall_s - f.lag.decode_host_stall_s
            return first - (f.timing.ttft_s - stalled)
    raise RuntimeError("stream ended without Finished")


async def _ttft_async(front: str, address: str, samples: int) -> tuple[list[float], list[float]]:
    """Null-stream first-message times and token-stream TTFT overheads, one at a time."""
    nulls, overs = [], []
    if front == "http":
        import aiohttp

        async with aiohttp.ClientSession() as session:
            await _ttft_http(session, address)  # warm-up: connection open
            for _ in range(samples):
                nulls.append((await _http_stream(session, address, None, 1))[1])
                overs.append(await _ttft_http(session, address))
        return nulls, overs
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        await _ttft_grpc(channel)
        for _ in range(samples):
            nulls.append((await _grpc_stream(channel, True, 1))[1])
            overs.append(await _ttft_grpc(channel))
    return nulls, overs


def _ttft_client(conn, front: str, address: str, samples: int) -> None:
    conn.send(asyncio.run(_ttft_async(front, address, samples)))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hardware", default="h100-sxm")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ttft", action="store_true", help="TTFT overhead at one user instead")
    parser.add_argument("--samples", type=int, default=20, help="requests per --ttft figure")
    args = parser.parse_args()
    load = os.getloadavg()
    print(
        f"# {platform.machine()}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n"
    )
    if args.ttft:
        ttft_table(args)
    else:
        cost_table(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
