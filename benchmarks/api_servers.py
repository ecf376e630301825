"""How delivered tokens/s grows with front processes (`memorywall serve --api-servers N`).

    python -m benchmarks.api_servers [--backend h100-sxm] [--users 256] [--servers 1,2]
                                     [--front http] [--workers 2] [--requests 2]

For each N a fresh server is driven as `benchmarks.server_fidelity` drives it
(closed-loop users in `--workers` client processes, 256-token prompts, 128
output tokens) and the table gives its fidelity row plus the CPU seconds each
server process spent per thousand delivered tokens (from /proc: the engine
process, the fronts together, or the one process when N = 1), and the
machine's load average. Those per-token costs say where more cores stop
helping: the engine is one process, so it saturates one core at
1000 / (engine CPU-s per 1k tokens) tokens/s whatever N is.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from benchmarks._serve import serving
from benchmarks.message_cost import cpu_s
from benchmarks.server_fidelity import MODEL, drive, host_stall, summarise


def _tcp_inodes() -> set[str]:
    return {line.split()[9] for line in Path("/proc/net/tcp").read_text().splitlines()[1:] if line}


def _roles(parent: int) -> dict[str, list[int]]:
    """The server's processes: "server" (the parent) and, with N > 1, "engine" and "fronts"
    (a front holds TCP sockets, the engine none; multiprocessing's tracker is left out)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    roles: dict[str, list[int]] = {"server": [parent], "engine": [], "fronts": []}
    tcp = _tcp_inodes()
    for pid in map(int, children):
        if b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes():
            continue
        fds = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except FileNotFoundError:
                continue
        sockets = {link[8:-1] for link in fds if link.startswith("socket:[")}
        roles["fronts" if sockets & tcp else "engine"].append(pid)
    return roles


def run(hw: str, users: int, servers: int, front: str, workers: int, requests: int) -> str:
    args = ["--hardware", hw, "--model", MODEL, "--http-port", "0", "--log-level", "ERROR"]
    args += ["--max-num-seqs", str(max(256, users)), "--api-servers", str(servers)]
    with serving(*args) as ready:
        roles = _roles(ready.pid)
        load = os.getloadavg()[0]
        before_stall = host_stall(ready.grpc_target)
        before = {role: sum(cpu_s(p) for p in pids) for role, pids in roles.items()}
        address = ready.grpc_target if front == "grpc" else ready.http_url
        records = drive(front, address, users, workers, requests)
        after = {role: sum(cpu_s(p) for p in pids) for role, pids in roles.items()}
        after_stall = host_stall(ready.grpc_target)
    s = summarise(records)
    tokens_k = sum(len(r.received_s) for r in records) / 1000
    cpu = {role: (after[role] - before[role]) / tokens_k for role in roles}
    stalls = after_stall.stalls - before_stall.stalls
    lost = (after_stall.stalled_s - before_stall.stalled_s) / s["span_s"]
    engine = cpu["engine"] if servers > 1 else cpu["server"]
    fronts = f"{cpu['fronts']:.3f}" if servers > 1 else "(same process)"
    return (
        f"| {servers} | {front} | {users} | {load:.1f} | {s['tok_s']:,.0f} "
        f"| {s['tpot_err']:+.1%} | {s['itl_p99_ms']:.1f} / {s['model_itl_p99_ms']:.1f} ms "
        f"| {stalls} ({lost:.1%}) | {engine:.3f} | {fronts} |"
    )


HEADER = (
    "| api servers | front | users | load | tok/s | TPOT err | ITL p99 client / model "
    "| host stalls (share of run) | engine CPU-s / 1k tok | fronts CPU-s / 1k tok |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="h100-sxm")
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--servers", default="1,2")
    parser.add_argument("--front", default="http", choices=["http", "grpc"])
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--requests", type=int, default=2, help="requests per user")
    args = parser.parse_args()
    print(f"# {os.cpu_count()} CPUs; {args.backend}, {args.workers} client processes\n")
    print(HEADER)
    for n in map(int, args.servers.split(",")):
        print(run(args.backend, args.users, n, args.front, args.workers, args.requests), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
