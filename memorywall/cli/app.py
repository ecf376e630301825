"""The `memorywall` command: one subparser per command module, and `main`.

Every error a user can cause prints one line, `memorywall: error: ...`, and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from memorywall.cli.usage import EXIT_USAGE, Parser, UsageError
from memorywall.errors import MemorywallError

# Each command and the module (memorywall.cli.*) that registers it, in `memorywall
# --help` order. A command imports its own module alone: loading every command's
# dependencies cost a short `memorywall simulate` a fifth of its CPU.
COMMANDS = {
    "predict": "predict",
    "serve": "serve",
    "demo": "demo",
    "fleet": "fleet",
    "dashboard": "dashboard",
    "bench": "bench",
    "simulate": "simulate",
    "calibrate": "calibrate",
    "plan": "plan",
    "hardware": "catalog",
    "models": "catalog",
    "grafana-dashboard": "grafana",
    "doctor": "doctor",
}


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"memorywall.cli.{name}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with a known `command`, only that command's subparser (what
    parsing its arguments needs; `--help` and errors read the same)."""
    parser = Parser(prog="memorywall", description="LLM serving emulator: wafer-scale vs GPU.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    names = [COMMANDS[command]] if command in COMMANDS else dict.fromkeys(COMMANDS.values())
    for name in names:
        _module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:2] == ["bench", "compare"]:
            return _module("bench").compare_command(argv[2:])
        args = build_parser(argv[0] if argv else None).parse_args(argv)
        return args.func(args)
    except (UsageError, MemorywallError) as e:
        print(f"memorywall: error: {e}", file=sys.stderr)
        return EXIT_USAGE
