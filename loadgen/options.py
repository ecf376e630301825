"""The `memorywall bench` options: argparse only, so building the CLI stays quick."""

from __future__ import annotations

import argparse
from pathlib import Path


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,4,16, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every level must be >= 1, got {text!r}")
    return values


def _rate_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 2,8,32, got {text!r}") from None
    if any(not v > 0 or v == float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"every rate must be a finite number > 0, got {text!r}")
    return values


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="memorywall server host:port")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_int_list, help="closed loop: users, e.g. 1,4,16,64")
    load.add_argument("--request-rate", type=_rate_list, help="open loop: requests/s, e.g. 2,8")
    p.add_argument(
        "--burstiness", type=_positive(float), default=1.0, help="gamma shape (1: Poisson)"
    )
    p.add_argument(
        "--max-concurrency", type=_positive(int), help="open loop: cap on requests in flight"
    )
    p.add_argument(
        "--num-prompts", type=_positive(int), help="requests per level (default 100, or the trace)"
    )
    p.add_argument(
        "--duration", type=_positive(float), help="stop releasing requests after S seconds"
    )
    p.add_argument(
        "--warmup", type=int, default=1, help="warm-up requests per level (excluded; default 1)"
    )
    p.add_argument("--input-len", default="512", help="N | uniform:N:R | lognormal:N:SIGMA")
    p.add_argument("--output-len", default="128", help="N | uniform:N:R | lognormal:N:SIGMA")
    p.add_argument(
        "--workload", type=Path, help="JSONL trace: prompt_tokens, output_tokens[, arrival_s]"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=_positive(int), default=1, help="load-generating processes")
    p.add_argument("--slo", help="goodput bounds, e.g. ttft=500ms,tpot=30ms")
    p.add_argument("--timeout", type=_positive(float), help="per-request deadline in seconds")
    p.add_argument("--label", default="run", help="name for this sweep in files and plots")
    p.add_argument("--out", type=Path, help="write JSON, per-request JSONL and PNG plots here")
