"""The same workload live (server + bench over loopback) and simulated (`memorywall simulate`).

    python -m benchmarks.sim_vs_live              # h100-sxm and wse-3 at 1, 4, 16, 64 users
    python -m benchmarks.sim_vs_live --quick      # fewer requests per level

Per level: mean TPOT and TTFT measured by the live client, the live server's modelled
timeline (from its records), and two simulations: of the live run's own arrivals (its
per-request file replayed as a trace: the engine offline sees the requests when the live
server saw them) and of the ideal closed-loop client. The targets (TPOT within 1%, TTFT
within 5%) compare the replay with the live modelled numbers; the live transport overhead
(client-measured minus modelled TTFT) stands on its own. Where they differ, the last
column says which side the host limited:

- "host stalls": the live server woke past a step's deadline and moved its timeline later
  (`ServerInfo.host_stall`), so its modelled times include host time the model has not;
- "client": bench marked the level suspect (client CPU, send lag or queueing).

The ideal client differs for another reason, shown beside: its users send the moment a
request finishes, so users who finish together stay in lock-step, prefilling in the same
steps (higher TTFT, cheaper decode-only steps between). A live client sends one request
at a time (~0.1 ms apart here) and a round trip later; an idle engine starts at the first
arrival and the rest wait a step, so prefills spread over more steps.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import tempfile
from pathlib import Path

import grpc

from benchmarks._serve import emulator
from memorywall.cli import main as memorywall
from memorywall.v1 import engine_pb2, engine_pb2_grpc

MODEL = "llama-3.1-8b"
HARDWARE = ("h100-sxm", "wse-3")
USERS = (1, 4, 16, 64)
TPOT_TOLERANCE, TTFT_TOLERANCE = 0.01, 0.05


def host_stall_s(target: str) -> float:
    """Modelled time the live server added for host stalls so far."""
    with grpc.insecure_channel(target) as channel:
        info = engine_pb2_grpc.EngineStub(channel).GetServerInfo(
            engine_pb2.GetServerInfoRequest(), timeout=10
        )
    return info.host_stall.stalled_s


def quiet(argv: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        if memorywall(argv) != 0:
            raise SystemExit(f"memorywall {' '.join(argv)} failed")


def load_args(users: int, prompts: int) -> list[str]:
    return ["--concurrency", str(users), "--num-prompts", str(prompts), "--label", "x"]


def compare(hardware: str, out: Path, per_user: int) -> list[dict]:
    deployment = ["--hardware", hardware, "--model", MODEL]
    rows = []
    with emulator(*deployment, "--grace", "1") as target:
        for users in USERS:
            load = load_args(users, max(8, per_user * users))
            before = host_stall_s(target)
            live_dir, sim_dir = out / f"{hardware}-c{users}-live", out / f"{hardware}-c{users}-sim"
            quiet(["bench", "--target", target, *load, "--out", str(live_dir)])
            stalled = host_stall_s(target) - before
            quiet(["simulate", *deployment, *load, "--out", str(sim_dir)])
            sends = live_dir / f"x-c{users}.requests.jsonl"
            replay_dir = out / f"{hardware}-c{users}-replay"
            replay_args = ["--workload", str(sends), "--label", "x", "--out", str(replay_dir)]
            quiet(["simulate", *deployment, *replay_args])
            live = json.loads((live_dir / f"x-c{users}.json").read_text())
            sim = json.loads((sim_dir / f"x-c{users}.json").read_text())
            replay = json.loads((replay_dir / "x-trace.json").read_text())
            rows.append(row(hardware, users, live, replay, sim, stalled))
            print(format_row(rows[-1]), flush=True)
    return rows


def row(hardware: str, users: int, live: dict, replay: dict, sim: dict, stalled_s: float) -> dict:
    """`replay`: the simulation of the live run's own arrivals (the check); `sim`: of the
    ideal closed-loop client."""
    tpot_err = replay["mean_tpot_ms"] / live["mean_modelled_tpot_ms"] - 1
    ttft_err = replay["mean_ttft_ms"] / live["mean_modelled_ttft_ms"] - 1
    limited = []
    if abs(tpot_err) > TPOT_TOLERANCE or abs(ttft_err) > TTFT_TOLERANCE:
        if stalled_s > 0:
            limited.append(f"host stalls ({stalled_s * 1e3:,.0f} ms added live)")
        if live["suspect"]:
            limited.append("client")
    return {
        "hardware": hardware,
        "users": users,
        "requests": live["completed"],
        "live_tpot_ms": live["mean_tpot_ms"],
        "live_modelled_tpot_ms": live["mean_modelled_tpot_ms"],
        "replay_tpot_ms": replay["mean_tpot_ms"],
        "sim_tpot_ms": sim["mean_tpot_ms"],
        "tpot_error": tpot_err,
        "live_ttft_ms": live["mean_ttft_ms"],
        "live_modelled_ttft_ms": live["mean_modelled_ttft_ms"],
        "replay_ttft_ms": replay["mean_ttft_ms"],
        "sim_ttft_ms": sim["mean_ttft_ms"],
        "ttft_error": ttft_err,
        "transport_ttft_ms": live["client_overhead_ttft_ms"],
        "host_stall_ms": stalled_s * 1e3,
        "live_suspect": live["suspect"],
        "limited_by": limited,
    }


HEAD = (
    "| hardware | users | requests | TPOT live measured / modelled | TPOT sim: live arrivals "
    "(error) / ideal client | TTFT live measured / modelled | TTFT sim: live arrivals (error) "
    "/ ideal client | transport | host limited |"
)


def format_row(r: dict) -> str:
    return (
        f"| {r['hardware']} | {r['users']} | {r['requests']} "
        f"| {r['live_tpot_ms']:.3f} / {r['live_modelled_tpot_ms']:.3f} ms "
        f"| {r['replay_tpot_ms']:.3f} ms ({r['tpot_error']:+.2%}) / {r['sim_tpot_ms']:.3f} ms "
        f"| {r['live_ttft_ms']:.2f} / {r['live_modelled_ttft_ms']:.2f} ms "
        f"| {r['replay_ttft_ms']:.2f} ms ({r['ttft_error']:+.1%}) / {r['sim_ttft_ms']:.2f} ms "
        f"| {r['transport_ttft_ms']:.2f} ms | {'; '.join(r['limited_by']) or '-'} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 requests per user, not 4")
    parser.add_argument("--out", type=Path, help="keep the result files here")
    parser.add_argument("--json", type=Path, help="write the comparison rows here")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, Python {platform.python_version()}")
    print(f"{MODEL}, prompt 512, output 128 tokens, closed loop, warm-up 1\n")
    print(HEAD)
    print("|" + "---|" * (HEAD.count("|") - 1))
    with tempfile.TemporaryDirectory(prefix="sim-vs-live-") as tmp:
        out = args.out or Path(tmp)
        rows = [r for hw in HARDWARE for r in compare(hw, out, 2 if args.quick else 4)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
