"""Plots and the docs page of the wafer-scale vs GPU study, from its results and the core.

Every number on the page is computed here from `results.json` (the live runs)
or from the core; the prose around them is fixed.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from benchmarks import published_table, server_fidelity
from memorywall.core import (
    Placement,
    StepModel,
    load_hardware,
    load_model,
    plan_deployment,
    predict,
)
from memorywall.loadgen.plots import level_axis, plain_log_axis

BACKEND_COLOURS = {"wse-3": "tab:red", "h100-sxm": "tab:blue", "b200": "tab:green"}
BREAKDOWN_CONTEXT = 640  # the study's prompt plus half its output
MODELS = ("llama-3.1-8b", "llama-3.1-70b", "gpt-oss-120b")


def _by(results: list[dict], model: str, hw: str, closed: bool = True) -> list[dict]:
    return [
        r
        for r in results
        if r["model"] == model and r["hardware"] == hw and (r["request_rate"] is None) == closed
    ]


def _per_user(r: dict, key: str = "mean_modelled_tpot_ms") -> float | None:
    return 1e3 / r[key] if r.get(key) else None


def _model_grid(results, models, draw, ylabel, path, title):
    """One panel per model against concurrent users; `draw` returns the y values it drew."""
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        ys, xs = [], []
        for hw, colour in BACKEND_COLOURS.items():
            if rows := _by(results, model, hw):
                xs += [r["max_concurrency"] for r in rows]
                ys += draw(ax, rows, hw, colour)
        ax.set_title(model)
        level_axis(ax, xs, "concurrent users")
        plain_log_axis(ax, "y", ys)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curve(modelled_key, measured_key, transform):
    """The server's modelled timeline (solid) and the client's measurement (hollow)."""

    def draw(ax, rows, hw, colour):
        x = [r["max_concurrency"] for r in rows]
        modelled = [transform(r, modelled_key) for r in rows]
        measured = [transform(r, measured_key) for r in rows]
        ax.plot(x, modelled, "-o", color=colour, label=f"{hw}: modelled")
        ax.plot(x, measured, "o", mfc="none", color=colour, label=f"{hw}: measured")
        return [v for v in modelled + measured if v is not None]

    return draw


def _modelled_only(key):
    """A quantity only the server's model knows (e.g. energy): one solid line per backend."""

    def draw(ax, rows, hw, colour):
        x = [r["max_concurrency"] for r in rows]
        y = [r.get(key) for r in rows]
        ax.plot(x, y, "-o", color=colour, label=f"{hw}: modelled")
        return [v for v in y if v is not None]

    return draw


def modelled_throughput(r: dict) -> float:
    """Output tok/s the emulated hardware delivers to `max_concurrency` users, each
    receiving its tokens over the modelled request time (Little's law). Unlike the
    measured throughput this does not drop where the load generator fell behind."""
    tokens = r["total_output_tokens"] / r["completed"]
    return r["max_concurrency"] * tokens / (r["mean_modelled_e2el_ms"] / 1e3)


def _tradeoff(results, models, path):
    fig, axes = plt.subplots(2, len(models), figsize=(4.6 * len(models), 7.5), squeeze=False)
    for col, model in enumerate(models):
        xs, ys = [], [[], []]
        for hw, colour in BACKEND_COLOURS.items():
            if not (rows := _by(results, model, hw)):
                continue
            x = [_per_user(r) for r in rows]
            per_device = [modelled_throughput(r) / r["devices"] for r in rows]
            per_kw = [modelled_throughput(r) / (r["devices"] * r["tdp_w"] / 1e3) for r in rows]
            axes[0][col].plot(x, per_device, "-o", color=colour, label=f"{hw}: modelled")
            axes[1][col].plot(x, per_kw, "-o", color=colour, label=f"{hw}: modelled")
            xs += x
            ys[0] += per_device
            ys[1] += per_kw
        axes[0][col].set_title(model)
        for row in (0, 1):
            ax = axes[row][col]
            plain_log_axis(ax, "x", xs)
            plain_log_axis(ax, "y", ys[row])
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xlabel("output tok/s per user (modelled)")
    axes[0][0].set_ylabel("output tok/s per device (modelled)")
    axes[1][0].set_ylabel("output tok/s per kW of rated power (modelled)")
    axes[0][-1].legend(fontsize=7)
    users = [r["max_concurrency"] for r in results if r["request_rate"] is None]
    fig.suptitle(f"Throughput against interactivity,\n{min(users)}-{max(users)} users (emulated)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def step_breakdowns(models) -> list[dict]:
    """One decode step per backend and model, at batch 1 and 64, split by what it waits on."""
    rows = []
    for model in models:
        for hw in BACKEND_COLOURS:
            deployment = plan_deployment(load_hardware(hw), load_model(model))
            sm = StepModel(deployment)
            for batch in (1, 64):
                p = predict(deployment, batch=batch, context=BREAKDOWN_CONTEXT)
                c = p.decode
                moved = c.weight_bytes + c.kv_bytes
                weights_s = c.memory_s * c.weight_bytes / moved if moved else 0.0
                rows.append(
                    {
                        "model": model,
                        "hardware": hw,
                        "devices": deployment.devices,
                        "batch": batch,
                        "step_s": c.time_s,
                        "bound": c.bound.value,
                        "weights_s": weights_s,
                        "kv_s": c.memory_s - weights_s,
                        "compute_s": c.compute_s,
                        "latency_s": c.latency_s,
                        "interconnect_s": c.comm_s + c.stream_s,
                        "tier_bytes": sm.bytes_by_tier(c),
                    }
                )
    return rows


def _breakdown_plot(rows, path):
    """Each step as shares of its terms (before overlap), with the step time beside it."""
    parts = [
        ("weights_s", "weights (memory)"),
        ("kv_s", "KV cache (memory)"),
        ("compute_s", "compute"),
        ("latency_s", "per-layer / per-step latency"),
        ("interconnect_s", "interconnect"),
    ]
    labels = [f"{r['model']}\n{r['hardware']} x{r['devices']}, batch {r['batch']}" for r in rows]
    totals = np.array([sum(r[k] for k, _ in parts) for r in rows])
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.8))
    left = np.zeros(len(rows))
    for key, name in parts:
        widths = np.array([r[key] for r in rows]) / totals * 100
        ax.barh(labels, widths, left=left, label=name)
        left += widths
    for i, r in enumerate(rows):
        ax.text(101, i, f"{r['step_s'] * 1e3:.3f} ms ({r['bound']})", va="center", fontsize=7)
    ax.set_xlim(0, 130)
    ax.set_xlabel("share of the step's terms, before memory/compute overlap (%)")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3)
    ax.set_title(f"Where one decode step goes (core, context {BREAKDOWN_CONTEXT})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def context_scaling(model: str, path: Path) -> list[dict]:
    """Per-user tok/s against context at batch 1 and 16, where the KV fits (core sweep)."""
    contexts = np.geomspace(1024, 131072 - 1024, 40).astype(int)
    fig, ax = plt.subplots(figsize=(7, 4.3))
    rows = []
    for hw, colour in BACKEND_COLOURS.items():
        deployment = plan_deployment(load_hardware(hw), load_model(model))
        sm = StepModel(deployment)
        for batch, style in ((1, "-"), (16, "--")):
            sweep = sm.decode_sweep(np.array([batch]), contexts)
            fits = batch * (contexts + 1) <= deployment.kv_capacity_tokens
            rate = np.where(fits, 1.0 / sweep.time_s, np.nan)
            ax.plot(
                contexts,
                rate,
                style,
                color=colour,
                label=f"{hw} x{deployment.devices}, batch {batch}: core",
            )
            longest = int(contexts[fits].max()) if fits.any() else 0
            rows.append(
                {
                    "hardware": hw,
                    "devices": deployment.devices,
                    "batch": batch,
                    "rate_1k": float(rate[0]),
                    "rate_32k": float(np.interp(32768, contexts, rate)),
                    "longest_context": longest,
                }
            )
    plain_log_axis(ax, "x", contexts)
    plain_log_axis(ax, "y", [v for line in ax.get_lines() for v in line.get_ydata()])
    ax.set_xlabel("context (cached tokens per sequence)")
    ax.set_ylabel("output tok/s per user (core)")
    ax.set_title(f"{model}: per-user speed against context; lines end where KV runs out")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return rows


def placements(model: str) -> list[dict]:
    """The wafer's two placements for a model larger than one wafer (core)."""
    hw = load_hardware("wse-3")
    rows = []
    for placement in (Placement.RESIDENT, Placement.STREAM):
        deployment = plan_deployment(hw, load_model(model), placement=placement)
        for batch in (1, 64):
            p = predict(deployment, batch=batch, context=BREAKDOWN_CONTEXT)
            rows.append(
                {
                    "placement": placement.value,
                    "devices": deployment.devices,
                    "batch": batch,
                    "per_user": p.tokens_per_s_per_user,
                    "total": p.tokens_per_s_total,
                    "bound": p.decode.bound.value,
                }
            )
    return rows


def write(data: dict, out: Path) -> None:
    results = data["results"]
    models = sorted(
        {r["model"] for r in results}, key=lambda m: [r["model"] for r in results].index(m)
    )
    both = "emulated: solid = the server's modelled timeline,\nhollow = measured by the client"
    _model_grid(
        results,
        models,
        _curve("mean_modelled_tpot_ms", "mean_tpot_ms", _per_user),
        "output tok/s per user",
        out / "per_user_vs_concurrency.png",
        both,
    )
    _model_grid(
        results,
        models,
        _curve("mean_modelled_ttft_ms", "mean_ttft_ms", lambda r, k: r.get(k)),
        "mean TTFT (ms)",
        out / "ttft_vs_concurrency.png",
        both,
    )
    _tradeoff(results, models, out / "throughput_vs_interactivity.png")
    _model_grid(
        results,
        models,
        _modelled_only("modelled_energy_j_per_output_token"),
        "energy per output token (J, modelled)",
        out / "energy_per_token.png",
        "emulated: energy from the server's model\n(no client can measure it)",
    )
    breakdown = step_breakdowns(MODELS)
    _breakdown_plot(breakdown, out / "step_breakdown.png")
    context = context_scaling("llama-3.1-70b", out / "context_scaling.png")
    placement = placements("llama-3.1-70b")
    (out.parent / "study.md").write_text(page(data, breakdown, context, placement, out.name))


def _fmt(v, spec=".1f", unit=""):
    return "n/a" if v is None or v != v else f"{v:{spec}}{unit}"  # v != v: NaN


def page(data, breakdown, context, placement, folder) -> str:
    results = data["results"]
    lines = [
        "# Wafer-scale vs GPU: what users of each experience, and why",
        "",
        f"Generated by `python -m benchmarks.study` on {data['date']} "
        f"({data['machine']}; the run took {data['elapsed_s']:.0f} s). "
        "**Every serving figure here is emulated**: memorywall servers timed by the "
        "performance core, driven live by `memorywall bench`. Nothing is typed in by hand.",
        "",
        "Workload: prompts of 512 tokens, 128 output tokens, closed-loop users 1, 4, 16, 64 "
        "and open-loop Poisson arrivals at 2 and 8 requests/s. Device counts are the core's "
        "fewest that hold the weights plus a KV reserve.",
        "",
        "## Per-user speed and TTFT against load",
        "",
        f"![per-user tok/s]({folder}/per_user_vs_concurrency.png)",
        "",
        f"![TTFT]({folder}/ttft_vs_concurrency.png)",
        "",
        "## Throughput per device and per kW against per-user speed",
        "",
        f"![trade-off]({folder}/throughput_vs_interactivity.png)",
        "",
        "## Energy per output token",
        "",
        f"![energy]({folder}/energy_per_token.png)",
        "",
        "## Where a decode step goes",
        "",
        f"![breakdown]({folder}/step_breakdown.png)",
        "",
        "| model | backend | batch | step | bound | weights | KV | compute | latency "
        "| interconnect |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in breakdown:
        lines.append(
            f"| {b['model']} | {b['hardware']} x{b['devices']} | {b['batch']} "
            f"| {b['step_s'] * 1e3:.3f} ms | {b['bound']} | {b['weights_s'] * 1e3:.3f} "
            f"| {b['kv_s'] * 1e3:.3f} | {b['compute_s'] * 1e3:.3f} | {b['latency_s'] * 1e3:.3f} "
            f"| {b['interconnect_s'] * 1e3:.3f} |"
        )
    lines += [
        "",
        "## Reading",
        "",
        *reading(breakdown, context, placement, results),
        "",
        "## Long context",
        "",
        f"![context]({folder}/context_scaling.png)",
        "",
        "| backend | batch | tok/s at 1k | tok/s at 32k | longest context that fits |",
        "|---|---|---|---|---|",
    ]
    for c in context:
        lines.append(
            f"| {c['hardware']} x{c['devices']} | {c['batch']} | {_fmt(c['rate_1k'], ',.0f')} "
            f"| {_fmt(c['rate_32k'], ',.0f')} | {c['longest_context']:,} |"
        )
    lines += [
        "",
        "## Llama 3.1 70B on wafers: weights resident in SRAM or streamed over I/O",
        "",
        "| placement | wafers | batch | per-user tok/s | total tok/s | bound |",
        "|---|---|---|---|---|---|",
    ]
    for p in placement:
        lines.append(
            f"| {p['placement']} | {p['devices']} | {p['batch']} | {p['per_user']:,.1f} "
            f"| {p['total']:,.0f} | {p['bound']} |"
        )
    lines += [
        "",
        "## Measured against modelled, every level",
        "",
        "Measured = `memorywall bench` on the client; modelled = the server's timeline "
        "from the core. `SUSPECT` marks levels where the load generator (one process on this "
        "2-core machine, beside the server) could not keep up; their measured numbers are "
        "not facts about the emulated hardware.",
        "",
        "| model | backend | load | TTFT measured / modelled | TPOT measured / modelled "
        "| output tok/s | J/token | suspect |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        load = (
            f"{r['request_rate']:g} req/s" if r["request_rate"] else f"{r['max_concurrency']} users"
        )
        lines.append(
            f"| {r['model']} | {r['hardware']} x{r['devices']} | {load} "
            f"| {_fmt(r['mean_ttft_ms'], '.2f')} / {_fmt(r['mean_modelled_ttft_ms'], '.2f')} ms "
            f"| {_fmt(r['mean_tpot_ms'], '.3f')} / {_fmt(r['mean_modelled_tpot_ms'], '.3f')} ms "
            f"| {_fmt(r['output_throughput'], ',.0f')} "
            f"| {_fmt(r.get('modelled_energy_j_per_output_token'), '.3g')} "
            f"| {'; '.join(r['suspect']) or '-'} |"
        )
    lines += [
        "",
        "## The emulator's own figures",
        "",
        "Closed-loop streams of 128-token prompts and 256-token outputs against one "
        "`memorywall serve` process (`benchmarks/server_fidelity.py`): client-observed TPOT "
        "against the server's modelled TPOT, per-token lateness (receipt minus modelled time, "
        "aligned on each request's first token), the server's own hand-off lag, the "
        "grouping interval it chose, and the token rate the one process sustained.",
        "",
        server_fidelity.HEADER,
        *data.get("emulator_rows", []),
        "",
        "Sanity check (measured TPOT within 2% of modelled wherever the client kept up): "
        + ("passed." if not data["failures"] else "FAILED: " + "; ".join(data["failures"])),
        "",
        "## The core against published results",
        "",
        "Every number in `docs/sources/published-results.md` against the core's prediction "
        "(`python benchmarks/published_table.py`):",
        "",
        published_table.markdown(),
    ]
    lines += [
        "",
        "Regenerate: `python -m benchmarks.study` (the whole page) or "
        "`python benchmarks/calibrate.py` (calibration tables).",
        "",
    ]
    return "\n".join(lines)


def reading(breakdown, context, placement, results) -> list[str]:
    """Short factual statements, each number computed from the rows above."""

    def step(model, hw, batch):
        return next(
            b
            for b in breakdown
            if b["model"] == model and b["hardware"] == hw and b["batch"] == batch
        )

    w1, h1 = step("llama-3.1-8b", "wse-3", 1), step("llama-3.1-8b", "h100-sxm", 1)
    w64, h64 = step("llama-3.1-8b", "wse-3", 64), step("llama-3.1-8b", "h100-sxm", 64)
    w70 = step("llama-3.1-70b", "wse-3", 1)
    out = [
        f"- **The wafer is latency-bound, the GPUs memory-bound.** One Llama 3.1 8B decode step "
        f"on wse-3 takes {w1['step_s'] * 1e3:.3f} ms, of which per-layer latency is "
        f"{w1['latency_s'] / w1['step_s']:.0%}; reading the weights from SRAM takes "
        f"{w1['weights_s'] * 1e6:.1f} us. On one H100 the same step takes "
        f"{h1['step_s'] * 1e3:.2f} ms, {h1['weights_s'] / h1['step_s']:.0%} of it streaming "
        f"weights from HBM ({h1['bound']}-bound).",
        f"- **Batching is cheap on both, for different reasons.** At 64 users the wafer's "
        f"step grows to {w64['step_s'] * 1e3:.3f} ms ({w64['step_s'] / w1['step_s']:.2f}x) and "
        f"the H100's to {h64['step_s'] * 1e3:.2f} ms ({h64['step_s'] / h1['step_s']:.2f}x): "
        "the GPU reads its weights once per step for every user; the wafer's binding latency "
        "does not depend on the batch until compute catches up.",
        f"- **On the wafer, depth costs; size barely does.** Llama 3.1 70B needs "
        f"{w70['devices']} wafers; of its {w70['step_s'] * 1e3:.2f} ms step the pipeline hops "
        f"over external I/O take {w70['interconnect_s'] * 1e6:.0f} us and per-layer latency "
        "over 80 layers takes the rest.",
    ]
    b1 = step("llama-3.1-8b", "b200", 1)
    out.append(
        f"- **B200's per-layer floor is borrowed from the H100 fit.** For Llama 3.1 8B at "
        f"batch 1 it is {b1['latency_s'] / b1['step_s']:.0%} of B200's {b1['step_s'] * 1e3:.2f} ms "
        f"step, so the core calls that step {b1['bound']}-bound. The floor was measured with "
        "unfused PyTorch kernels on an H100; an engine with fused kernels would cut it on both "
        "GPUs, and no B200 measurement exists here to say by how much."
    )
    wafer_ctx = [c for c in context if c["hardware"] == "wse-3"]
    gpu_ctx = [c for c in context if c["hardware"] != "wse-3"]
    if wafer_ctx and gpu_ctx:
        wb1 = next(c for c in wafer_ctx if c["batch"] == 1)
        wb16 = next(c for c in wafer_ctx if c["batch"] == 16)
        best_gpu = max(gpu_ctx, key=lambda c: c["longest_context"])
        out.append(
            f"- **Long context shrinks the wafer's advantage through capacity.** Llama 3.1 70B on "
            f"{wb1['devices']} wafers holds one sequence of at most {wb1['longest_context']:,} "
            f"tokens and 16 sequences of at most {wb16['longest_context']:,} tokens in SRAM, "
            f"while {best_gpu['hardware']} x{best_gpu['devices']} holds 16 of "
            f"{best_gpu['longest_context']:,}."
        )
    res = next(p for p in placement if p["placement"] == "resident" and p["batch"] == 1)
    stream1 = next(p for p in placement if p["placement"] == "stream" and p["batch"] == 1)
    stream64 = next(p for p in placement if p["placement"] == "stream" and p["batch"] == 64)
    out.append(
        f"- **Streaming weights over the wafer's I/O is I/O-bound.** Llama 3.1 70B with weights "
        f"resident in SRAM on {res['devices']} wafers decodes at {res['per_user']:,.0f} tok/s per "
        f"user; streamed from external memory over ~150 GB/s into {stream1['devices']} wafer it "
        f"manages {stream1['per_user']:,.1f} tok/s ({stream1['bound']}-bound), and even at batch "
        f"64 only {stream64['total']:,.0f} tok/s in total."
    )
    return out
