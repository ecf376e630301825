"""memorywall's offline engine against NVIDIA Dynamo's replay on the same work, in one run:
requests simulated per CPU-second.

    python -m benchmarks.mocker_compare --setup     # once: Dynamo 1.6.1 in /tmp/dynamo-venv
    python -m benchmarks.replay_compare             # 10,000 requests, 64 users, 512/128
    python -m benchmarks.replay_compare --json      # the rows as JSON
    python -m benchmarks.replay_compare --requests 200 --users 8 --repeat 1   # a smoke run

The work: `--requests` requests of `--input-len` prompt and `--output-len` output tokens,
closed loop, `--users` at once (each user's next request the moment its last one ends),
Llama 3.1 8B. Every figure is CPU time (user + system, every thread), the least of
`--repeat` runs; on a shared host it is the code's own cost, where wall time also counts
the waits for a core.

- `dynamo replay`: Dynamo 1.6.1's offline replay of its mocker,
  `dynamo.replay.run_synthetic_trace_replay(input, output, requests,
  replay_concurrency=users)` with its default engine (vLLM-like scheduler, H100-class
  polynomial timing), in a process of its own in Dynamo's venv: the CPU of that call
  (`time.process_time` around it), and of the whole process (interpreter, import,
  replay: the process's rusage) on the next row.
- `memorywall engine`: the `OfflineEngine` alone (`benchmarks.engine_cpu.offline`: prompts
  drawn beforehand, requests submitted from its finish callback), per `--hardware`.
- `memorywall simulate level`: `simulate_level` in this process: the engine plus the
  bench's release rules, prompts, records and metrics (`LevelRun.cpu_s`), no files.
- `memorywall simulate command`: `memorywall simulate ... --out DIR` in a process of its
  own, everything from the interpreter's start to the files written (its rusage).
- Below the table, the command's start-up floor: the CPU of a process that only starts
  the interpreter, one that also imports numpy, and one that imports what `simulate`
  imports before its first level.

Child processes run with their bytecode cached, as an installed package's are: the
environment's `PYTHONDONTWRITEBYTECODE` is dropped for them and one unmeasured import
run writes the cache first (without it every run compiled the whole package again,
~0.2 s of the command's CPU).

Without Dynamo's venv (`--dynamo-venv`) the Dynamo rows are left out and said so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.engine_cpu import offline
from benchmarks.sim_speed import HARDWARE, MODEL, OUTPUT, PROMPT, deployment
from memorywall.argtypes import positive_int
from memorywall.loadgen.bench import BenchConfig, Level
from memorywall.loadgen.prompts import PromptSource
from memorywall.loadgen.records import RequestSpec
from memorywall.loadgen.workload import Fixed, SyntheticWorkload
from memorywall.server.engine.scheduler import EngineConfig, Request
from memorywall.sim.simulate import simulate_level

REQUESTS, USERS = 10_000, 64
DYNAMO_VENV = Path("/tmp/dynamo-venv")
TIMEOUT_S = 600.0

# Run in Dynamo's venv: one synthetic replay; prints its CPU, wall and modelled time.
DYNAMO_SCRIPT = """
import json, sys, time
from dynamo.replay import run_synthetic_trace_replay
users, count, prompt, output = map(int, sys.argv[1:])
cpu0, wall0 = time.process_time(), time.perf_counter()
summary = run_synthetic_trace_replay(prompt, output, count, replay_concurrency=users).summary
cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
print(json.dumps({"cpu_s": cpu, "wall_s": wall, "modelled_s": summary["duration_ms"] / 1e3,
                  "completed": summary["completed_requests"]}))
"""


@dataclass(frozen=True, kw_only=True)
class Work:
    """What both sides simulate."""

    requests: int = REQUESTS
    users: int = USERS
    prompt: int = PROMPT
    output: int = OUTPUT


@dataclass(frozen=True, kw_only=True)
class Row:
    """One measurement: which side, what part of it, on what modelled hardware."""

    side: str  # "dynamo" or "memorywall"
    what: str
    hardware: str  # the modelled hardware ("H100-class": Dynamo's default mocker)
    requests: int  # completed
    cpu_s: float
    wall_s: float
    modelled_s: float

    @property
    def requests_per_cpu_s(self) -> float:
        return self.requests / self.cpu_s

    @property
    def modelled_per_cpu_s(self) -> float:
        """Modelled seconds per CPU-second: 'x real time' on a host with a core to spare."""
        return self.modelled_s / self.cpu_s

    def as_dict(self) -> dict:
        return asdict(self) | {
            "requests_per_cpu_s": self.requests_per_cpu_s,
            "modelled_per_cpu_s": self.modelled_per_cpu_s,
        }


# What `memorywall simulate` imports before its first level (`cli.simulate` and, in its
# `run`, the bench CLI), after the interpreter alone and numpy.
STARTUP = {
    "interpreter": "pass",
    "interpreter + numpy": "import numpy",
    "simulate's imports": "import memorywall.cli.simulate, memorywall.loadgen.cli",
}


def child_env() -> dict[str, str]:
    """This environment, but with bytecode written and read as a user's run has it."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def children_cpu_s() -> float:
    """User + system CPU of this process's waited-for children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_child(argv: Sequence[str]) -> tuple[str, float, float]:
    """Run `argv` to its end: (stdout, its CPU seconds, its wall seconds); raises
    RuntimeError with its stderr's last line if it fails."""
    cpu0, wall0 = children_cpu_s(), time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, env=child_env())
    cpu, wall = children_cpu_s() - cpu0, time.perf_counter() - wall0
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {last}")
    return proc.stdout, cpu, wall


def least(runs: int, measure: Callable[[], list[Row]]) -> list[Row]:
    """Each row's run with the least CPU of `runs`."""
    every = [measure() for _ in range(runs)]
    return [min(rows, key=lambda r: r.cpu_s) for rows in zip(*every, strict=True)]


def dynamo(python: str, work: Work) -> list[Row]:
    """Dynamo's replay of `work`: the call, then the whole process."""
    args = map(str, (work.users, work.requests, work.prompt, work.output))
    out, cpu, wall = run_child([python, "-c", DYNAMO_SCRIPT, *args])
    got = json.loads(out.strip().splitlines()[-1])
    common = {"side": "dynamo", "hardware": "H100-class", "requests": got["completed"]}
    return [
        Row(what="replay", cpu_s=got["cpu_s"], wall_s=got["wall_s"],
            modelled_s=got["modelled_s"], **common),
        Row(what="replay process", cpu_s=cpu, wall_s=wall, modelled_s=got["modelled_s"],
            **common),
    ]  # fmt: skip


def engine_requests(work: Work) -> list[Request]:
    """The closed loop's requests, prompts drawn as simulate draws them."""
    source = PromptSource(0)
    return [
        Request(
            request_id=str(i),
            prompt_ids=source.token_ids(RequestSpec(i, work.prompt, work.output)),
            max_tokens=work.output,
            ignore_eos=True,
        )
        for i in range(work.requests)
    ]


def bench_config(work: Work) -> BenchConfig:
    return BenchConfig(
        target="sim",
        workload=SyntheticWorkload(Fixed(work.prompt), Fixed(work.output)),
        num_prompts=work.requests,
        warmup=0,  # the same requests as the other rows
    )


def simulate_argv(hardware: str, work: Work, out: Path) -> list[str]:
    """The `memorywall simulate` command for `work`, as a user would type it."""
    return [
        *("simulate", "--hardware", hardware, "--model", MODEL),
        *("--concurrency", str(work.users), "--num-prompts", str(work.requests)),
        *("--input-len", str(work.prompt), "--output-len", str(work.output)),
        *("--warmup", "0", "--out", str(out)),
    ]


def memorywall(hardware: str, work: Work) -> list[Row]:
    """The engine alone, a simulated level, and the whole simulate command."""
    common = {"side": "memorywall", "hardware": hardware}
    e = offline(hardware, work.users, engine_requests(work))
    level = Level(f"c{work.users}", work.users, None)
    lr = simulate_level(deployment(hardware), EngineConfig(), bench_config(work), level)
    with tempfile.TemporaryDirectory() as out:
        argv = [sys.executable, "-m", "memorywall", *simulate_argv(hardware, work, Path(out))]
        _, cpu, wall = run_child(argv)
        written = json.loads((Path(out) / "wall_time.json").read_text())["levels"][0]
        result = json.loads((Path(out) / f"sim-{level.name}.json").read_text())
    return [
        Row(what="engine", requests=e.requests, cpu_s=e.cpu_s, wall_s=e.wall_s,
            modelled_s=e.modelled_s, **common),
        Row(what="simulate level", requests=lr.result["completed"],
            cpu_s=lr.cpu_s, wall_s=lr.wall_s, modelled_s=lr.modelled_s, **common),
        Row(what="simulate command", requests=result["completed"],
            cpu_s=cpu, wall_s=wall, modelled_s=written["modelled_s"], **common),
    ]  # fmt: skip


def startup(repeat: int) -> dict[str, float]:
    """The least CPU seconds of `repeat` runs of each `STARTUP` process, bytecode cached."""
    run_child([sys.executable, "-c", STARTUP["simulate's imports"]])  # writes the cache
    return {
        what: min(run_child([sys.executable, "-c", code])[1] for _ in range(repeat))
        for what, code in STARTUP.items()
    }


def measure(
    work: Work, hardware: Sequence[str], repeat: int, dynamo_python: str | None
) -> list[Row]:
    run_child([sys.executable, "-c", STARTUP["simulate's imports"]])  # bytecode cached
    rows: list[Row] = []
    if dynamo_python is not None:
        rows += least(repeat, lambda: dynamo(dynamo_python, work))
    for hw in hardware:
        rows += least(repeat, lambda hw=hw: memorywall(hw, work))  # type: ignore[misc]
    return rows


def baseline(rows: Sequence[Row]) -> Row | None:
    """Dynamo's replay call, what every row is set against; None without Dynamo."""
    return next((r for r in rows if r.side == "dynamo" and r.what == "replay"), None)


def table(rows: Sequence[Row]) -> str:
    head = (
        "| side | what | hardware | requests | CPU | wall | modelled | modelled / CPU "
        "| requests per CPU-second | vs Dynamo replay |"
    )
    base = baseline(rows)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ratio = "" if base is None else f"{r.requests_per_cpu_s / base.requests_per_cpu_s:.2f}x"
        lines.append(
            f"| {r.side} | {r.what} | {r.hardware} | {r.requests:,} | {r.cpu_s:,.3f} s "
            f"| {r.wall_s:,.2f} s | {r.modelled_s:,.1f} s | {r.modelled_per_cpu_s:,.0f}x "
            f"| {r.requests_per_cpu_s:,.0f} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hardware", type=lambda s: s.split(","), default=list(HARDWARE))
    p.add_argument("--requests", type=positive_int, default=REQUESTS)
    p.add_argument("--users", type=positive_int, default=USERS)
    p.add_argument("--input-len", type=positive_int, default=PROMPT)
    p.add_argument("--output-len", type=positive_int, default=OUTPUT)
    p.add_argument("--repeat", type=positive_int, default=3, help="runs each; the least CPU")
    p.add_argument("--dynamo-venv", type=Path, default=DYNAMO_VENV)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    work = Work(
        requests=args.requests, users=args.users, prompt=args.input_len, output=args.output_len
    )
    python = args.dynamo_venv / "bin" / "python"
    have_dynamo = python.exists()
    rows = measure(work, args.hardware, args.repeat, str(python) if have_dynamo else None)
    floor = startup(args.repeat)
    if args.json:
        doc = {"work": asdict(work), "rows": [r.as_dict() for r in rows], "startup_cpu_s": floor}
        print(json.dumps(doc, indent=2))
        return 0
    print(f"machine: {platform.machine()}, Python {platform.python_version()}")
    print(
        f"{MODEL}, {work.requests:,} requests, {work.users} users, prompt {work.prompt}, "
        f"output {work.output} tokens, closed loop; least CPU of {args.repeat}\n"
    )
    if not have_dynamo:
        print(f"(no Dynamo at {python}: `python -m benchmarks.mocker_compare --setup`)\n")
    print(table(rows))
    parts = ", ".join(f"{what} {cpu_s:.3f} s" for what, cpu_s in floor.items())
    print(f"\nstart-up floor of the command (CPU): {parts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
