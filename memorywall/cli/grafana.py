"""`memorywall grafana-dashboard`: print (or write) the Grafana dashboard for the workers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from memorywall.cli.usage import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "grafana-dashboard",
        help="print the Grafana dashboard (JSON, to import) for workers scraped by Prometheus",
        description="The dashboard reads the workers' /metrics and DCGM ports through a "
        "Prometheus datasource (asked for on import), grouped by the worker and hardware "
        "labels of `memorywall fleet --prometheus-config`.",
    )
    p.add_argument("--output", "-o", type=Path, metavar="FILE", help="write it here, not stdout")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from memorywall.telemetry.grafana import render

    text = render()
    if args.output is None:
        sys.stdout.write(text)
    else:
        try:
            args.output.write_text(text)
        except OSError as e:
            raise UsageError(f"--output: {e}") from None
    return 0
