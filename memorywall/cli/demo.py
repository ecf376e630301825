"""`memorywall demo`: start an emulated wafer and GPU, load both, show what their users get."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from memorywall.argtypes import number_list, positive_int
from memorywall.demo import config as demo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="start an emulated wafer and GPU, load both, and show what their users get",
    )
    p.add_argument(
        "--hardware",
        default=",".join(demo.DEFAULT_HARDWARE),
        help="profiles, comma-separated (default: %(default)s)",
    )
    p.add_argument(
        "--model",
        default=demo.DEFAULT_MODEL,
        help="model every server serves (default: %(default)s)",
    )
    p.add_argument(
        "--levels",
        type=number_list(int, low=1),
        default=demo.DEFAULT_LEVELS,
        help=f"closed-loop users per level (default: {','.join(map(str, demo.DEFAULT_LEVELS))})",
    )
    p.add_argument(
        "--input-len",
        type=positive_int,
        default=demo.DEFAULT_PROMPT_TOKENS,
        help="prompt tokens (default: %(default)s)",
    )
    p.add_argument(
        "--output-len",
        type=positive_int,
        default=demo.DEFAULT_OUTPUT_TOKENS,
        help="output tokens per request (default: %(default)s)",
    )
    p.add_argument(
        "--keep-serving",
        action="store_true",
        help="leave the servers up afterwards and print how to point tools at them",
    )
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="serve a live browser dashboard of the servers while the demo runs (its URL is "
        "printed; a browser opens where there is a graphical one)",
    )
    p.add_argument(
        "--out", type=Path, help="results folder (default: ./memorywall-demo-<date>-<time>)"
    )
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    # Imported here: only `demo` starts servers and the load generator.
    from memorywall.demo.config import DemoConfig
    from memorywall.demo.runner import run as run_demo

    config = DemoConfig(
        hardware=tuple(h for h in args.hardware.split(",") if h),
        model=args.model,
        levels=args.levels,
        prompt_tokens=args.input_len,
        output_tokens=args.output_len,
        out=args.out or Path(time.strftime("memorywall-demo-%Y%m%d-%H%M%S")),
        keep_serving=args.keep_serving,
        dashboard=args.dashboard,
    )
    return run_demo(config)
