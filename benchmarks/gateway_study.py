"""The smg gateway in front of emulated workers, end to end, from one command:

    python -m benchmarks.gateway_study [--out docs/gateway.md]

Starts fleets (`memorywall.fleet.runner`) of emulated Llama 3.1 8B workers behind smg and drives
them with `memorywall bench`'s closed loop over the OpenAI chat API:

1. Routing policies (round_robin, power_of_two, cache_aware) on three h100-sxm workers with
   a shared-prefix workload: client TTFT/TPOT/throughput, the workers' prefix-cache hit
   rate (vllm:prefix_cache_hits_total / queries_total deltas) and per-worker request counts
   (vllm:request_success_total deltas).
2. A mixed fleet (two h100-sxm + one wse-3) under power_of_two and cache_aware: each
   worker's request share and mean TTFT/TPOT from its own histograms.
3. Gateway overhead: one h100-sxm worker at concurrency 1 and 16, the same requests sent
   through smg and straight to the worker's HTTP front.

Everything is emulated: the workers model the hardware's timeline; smg is real.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks._serve import scrape
from benchmarks.gateway_faults import section_in, write_section
from memorywall.core import (
    Batch,
    PrefillChunk,
    StepModel,
    load_hardware,
    load_model,
    plan_deployment,
)
from memorywall.fleet.runner import FleetReady, find_smg, in_background
from memorywall.fleet.spec import FleetSpec, GatewaySpec, WorkerSpec
from memorywall.loadgen.bench import BenchConfig, Level, ServerFacts, run_level
from memorywall.loadgen.prefix_workload import SharedPrefixWorkload
from memorywall.loadgen.target import Backend
from memorywall.loadgen.workload import Fixed, SyntheticWorkload

MODEL = "llama-3.1-8b"
POLICIES = ("round_robin", "power_of_two", "cache_aware")
MIXED_POLICIES = ("power_of_two", "cache_aware")
CONCURRENCY = 16
GROUPS, PREFIX, PROMPT, OUTPUT = 8, 800, 1000, 128
REQUESTS = 96


def fleet_spec(workers: list[tuple[str, str]], policy: str) -> FleetSpec:
    """Workers (name, hardware) with HTTP fronts, behind smg with `policy`."""
    return FleetSpec(
        workers=tuple(
            WorkerSpec(name=n, hardware=hw, model=MODEL, http_port=0) for n, hw in workers
        ),
        gateway=GatewaySpec(policy=policy, port=0),
    )


def gateway_url(up: FleetReady) -> str:
    assert up.gateway is not None, "the fleet was started with a gateway"
    return up.gateway.url


def worker_metrics(up: FleetReady) -> dict[str, dict[str, float]]:
    """Per worker: metric name (labels dropped) -> sum of its samples."""
    out = {}
    for name, worker in up.workers.items():
        sums: dict[str, float] = defaultdict(float)
        for metric, _, value in scrape(f"{worker.http_url}/metrics"):
            sums[metric] += value
        out[name] = dict(sums)
    return out


def _delta(before: dict, after: dict, worker: str, key: str) -> float:
    return after[worker].get(key, 0.0) - before[worker].get(key, 0.0)


def drive(target: str, workload, concurrency: int, n: int, label: str, seed: int = 0) -> dict:
    facts = ServerFacts(hardware="h100-sxm", model=MODEL, devices=1, emulated=True)
    config = BenchConfig(
        target=target,
        workload=workload,
        backend=Backend.OPENAI_CHAT,
        model=MODEL,
        num_prompts=n,
        concurrency=(concurrency,),
        warmup=1,
        seed=seed,
        label=label,
    )
    result, records = run_level(config, Level(f"c{concurrency}", concurrency, None), facts)
    cached = [r.usage_cached_tokens or 0 for r in records if r.ok and not r.warmup]
    prompt = [r.usage_prompt_tokens or 0 for r in records if r.ok and not r.warmup]
    result["client_cached_fraction"] = sum(cached) / sum(prompt) if sum(prompt) else None
    return result


def _per_worker(before: dict, after: dict, names: list[str]) -> dict[str, dict]:
    rows = {}
    for w in names:
        ttft_n = _delta(before, after, w, "vllm:time_to_first_token_seconds_count")
        tpot_n = _delta(before, after, w, "vllm:request_time_per_output_token_seconds_count")
        ttft_s = _delta(before, after, w, "vllm:time_to_first_token_seconds_sum")
        tpot_s = _delta(before, after, w, "vllm:request_time_per_output_token_seconds_sum")
        rows[w] = {
            "requests": _delta(before, after, w, "vllm:request_success_total"),
            "queries": _delta(before, after, w, "vllm:prefix_cache_queries_total"),
            "hits": _delta(before, after, w, "vllm:prefix_cache_hits_total"),
            "ttft_ms": 1e3 * ttft_s / ttft_n if ttft_n else None,
            "tpot_ms": 1e3 * tpot_s / tpot_n if tpot_n else None,
        }
    return rows


def policy_run(workers: list[tuple[str, str]], policy: str) -> dict:
    workload = SharedPrefixWorkload(GROUPS, PREFIX, Fixed(PROMPT), Fixed(OUTPUT))
    with in_background(fleet_spec(workers, policy), prefix="gw-study-") as up:
        before = worker_metrics(up)
        result = drive(gateway_url(up), workload, CONCURRENCY, REQUESTS, policy)
        after = worker_metrics(up)
        per = _per_worker(before, after, [n for n, _ in workers])
    q = sum(p["queries"] for p in per.values())
    h = sum(p["hits"] for p in per.values())
    return {
        "policy": policy,
        "hardware": dict(workers),
        "result": result,
        "per_worker": per,
        "hit_rate": h / q if q else None,
    }


def overhead_runs() -> list[dict]:
    rows = []
    with in_background(fleet_spec([("h100", "h100-sxm")], "round_robin")) as up:
        for c in (1, 16):
            n = 8 if c == 1 else 64
            workload = SyntheticWorkload(Fixed(512), Fixed(OUTPUT))
            for path, url in (("direct", up.workers["h100"].http_url), ("smg", gateway_url(up))):
                r = drive(url, workload, c, n, f"{path} c{c}", seed=c)
                rows.append({"path": path, "concurrency": c, "result": r})
    return rows


def prefix_ttft_run() -> dict:
    """One h100 worker, one user at a time: TTFT of prefix-cache misses and hits, measured,
    modelled by the server, and predicted by the core (prefill of the whole prompt vs of
    the uncached tokens after the cached ones)."""
    workload = SharedPrefixWorkload(GROUPS, PREFIX, Fixed(PROMPT), Fixed(OUTPUT))
    facts = ServerFacts(hardware="h100-sxm", model=MODEL, devices=1, emulated=True)
    with in_background(fleet_spec([("h100", "h100-sxm")], "round_robin")) as up:
        config = BenchConfig(
            target=up.workers["h100"].http_url,
            workload=workload,
            backend=Backend.OPENAI_CHAT,
            model=MODEL,
            num_prompts=3 * GROUPS,
            concurrency=(1,),
            warmup=0,
            label="prefix",
        )
        _, records = run_level(config, Level("c1", 1, None), facts)
    sm = StepModel(plan_deployment(load_hardware("h100-sxm"), load_model(MODEL)))
    rows = {}
    for kind, pick in (("miss", lambda c: c == 0), ("hit", lambda c: c > 0)):
        chosen = [r for r in records if r.ok and pick(r.usage_cached_tokens or 0)]
        if not chosen:
            continue
        prompt = round(np.mean([r.usage_prompt_tokens for r in chosen]))
        cached = round(np.mean([r.usage_cached_tokens or 0 for r in chosen]))
        chunk = PrefillChunk(prompt - cached, cached)
        rows[kind] = {
            "requests": len(chosen),
            "prompt": prompt,
            "cached": cached,
            "measured_ms": np.mean([(r.chunk_ns[0] - r.sent_ns) / 1e6 for r in chosen]),
            "modelled_ms": np.mean([r.modelled_ttft_s * 1e3 for r in chosen]),
            "predicted_ms": sm.step_cost(Batch(prefill=(chunk,))).time_s * 1e3,
        }
    return rows


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt)


def report(data: dict) -> str:
    lines = [
        "# The smg gateway in front of emulated workers",
        "",
        "All numbers are **emulated**: each worker is a memorywall process modelling the named",
        "hardware serving Llama 3.1 8B; the gateway is the real smg 1.13 (`smg launch`),",
        "routing over the workers' SGLang gRPC ports. Client figures are measured by",
        "`memorywall bench --backend openai-chat` against the gateway (closed loop).",
        "",
        f"- command: `{data['command']}`",
        f"- machine: {data['machine']}",
        f"- date: {data['date']} (took {data['elapsed_s']:.0f} s)",
        f"- workload: shared prefix, {GROUPS} groups, prompts of {PROMPT} tokens whose first "
        f"{PREFIX} are shared within a group, {OUTPUT} output tokens, {REQUESTS} requests "
        f"at concurrency {CONCURRENCY} (`--workload shared-prefix:{GROUPS}:{PREFIX} "
        f"--input-len {PROMPT} --output-len {OUTPUT}`)",
        "",
        "## Routing policies, three h100-sxm workers",
        "",
        "Hit rate: the workers' `vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`"
        " over the run; requests per worker: `vllm:request_success_total` deltas.",
        "",
        "| policy | TTFT p50 ms | TTFT p99 ms | TPOT mean ms | output tok/s | cache hit rate "
        "| requests per worker |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in data["policies"]:
        r = p["result"]
        share = " / ".join(f"{int(w['requests'])}" for w in p["per_worker"].values())
        lines.append(
            f"| {p['policy']} | {_f(r['p50_ttft_ms'])} | {_f(r['p99_ttft_ms'])} | "
            f"{_f(r['mean_tpot_ms'], '.3f')} | {_f(r['output_throughput'], ',.0f')} | "
            f"{_f(p['hit_rate'], '.1%')} | {share} |"
        )
    lines += [
        "",
        "## Mixed fleet: two h100-sxm + one wse-3",
        "",
        "Per-worker mean TTFT/TPOT from each worker's own histograms "
        "(`vllm:time_to_first_token_seconds`, `vllm:request_time_per_output_token_seconds`).",
        "",
        "| policy | worker | hardware | requests | share | cache hit rate | TTFT mean ms "
        "| TPOT mean ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in data["mixed"]:
        total = sum(w["requests"] for w in p["per_worker"].values()) or 1
        for name, w in p["per_worker"].items():
            hit = w["hits"] / w["queries"] if w["queries"] else None
            lines.append(
                f"| {p['policy']} | {name} | {p['hardware'][name]} | {int(w['requests'])} | "
                f"{w['requests'] / total:.0%} | {_f(hit, '.1%')} | {_f(w['ttft_ms'])} | "
                f"{_f(w['tpot_ms'], '.3f')} |"
            )
    lines += ["", "| policy | TTFT p50 ms | TTFT p99 ms | TPOT mean ms | output tok/s |"]
    lines += ["|---|---|---|---|---|"]
    for p in data["mixed"]:
        r = p["result"]
        lines.append(
            f"| {p['policy']} | {_f(r['p50_ttft_ms'])} | {_f(r['p99_ttft_ms'])} | "
            f"{_f(r['mean_tpot_ms'], '.3f')} | {_f(r['output_throughput'], ',.0f')} |"
        )
    lines += [
        "",
        "## Gateway overhead: one h100-sxm worker, through smg vs direct",
        "",
        "The same requests (512-token prompts, 128 output tokens, no shared prefix) sent to",
        "the worker's own HTTP front (`direct`) and through smg. Target: client TPOT within",
        "2% of direct; the added TTFT is smg's (tokenising, routing, gRPC hop).",
        "",
        "| concurrency | path | TTFT p50 ms | TTFT mean ms | TPOT mean ms | TPOT vs direct "
        "| added TTFT (mean) ms |",
        "|---|---|---|---|---|---|---|",
    ]
    direct = {r["concurrency"]: r["result"] for r in data["overhead"] if r["path"] == "direct"}
    for row in data["overhead"]:
        r, d = row["result"], direct[row["concurrency"]]
        gap = r["mean_tpot_ms"] / d["mean_tpot_ms"] - 1 if d["mean_tpot_ms"] else None
        added = r["mean_ttft_ms"] - d["mean_ttft_ms"]
        lines.append(
            f"| {row['concurrency']} | {row['path']} | {_f(r['p50_ttft_ms'])} | "
            f"{_f(r['mean_ttft_ms'])} | {_f(r['mean_tpot_ms'], '.3f')} | "
            f"{_f(gap, '+.2%') if row['path'] != 'direct' else '-'} | "
            f"{_f(added) if row['path'] != 'direct' else '-'} |"
        )
    suspect = [
        f"{label}: {'; '.join(r['suspect'])}"
        for label, r in [(p["policy"], p["result"]) for p in data["policies"]]
        + [(f"mixed {p['policy']}", p["result"]) for p in data["mixed"]]
        + [(f"{o['path']} c{o['concurrency']}", o["result"]) for o in data["overhead"]]
        if r["suspect"]
    ]
    prefix = data.get("prefix_ttft", {})
    if prefix:
        lines += [
            "",
            "## Prefix-cache hits against the core's prediction",
            "",
            "One h100-sxm worker, direct, one user at a time, the shared-prefix workload: mean",
            "TTFT of requests whose prefix was not cached (miss) and was (hit); measured by the",
            "client, modelled by the server, and predicted by the core as the prefill of the",
            "uncached tokens after the cached ones.",
            "",
            "| | requests | prompt | cached | measured TTFT | modelled | core prediction |",
            "|---|---|---|---|---|---|---|",
        ]
        for kind, r in prefix.items():
            lines.append(
                f"| {kind} | {r['requests']} | {r['prompt']} | {r['cached']} "
                f"| {r['measured_ms']:.2f} ms | {r['modelled_ms']:.2f} ms "
                f"| {r['predicted_ms']:.2f} ms |"
            )
        if {"hit", "miss"} <= prefix.keys():
            drop = {
                k: prefix["miss"][k] - prefix["hit"][k]
                for k in ("measured_ms", "modelled_ms", "predicted_ms")
            }
            lines.append(
                f"| drop | | | | {drop['measured_ms']:.2f} ms | {drop['modelled_ms']:.2f} ms "
                f"| {drop['predicted_ms']:.2f} ms |"
            )
    lines += [
        "",
        "## Notes",
        "",
        "- One run per row (seed 0), no repeats: differences of a few points in hit rate or a",
        "  few ms in TTFT are within run-to-run noise.",
        "- Per-worker counts include the run's one warm-up request. Per-worker TTFT/TPOT are",
        "  what each worker's histograms saw (server side, no gateway or client time).",
        "- Cache hit rate counts prompt tokens served from a worker's prefix cache; with",
        f"  {GROUPS} groups of {PREFIX}-token prefixes, the ceiling is about "
        f"{PREFIX / PROMPT:.0%} once every",
        "  worker has seen every group, and is reached sooner when a group stays on one worker.",
        "- The load generator and every process share this machine's CPUs; rows the bench",
        "  flagged as suspect (client fell behind) are listed here: "
        + ("; ".join(suspect) if suspect else "none."),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="write the Markdown page here")
    args = parser.parse_args()
    if find_smg() is None:
        print("smg is not installed (pip install 'memorywall[gateway]')")
        return 1
    started = time.perf_counter()
    three = [("h100-a", "h100-sxm"), ("h100-b", "h100-sxm"), ("h100-c", "h100-sxm")]
    mixed = [("h100-a", "h100-sxm"), ("h100-b", "h100-sxm"), ("wse3", "wse-3")]
    data = {
        "policies": [policy_run(three, p) for p in POLICIES],
        "mixed": [policy_run(mixed, p) for p in MIXED_POLICIES],
        "overhead": overhead_runs(),
        "prefix_ttft": prefix_ttft_run(),
    }
    data |= {
        "command": "python -m benchmarks.gateway_study"
        + (f" --out {args.out}" if args.out else ""),
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "elapsed_s": time.perf_counter() - started,
    }
    text = report(data)
    print(text)
    if args.out:
        kept = section_in(args.out)  # benchmarks/gateway_faults.py's section stays
        args.out.write_text(text)
        if kept is not None:
            write_section(args.out, kept)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
