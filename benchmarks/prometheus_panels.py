"""The Grafana dashboard's panels as numbers, through a real Prometheus, beside the client's:

    python -m benchmarks.prometheus_panels [--requests 64] [--concurrency 16]

Starts examples/fleet-telemetry.toml (Llama 3.1 8B on a wse-3 and on an h100-sxm, each
worker with its HTTP /metrics and its emulated DCGM port), writes the scrape config that
`memorywall fleet --prometheus-config` writes (1 s scrapes), starts Debian's
`prometheus` on it (loopback), drives each worker in turn with `memorywall bench`'s
closed loop over gRPC, and evaluates the dashboard's own expressions for that worker
over its load's window. Prints a Markdown table: dashboard figure, then what the load
generator measured for the same requests where it measures one.
"""

from __future__ import annotations

import argparse
import math
import platform
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._prometheus import Prometheus
from memorywall.fleet import prometheus as scrape_config
from memorywall.fleet.runner import in_background
from memorywall.fleet.spec import load_spec
from memorywall.loadgen.bench import BenchConfig, Level, ServerFacts, run_level
from memorywall.loadgen.workload import Fixed, SyntheticWorkload
from memorywall.telemetry import grafana

SPEC = Path(__file__).resolve().parent.parent / "examples" / "fleet-telemetry.toml"
PROMPT, OUTPUT = 512, 128
SCRAPE_S = 1.0
# (row label, dashboard panel, legend prefix of its target, scale, bench key or None)
FIGURES = (
    ("tokens/s per user", "Tokens/s per user", "{{worker}}", 1.0, None),
    ("mean ITL (ms)", "Inter-token latency", "mean", 1e3, "mean_itl_ms"),
    ("p50 ITL (ms)", "Inter-token latency", "p50", 1e3, "median_itl_ms"),
    ("p50 TTFT (ms)", "Time to first token", "p50", 1e3, "median_ttft_ms"),
    ("J per output token (DCGM)", "Energy per output token", "DCGM", 1.0, None),
    ("J per output token (modelled)", "Energy per output token", "modelled", 1.0, None),
    ("output tokens per J (DCGM)", "Tokens per joule", "{{hardware}}", 1.0, None),
)


def _expr(title: str, legend: str) -> str:
    """The dashboard's expression: the target of panel `title` whose legend starts so."""
    for row in grafana.ROWS:
        for panel in row.panels:
            if panel.title == title:
                for target in panel.targets:
                    if target.legend.startswith(legend):
                        return target.expr
    raise KeyError(f"no panel {title!r} target {legend!r}")


def _value(server: Prometheus, expr: str, worker: str, hardware: str, window_s: int, at: float):
    expr = expr.replace("$__rate_interval", f"{window_s}s")
    expr = expr.replace("$worker", worker).replace("$hardware", hardware)
    result = server.query(expr, at=at)
    values = [float(s["value"][1]) for s in result]
    return values[0] if len(values) == 1 and math.isfinite(values[0]) else None


def _deltas_j_per_token(server: Prometheus, worker: str, window_s: int, at: float) -> float:
    """DCGM energy over generated tokens from the counters' values at the window's two ends
    (no rate extrapolation, which differs between the two scrape targets)."""

    def delta(name: str) -> float:
        now = f'sum(last_over_time({name}{{worker="{worker}"}}[{window_s}s]))'
        then = f'sum(last_over_time({name}{{worker="{worker}"}}[{window_s}s] offset {window_s}s))'
        (result,) = server.query(f"{now} - ({then} or vector(0))", at=at)
        return float(result["value"][1])

    return (
        delta("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION") / 1e3 / delta("vllm:generation_tokens_total")
    )


def _wait(condition, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {within_s:g} s")
        time.sleep(0.2)


def _load(target: str, hardware: str, requests: int, concurrency: int) -> dict:
    config = BenchConfig(
        target=target,
        workload=SyntheticWorkload(Fixed(PROMPT), Fixed(OUTPUT)),
        num_prompts=requests,
        concurrency=(concurrency,),
        label=hardware,
    )
    facts = ServerFacts(hardware=hardware, model="llama-3.1-8b", devices=1, emulated=True)
    result, _ = run_level(config, Level(f"c{concurrency}", concurrency, None), facts)
    return result


def run(requests: int, concurrency: int) -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("prometheus is not installed (apt-get install prometheus)")
    folder = Path(tempfile.mkdtemp(prefix="memorywall-prometheus-"))
    columns: dict[str, dict[str, str]] = {}
    with in_background(load_spec(SPEC)) as up:
        config = folder / "prometheus.yml"
        scrape_config.write(config, scrape_config.Scrape(up.workers), interval_s=SCRAPE_S)
        server = Prometheus(binary, config, folder)
        try:
            _wait(server.ready, 15)
            _wait(lambda: len(server.query("up == 1")) == 2 * len(up.workers), 20)
            for name, worker in up.workers.items():
                assert worker.grpc_target is not None
                start = time.time()
                bench = _load(worker.grpc_target, worker.hardware, requests, concurrency)
                time.sleep(2.5 * SCRAPE_S)  # a scrape after the load, on both ports
                end = time.time()
                window_s = math.ceil(end - start) + 1
                cells = {"rate window (s, 1 s scrapes)": str(window_s)}
                for label, title, legend, scale, key in FIGURES:
                    v = _value(server, _expr(title, legend), name, ".*", window_s, end)
                    text = "n/a" if v is None else f"{v * scale:.4g}"
                    if key is not None and bench.get(key) is not None:
                        text += f" ({bench[key]:.3g})"
                    cells[label] = text
                deltas = _deltas_j_per_token(server, name, window_s, end)
                cells["J per output token (DCGM, counter deltas)"] = f"{deltas:.3g}"
                rate = bench.get("output_throughput")
                cells["output tokens/s (bench)"] = "n/a" if rate is None else f"{rate:.0f}"
                columns[f"{name} ({worker.hardware})"] = cells
        finally:
            server.stop()
    shutil.rmtree(folder, ignore_errors=True)
    names = list(columns)
    lines = ["| dashboard figure (load generator) | " + " | ".join(names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for label in next(iter(columns.values())):
        lines.append(f"| {label} | " + " | ".join(columns[n][label] for n in names) + " |")
    machine = f"{platform.machine()}, {platform.system()}, Python {platform.python_version()}"
    head = (
        f"Load per worker: {requests} requests, closed loop at concurrency {concurrency}, "
        f"{PROMPT} prompt + {OUTPUT} output tokens (gRPC). Machine: {machine}."
    )
    return head + "\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    print(run(args.requests, args.concurrency))


if __name__ == "__main__":
    main()
