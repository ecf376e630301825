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
        "prompt token). 'gateway': what smg and this host add, an aggregated wafer worker's",
        "client TTFT over its modelled prefill. 'stalls': the modelled time the split's",
        "workers lost per request, over its whole life, to a host that woke late",
        "(`memorywall:host_stall_seconds`; the emulator is never faster than the model, so",
        "a loaded host shows there). Targets: TTFT within 5% of modelled + gateway; TPOT",
        "within 2% of the wafer's batch-1 decode steps. 'agg TPOT': the same wafer's TPOT",
        "through smg without the split, on this machine.",
        "",
        "| model | prefill | decode | prompt tok | TTFT ms | modelled ms (prefill + transfer "
        "+ step) | gateway ms | stalls ms | TTFT gap vs modelled + gateway "
        "| TPOT ms | modelled | agg TPOT ms | TPOT gap vs modelled (vs agg) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ttft_ok = tpot_ok = 0
    for r in rows:
        expected = r["modelled_ttft_ms"] + r["gateway_ms"]
        gap = r["ttft_ms"] / expected - 1
        tpot_gap = r["tpot_ms"] / r["modelled_tpot_ms"] - 1
        tpot_ref = r["tpot_ms"] / r["reference_tpot_ms"] - 1
        ttft_ok += abs(gap) <= 0.05
        tpot_ok += abs(tpot_gap) <= 0.02
        lines.append(
            f"| {r['model']} | {r['prefill_hw']} | {r['decode_hw']} | {r['prompt_tokens']:,.0f} "
            f"| {r['ttft_ms']:,.2f} | {r['modelled_ttft_ms']:,.2f} ({r['prefill_ms']:,.2f} + "
            f"{r['transfer_ms']:,.2f} + {r['first_step_ms']:.2f}) | {r['gateway_ms']:.2f} | "
            f"{r['stall_ms']:.2f} | {gap:+.1%} | {r['tpot_ms']:.3f} | "
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
        f"Poisson at {c['load']:.0%} of the split fleet's simulated capacity, {c['output']} "
        "output tokens per request; the",
        "same schedule on every fleet. Aggregated fleets of the same device count and of the",
        "same rated power (TDP; a CS-3 is 23 kW) serve whole requests. TTFT and TPOT: at",
        "that offered load. Capacity (tok/s, per device, per kW): output tokens per second of",
        "a burst of three full decode batches per decode (or aggregated) worker, first",
        "request to last token; an aggregated fleet's is its workers' count times one's.",
        "Transfers share the link: those at once from one prefill worker share its egress,",
        "those into the decode worker its ingress (the CS-3's 150 GB/s), each taking what",
        "the ones before it leave (`kv_transfer.book`). The split's transfer is the mean",
        "from prefill end to KV landed, its p99, and the mean wait for the link within it.",
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
            extra = (
                f" (transfer {r['transfer_ms']:.2f} ms, p99 {r['transfer_p99_ms']:.2f}; "
                f"waiting for the link {r['wait_ms']:.2f} ms, {r['waited']:.0%} waited)"
                if "transfer_ms" in r
                else ""
            )
            lines.append(
                f"| {r['fleet']}{extra} | {r['devices']} | {r['power_kw']:,.1f} | "
                f"{_f(r['ttft_p50_ms'], ',.1f')} | {_f(r['ttft_p99_ms'], ',.1f')} | "
                f"{_f(r['tpot_ms'], '.3f')} | {r['tok_s']:,.0f} | {r['tok_s_per_device']:,.0f} | "
                f"{r['tok_s_per_kw']:,.0f} | {r['failed']} |"
            )
    return lines


def _span(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}} to {hi:{fmt}}"


def _verdict(data: dict) -> list[str]:
    """Where the split pays and where it does not, read off the rows below."""
    lines = [
        "## Where the split pays, and where the link eats the gain",
        "",
        "Read off sections 1 and 3: the split fleet against the aggregated fleets of the",
        "same rated power, capacity per kW (saturated) and median TTFT and TPOT at the same",
        "offered load.",
        "",
    ]
    by_kind: dict[str, list[tuple[str, float, float, float]]] = {"wse-3": [], "GPU": []}
    shares, waits = [], []
    for case in data["sim"]:
        split = case["rows"][0]
        name = f"{case['model']} {case['prompt']:,}-token prompts, {case['prefill_hw']} prefill"
        for rival in (r for r in case["rows"][1:] if r["fleet"].startswith("same power")):
            kind = "wse-3" if rival["fleet"].endswith("wse-3") else "GPU"
            by_kind[kind].append(
                (
                    name,
                    split["tok_s_per_kw"] / rival["tok_s_per_kw"] - 1,
                    (split["ttft_p50_ms"] or 0) / (rival["ttft_p50_ms"] or float("inf")),
                    (split["tpot_ms"] or 0) / (rival["tpot_ms"] or float("inf")),
                )
            )
        if split["ttft_p50_ms"]:
            shares.append(split["transfer_ms"] / split["ttft_p50_ms"])
            waits.append(split["wait_ms"] / split["transfer_ms"])
    for kind, label in (("GPU", "GPUs alone"), ("wse-3", "wafers alone")):
        rows = by_kind[kind]
        if not rows:
            continue
        pays = [f"{n} ({k:+.0%})" for n, k, _, _ in rows if k > 0]
        lines.append(
            f"- Against {label}: capacity per kW {_span([r[1] for r in rows], '+.0%')}; "
            f"median TTFT {_span([r[2] for r in rows], '.2f')}x theirs; TPOT "
            f"{_span([r[3] for r in rows], '.2f')}x theirs. The split holds more capacity per "
            f"kW in {len(pays)} of {len(rows)} cases" + (f": {'; '.join(pays)}." if pays else ".")
        )
    link = data["link"]
    if link and shares:
        slower = [(r["gpu_prefill_ms"] + r["transfer_ms"]) / r["wafer_prefill_ms"] for r in link]
        link_share = _span([r["transfer_share"] * 100 for r in link], ".0f")
        prompts = _span([float(r["prompt"]) for r in link], ",.0f")
        bigger = "the link's" if max(shares) > 0.5 else "the GPU's prefill"
        lines.append(
            f"- The link: the transfer is {_span([x * 100 for x in shares], '.0f')}% of the "
            f"split's median TTFT in section 3 (waiting behind other transfers is "
            f"{_span([x * 100 for x in waits], '.0f')}% of it), and {link_share}% of GPU "
            f"prefill + transfer for prompts of {prompts} tokens on an idle link (section 1). "
            f"GPU prefill + transfer takes {_span(slower, '.1f')}x as long as the wafer "
            f"prefilling the prompt itself; the larger part of the split's TTFT is {bigger}."
        )
    return lines


def _load(data: dict) -> list[str]:
    """The host's load average (1, 5, 15 min) over the run: the live rows share its CPUs."""
    load = data.get("load_average")
    if load is None:
        return []
    start, end = (", ".join(f"{x:.2f}" for x in load[k]) for k in ("start", "end"))
    return [f"- host load average (1, 5, 15 min): {start} at the start, {end} at the end"]


def _prefill_kv() -> list[str]:
    return [
        "- Prefill-side KV: a prefill worker, live and simulated, holds a prompt's KV blocks",
        "  until its transfer has landed, then frees them (full blocks stay in its prefix",
        "  cache), so a loaded prefill worker runs short of KV as a real one does: the",
        "  prefill half submits with `Request.keep_kv` and calls `EngineClient.release_kv`",
        "  once the KV has landed or its partner is lost.",
    ]


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
        *_load(data),
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
        "  request.",
        "- The link is shared in booking order, not fairly: a transfer takes, moment by",
        "  moment, the bandwidth the transfers booked before it leave on both its ends, so",
        "  two at once on one 150 GB/s end run one after the other, while two 50 GB/s GPUs",
        "  into one wafer both run at full speed. A booking is final (a later transfer never",
        "  moves an earlier one's landing), so the live decode worker knows when the KV lands",
        "  as it starts and live and simulated runs book alike; fair sharing would finish the",
        "  same work at the same moment, only in another order.",
        *_prefill_kv(),
        "- One run per row (seed 0); the load generator and every process share this",
        "  machine's CPUs.",
        "- Other splits, loads and workloads: `memorywall simulate --hardware wse-3 --model M",
        "  --prefill-hardware h100-sxm --prefill-workers X --decode-workers Y --kv-link nic`",
        "  with any of bench's load options writes bench's result files for a split fleet.",
    ]
    return "\n".join(lines) + "\n"
