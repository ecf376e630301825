"""`memorywall fleet`: several emulated workers from a TOML spec, optionally behind smg."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fleet", help="run several emulated workers from a TOML spec, optionally behind smg"
    )
    p.add_argument("spec", type=Path, help="fleet .toml: [[worker]] tables, optional [gateway]")
    p.add_argument(
        "--log-dir", type=Path, help="write <name>.log per process here (default: a temp dir)"
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        help="once every worker (and the gateway) answers, write a JSON file here: each "
        "worker's addresses and devices, the gateway's URL; removed on exit",
    )
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    # Imported here: only `fleet` starts processes.
    from memorywall.fleet.runner import run as run_fleet
    from memorywall.fleet.spec import load_spec

    return run_fleet(load_spec(args.spec), args.log_dir, ready_file=args.ready_file)
