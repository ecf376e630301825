"""Instructions per streamed message on the OpenAI HTTP front's two paths, engine to transport.

    python -m benchmarks.message_instructions [--streams 64] [--tokens 50,150]

CPU time on this shared VM swings too much to show a few microseconds per message, and a
real server's instruction count moves with its timing (how many loop turns, how many
stalls). So this runs the live engine (llama-3.1-8b on h100-sxm, `--stream-interval 1`:
one token a message) on a clock that jumps to each step's end, `--streams` streaming
completions each read by the front's own code (`openai_stream.stream_events`) into
aiohttp's payload writer, chunked, over a transport that drops the bytes: no sockets, no
timing, the same instructions every run. valgrind's callgrind counts a whole process at
two output lengths; the difference over the difference in tokens is the cost of a
message, start-up cancelled out, engine included (scheduling, sampling and fan-out: a
fixed part of each figure, which the `engine` path gives alone: a sink that drops each
group, no front). The sink path (`openai_sink.py`: the engine's step formats
and writes each chunk) is counted against the task path (each message wakes the
request's handler task, which awaits aiohttp's write; run alone, on code without the
sink path, it is the figure before it). The kernel's part of a real send is in neither.
Needs `valgrind` on PATH; about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys

CALLGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")
RUN = (
    "import sys; from benchmarks.message_instructions import run; "
    "run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])"
)


class NullSink:
    """Takes each group and drops it; `over` is set at the stream's end."""

    def __init__(self) -> None:
        self.over = asyncio.get_running_loop().create_future()

    def group(self, group: object) -> None:
        pass

    def end(self, final: object, error: object) -> None:
        self.over.set_result(None)


class NullTransport:
    """Takes every write and drops it."""

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


async def _run(streams: int, tokens: int, path: str) -> int:
    from types import SimpleNamespace

    from aiohttp.base_protocol import BaseProtocol
    from aiohttp.http_writer import StreamWriter

    from benchmarks.engine_cpu import SteppedClock
    from memorywall.core import load_hardware, load_model, plan_deployment
    from memorywall.server.engine.build import build_core
    from memorywall.server.engine.live import AsyncEngine
    from memorywall.server.engine.scheduler import EngineConfig
    from memorywall.server.fronts.openai_api import Endpoint, OpenAIApi
    from memorywall.server.fronts.openai_reply import Reply
    from memorywall.server.fronts.openai_stream import stream_events
    from memorywall.server.fronts.tokenizer import load_tokenizer

    deployment = plan_deployment(load_hardware("h100-sxm"), load_model("llama-3.1-8b"))
    core, card = build_core(deployment, EngineConfig(max_num_seqs=1024))
    engine = AsyncEngine(core, clock=SteppedClock(), max_messages_per_s=1e9, stream_interval=1)
    api = OpenAIApi(card, load_tokenizer(None, card.vocab_size))
    loop = asyncio.get_running_loop()
    await engine.start()
    writers: list[StreamWriter] = []

    async def one(i: int) -> None:
        body = {"prompt": "hi", "max_tokens": tokens, "ignore_eos": True, "stream": True}
        call = api.to_call(body, Endpoint.COMPLETIONS, f"r{i}")
        stream = engine.submit(call.request)
        protocol = BaseProtocol(loop)
        protocol.connection_made(NullTransport())  # type: ignore[arg-type]
        writer = StreamWriter(protocol, loop)
        writer.enable_chunking()
        writers.append(writer)
        if path == "engine":  # the engine alone: a sink that takes each group, no front
            null = NullSink()
            assert stream.attach(null)
            await null.over
            return
        extra = []  # the task path: what the front did before the sink path existed
        if path == "sink":
            from memorywall.server.fronts.http_front import write_now

            request = SimpleNamespace(
                writer=writer, protocol=protocol, transport=protocol.transport
            )
            extra.append(write_now(request, SimpleNamespace(compression=False)))  # type: ignore[arg-type]
        try:
            await stream_events([stream], [Reply(call, card.model, 0)], writer.write, *extra)
        finally:
            stream.close()

    await asyncio.gather(*(one(i) for i in range(streams)))
    await engine.stop()
    return sum(w.output_size for w in writers)


def run(streams: int, tokens: int, path: str) -> None:
    """The counted process: `streams` streams of `tokens` tokens, on one path."""
    print(asyncio.run(_run(streams, tokens, path)))


PATHS = ("engine", "task", "sink")


def instructions(streams: int, tokens: int, path: str) -> tuple[int, int]:
    """Instructions callgrind counted for one whole process, and the bytes it wrote."""
    out = subprocess.run(
        [*CALLGRIND, sys.executable, "-c", RUN, str(streams), str(tokens), path],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(f"run failed: {out.stderr[-2000:]}")
    return int(re.search(r"Collected : (\d+)", out.stderr).group(1)), int(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", default="50,150", help="two output lengths")
    parser.add_argument("--paths", default=",".join(PATHS), help="task, sink or both")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("message_instructions: valgrind is not installed", file=sys.stderr)
        return 2
    short, long = map(int, args.tokens.split(","))
    messages = args.streams * (long - short)
    print(f"{args.streams} streams, {short} and {long} tokens, a token a message\n")
    print("| path | instructions per message | bytes written |")
    print("|---|---|---|")
    for path in args.paths.split(","):
        (a, bytes_a), (b, bytes_b) = (instructions(args.streams, n, path) for n in (short, long))
        print(f"| {path} | {(b - a) / messages:,.0f} | {bytes_a:,} and {bytes_b:,} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
