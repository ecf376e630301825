"""Engine CPU per generated token: the offline engine alone, and the live engine on its
real clock with in-process readers.

    python -m benchmarks.engine_cpu                 # batch 64 and 256, h100-sxm and wse-3
    python -m benchmarks.engine_cpu --json          # the rows as JSON
    python -m benchmarks.engine_cpu --batch 8 --rounds 1 --output-len 16   # a smoke run
    valgrind --tool=callgrind python -m benchmarks.engine_cpu --stepped --live-only \
        --hardware wse-3 --batch 64 --rounds 3    # instructions: minus --rounds 1, per token

Llama 3.1 8B, prompts of 512 and outputs of 128 tokens (`--input-len`, `--output-len`),
closed loop: `batch` users each send `--rounds` requests, the next the moment the last
one ends, so the engine decodes about `batch` sequences at a time.

OFFLINE: the `OfflineEngine` (what `memorywall simulate` steps) on its virtual clock,
requests submitted from its finish callback; the cycle collector paused, as simulate
pauses it. LIVE: the `AsyncEngine` (what `memorywall serve` runs) on its monotonic
clock, in this process, one asyncio task per user reading every event of its stream; no
network, no front. Both: this process's CPU time (user + system) over the tokens the
engine generated, prompts drawn beforehand. LIVE also gives the host stall share the
engine reports: the decode time its requests lost to a late host
(`Finished.decode_host_stall_s`) over their decode time (`Finished.decode_s`); 0 means
the host kept the model's pace; and the tokens per message its `auto` grouping sent.
On a shared host CPU time is the code's own cost and the wall time and stalls include
waits for a core.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from benchmarks.sim_speed import HARDWARE, MODEL, OUTPUT, PROMPT, deployment
from memorywall.argtypes import number_list, positive_float, positive_int
from memorywall.loadgen.prompts import PromptSource
from memorywall.loadgen.records import RequestSpec
from memorywall.server.config import ServerConfig
from memorywall.server.engine.api import Finished
from memorywall.server.engine.build import build_core
from memorywall.server.engine.live import AsyncEngine
from memorywall.server.engine.offline import OfflineEngine
from memorywall.server.engine.scheduler import EngineConfig, Request

BATCHES = (64, 256)
ROUNDS = 2  # requests per user


@dataclass(frozen=True, kw_only=True)
class Row:
    """One measurement: `mode` OFFLINE or LIVE."""

    mode: str
    hardware: str
    batch: int
    requests: int
    tokens: int  # generated
    wall_s: float
    cpu_s: float
    modelled_s: float  # the engine's clock from the first arrival to the last token
    decode_s: float | None = None  # LIVE: the requests' decode time, stalls included
    decode_host_stall_s: float | None = None  # LIVE: of which the host's stalls
    messages: int | None = None  # LIVE: token groups the readers got (`auto` grouping)

    @property
    def cpu_per_token_us(self) -> float:
        return self.cpu_s / self.tokens * 1e6

    @property
    def stall_share(self) -> float | None:
        if self.decode_s is None or not self.decode_s:
            return None
        return self.decode_host_stall_s / self.decode_s

    @property
    def tokens_per_message(self) -> float | None:
        return self.tokens / self.messages if self.messages else None

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "cpu_per_token_us": self.cpu_per_token_us,
            "stall_share": self.stall_share,
            "tokens_per_message": self.tokens_per_message,
        }


def requests(batch: int, rounds: int, prompt: int, output: int) -> list[Request]:
    """The closed loop's requests, prompts drawn as simulate draws them (no prefix shared)."""
    source = PromptSource(0)
    return [
        Request(
            request_id=str(i),
            prompt_ids=source.token_ids(RequestSpec(i, prompt, output)),
            max_tokens=output,
            ignore_eos=True,
        )
        for i in range(batch * rounds)
    ]


def offline(hardware: str, batch: int, todo: Sequence[Request]) -> Row:
    """The offline engine alone: `batch` users, each sending its next request at its last
    one's finish."""
    core, _ = build_core(deployment(hardware), EngineConfig(max_num_seqs=max(batch, 256)))
    engine = OfflineEngine(core)
    pending = list(reversed(todo))

    def next_one(timeline) -> None:
        if pending:
            engine.submit(pending.pop(), timeline.last_token_s or timeline.arrival_s)

    engine.on_finish = next_one
    for _ in range(min(batch, len(pending))):
        engine.submit(pending.pop(), 0.0)
    enabled = gc.isenabled()
    gc.disable()
    try:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        engine.run()
        cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        if enabled:
            gc.enable()
    engine.on_finish = None
    return Row(
        mode="OFFLINE",
        hardware=hardware,
        batch=batch,
        requests=len(todo),
        tokens=core.counters.tokens_generated,
        wall_s=wall_s,
        cpu_s=cpu_s,
        modelled_s=engine.now_s,
    )


class SteppedClock:
    """A clock that jumps to each deadline at once (`--stepped`): the live engine's code,
    its readers' and asyncio's, with no waits and no late wake-ups, so its cost repeats
    (instruction counts under `valgrind --tool=callgrind`) whatever else the host runs."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep_until(self, deadline_s: float) -> None:
        await asyncio.sleep(0)  # readers handed tokens this step run first, as when waiting
        self.t = max(self.t, deadline_s)

    def close(self) -> None:
        pass


async def _live(
    hardware: str,
    batch: int,
    todo: Sequence[Request],
    stepped: bool = False,
    max_messages_per_s: float | None = None,
) -> Row:
    core, _ = build_core(deployment(hardware), EngineConfig(max_num_seqs=max(batch, 256)))
    rate = ServerConfig().max_messages_per_s if max_messages_per_s is None else max_messages_per_s
    engine = AsyncEngine(
        core,
        max_messages_per_s=rate,
        # Stepped: no wall time passes, so the budget sees an idle process.
        **({"clock": SteppedClock(), "cpu_time": lambda: 0.0} if stepped else {}),
    )
    pending = list(reversed(todo))
    ends: list[Finished] = []
    messages = 0

    async def user() -> None:
        nonlocal messages
        while pending:
            async for event in engine.submit(pending.pop()):
                if isinstance(event, Finished):
                    ends.append(event)
                else:
                    messages += 1

    await engine.start()
    try:
        first = engine.now()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(user() for _ in range(batch)))
        cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
        modelled_s = engine.now() - first
    finally:
        await engine.stop()
    return Row(
        mode="STEPPED" if stepped else "LIVE",
        hardware=hardware,
        batch=batch,
        requests=len(ends),
        tokens=core.counters.tokens_generated,
        wall_s=wall_s,
        cpu_s=cpu_s,
        modelled_s=modelled_s,
        decode_s=sum(f.decode_s for f in ends),
        decode_host_stall_s=sum(f.decode_host_stall_s for f in ends),
        messages=messages,
    )


def live(
    hardware: str,
    batch: int,
    todo: Sequence[Request],
    stepped: bool = False,
    max_messages_per_s: float | None = None,
) -> Row:
    """The live engine on its monotonic clock (or `stepped`), `batch` in-process readers;
    `max_messages_per_s`: its message budget (default: serve's)."""
    return asyncio.run(_live(hardware, batch, todo, stepped, max_messages_per_s))


def measure(
    hardware: Sequence[str],
    batches: Sequence[int],
    rounds: int,
    prompt: int,
    output: int,
    stepped: bool = False,
    max_messages_per_s: float | None = None,
    live_only: bool = False,
) -> list[Row]:
    rows = []
    for hw in hardware:
        for batch in batches:
            todo = requests(batch, rounds, prompt, output)
            if not live_only:
                rows.append(offline(hw, batch, todo))
            rows.append(live(hw, batch, todo, stepped, max_messages_per_s))
    return rows


def table(rows: Sequence[Row]) -> str:
    head = (
        "| mode | hardware | batch | requests | tokens | wall | CPU | CPU per token "
        "| modelled / CPU | tokens per message | host stall share |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        stall = "" if r.stall_share is None else f"{r.stall_share:.1%}"
        grouped = "" if r.tokens_per_message is None else f"{r.tokens_per_message:.2f}"
        lines.append(
            f"| {r.mode} | {r.hardware} | {r.batch} | {r.requests:,} | {r.tokens:,} "
            f"| {r.wall_s:,.2f} s | {r.cpu_s:,.3f} s | {r.cpu_per_token_us:,.2f} us "
            f"| {r.modelled_s / r.cpu_s:,.0f}x | {grouped} | {stall} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hardware", type=lambda s: s.split(","), default=list(HARDWARE))
    p.add_argument("--batch", type=number_list(int, low=1), default=BATCHES, help="e.g. 64,256")
    p.add_argument("--rounds", type=positive_int, default=ROUNDS, help="requests per user")
    p.add_argument("--input-len", type=positive_int, default=PROMPT)
    p.add_argument("--output-len", type=positive_int, default=OUTPUT)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument(
        "--stepped",
        action="store_true",
        help="LIVE on a clock that jumps to each deadline: the code's cost alone (STEPPED rows)",
    )
    p.add_argument(
        "--max-messages-per-s",
        type=positive_float,
        default=None,
        help="LIVE's message budget (default: serve's)",
    )
    p.add_argument("--live-only", action="store_true", help="no OFFLINE rows")
    args = p.parse_args(argv)
    rows = measure(
        args.hardware,
        args.batch,
        args.rounds,
        args.input_len,
        args.output_len,
        args.stepped,
        args.max_messages_per_s,
        args.live_only,
    )
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    print(f"machine: {platform.machine()}, Python {platform.python_version()}")
    print(f"{MODEL}, prompt {args.input_len}, output {args.output_len} tokens, closed loop\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
