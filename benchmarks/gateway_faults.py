"""smg's retries and circuit breaker against failing workers, end to end:

    python -m benchmarks.gateway_faults [--out docs/gateway.md]

Three emulated h100-sxm workers (Llama 3.1 8B) behind smg (round_robin); the third
one fails: it refuses 20% of requests with UNAVAILABLE (`faults = "error:0.2"`), it
hangs (SIGSTOP two seconds in, never resumed), or it dies (SIGKILL two seconds in).
Each runs once with smg's defaults (5 attempts, circuit breaker after 10 failures) and
once with `--disable-retries --disable-circuit-breaker`, under `memorywall bench`'s
closed loop over the OpenAI chat API with a per-request deadline. The page reports
what the client saw (success rate, TTFT, TPOT, errors) and what smg did (retries
from `smg_worker_retries_total`, breakers opened from `smg_worker_cb_transitions_total`).
With `--out` the section replaces the one between its markers in that page (or is
appended), so `benchmarks/gateway_study.py` and this script share docs/gateway.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter
from pathlib import Path

from benchmarks._serve import scrape
from memorywall.fleet.faults import WorkerAction, WorkerFault
from memorywall.fleet.runner import find_smg, in_background
from memorywall.fleet.spec import FleetSpec, GatewaySpec, WorkerSpec
from memorywall.loadgen.bench import BenchConfig, Level, ServerFacts, run_level
from memorywall.loadgen.target import Backend
from memorywall.loadgen.workload import Fixed, SyntheticWorkload

MODEL = "llama-3.1-8b"
CONCURRENCY, REQUESTS, PROMPT, OUTPUT = 8, 96, 256, 64
DEADLINE_S = 5.0  # the client's per-request deadline
FAULT_AT_S = 2.0
START, END = "<!-- gateway-faults:start -->", "<!-- gateway-faults:end -->"
SCENARIOS = ("none", "errors 20%", "hangs", "dies")
GATEWAYS = {
    "smg defaults": (),
    "no retries, no breaker": ("--disable-retries", "--disable-circuit-breaker"),
}


def fleet_spec(scenario: str, gateway_args: tuple[str, ...]) -> FleetSpec:
    faulty = {"errors 20%": "error:0.2"}.get(scenario)
    workers = tuple(
        WorkerSpec(name=n, hardware="h100-sxm", model=MODEL, faults=faulty if n == "c" else None)
        for n in ("a", "b", "c")
    )
    action = {"hangs": WorkerAction.PAUSE, "dies": WorkerAction.KILL}.get(scenario)
    faults = () if action is None else (WorkerFault(FAULT_AT_S, "c", action),)
    gateway = GatewaySpec(policy="round_robin", port=0, args=gateway_args)
    return FleetSpec(workers=workers, gateway=gateway, faults=faults)


def smg_counters(url: str) -> Counter[str]:
    """Retries on the chat endpoint and circuit breakers opened, from smg's /metrics."""
    out: Counter[str] = Counter()
    for name, labels, value in scrape(url):
        if name == "smg_worker_retries_total" and 'endpoint="chat"' in labels:
            out["retries"] += value
        if name == "smg_worker_cb_transitions_total" and 'to="open"' in labels:
            out["breaker_opens"] += value
    return out


def run(scenario: str, gateway: str) -> dict:
    with in_background(fleet_spec(scenario, GATEWAYS[gateway]), prefix="gw-faults-") as up:
        before = smg_counters(up.gateway.metrics_url)
        config = BenchConfig(
            target=up.gateway.url,
            workload=SyntheticWorkload(Fixed(PROMPT), Fixed(OUTPUT)),
            backend=Backend.OPENAI_CHAT,
            model=MODEL,
            num_prompts=REQUESTS,
            concurrency=(CONCURRENCY,),
            timeout_s=DEADLINE_S,
            label=f"{scenario} / {gateway}",
        )
        facts = ServerFacts(hardware="h100-sxm", model=MODEL, devices=1, emulated=True)
        started = time.perf_counter()
        result, records = run_level(config, Level(f"c{CONCURRENCY}", CONCURRENCY, None), facts)
        wall_s = time.perf_counter() - started
        after = smg_counters(up.gateway.metrics_url)
    errors = Counter(r.error.split(":", 1)[0] for r in records if r.error and not r.warmup)
    return {
        "scenario": scenario,
        "gateway": gateway,
        "requests": result["completed"] + result["failed"],
        "completed": result["completed"],
        "ttft_ms": (result.get("mean_ttft_ms"), result.get("p99_ttft_ms")),
        "tpot_ms": result.get("mean_tpot_ms"),
        "errors": dict(errors),
        "retries": after["retries"] - before["retries"],
        "breaker_opens": after["breaker_opens"] - before["breaker_opens"],
        "wall_s": wall_s,
    }


def _ms(v: float | None, fmt: str = ",.0f") -> str:
    return "-" if v is None else format(v, fmt)


def report(rows: list[dict], meta: dict) -> str:
    lines = [
        START,
        "## Failing workers: smg's retries and circuit breaker",
        "",
        f"Three h100-sxm workers behind smg (round_robin); worker c refuses 20% of requests "
        f"with UNAVAILABLE, hangs (SIGSTOP at {FAULT_AT_S:g} s, never resumed) or dies "
        f"(SIGKILL at {FAULT_AT_S:g} s). {REQUESTS} chat requests ({PROMPT} prompt, {OUTPUT} "
        f"output tokens), {CONCURRENCY} users, a {DEADLINE_S:g} s client deadline. "
        'Retries: `smg_worker_retries_total{endpoint="chat"}`; breaker opens: '
        '`smg_worker_cb_transitions_total{to="open"}`.',
        "",
        "| worker c | smg | success | mean / p99 TTFT ms | TPOT ms | client errors "
        "| smg retries | breaker opens | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "-"
        mean, p99 = r["ttft_ms"]
        lines.append(
            f"| {r['scenario']} | {r['gateway']} | {r['completed']}/{r['requests']} "
            f"| {_ms(mean)} / {_ms(p99)} | {_ms(r['tpot_ms'], '.1f')} | {errors} "
            f"| {r['retries']:g} | {r['breaker_opens']:g} | {r['wall_s']:.1f} |"
        )
    lines += [
        "",
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}, {meta['elapsed_s']:.0f} s.",
        END,
    ]
    return "\n".join(lines) + "\n"


def section_in(page: Path) -> str | None:
    """This script's section of `page`, markers included, if it has one."""
    text = page.read_text() if page.exists() else ""
    if START not in text or END not in text:
        return None
    return START + text.split(START, 1)[1].split(END, 1)[0] + END + "\n"


def write_section(page: Path, section: str) -> None:
    text = page.read_text() if page.exists() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    page.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="put the section into this Markdown page")
    args = parser.parse_args()
    if find_smg() is None:
        print("smg is not installed (pip install 'memorywall[gateway]')")
        return 1
    started = time.perf_counter()
    rows = []
    for scenario in SCENARIOS:
        for gateway in GATEWAYS:
            rows.append(run(scenario, gateway))
            print(json.dumps(rows[-1]), flush=True)
    meta = {
        "command": "python -m benchmarks.gateway_faults"
        + (f" --out {args.out}" if args.out else ""),
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "elapsed_s": time.perf_counter() - started,
    }
    section = report(rows, meta)
    print(section)
    if args.out:
        write_section(args.out, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
