"""The article's claims ("Crossing the Memory Wall"), each checked against the emulator.

    python -m benchmarks.study_claims [--results docs/study/results.json]

Prints the claims table that `python -m benchmarks.study` writes into docs/study.md.
Every figure is computed here, from the hardware profiles, the model files and the core
(decode steps and prefills, `memorywall predict`'s numbers), and, for the power budget,
from the study's `memorywall plan --power-budget` run in `results.json`; each verdict
is chosen by comparing the computed figures with the claim's own numbers.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.expert_parallel import rows as ep_rows
from memorywall.core import Deployment, Hardware, load_hardware, load_model, plan_deployment
from memorywall.core.cost import StepModel
from memorywall.core.deployment import Placement
from memorywall.core.precision import Precision
from memorywall.core.predict import predict
from memorywall.core.published import fused_stack
from memorywall.core.work import Batch
from memorywall.errors import MemorywallError

WAFER, GPU = "wse-3", "b200"
SPEED_MODELS = ("llama-3.1-8b", "llama-3.1-70b", "gpt-oss-120b")
SPEED_RANGE = (1.5, 5.0)  # the article: "1.5-5 times faster than B200 in some models"
LONG_CONTEXT = 32_768
LONG_MODEL = "llama-3.1-70b"
LARGE_MODEL = "llama-3.1-405b"  # "very large models"
ROUTE_MODEL = "llama-3.1-70b"
ROUTES = {
    "wafer": ("wse-3",),
    "GPU": ("b200", "gb200-nvl72"),
    "inference ASIC": ("tpu-v7", "maia-100", "groq-lpu"),
    "advanced packaging (what-if)": ("what-if-sow-hbm",),
    "optical I/O (what-if)": ("what-if-wafer-optical",),
}
ROUTE_BATCH = 64
WAFERS = ("wse-3", "what-if-wafer-optical")  # the wafer and its optical-I/O what-if
# The power-budget question the study asks `memorywall plan` (study.power_plan runs it).
BUDGET = "250MW"


@dataclass(frozen=True, kw_only=True)
class Claim:
    quote: str
    figure: str
    command: str
    assumptions: str
    verdict: str


def _context(data: dict | None) -> tuple[int, int]:
    """The study's prompt and its mean decode context (prompt + output / 2)."""
    c = (data or {}).get("config", {})
    prompt, output = c.get("prompt_tokens", 512), c.get("output_tokens", 128)
    return prompt, prompt + output // 2


def _deploy(hw: str | Hardware, model: str, **kw) -> Deployment:
    hardware = load_hardware(hw) if isinstance(hw, str) else hw
    return plan_deployment(hardware, load_model(model), **kw)


def compiled_b200(model: str) -> Deployment:
    """B200 on a compiled fp8 stack (TensorRT-LLM-like): the profile with fused elementwise
    kernels and no launch floor (`core.published.fused_stack`, as the published TensorRT
    rows run), fp8 weights and fp8 KV, on the fewest devices that hold them."""
    fitted = _deploy(GPU, model, weight_precision=Precision.FP8, kv_precision=Precision.FP8)
    stack = fused_stack(fitted.hardware, fitted.model, fitted.tensor_parallel)
    stack = replace(stack, name=f"{GPU} compiled fp8")
    return _deploy(
        stack,
        model,
        devices=fitted.devices,
        weight_precision=Precision.FP8,
        kv_precision=Precision.FP8,
    )


def _per_user(d: Deployment, context: int, batch: int = 1) -> float:
    return predict(d, batch=batch, context=context).tokens_per_s_per_user


def _ratio_text(values: dict[str, float]) -> str:
    return ", ".join(f"{m} {v:.1f}x" for m, v in values.items())


def bandwidth() -> Claim:
    w, g = load_hardware(WAFER), load_hardware(GPU)
    ratio = w.resident.bandwidth_bytes_per_s / g.resident.bandwidth_bytes_per_s
    eff = (w.resident.bandwidth_bytes_per_s * w.efficiency.weight_read) / (
        g.resident.bandwidth_bytes_per_s * g.efficiency.weight_read
    )
    verdict = (
        f"holds: {ratio:,.0f}x on the datasheets (thousands of times)"
        if ratio >= 1000
        else f"does not hold here: {ratio:,.0f}x"
    )
    return Claim(
        quote='"memory bandwidth thousands of times higher than HBM (21 PB/s vs B200)"',
        figure=f"{w.resident.bandwidth_bytes_per_s / 1e15:g} PB/s SRAM vs "
        f"{g.resident.bandwidth_bytes_per_s / 1e12:g} TB/s HBM: {ratio:,.0f}x; at the "
        f"profiles' weight-read efficiencies {eff:,.0f}x",
        command="memorywall hardware",
        assumptions="the profiles' datasheet figures (docs/sources/hardware-sources.md)",
        verdict=f"{verdict}; a wafer holds {w.resident.capacity_bytes / 1e9:g} GB against "
        f"{g.resident.capacity_bytes / 1e9:g} GB, so large models span many wafers",
    )


def speed(data: dict | None) -> Claim:
    _, ctx = _context(data)
    fitted, compiled, floors, bare = {}, {}, {}, {}
    for m in SPEED_MODELS:
        wafer = _per_user(_deploy(WAFER, m), ctx)
        fitted[m] = wafer / _per_user(_deploy(GPU, m), ctx)
        fast = compiled_b200(m)
        compiled[m] = wafer / _per_user(fast, ctx)
        step = predict(fast, batch=1, context=ctx).decode
        floors[m] = step.latency_s / step.time_s
        # The bound: the compiled stack with no per-layer floor at all.
        hw = fast.hardware
        no_floor = replace(fast, hardware=replace(hw, latency=replace(hw.latency, per_layer_s=0.0)))
        bare[m] = wafer / _per_user(no_floor, ctx)
    per_layer_us = load_hardware(GPU).latency.per_layer_s * 1e6
    low, high = SPEED_RANGE

    def inside(r: dict[str, float]) -> list[str]:
        return [m for m, v in r.items() if low <= v <= high]

    if inside(fitted):
        verdict = f"holds for {', '.join(inside(fitted))} against the B200 as fitted"
    elif inside(compiled):
        verdict = (
            f"holds only when the B200 runs a compiled fp8 stack ({', '.join(inside(compiled))}"
            f"); against the profile as fitted (eager-fitted per-layer floors) the wafer is "
            f"{min(fitted.values()):.1f}-{max(fitted.values()):.1f}x, above the range"
        )
    else:
        every = list(fitted.values()) + list(compiled.values())
        verdict = (
            f"does not hold here: the wafer is {min(every):.1f}-{max(every):.1f}x the B200 "
            f"on both stacks, because the B200's per-layer floor ({per_layer_us:.0f} us a "
            "layer, fitted on the H100) is "
            f"{min(floors.values()):.0%}-{max(floors.values()):.0%} of the compiled stack's "
            f"batch-1 step; with no floor at all it would be {min(bare.values()):.1f}-"
            f"{max(bare.values()):.1f}x (in the range: {', '.join(inside(bare)) or 'none'})"
        )
    return Claim(
        quote='"token generation 1.5-5 times faster than B200 in some models"',
        figure=f"single-user decode, wafer over B200 as fitted: {_ratio_text(fitted)}; over "
        f"B200 compiled fp8: {_ratio_text(compiled)}",
        command=f"python -m benchmarks.study_claims (memorywall predict --batch 1 "
        f"--context {ctx} per model on {WAFER} and {GPU})",
        assumptions=f"batch 1, context {ctx}; the wafer bf16 on the fewest wafers; B200 as "
        "fitted: bf16, the profile's per-layer floors (fitted on the H100); compiled: fp8 "
        "weights and KV, fused kernels, no launch floor",
        verdict=verdict,
    )


def first_token_and_long_context(data: dict | None) -> Claim:
    prompt, ctx = _context(data)
    ttft = {}
    for m in SPEED_MODELS:
        w = predict(_deploy(WAFER, m), batch=1, context=ctx, prompt=prompt).ttft_s
        g = predict(_deploy(GPU, m), batch=1, context=ctx, prompt=prompt).ttft_s
        assert w is not None and g is not None, "a prompt gives a TTFT"
        ttft[m] = g / w
    wafer, gpu = _deploy(WAFER, LONG_MODEL), _deploy(GPU, LONG_MODEL)
    long_ratio = _per_user(wafer, LONG_CONTEXT) / _per_user(gpu, LONG_CONTEXT)
    short_ratio = _per_user(wafer, ctx) / _per_user(gpu, ctx)
    seqs_w = wafer.kv_capacity_tokens // LONG_CONTEXT
    seqs_g = gpu.kv_capacity_tokens // LONG_CONTEXT
    ttft_holds = min(ttft.values()) >= SPEED_RANGE[0]
    speed_holds = long_ratio >= SPEED_RANGE[0]
    first = (
        f"first token: holds ({min(ttft.values()):.1f}x or more)"
        if ttft_holds
        else f"first token: not everywhere ({_ratio_text(ttft)})"
    )
    long = (
        f"long context: per-user speed holds ({long_ratio:.1f}x at {LONG_CONTEXT:,}), "
        if speed_holds
        else f"long context: per-user speed does not hold ({long_ratio:.1f}x), "
    )
    if seqs_w < seqs_g:
        capacity = (
            f"but capacity holds only when wafers are added: the fewest wafers fit {seqs_w} "
            f"sequence(s) of {LONG_CONTEXT:,} tokens, the fewest B200s {seqs_g}"
        )
    elif seqs_w == seqs_g:
        capacity = f"capacity even ({seqs_w} sequence(s) of {LONG_CONTEXT:,} tokens each)"
    else:
        capacity = f"and capacity too ({seqs_w} sequences of {LONG_CONTEXT:,} against {seqs_g})"
    return Claim(
        quote='"significant advantages in first-token latency and long-context tasks"',
        figure=f"TTFT, B200 over wafer, prompt {prompt}: {_ratio_text(ttft)}; {LONG_MODEL} "
        f"per-user decode at {LONG_CONTEXT:,} tokens: {long_ratio:.1f}x (at {ctx}: "
        f"{short_ratio:.1f}x); KV room at {LONG_CONTEXT:,} tokens: {wafer.devices} wafers "
        f"{seqs_w} sequence(s), {gpu.devices} B200(s) {seqs_g}",
        command=f"memorywall predict --hardware {WAFER}|{GPU} --model M --prompt {prompt} "
        f"--context {LONG_CONTEXT}",
        assumptions="one user; bf16 on the fewest devices that hold the weights and a 10% "
        "KV reserve; B200 as fitted",
        verdict=f"{first}; {long}{capacity}",
    )


def interconnect_energy() -> Claim:
    w, g = load_hardware(WAFER), load_hardware(GPU)
    shares = {}
    for hw in (WAFER, GPU):
        d = _deploy(hw, LARGE_MODEL)  # several devices on both: links carry traffic
        sm = StepModel(d)
        cost = sm.step_cost(Batch(decode_contexts=(1024,) * ROUTE_BATCH))
        link_pj = d.hardware.scale_up.energy_pj_per_bit
        if d.tensor_parallel == 1:
            link_pj = d.hardware.external_io.energy_pj_per_bit
        shares[f"{d.devices} x {hw}"] = cost.link_bytes * 8 * link_pj * 1e-12 / cost.energy_j
    share_text = ", ".join(f"{k} {v * 100:.2g}%" for k, v in shares.items())
    material = max(shares.values()) >= 0.05
    return Claim(
        quote='"interconnect 0.15 pJ/bit vs ~10 pJ/bit"',
        figure=f"profiles: on-wafer fabric {w.scale_up.energy_pj_per_bit:g} pJ/bit, off-chip "
        f"{g.external_io.energy_pj_per_bit:g} pJ/bit (NVLink {g.scale_up.energy_pj_per_bit:g}"
        f"); link energy's share of a {LARGE_MODEL} decode step's energy at batch "
        f"{ROUTE_BATCH}: {share_text}",
        command=f"memorywall predict --hardware {WAFER}|{GPU} --model {LARGE_MODEL} "
        f"--batch {ROUTE_BATCH} --json (link bytes, energy)",
        assumptions="the pJ/bit figures are the article's, carried as labelled parameters, "
        "not measured; the core counts no link bytes inside a wafer (its dataflow stays in "
        "SRAM and fabric), so only wafer-to-wafer hops, at the off-chip figure, and GPU "
        "tensor-parallel all-reduces, at NVLink's, are charged",
        verdict="holds only as an input (the emulator cannot check a pJ/bit figure); "
        + (
            "at it, link energy matters to energy per token"
            if material
            else "at it, links are under 5% of a step's energy on both, so the gap barely "
            "moves energy per token: memory reads and static power dominate"
        ),
    )


def external_io() -> Claim:
    w = load_hardware(WAFER)
    io = min(w.stream.bandwidth_bytes_per_s, w.external_io.bandwidth_bytes_per_s)
    resident = _deploy(WAFER, LARGE_MODEL)
    streamed = _deploy(WAFER, LARGE_MODEL, placement=Placement.STREAM)
    step = StepModel(resident).step_cost(Batch(decode_contexts=(1024,) * ROUTE_BATCH))
    hop_share = step.comm_s / step.time_s
    stream_speed = _per_user(streamed, 1024)
    res_speed = _per_user(resident, 1024)
    return Claim(
        quote='"external I/O of 150 GB/s hinders multi-system scaling for very large models"',
        figure=f"{LARGE_MODEL}: resident on {resident.devices} wafers (pipeline), hops are "
        f"{hop_share:.1%} of a batch-{ROUTE_BATCH} step, {res_speed:,.0f} tok/s per user; "
        f"weights streamed over {io / 1e9:g} GB/s into one wafer: {stream_speed:,.2f} tok/s "
        "per user",
        command=f"memorywall predict --hardware {WAFER} --model {LARGE_MODEL} [--placement stream]",
        assumptions="bf16; pipeline hops carry one token's activations per sequence over "
        "the external I/O; streaming reads every weight over it each step",
        verdict=(
            f"holds for streamed weights ({res_speed / stream_speed:,.0f}x slower than resident); "
            if stream_speed < res_speed / 10
            else "does not hold for streamed weights here; "
        )
        + (
            f"does not hold for a resident pipeline: its hops carry activations only "
            f"({hop_share:.1%} of a step); what it costs is {resident.devices} wafers"
            if hop_share < 0.2
            else f"holds for a resident pipeline too ({hop_share:.0%} of a step in hops)"
        ),
    )


def sram_scaling() -> Claim:
    flat = "what-if-wse-flat-sram"
    parts, ratios, prefill = [], [], []
    for m in ("llama-3.1-70b", LARGE_MODEL):
        a, b = _deploy(WAFER, m), _deploy(flat, m)
        r = _per_user(b, 1024) / _per_user(a, 1024)
        ttft_a = predict(a, batch=1, context=1024, prompt=1024).ttft_s
        ttft_b = predict(b, batch=1, context=1024, prompt=1024).ttft_s
        assert ttft_a is not None and ttft_b is not None, "a prompt gives a TTFT"
        ratios.append(r)
        prefill.append(ttft_a / ttft_b)
        parts.append(
            f"{m}: {a.devices} vs {b.devices} wafers, {r:.2f}x per-user decode speed, "
            f"{ttft_a / ttft_b:.2f}x faster prefill of 1,024 tokens"
        )
    return Claim(
        quote='"SRAM scaling has slowed"',
        figure=f"a WSE-3 successor with 2x compute and SRAM flat ({flat}): " + "; ".join(parts),
        command=f"memorywall predict --hardware {flat} --model M",
        assumptions=f"what-if profile (every assumption in core/profiles/{flat}.toml); bf16, "
        "batch 1, context 1,024",
        verdict="the trend is not testable here; its consequence under the what-if holds: "
        f"2x compute buys {min(prefill):.2f}-{max(prefill):.2f}x prefill but "
        f"{min(ratios):.2f}-{max(ratios):.2f}x decode speed and no fewer wafers, since "
        "decode is bound by SRAM bandwidth and capacity",
    )


def routes() -> Claim:
    rows, best_user, best_kw = [], ("", 0.0), ("", 0.0)
    for route, names in ROUTES.items():
        for hw in names:
            try:
                d = _deploy(hw, ROUTE_MODEL, weight_precision=Precision.FP8)
            except MemorywallError as e:
                rows.append(f"{hw} ({route}): does not fit ({e})")
                continue
            user = _per_user(d, 1024)
            n = min(ROUTE_BATCH, d.kv_capacity_tokens // 1025)  # what its KV cache holds
            batch = predict(d, batch=n, context=1024)
            per_kw = batch.tokens_per_s_total / (d.devices * d.hardware.tdp_w / 1e3)
            rows.append(
                f"{hw} x{d.devices} ({route}): {user:,.0f} tok/s per user, {per_kw:,.0f} "
                f"tok/s/kW at batch {n}"
            )
            if user > best_user[1]:
                best_user = (hw, user)
            if per_kw > best_kw[1]:
                best_kw = (hw, per_kw)
    return Claim(
        quote="three competing routes: inference ASICs (TPU, Maia), advanced packaging "
        "(TSMC SoW), optical interconnects",
        figure=f"{ROUTE_MODEL}: " + "; ".join(rows),
        command=f"memorywall predict --hardware H --model {ROUTE_MODEL} --weight-precision "
        f"fp8 [--batch {ROUTE_BATCH}]",
        assumptions=f"fp8 weights, bf16 KV, the fewest devices that hold them, context 1,024, "
        f"batch {ROUTE_BATCH} or what the KV cache holds; "
        "what-if profiles state every assumption; rated TDP",
        verdict=f"holds as competition on throughput per kW (most here: {best_kw[0]}); "
        + (
            "none of the other routes reaches the wafer's per-user speed"
            if best_user[0] in WAFERS
            else f"{best_user[0]} is fastest per user"
        )
        + " (a TPU's systolic arrays and torus are approximated, as the profiles' notes say)",
    )


def nvl72_ep() -> Claim:
    found = [r for r in ep_rows(("deepseek-v3",)) if r.batch == max(r.batch for r in ep_rows())]
    by = {r.layout: r for r in found}
    tp = next(r for k, r in by.items() if "gb200" in k and "EP" not in k)
    ep = next(r for k, r in by.items() if "EP" in k)
    wafer = next(r for k, r in by.items() if "wse-3" in k)
    gain = ep.tok_s_device / tp.tok_s_device - 1
    ahead = ep.tok_s_kw > wafer.tok_s_kw
    return Claim(
        quote='NVIDIA\'s answer, "versatility and massive cluster throughput": GB200 NVL72 '
        "with expert parallelism for MoE",
        figure=f"deepseek-v3 decode at batch {ep.batch}: {ep.layout} {ep.tok_s_kw:,.0f} "
        f"tok/s/kW ({gain:+.1%} per device over {tp.layout}), {wafer.layout} "
        f"{wafer.tok_s_kw:,.0f} tok/s/kW; per user {ep.tok_s_user:,.0f} vs "
        f"{wafer.tok_s_user:,.0f} tok/s",
        command="python -m benchmarks.expert_parallel (docs/expert-parallel.md)",
        assumptions="fp8 weights, bf16 KV, context 1,024; EP as docs/expert-parallel.md "
        "models it (uniform routing, attention tensor parallel)",
        verdict=(
            "holds for throughput per kW (the rack ahead of the wafers), not per user"
            if ahead and ep.tok_s_user < wafer.tok_s_user
            else "holds"
            if ahead
            else "does not hold here: the wafers lead per kW too"
        )
        + f"; EP itself adds {gain:+.1%} at this batch (less at small batches, where its "
        "all-to-alls' extra latency costs)",
    )


def power(data: dict | None) -> Claim:
    doc = (data or {}).get("power_budget")
    quote = '"contracts of 250 MW a year" (power at data-centre scale)'
    if not doc:
        return Claim(
            quote=quote,
            figure="not in this run",
            command=f"python -m benchmarks.study (runs memorywall plan --power-budget {BUDGET})",
            assumptions="-",
            verdict="not checked in this run",
        )
    budget = doc["power_budget"]
    parts, best = [], ("", 0.0)
    for hw, one in budget["backends"].items():
        a = one["answer"]
        if a is None:
            parts.append(f"{hw}: {one['why']}")
            continue
        parts.append(
            f"{hw}: {a['deployments']:,} x ({a['describe']}), {a['users']:,.0f} users, "
            f"{a['goodput_tok_s'] / 1e6:,.2f} M tok/s goodput"
        )
        if a["goodput_tok_s"] > best[1]:
            best = (hw, a["goodput_tok_s"])
    slo, space = doc["slo_text"], doc["space"]
    seqs = ",".join(str(n) for n in space["max_num_seqs"])
    return Claim(
        quote=quote,
        figure=f"{doc['model']} at {slo}, {budget['basis']}: " + "; ".join(parts),
        command=f"memorywall plan --model {doc['model']} --hardware "
        f"{','.join(space['hardware'])} --slo {slo} --max-num-seqs {seqs} --tolerance "
        f"{space['tolerance']:g} --power-budget {BUDGET}",
        assumptions="the planner's search (simulated, open loop); device TDP only, PUE 1; "
        "copies serve independent users",
        verdict="a market figure, not testable here; what it buys: the most goodput from "
        f"{best[0] or 'none'}",
    )


def claims(data: dict | None = None) -> list[Claim]:
    return [
        bandwidth(),
        speed(data),
        first_token_and_long_context(data),
        interconnect_energy(),
        external_io(),
        sram_scaling(),
        routes(),
        nvl72_ep(),
        power(data),
    ]


def markdown(found: list[Claim]) -> list[str]:
    lines = [
        "| # | the article says | the emulator's figure | command | assumptions | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(found, 1):
        cells = [str(i), c.quote, c.figure, f"`{c.command}`", c.assumptions, c.verdict]
        lines.append("| " + " | ".join(x.replace("|", "/") for x in cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=Path("docs/study/results.json"))
    args = p.parse_args()
    data = json.loads(args.results.read_text()) if args.results.is_file() else None
    print("\n".join(markdown(claims(data))))


if __name__ == "__main__":
    main()
