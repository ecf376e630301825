"""NVIDIA Dynamo's mocker against memorywall: delivered tokens/s with timing held, one run.

    python -m benchmarks.mocker_compare --setup     # once: Dynamo in its own venv (PyPI only)
    python -m benchmarks.mocker_compare             # 16, 64, 256, 1,024 streams
    python -m benchmarks.mocker_compare --quick     # 16 and 64 streams, fewer requests

Four engines, one after another in one run, each driven by the same client (the load
generator of `memorywall bench --backend openai-completions`, its requests spread over
`--workers` processes): closed loop, 256-token prompts, 128 output tokens, `--levels`
streams, `--max-num-seqs` max(256, streams) on every engine.

- `mocker 1x`: Dynamo's mocker (its default vLLM-like scheduler and polynomial timing
  model, H100-class steps) behind Dynamo's OpenAI frontend; `mocker 10x`: the same with
  `--speedup-ratio 10`.
- `memorywall h100-sxm` and `memorywall wse-3`, Llama 3.1 8B, `memorywall serve` with its
  HTTP front. The wafer is the 10x pairing: its decode steps (0.56 ms at 16 streams) sit
  where the 10x mocker's do (0.60 ms); a B200 is only about 2x an H100.

Each engine's own expectation for the load it actually got: the arrival times of the
live requests become a Mooncake trace (`timestamp` in ms, lengths, unique `hash_ids`),
replayed on a virtual clock by the engine's own offline model: Dynamo's
`run_trace_replay` for the mocker (same engine args), `memorywall simulate --workload`
for memorywall. Replaying the real arrivals keeps the comparison fair at low load, where
a lock-step closed-loop replay would prefill every user together, and it judges the
engine, not the client: a host that falls behind sends later requests, and the replay
still says how fast those should have gone. Timing held: client mean TPOT within 2% of
that expectation, either way (faster than the model is a miss too), no failed request.
The table also shows what each model delivers in an ideal closed loop (the offline
replay of the same users with no client or host delay: the ceiling a faithful emulator
can reach), and for memorywall the server's own modelled TPOT and the share of the
level its host stalled (a stall moves the modelled timeline later, and says so). Server
CPU per token: user + system CPU seconds of the server's processes over the level
(Dynamo: frontend and mocker; memorywall: serve and any `--api-servers` fronts) over
the tokens delivered, the figure that least depends on what else the machine runs.
`--serve-arg=--api-servers --serve-arg=2` passes arguments on to `memorywall serve`.

Offline Dynamo (what `--setup` does and why): `ai-dynamo` 1.6.1 and `ai-dynamo-runtime`
install from PyPI with `--no-deps`, then their dependencies by hand, leaving out
`aisimulate` (its PyPI sdist refuses to build and points at NVIDIA's own index; the
mocker's default timing model and offline replay are compiled into ai-dynamo-runtime),
`kubernetes` and `redis` (unused with file discovery). The mocker and frontend want a
model folder (config.json and a tokenizer) that they would otherwise fetch from the
Hugging Face hub; this script writes one per run: the repo's unmodified Llama 3.1 8B
config.json and a word-level tokenizer.json whose 128,256 entries `t0`..`t128255` cover
every token id the load sends or the mocker emits (each decodes to non-empty text, so
every streamed chunk carries a token). Discovery goes through files (`DYN_FILE_KV`, no
etcd or NATS) and every Dynamo socket is advertised on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks._serve import serving
from benchmarks.message_cost import cpu_s
from benchmarks.sim_vs_live import host_stall_s, quiet
from memorywall.fleet.runner import free_port
from memorywall.loadgen.bench import BenchConfig, Level, ServerFacts, run_level
from memorywall.loadgen.records import RequestRecord
from memorywall.loadgen.target import Backend
from memorywall.loadgen.workload import Fixed, SyntheticWorkload

MODEL = "llama-3.1-8b"
PROMPT_TOKENS, OUTPUT_TOKENS = 256, 128
TRACE_BLOCK_TOKENS = 64  # the mocker's default KV block
HELD = 0.02  # client TPOT within 2% of the engine's own replay of the live arrivals
REPO = Path(__file__).resolve().parent.parent
CONFIG_JSON = REPO / "core" / "models" / f"{MODEL}.json"
DYNAMO_VERSION = "1.6.1"
# ai-dynamo's requirements less aisimulate, kubernetes and redis (see the module doc).
DYNAMO_DEPS = (
    "aiohttp>=3.14.3,<4.0",
    "certifi>=2026.10.19",
    "msgspec>=0.19.0",
    "prometheus-client>=0.23.1,<1.0",
    "pyzmq>=26.0.0",
    "tqdm>=4.0.0",
    "transformers>=4.56.0",
    "typing-extensions>=4.10.0",
    "zstandard>=0.23.0,<1.0",
    "pydantic>=2.10.6,<=2.13.5",
    "uvloop>=0.21.0",
    "tokenizers",
)
START_TIMEOUT_S = 120.0

# Run in Dynamo's venv: the model folder the mocker and frontend read.
MODEL_DIR_SCRIPT = """
import json, shutil, sys
from tokenizers import Tokenizer, models, pre_tokenizers
out, config_path = sys.argv[1], sys.argv[2]
shutil.copy(config_path, f"{out}/config.json")
config = json.load(open(config_path))
eos = config["eos_token_id"]
tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(config["vocab_size"])}, "t0"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.save(f"{out}/tokenizer.json")
json.dump({"tokenizer_class": "PreTrainedTokenizerFast",
           "bos_token": f"t{config['bos_token_id']}",
           "eos_token": f"t{eos[0] if isinstance(eos, list) else eos}",
           "model_max_length": config["max_position_embeddings"],
           "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"},
          open(f"{out}/tokenizer_config.json", "w"))
"""

# Run in Dynamo's venv: the mocker's own offline replays, of the trace and of an ideal
# closed loop (every user's next request the instant its last ends); prints both summaries.
REPLAY_SCRIPT = """
import json, sys
from dynamo.replay import run_synthetic_trace_replay, run_trace_replay
trace, engine = sys.argv[1], {"engine": json.loads(sys.argv[2])}
users, count, prompt, output, block = map(int, sys.argv[3:])
live = run_trace_replay(trace, extra_engine_args=engine, trace_block_size=block).summary
ideal = run_synthetic_trace_replay(
    prompt, output, count, replay_concurrency=users, extra_engine_args=engine
).summary
print(json.dumps({"live": live, "ideal": ideal}))
"""


@dataclass(frozen=True)
class Engine:
    """One server under test: which, at what speed, and its modelled pace's pairing."""

    name: str
    speed: str
    speedup: float | None = None  # mocker only
    hardware: str | None = None  # memorywall only


ENGINES = (
    Engine("mocker", "H100 (1x)", speedup=1.0),
    Engine("memorywall", "H100 (1x)", hardware="h100-sxm"),
    Engine("mocker", "10x", speedup=10.0),
    Engine("memorywall", "10x", hardware="wse-3"),
)


# ---- Dynamo: install, model folder, processes -------------------------------------------


def setup(venv: Path) -> None:
    """Create Dynamo's venv from PyPI alone (the recipe in the module doc)."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    dynamo = [f"ai-dynamo=={DYNAMO_VERSION}", f"ai-dynamo-runtime=={DYNAMO_VERSION}"]
    subprocess.run([*pip, "--no-deps", *dynamo], check=True)
    subprocess.run([*pip, *DYNAMO_DEPS], check=True)


def dynamo_python(venv: Path) -> str:
    return str(venv / "bin" / "python")


def stream_counts(text: str) -> list[int]:
    """`--levels`: positive stream counts, comma-separated."""
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"want stream counts like 16,64, got {text!r}")
    return counts


def write_model_dir(python: str, out: Path) -> None:
    subprocess.run([python, "-c", MODEL_DIR_SCRIPT, str(out), str(CONFIG_JSON)], check=True)


def dynamo_env(kv_dir: Path) -> dict[str, str]:
    """File discovery, no hub, every socket advertised on loopback, warnings only."""
    loopback = "127.0.0.1"
    return os.environ | {
        "DYN_FILE_KV": str(kv_dir),
        "HF_HUB_OFFLINE": "1",
        "DYN_TCP_RPC_HOST": loopback,
        "DYN_TCP_RESPONSE_STREAM_HOST": loopback,
        "DYN_EVENT_PLANE_HOST": loopback,
        "DYN_SYSTEM_HOST": loopback,
        "DYN_LOG": "warn",
    }


def served_models(url: str) -> list[str]:
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as resp:
            return [m["id"] for m in json.load(resp)["data"]]
    except OSError:
        return []


def stop(procs: Sequence[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def mocker(
    python: str, speedup: float, max_num_seqs: int, logs: Path
) -> Iterator[tuple[str, list[int]]]:
    """Yield the base URL of Dynamo's frontend once it lists the mocker's model, and the
    pids of the frontend and the mocker."""
    with tempfile.TemporaryDirectory(prefix="mocker-") as tmp:
        model_dir, kv_dir = Path(tmp) / "model", Path(tmp) / "kv"
        model_dir.mkdir()
        kv_dir.mkdir()
        write_model_dir(python, model_dir)
        env, port = dynamo_env(kv_dir), free_port()  # its frontend takes no port 0
        url = f"http://127.0.0.1:{port}"
        frontend = [python, "-m", "dynamo.frontend", "--http-host", "127.0.0.1"]
        frontend += ["--http-port", str(port), "--discovery-backend", "file"]
        worker = [python, "-m", "dynamo.mocker", "--model-path", str(model_dir)]
        worker += ["--model-name", MODEL, "--discovery-backend", "file"]
        worker += ["--speedup-ratio", f"{speedup:g}", "--max-num-seqs", str(max_num_seqs)]
        procs: list[subprocess.Popen] = []
        try:
            for cmd, log in ((frontend, "frontend"), (worker, "mocker")):
                with open(logs / f"{log}-{speedup:g}x.log", "w") as f:
                    procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=f))
            deadline = time.monotonic() + START_TIMEOUT_S
            while MODEL not in served_models(url):
                if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                    raise SystemExit(f"Dynamo's mocker did not start; its logs are in {logs}")
                time.sleep(0.5)
            yield url, [p.pid for p in procs]
        finally:
            stop(procs)


def tree_cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds of these processes and their live children (`--api-servers` fronts)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            total += cpu_s(pid) + tree_cpu_s([int(c) for c in children])
    return total


# ---- expectations: each engine's offline replay of the live arrivals ---------------------


def write_trace(records: Sequence[RequestRecord], path: Path) -> int:
    """The live requests as a Mooncake trace: send times (ms from the first), lengths, and
    64-token block hash ids of their own (random prompts share no prefix). Returns the
    request count."""
    sent = sorted(records, key=lambda r: r.sent_ns)
    next_block = 0
    with path.open("w") as f:
        for r in sent:
            blocks = -(-r.prompt_tokens // TRACE_BLOCK_TOKENS)
            line = {
                "timestamp": (r.sent_ns - sent[0].sent_ns) / 1e6,
                "input_length": r.prompt_tokens,
                "output_length": r.output_tokens,
                "hash_ids": list(range(next_block, next_block + blocks)),
            }
            next_block += blocks
            f.write(json.dumps(line) + "\n")
    return len(sent)


def mocker_replay(
    python: str, trace: Path, users: int, count: int, engine: Engine, max_num_seqs: int
) -> dict:
    args = json.dumps({"max_num_seqs": max_num_seqs, "speedup_ratio": engine.speedup})
    numbers = (users, count, PROMPT_TOKENS, OUTPUT_TOKENS, TRACE_BLOCK_TOKENS)
    cmd = [python, "-c", REPLAY_SCRIPT, str(trace), args, *map(str, numbers)]
    out = subprocess.run(cmd, check=True, capture_output=True)
    s = json.loads(out.stdout.decode().strip().splitlines()[-1])
    live, ideal = s["live"], s["ideal"]
    return {
        "tpot_ms": live["mean_tpot_ms"],
        "p99_itl_ms": live["p99_itl_ms"],
        "ideal_tok_s": ideal["output_throughput_tok_s"],
    }


def simulate(engine: Engine, max_num_seqs: int, load: list[str]) -> dict:
    """`memorywall simulate` of this engine under `load` (bench's load options)."""
    deployment = ["--hardware", str(engine.hardware), "--model", MODEL]
    with tempfile.TemporaryDirectory(prefix="mocker-compare-sim-") as out:
        limits = ["--max-num-seqs", str(max_num_seqs), "--warmup", "0"]
        quiet(["simulate", *deployment, *limits, *load, "--label", "x", "--out", out])
        (result,) = (p for p in Path(out).glob("x-*.json"))
        return json.loads(result.read_text())


def memorywall_replay(trace: Path, users: int, count: int, engine: Engine, seqs: int) -> dict:
    replay = ["--workload", str(trace), "--trace-block-size", str(TRACE_BLOCK_TOKENS)]
    live = simulate(engine, seqs, [*replay, "--num-prompts", str(count)])
    lengths = ["--input-len", str(PROMPT_TOKENS), "--output-len", str(OUTPUT_TOKENS)]
    ideal = simulate(
        engine, seqs, ["--concurrency", str(users), "--num-prompts", str(count), *lengths]
    )
    return {
        "tpot_ms": live["mean_tpot_ms"],
        "p99_itl_ms": live["p99_itl_ms"],
        "ideal_tok_s": ideal["output_throughput"],
    }


# ---- one level ---------------------------------------------------------------------------


def drive(url: str, users: int, per_user: int, workers: int, facts: ServerFacts):
    config = BenchConfig(
        target=url,
        backend=Backend.OPENAI_COMPLETIONS,
        model=MODEL,
        workload=SyntheticWorkload(Fixed(PROMPT_TOKENS), Fixed(OUTPUT_TOKENS)),
        num_prompts=per_user * users,
        concurrency=(users,),
        warmup=0,  # every request sent is one the replay sees
        workers=workers,
        label="mocker-compare",
    )
    return run_level(config, Level(f"c{users}", users, None), facts)


def row(engine: Engine, users: int, load: float, live: dict, expected: dict, extra: dict) -> dict:
    error = live["mean_tpot_ms"] / expected["tpot_ms"] - 1
    held = abs(error) <= HELD and not live["failed"]
    return {
        "engine": engine.name,
        "speed": engine.speed,
        "hardware": engine.hardware,
        "speedup": engine.speedup,
        "users": users,
        "load": load,
        "completed": live["completed"],
        "failed": live["failed"],
        "tok_s": live["output_throughput"],
        "tpot_ms": live["mean_tpot_ms"],
        "expected_tpot_ms": expected["tpot_ms"],
        "tpot_error": error,
        "p99_itl_ms": live["p99_itl_ms"],
        "expected_p99_itl_ms": expected["p99_itl_ms"],
        "modelled_tpot_ms": live["mean_modelled_tpot_ms"],
        "stall_share": extra.get("stall_share"),
        "ideal_tok_s": expected["ideal_tok_s"],
        "cpu_us_per_token": extra["cpu_us_per_token"],
        "suspect": live["suspect"],
        "held": held,
    }


def run_engine(engine: Engine, levels: Sequence[int], args, logs: Path) -> Iterator[dict]:
    """Start the engine once per level (its batch limit follows the level) and drive it."""
    for users in levels:
        seqs = max(256, users)
        with contextlib.ExitStack() as stack:
            if engine.name == "mocker":
                python = dynamo_python(args.dynamo_venv)
                url, pids = stack.enter_context(mocker(python, float(engine.speedup), seqs, logs))
                grpc_target = None
                facts = ServerFacts(model=MODEL)
            else:
                serve = ["--hardware", str(engine.hardware), "--model", MODEL]
                serve += ["--http-port", "0", "--max-num-seqs", str(seqs), *args.serve_arg]
                ready = stack.enter_context(serving(*serve))
                url, grpc_target, pids = ready.http_url, ready.grpc_target, [ready.pid]
                facts = ServerFacts(hardware=engine.hardware, model=MODEL, emulated=True)
            load = os.getloadavg()[0]
            stalled_before = host_stall_s(grpc_target) if grpc_target else 0.0
            cpu_before = tree_cpu_s(pids)
            live, records = drive(url, users, args.requests_per_user, args.workers, facts)
            extra = {
                "cpu_us_per_token": (tree_cpu_s(pids) - cpu_before)
                * 1e6
                / live["total_output_tokens"]
            }
            if grpc_target:
                stalled = host_stall_s(grpc_target) - stalled_before
                extra["stall_share"] = stalled / live["duration"]
        with tempfile.TemporaryDirectory(prefix="mocker-compare-trace-") as tmp:
            trace = Path(tmp) / "trace.jsonl"
            count = write_trace(records, trace)
            if engine.name == "mocker":
                expected = mocker_replay(python, trace, users, count, engine, seqs)
            else:
                expected = memorywall_replay(trace, users, count, engine, seqs)
        yield row(engine, users, load, live, expected, extra)


# ---- report ------------------------------------------------------------------------------

HEAD = (
    "| engine | speed | streams | load | tok/s | ideal tok/s | client TPOT | expected TPOT "
    "| TPOT vs expected | p99 ITL client / expected | server CPU per token "
    "| modelled TPOT, host stalls | timing held |"
)


def fmt(r: dict) -> str:
    name = r["engine"] + (f" {r['hardware']}" if r["hardware"] else f" {r['speedup']:g}x")
    own = "-"
    if r["modelled_tpot_ms"] is not None:
        own = f"{r['modelled_tpot_ms']:.3f} ms, {r['stall_share']:.1%}"
    held = "yes" if r["held"] else "**no**"
    return (
        f"| {name} | {r['speed']} | {r['users']:,} | {r['load']:.2f} | {r['tok_s']:,.0f} "
        f"| {r['ideal_tok_s']:,.0f} | {r['tpot_ms']:.3f} ms | {r['expected_tpot_ms']:.3f} ms "
        f"| {r['tpot_error']:+.1%} "
        f"| {r['p99_itl_ms']:.2f} / {r['expected_p99_itl_ms']:.2f} ms "
        f"| {r['cpu_us_per_token']:.0f} us | {own} | {held} |"
    )


def verdict(rows: Sequence[dict]) -> list[str]:
    """Best delivered tokens/s with timing held, per speed and over the run, and the ratio."""
    lines = []
    for speed in [*dict.fromkeys(r["speed"] for r in rows), None]:
        best = {}
        for name in ("memorywall", "mocker"):
            held = [r for r in rows if r["engine"] == name and r["held"]]
            held = [r for r in held if speed is None or r["speed"] == speed]
            top = max(held, key=lambda r: r["tok_s"], default=None)
            best[name] = top["tok_s"] if top else 0.0
            where = f" ({top['users']:,} streams, {top['speed']})" if top else " (no level held)"
            best[f"{name}_at"] = where
        ratio = f"{best['memorywall'] / best['mocker']:.2f}x" if best["mocker"] else "n/a"
        lines.append(
            f"- {speed or 'whole run'}: memorywall {best['memorywall']:,.0f} tok/s"
            f"{best['memorywall_at']}, mocker {best['mocker']:,.0f} tok/s{best['mocker_at']}: "
            f"{ratio}"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setup", action="store_true", help="install Dynamo's venv, then stop")
    parser.add_argument("--dynamo-venv", type=Path, default=Path("/tmp/dynamo-venv"))
    parser.add_argument(
        "--levels", type=stream_counts, default=[16, 64, 256, 1024], help="streams, e.g. 16,64"
    )
    parser.add_argument("--quick", action="store_true", help="16 and 64 streams, 1 request each")
    parser.add_argument("--requests-per-user", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument(
        "--serve-arg", action="append", default=[], help="extra `memorywall serve` argument"
    )
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--logs", type=Path, help="keep Dynamo's logs here")
    args = parser.parse_args()
    if args.setup:
        setup(args.dynamo_venv)
        return 0
    if not Path(dynamo_python(args.dynamo_venv)).exists():
        parser.error(f"no Dynamo venv at {args.dynamo_venv}: run with --setup first")
    levels = [16, 64] if args.quick else args.levels
    if args.quick:
        args.requests_per_user = 1
    print(
        f"# Dynamo mocker {DYNAMO_VERSION} vs memorywall, {MODEL}: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}; closed loop, "
        f"{PROMPT_TOKENS}-token prompts, {OUTPUT_TOKENS} output tokens, "
        f"{args.requests_per_user} requests per stream, bench --workers {args.workers}\n"
    )
    print(HEAD)
    print("|" + "---|" * (HEAD.count("|") - 1))
    rows = []
    with contextlib.ExitStack() as stack:
        logs = args.logs or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        logs.mkdir(parents=True, exist_ok=True)
        for engine in ENGINES:
            for r in run_engine(engine, levels, args, logs):
                rows.append(r)
                print(fmt(r), flush=True)
    print("\nBest delivered tokens/s with timing held (client TPOT within 2% of its own model):")
    print("\n".join(verdict(rows)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
