"""`memorywall bench`: TTFT and tokens/s under load; `bench compare`: saved sweeps side by side.

The options are the load generator's (`memorywall.loadgen.options`); `compare` has a
parser of its own, since `bench`'s options would not apply to it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from memorywall.cli.usage import Parser, UsageError
from memorywall.cluster.options import add_ray_argument
from memorywall.loadgen.options import add_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure TTFT and tokens/s under load (`memorywall bench compare DIR...` to compare)",
    )
    add_arguments(p)
    add_ray_argument(p, "run the --workers load generators as tasks (one CPU each)")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from memorywall.loadgen.cli import BenchError
    from memorywall.loadgen.cli import run as run_bench

    try:
        if args.ray is None:
            return run_bench(args)
        from memorywall.cluster.pools import ray_pool

        with ray_pool(args.ray) as pool:
            if args.workers > pool.width:
                raise BenchError(
                    f"--workers {args.workers}: the cluster at {args.ray} has {pool.width} "
                    "CPUs, and every worker must run at once"
                )
            return run_bench(args, pool=pool)
    except BenchError as e:
        raise UsageError(str(e)) from None


def compare_parser() -> argparse.ArgumentParser:
    p = Parser(prog="memorywall bench compare", description="compare saved bench sweeps")
    p.add_argument("paths", nargs="+", type=Path, help="--out folders (or summary.json files)")
    p.add_argument("--out", type=Path, help="write comparison plots here")
    p.add_argument(
        "--label",
        type=lambda text: text.split(","),
        help="names for the sweeps, comma-separated, one per path (default: what each "
        "measured, e.g. 'wse-3 x1 llama-3.1-8b')",
    )
    return p


def compare_command(argv: Sequence[str]) -> int:
    from memorywall.loadgen.compare import CompareError, compare

    args = compare_parser().parse_args(argv)
    try:
        return compare(args.paths, args.out, args.label)
    except CompareError as e:
        raise UsageError(str(e)) from None
