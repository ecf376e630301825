"""`memorywall dashboard`: a live browser view of running workers, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from memorywall.argtypes import port, positive_float
from memorywall.cli.usage import UsageError

if TYPE_CHECKING:  # the CLI's startup path loads no aiohttp
    from memorywall.dashboard.sources import Access, Target

HELP = "serve a live browser dashboard of running workers (their /metrics), side by side"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help=HELP)
    p.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="URL",
        help="a worker's HTTP front (http://host:port: its /metrics and /v1/models) or "
        "metrics URL (.../metrics); repeat for several",
    )
    p.add_argument(
        "--fleet",
        type=Path,
        metavar="READYFILE",
        help="every worker of a fleet, from its ready file (`memorywall fleet --ready-file`)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument(
        "--port", type=port, default=0, help="port for the page (default 0: any free port)"
    )
    p.add_argument(
        "--interval",
        type=positive_float,
        default=1.0,
        help="seconds between scrapes of each worker (default 1)",
    )
    p.add_argument(
        "--window",
        type=positive_float,
        default=5.0,
        help="seconds of recent scrapes that rates and quantiles cover (default 5)",
    )
    p.add_argument(
        "--tls-ca",
        type=Path,
        metavar="PEM",
        help="roots that sign the workers' certificates, for https workers with a private CA "
        "(default: the system's)",
    )
    p.add_argument(
        "--api-key",
        help="the workers' API key (`serve --api-key`), sent as a bearer token: their "
        "/v1/models, where the dashboard learns what each emulates, is behind it",
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        help="once the page is served, write a JSON file here (pid, host, port, url, "
        "workers); removed on exit",
    )
    p.set_defaults(func=command)


def targets(args: argparse.Namespace) -> list[Target]:
    """The workers `--worker` and `--fleet` name, in that order; a one-line error if none,
    or if a URL or the ready file is bad, or if two share a name."""
    from memorywall.dashboard.sources import target_from_url, targets_from_fleet

    found = [target_from_url(url) for url in args.worker]
    if args.fleet is not None:
        found += targets_from_fleet(args.fleet)
    if not found:
        raise UsageError("name the workers to watch: --worker URL (repeatable) or --fleet FILE")
    names = [t.name for t in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"--worker: {', '.join(twice)} named twice")
    return found


def command(args: argparse.Namespace) -> int:
    # Imported here: only `dashboard` needs aiohttp's server and the poller.
    import asyncio

    if args.window < args.interval:
        raise UsageError(
            f"--window ({args.window:g} s) must cover at least one --interval ({args.interval:g} s)"
        )
    workers = targets(args)
    access = _access(args)
    try:
        asyncio.run(_serve(args, workers, access))
    except OSError as e:
        raise UsageError(str(e)) from None
    return 0


def _access(args: argparse.Namespace) -> Access:
    from memorywall.dashboard.sources import Access, tls_context

    ssl = tls_context(args.tls_ca) if args.tls_ca is not None else None
    return Access(ssl=ssl, api_key=args.api_key)


async def _serve(args: argparse.Namespace, workers: list[Target], access: Access) -> None:
    import asyncio
    import os
    import signal

    from memorywall.dashboard.poller import PollerConfig
    from memorywall.dashboard.site import DashboardSite, http_poller
    from memorywall.ready import remove, write_json

    config = PollerConfig(interval_s=args.interval, window_s=args.window)
    site = DashboardSite(http_poller(workers, config, access))
    url = await site.start(args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(f"dashboard: {url} watching {', '.join(w.name for w in workers)}", flush=True)
        if args.ready_file is not None:
            write_json(
                args.ready_file,
                {
                    "pid": os.getpid(),
                    "host": args.host,
                    "port": site.port,
                    "url": url,
                    "workers": [w.name for w in workers],
                },
            )
        await stop.wait()
    finally:
        if args.ready_file is not None:
            remove(args.ready_file)
        await site.stop()
