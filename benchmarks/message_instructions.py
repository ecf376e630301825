"""Instructions per streamed message on the OpenAI HTTP front: a figure load barely moves.

    python -m benchmarks.message_instructions [--streams 16] [--tokens 40,120]
                                              [--intervals 1,4]

CPU time on this shared VM swings too much to show a few microseconds per message.
valgrind's callgrind counts the instructions of one server process (the live engine,
llama-3.1-8b on h100-sxm, behind the OpenAI HTTP front) that serves one client run of
`--streams` concurrent streaming completions and exits; the client runs in its own,
uncounted process. Two runs, at two output lengths, differ only in the tokens
streamed: their difference over the difference in tokens is the server's cost per token,
start-up and connection set-up cancelled out. With `--stream-interval` fixed, the
messages are exactly the tokens over the interval whatever the host's speed (under
callgrind it stalls on every step), so two intervals split that cost into a part per
message (front, transport) and a part per token (engine, token text):
per token = token + message / interval.
Needs `valgrind` on PATH; a run takes a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys

CALLGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")
SERVE = (
    "import sys; from benchmarks.message_instructions import serve; "
    "serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))"
)


async def _serve(streams: int, tokens: int, interval: int) -> None:
    from memorywall.core import load_hardware, load_model, plan_deployment
    from memorywall.server.app import quiet_gc
    from memorywall.server.engine.build import build_core
    from memorywall.server.engine.live import AsyncEngine
    from memorywall.server.engine.scheduler import EngineConfig
    from memorywall.server.fronts.http_front import HttpSite, OpenAIFront
    from memorywall.server.fronts.tokenizer import load_tokenizer

    deployment = plan_deployment(load_hardware("h100-sxm"), load_model("llama-3.1-8b"))
    core, card = build_core(deployment, EngineConfig(max_num_seqs=1024))
    engine = AsyncEngine(core, max_messages_per_s=1e9, stream_interval=interval)
    front = OpenAIFront(engine, card, load_tokenizer(None, card.vocab_size))
    site = HttpSite(front.app())
    port = await site.start("127.0.0.1", 0)
    await engine.start()
    quiet_gc()
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; from benchmarks.message_instructions import client; client(*sys.argv[1:])",
        f"http://127.0.0.1:{port}",
        str(streams),
        str(tokens),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await client.communicate()
    messages = int(out)
    expected = streams * (1 + -(-(tokens - 1) // interval))  # the first token goes alone
    if messages != expected:
        raise SystemExit(f"got {messages} messages, expected {expected}")
    await site.stop()
    await engine.stop()


def serve(streams: int, tokens: int, interval: int) -> None:
    """The counted process: serve one client run, then exit."""
    asyncio.run(_serve(streams, tokens, interval))


def client(url: str, streams: str, tokens: str) -> None:
    """The uncounted process: `streams` concurrent streams; prints the messages received."""
    from benchmarks.message_cost import _client_async

    results = asyncio.run(_client_async("http", url, False, int(streams), int(tokens), 0.0))
    print(sum(count for count, _ in results))


def instructions(streams: int, tokens: int, interval: int) -> int:
    """Instructions callgrind counted for one server process."""
    args = (str(streams), str(tokens), str(interval))
    out = subprocess.run(
        [*CALLGRIND, sys.executable, "-c", SERVE, *args], capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"server run failed: {out.stderr[-2000:]}")
    return int(re.search(r"Collected : (\d+)", out.stderr).group(1))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", default="40,120", help="two output lengths")
    parser.add_argument("--intervals", default="1,4", help="two --stream-interval values")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("message_instructions: valgrind is not installed", file=sys.stderr)
        return 2
    short, long = map(int, args.tokens.split(","))
    per_token = {}
    print("| --stream-interval | instructions per token |")
    print("|---|---|")
    for interval in map(int, args.intervals.split(",")):
        diff = instructions(args.streams, long, interval) - instructions(
            args.streams, short, interval
        )
        per_token[interval] = diff / (args.streams * (long - short))
        print(f"| {interval} | {per_token[interval]:,.0f} |", flush=True)
    (a, ca), (b, cb) = per_token.items()
    message = (ca - cb) / (1 / a - 1 / b)
    print(f"\nper message: {message:,.0f}; per token (engine, text): {ca - message / a:,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
