"""The disaggregation study's page: tables from `benchmarks.disaggregation`'s data, and what
they say, derived from the numbers (no sentence here states a figure it did not compute)."""

from __future__ import annotations


def _f(v: float | None, fmt: str = ".1f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _link(data: dict) -> list[str]:
    lines = [
        "## 1. The link: what the KV transfer adds",
        "",
        "The prompt's KV (128 KiB per token for 8B, 320 KiB for 70B, bf16) crosses from the",
        "GPU pool to the wafer over each side's external I/O (`--kv-link nic`, the default):",
        "the slower aggregate sets the pace (an H100's 400 Gb/s NIC, 50 GB/s, per GPU; a",
        "CS-3's 12 x 100 GbE, 150 GB/s, per wafer). The wafer prefilling the prompt itself is",
        "the column to beat: the split's TTFT is GPU prefill + transfer + a wafer step.",
        "",
        "| model | prefill on | link | prompt | KV MB | GPU prefill ms | transfer ms "
        "| transfer share | wafer prefill ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["link"]:
        lines.append(
            f"| {r['model']} | {r['prefill_hw']} | {r['link']} | {r['prompt']:,} | "
            f"{r['kv_mb']:,.0f} | {r['gpu_prefill_ms']:,.2f} | {r['transfer_ms']:,.2f} | "
            f"{r['transfer_share']:.0%} | {r['wafer_prefill_ms']:,.2f} |"
        )
    return lines


def _live(data: dict) -> list[str]:
    rows = data["live"]
    if not rows:
        return ["## 2. Live through smg", "", "Not run (`--no-live`)."]
    lines = [
        "## 2. Live through smg at light load",
        "",
        "One prefill worker and one wse-3 decode worker behind smg 1.13's PD mode",
        "(`--pd-disaggregation`, round robin), streaming chat requests one at a time",
        f"({rows[0]['requests']} per row, medians). Modelled TTFT = the core's prefill of the",
        "uncached prompt on the GPU + the transfer + the wafer's first decode step (its last",
        "prompt token). 'gateway': smg's own share on this machine, an aggregated wafer",
        "worker's client TTFT over its modelled prefill and its host stalls. 'stalls': the",
        "modelled time the split's workers lost per request to a host that woke late",
        "(`memorywall:host_stall_seconds`; the emulator is never faster than the model, so",
        "a loaded host shows there). Targets: TTFT within 5% of modelled + gateway; TPOT",
        "within 2% of the wafer's batch-1 decode steps. 'agg TPOT': the same wafer's TPOT",
        "through smg without the split, on this machine.",
        "",
        "| model | prefill | decode | prompt tok | TTFT ms | modelled ms (prefill + transfer "
        "+ step) | gateway ms | stalls ms | TTFT gap vs modelled + gateway (+ stalls) "
        "| TPOT ms | modelled | agg TPOT ms | TPOT gap vs modelled (vs agg) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ttft_ok = tpot_ok = 0
    for r in rows:
        expected = r["modelled_ttft_ms"] + r["gateway_ms"]
        gap = r["ttft_ms"] / expected - 1
        gap_stalls = r["ttft_ms"] / (expected + r["stall_ms"]) - 1
        tpot_gap = r["tpot_ms"] / r["modelled_tpot_ms"] - 1
        tpot_ref = r["tpot_ms"] / r["reference_tpot_ms"] - 1
        ttft_ok += abs(gap) <= 0.05
        tpot_ok += abs(tpot_gap) <= 0.02
        lines.append(
            f"| {r['model']} | {r['prefill_hw']} | {r['decode_hw']} | {r['prompt_tokens']:,.0f} "
            f"| {r['ttft_ms']:,.2f} | {r['modelled_ttft_ms']:,.2f} ({r['prefill_ms']:,.2f} + "
            f"{r['transfer_ms']:,.2f} + {r['first_step_ms']:.2f}) | {r['gateway_ms']:.2f} | "
            f"{r['stall_ms']:.2f} | {gap:+.1%} ({gap_stalls:+.1%}) | {r['tpot_ms']:.3f} | "
            f"{r['modelled_tpot_ms']:.3f} | {r['reference_tpot_ms']:.3f} | "
            f"{tpot_gap:+.1%} ({tpot_ref:+.1%}) |"
        )
    lines += [
        "",
        f"TTFT within 5% of modelled + gateway: {ttft_ok} of {len(rows)} rows; TPOT within 2% "
        f"of modelled: {tpot_ok} of {len(rows)}.",
    ]
    return lines


def _sim(data: dict) -> list[str]:
    c = data["constants"]
    lines = [
        "## 3. Simulated at scale",
        "",
        "Virtual clock (`server/pd/offline.py`): the same engines as the live workers, round",
        "robin. The split fleet has one decode worker and as many prefill workers as keep",
        "its decode fed (the core's prefill and decode capacities; at most 48). Offered load:",
        f"Poisson at {c['load']:.0%} of the split fleet's capacity, {c['output']} output tokens "
        "per request; the",
        "same schedule on every fleet. Aggregated fleets of the same device count and of the",
        "same rated power (TDP; a CS-3 is 23 kW) serve whole requests. TTFT and TPOT: at",
        "that offered load. Capacity (tok/s, per device, per kW): output tokens per second of",
        "a burst of three full decode batches per decode (or aggregated) worker, first",
        "request to last token; an aggregated fleet's is its workers' count times one's.",
    ]
    for case in data["sim"]:
        lines += [
            "",
            f"### {case['model']}, prefill on {case['prefill_hw']}, {case['prompt']:,}-token "
            f"prompts: {case['rate']:,.0f} req/s, {case['requests']:,} requests",
            "",
            "| fleet | devices | kW | TTFT p50 ms | TTFT p99 ms | TPOT ms | capacity tok/s "
            "| per device | per kW | failed |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in case["rows"]:
            extra = f" (transfer {r['transfer_ms']:.2f} ms)" if "transfer_ms" in r else ""
            lines.append(
                f"| {r['fleet']}{extra} | {r['devices']} | {r['power_kw']:,.1f} | "
                f"{_f(r['ttft_p50_ms'], ',.1f')} | {_f(r['ttft_p99_ms'], ',.1f')} | "
                f"{_f(r['tpot_ms'], '.3f')} | {r['tok_s']:,.0f} | {r['tok_s_per_device']:,.0f} | "
                f"{r['tok_s_per_kw']:,.0f} | {r['failed']} |"
            )
    return lines


def _verdict(data: dict) -> list[str]:
    """Where the split pays and where it does not, read off the simulated rows."""
    lines = [
        "## Where the split pays, and where the link eats the gain",
        "",
        "Against the aggregated fleets of the same power (section 3): capacity per kW, and",
        "median TTFT and TPOT at the same offered load.",
        "",
    ]
    for case in data["sim"]:
        split = case["rows"][0]
        for rival in (r for r in case["rows"][1:] if r["fleet"].startswith("same power")):
            per_kw = split["tok_s_per_kw"] / rival["tok_s_per_kw"] - 1
            ttft = (split["ttft_p50_ms"] or 0) / (rival["ttft_p50_ms"] or float("inf"))
            tpot = (split["tpot_ms"] or 0) / (rival["tpot_ms"] or float("inf"))
            lines.append(
                f"- {case['model']}, {case['prefill_hw']} prefill, {case['prompt']:,}-token "
                f"prompts, against {rival['fleet'].removeprefix('same power: ')}: capacity per "
                f"kW {per_kw:+.0%}, median TTFT {ttft:.2f}x, TPOT {tpot:.2f}x"
                + (f" ({rival['failed']} of its requests failed)" if rival["failed"] else "")
                + "."
            )
        share = split["transfer_ms"] / split["ttft_p50_ms"] if split["ttft_p50_ms"] else None
        lines.append(
            f"  The transfer is {_f(None if share is None else share * 100, '.0f')}% of the "
            "split's median TTFT."
        )
    link = data["link"]
    if link:
        worst = max(link, key=lambda r: r["transfer_share"])
        lines += [
            "",
            f"- The link's share of the split's TTFT grows with the prompt only as fast as the "
            f"GPU's prefill does (both linear in tokens, until attention makes prefill "
            f"quadratic): at most {worst['transfer_share']:.0%} here ({worst['model']}, "
            f"{worst['prefill_hw']}, {worst['prompt']:,} tokens, {worst['link']}). What eats "
            "the gain is the GPU's prefill itself: the wafer prefills the same prompt in a "
            "fraction of the time (section 1), so for TTFT the split only adds.",
        ]
    return lines


def report(data: dict) -> str:
    lines = [
        "# Prefill on GPUs, decode on wafers: disaggregated serving",
        "",
        "All numbers are **emulated**: memorywall workers model the named hardware serving",
        "Llama 3.1; the gateway in section 2 is the real smg 1.13 in PD mode. A split fleet",
        "sends each request's prompt to a GPU prefill worker and its decode to a wse-3 worker;",
        "the prompt's KV crosses the link in between (`core/kv_transfer.py`).",
        "",
        f"- command: `{data['command']}`",
        f"- machine: {data['machine']}",
        f"- date: {data['date']} (took {data['elapsed_s']:.0f} s)",
        "",
        *_verdict(data),
        "",
        *_link(data),
        "",
        *_live(data),
        "",
        *_sim(data),
        "",
        "## Notes",
        "",
        "- The prefill worker samples the first token; the decode worker admits the request",
        "  when its KV has landed, runs its last prompt token, and its first token comes one",
        "  step later (`Request.kv_transferred`). A decode worker short of KV queues the",
        "  request; the prefill worker's blocks go back to its pool (and prefix cache) when",
        "  the prefill ends, so it holds no KV while the transfer runs.",
        "- Transfers are not modelled as contending for the link: each request's KV moves at",
        "  the link's full rate. Under heavy load that flatters the split.",
        "- One run per row (seed 0); the load generator and every process share this",
        "  machine's CPUs.",
    ]
    return "\n".join(lines) + "\n"
