"""The `memorywall` command: one subparser per command module, and `main`.

Every error a user can cause prints one line, `memorywall: error: ...`, and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from memorywall.cli import (
    bench,
    calibrate,
    catalog,
    dashboard,
    demo,
    doctor,
    fleet,
    grafana,
    plan,
    predict,
    serve,
    simulate,
)
from memorywall.cli.usage import EXIT_USAGE, Parser, UsageError
from memorywall.errors import MemorywallError

# In `memorywall --help` order.
COMMANDS = (
    predict,
    serve,
    demo,
    fleet,
    dashboard,
    bench,
    simulate,
    calibrate,
    plan,
    catalog,
    grafana,
    doctor,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="memorywall", description="LLM serving emulator: wafer-scale vs GPU.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:2] == ["bench", "compare"]:
            return bench.compare_command(argv[2:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (UsageError, MemorywallError) as e:
        print(f"memorywall: error: {e}", file=sys.stderr)
        return EXIT_USAGE
