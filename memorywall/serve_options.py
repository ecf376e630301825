"""`memorywall serve` options for faults, admission and request limits.

Kept apart from `cli.py`: they build the server's `GuardConfig` and limits, and
only `serve` uses them.
"""

from __future__ import annotations

import argparse
from typing import Any

from memorywall.argtypes import nonnegative_int, positive_float, positive_int
from memorywall.errors import ConfigError


def fault_spec(text: str):
    """argparse type for `--faults`: comma-separated KIND:RATE[:ARG] rules."""
    from memorywall.server.engine.faults import parse_spec

    try:
        return parse_spec(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("faults and admission")
    g.add_argument(
        "--faults",
        type=fault_spec,
        metavar="SPEC",
        help="inject faults: comma-separated KIND:RATE[:ARG], KIND one of error[:STATUS] "
        "(unavailable, resource_exhausted, internal, deadline_exceeded), abort[:TOKENS], "
        "stall[:SECONDS], slow[:FACTOR]; e.g. error:0.05,stall:0.1:2",
    )
    g.add_argument(
        "--fault-seed",
        type=nonnegative_int,
        default=0,
        help="seed for each request's fate (drawn in arrival order; default 0)",
    )
    g.add_argument(
        "--allow-fault-headers",
        action="store_true",
        help="let a request ask for its own fault (header / metadata x-memorywall-fault: "
        "KIND:RATE[:ARG]); refused with 400 / INVALID_ARGUMENT otherwise",
    )
    g.add_argument(
        "--max-waiting",
        type=nonnegative_int,
        help="refuse requests (429 / RESOURCE_EXHAUSTED) while this many wait (default: no "
        "bound)",
    )
    g.add_argument(
        "--retry-after",
        type=positive_float,
        default=1.0,
        help="seconds a refused client is told to wait (Retry-After, grpc-retry-pushback-ms)",
    )
    g.add_argument(
        "--max-request-bytes",
        type=positive_int,
        help="largest request body (HTTP, 413 beyond) or message (gRPC, INVALID_ARGUMENT) "
        "(default 16 MiB)",
    )


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """`ServerConfig` fields from the options above."""
    from memorywall.server.engine.guard import GuardConfig

    out: dict[str, Any] = {
        "guard": GuardConfig(
            max_waiting=args.max_waiting,
            retry_after_s=args.retry_after,
            faults=args.faults or (),
            fault_seed=args.fault_seed,
            allow_fault_headers=args.allow_fault_headers,
        )
    }
    if args.max_request_bytes is not None:
        out["max_request_bytes"] = args.max_request_bytes
    return out
