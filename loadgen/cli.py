"""`memorywall bench` and `memorywall bench compare`."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from memorywall.client import AsyncClient, ClientError
from memorywall.loadgen import plots
from memorywall.loadgen.bench import BenchConfig, ServerFacts, levels, run_level, write_level
from memorywall.loadgen.metrics import parse_slo
from memorywall.loadgen.workload import SyntheticWorkload, TraceWorkload, parse_length

SUMMARY = "summary.json"


class BenchError(Exception):
    """A problem found before any load is sent; the CLI prints it and exits 2."""


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Validate everything before any load is sent."""
    try:
        if args.workload:
            workload = TraceWorkload.from_jsonl(args.workload)
        else:
            workload = SyntheticWorkload(
                parse_length(args.input_len), parse_length(args.output_len)
            )
        slo = parse_slo(args.slo) if args.slo else None
    except (ValueError, OSError) as e:
        raise BenchError(str(e)) from None
    if args.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {args.warmup}")
    trace_arrivals = isinstance(workload, TraceWorkload) and workload.has_arrivals
    concurrency = args.concurrency or (() if args.request_rate or trace_arrivals else (1,))
    if isinstance(workload, TraceWorkload):
        num = min(args.num_prompts or len(workload), len(workload))
    else:
        num = args.num_prompts or 100
    return BenchConfig(
        target=args.target,
        workload=workload,
        num_prompts=num,
        concurrency=concurrency,
        request_rates=args.request_rate or (),
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        duration_s=args.duration,
        warmup=args.warmup,
        seed=args.seed,
        workers=args.workers,
        slo=slo,
        timeout_s=args.timeout,
        label=args.label,
    )


def server_facts(target: str) -> ServerFacts:
    """Ask the server what it is; unreachable is an error before any load."""

    async def ask() -> ServerFacts:
        async with AsyncClient(target, timeout_s=5.0) as client:
            if not await client.health():
                raise BenchError(f"server at {target} is not serving")
            info = await client.model_info()
        return ServerFacts(
            hardware=info.hardware, model=info.model, devices=info.devices, emulated=True
        )

    try:
        return asyncio.run(ask())
    except ClientError as e:
        raise BenchError(f"cannot reach a memorywall server at {target} ({e.code.name})") from None


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    facts = server_facts(config.target)
    results = []
    for level in levels(config):
        result, records = run_level(config, level, facts)
        results.append(result)
        print(format_result(result), flush=True)
        if args.out:
            write_level(args.out, result, records)
    if args.out:
        (args.out / SUMMARY).write_text(json.dumps(results, indent=2))
        plots.latency_vs_load([(config.label, results)], args.out / "latency_vs_load.png")
        plots.throughput_vs_interactivity(
            [(config.label, results)], args.out / "throughput_vs_interactivity.png"
        )
        print(f"wrote {args.out}/")
    return 0


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.2f} ms"


def _load_label(r: dict, *, short: bool = False) -> str:
    if r["request_rate"]:
        return f"{r['request_rate']:g}/s" if short else f"rate {r['request_rate']:g}/s"
    if r["max_concurrency"]:
        c = r["max_concurrency"]
        return f"c={c}" if short else f"concurrency {c}"
    return "trace" if short else "trace replay"


def format_result(r: dict) -> str:
    """A readable summary of one level, measured beside modelled and predicted."""
    load = _load_label(r)
    head = f"== {r['label']} · {load} · {r['hardware'] or 'server'} x{r['devices']}"
    if r["emulated"]:
        head += " (emulated)"
    rows = [
        ("requests", f"{r['completed']} completed, {r['failed']} failed"),
        ("duration", f"{r['duration']:.2f} s" if r["duration"] else "n/a"),
        ("output tok/s", f"{r['output_throughput']:,.1f}" if r["output_throughput"] else "n/a"),
        ("request/s", f"{r['request_throughput']:,.2f}" if r["request_throughput"] else "n/a"),
    ]
    if r.get("request_goodput") is not None:
        rows.append(("goodput req/s", f"{r['request_goodput']:,.2f}"))
    header = ("metric", "mean", "p50", "p99", "modelled", "predicted")
    table = [header]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E")):
        table.append(
            (
                label,
                _ms(r.get(f"mean_{name}_ms")),
                _ms(r.get(f"p50_{name}_ms")),
                _ms(r.get(f"p99_{name}_ms")),
                _ms(r.get(f"mean_modelled_{name}_ms")),
                _ms(r.get(f"predicted_{name}_ms")),
            )
        )
    if r.get("mean_send_lag_ms") is not None:
        table.append(
            (
                "send lag",
                _ms(r["mean_send_lag_ms"]),
                _ms(r["p50_send_lag_ms"]),
                _ms(r["p99_send_lag_ms"]),
                "",
                "",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [head]
    lines += [f"  {k:<14} {v}" for k, v in rows]
    lines += [
        "  "
        + "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in table
    ]
    if r.get("error_counts"):
        lines += [f"  error x{n}: {e}" for e, n in r["error_counts"].items()]
    lines += [f"  SUSPECT: {s}" for s in r["suspect"]]
    return "\n".join(lines)


def compare(paths: list[Path], out: Path | None) -> int:
    """Side-by-side table (and plots) of several saved sweeps."""
    sweeps = []
    for path in paths:
        summary = path / SUMMARY if path.is_dir() else path
        try:
            results = json.loads(summary.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BenchError(f"{summary}: not a bench summary ({e})") from None
        needed = {"label", "request_rate", "max_concurrency", "output_throughput"}
        if (
            not isinstance(results, list)
            or not results
            or not all(isinstance(r, dict) and needed <= r.keys() for r in results)
        ):
            raise BenchError(f"{summary}: not a bench summary (a non-empty list of level results)")
        sweeps.append((results[0]["label"], results))
    header = (
        "sweep",
        "load",
        "TTFT mean",
        "TPOT mean",
        "tok/s/user",
        "output tok/s",
        "tok/s/device",
    )
    rows = [header]
    for label, results in sweeps:
        for r in results:
            load = _load_label(r, short=True)
            per_user = r.get("mean_output_tok_s_per_user")
            tput = r.get("output_throughput")
            rows.append(
                (
                    label,
                    load,
                    _ms(r.get("mean_ttft_ms")),
                    _ms(r.get("mean_tpot_ms")),
                    "n/a" if per_user is None else f"{per_user:,.1f}",
                    "n/a" if tput is None else f"{tput:,.1f}",
                    "n/a" if tput is None else f"{tput / r.get('devices', 1):,.1f}",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if out:
        out.mkdir(parents=True, exist_ok=True)
        plots.latency_vs_load(sweeps, out / "latency_vs_load.png")
        plots.throughput_vs_interactivity(sweeps, out / "throughput_vs_interactivity.png")
        print(f"wrote {out}/")
    return 0
