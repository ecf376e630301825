"""`memorywall doctor`: what this install runs on, one line per part that can be missing."""

from __future__ import annotations

import argparse
import platform

from memorywall.server.engine import kernel


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser(
        "doctor", help="say what this install runs on (Python, the engine's compiled kernel)"
    ).set_defaults(func=doctor_command)


def doctor_command(args: argparse.Namespace) -> int:
    print(f"python: {platform.python_version()} ({platform.machine()})")
    print(kernel.status())
    return 0
