"""The study's plots: simulated sweeps (with the live spot checks on top) and core views.

Every axis has its unit and plain-number ticks (`loadgen.plots`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from memorywall.core import (
    Precision,
    StepModel,
    load_hardware,
    load_model,
    plan_deployment,
    predict,
)
from memorywall.errors import MemorywallError
from memorywall.loadgen.plots import level_axis, plain_log_axis
from memorywall.plan.routes import route_colours

BACKEND_COLOURS = {"wse-3": "tab:red", "h100-sxm": "tab:blue", "b200": "tab:green"}
BREAKDOWN_BATCHES = (1, 64)


def by(rows: list[dict], model: str, hw: str) -> list[dict]:
    return [r for r in rows if r["model"] == model and r["hardware"] == hw]


def per_user(r: dict) -> float | None:
    """Output tok/s one user sees: 1 / mean TPOT."""
    return 1e3 / r["mean_tpot_ms"] if r.get("mean_tpot_ms") else None


def _save(fig, path: Path, title: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def users_grid(data: dict, models, sim_value, live_value, ylabel: str, path: Path, title: str):
    """One panel per model against concurrent users: the simulated sweep (solid) and the
    live spot checks (hollow) where `live_value` gives one."""
    sim, spots = data["simulated"], data["spot_checks"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        xs, ys = [], []
        for hw, colour in BACKEND_COLOURS.items():
            rows = by(sim, model, hw)
            if not rows:
                continue
            pts = [(r["max_concurrency"], sim_value(r)) for r in rows if sim_value(r)]
            ax.plot(*zip(*pts, strict=True), "-o", ms=3, color=colour, label=f"{hw}: simulated")
            xs += [p[0] for p in pts]
            ys += [p[1] for p in pts]
            for suspect, marker, name in ((False, "o", "live"), (True, "x", "live, suspect")):
                live = [
                    (s["users"], live_value(s))
                    for s in by(spots, model, hw)
                    if live_value and bool(s["suspect"]) == suspect and live_value(s)
                ]
                if live:
                    ax.plot(
                        *zip(*live, strict=True),
                        marker,
                        ms=8,
                        mfc="none",
                        color=colour,
                        label=f"{hw}: {name}",
                    )
                    ys += [p[1] for p in live]
        ax.set_title(model)
        level_axis(ax, xs, "concurrent users")
        plain_log_axis(ax, "y", ys)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend(fontsize=7)  # the first model has every backend's spot checks
    _save(fig, path, title)


def tradeoff(data: dict, models, path: Path) -> None:
    """Output tok/s per device and per kW of rated power against per-user tok/s."""
    sim = data["simulated"]
    fig, axes = plt.subplots(2, len(models), figsize=(4.6 * len(models), 7.5), squeeze=False)
    for col, model in enumerate(models):
        xs, ys = [], [[], []]
        for hw, colour in BACKEND_COLOURS.items():
            rows = [r for r in by(sim, model, hw) if per_user(r) and r.get("output_throughput")]
            if not rows:
                continue
            x = [per_user(r) for r in rows]
            per_device = [r["output_throughput"] / r["devices"] for r in rows]
            per_kw = [r["output_throughput"] / (r["devices"] * r["tdp_w"] / 1e3) for r in rows]
            axes[0][col].plot(x, per_device, "-o", ms=3, color=colour, label=f"{hw}: simulated")
            axes[1][col].plot(x, per_kw, "-o", ms=3, color=colour, label=f"{hw}: simulated")
            xs += x
            ys[0] += per_device
            ys[1] += per_kw
        axes[0][col].set_title(model)
        for row in (0, 1):
            ax = axes[row][col]
            plain_log_axis(ax, "x", xs)
            plain_log_axis(ax, "y", ys[row])
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xlabel("output tok/s per user (1 / mean TPOT)")
    axes[0][0].set_ylabel("output tok/s per device")
    axes[1][0].set_ylabel("output tok/s per kW of rated power")
    axes[0][-1].legend(fontsize=7)
    users = data["config"]["users"]
    _save(
        fig,
        path,
        f"Throughput against interactivity, {min(users):,}-{max(users):,} users (simulated)",
    )


def step_breakdowns(models, context: int) -> list[dict]:
    """One decode step per backend and model at a few batches, split by what it waits on."""
    rows = []
    for model in models:
        for hw in BACKEND_COLOURS:
            deployment = plan_deployment(load_hardware(hw), load_model(model))
            sm = StepModel(deployment)
            for batch in BREAKDOWN_BATCHES:
                c = predict(deployment, batch=batch, context=context).decode
                moved = c.weight_bytes + c.kv_bytes
                weights_s = c.memory_s * c.weight_bytes / moved if moved else 0.0
                rows.append(
                    {
                        "model": model,
                        "hardware": hw,
                        "devices": deployment.devices,
                        "pipeline_parallel": deployment.pipeline_parallel,
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


def breakdown_plot(rows, context: int, path: Path) -> None:
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
    ax.set_title(f"Where one decode step goes (core, context {context:,})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def context_scaling(model: str, path: Path) -> list[dict]:
    """Per-user tok/s against context at batch 1 and 16, where the KV fits (core sweep)."""
    window = load_model(model).max_context
    contexts = np.geomspace(1024, window - 1024, 40).astype(int)
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


ROUTE_CONTEXT = 1024
ROUTE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def routes_plot(model: str, path: Path) -> list[dict]:
    """Every route's profiles on one model (fp8 weights, the fewest devices that hold them):
    decode tok/s per device and per kW of rated power against per-user tok/s, batch 1 up to
    what the KV cache holds (core)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    rows, xs, ys = [], [], [[], []]
    for hw, (route, colour) in route_colours().items():
        try:
            d = plan_deployment(
                load_hardware(hw), load_model(model), weight_precision=Precision.FP8
            )
        except MemorywallError as e:
            rows.append({"hardware": hw, "route": route, "fits": False, "why": str(e)})
            continue
        fits = [b for b in ROUTE_BATCHES if b * (ROUTE_CONTEXT + 1) <= d.kv_capacity_tokens]
        sweep = StepModel(d).decode_sweep(np.array(fits), np.array([ROUTE_CONTEXT]))
        step = sweep.time_s.reshape(-1)
        user = 1.0 / step
        per_device = np.array(fits) / step / d.devices
        per_kw = np.array(fits) / step / (d.devices * d.hardware.tdp_w / 1e3)
        style = "--" if d.hardware.what_if else "-"
        label = f"{hw} x{d.devices} ({route})"
        axes[0].plot(user, per_device, style + "o", ms=3, color=colour, label=label)
        axes[1].plot(user, per_kw, style + "o", ms=3, color=colour, label=label)
        xs += list(user)
        ys[0] += list(per_device)
        ys[1] += list(per_kw)
        rows.append({"hardware": hw, "route": route, "fits": True, "devices": d.devices})
    for ax, ylabel, values in zip(
        axes, ("output tok/s per device", "output tok/s per kW of rated power"), ys, strict=True
    ):
        plain_log_axis(ax, "x", xs)
        plain_log_axis(ax, "y", values)
        ax.set_xlabel("output tok/s per user (core decode step)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    _save(
        fig,
        path,
        f"{model}, fp8 weights, context {ROUTE_CONTEXT:,}: every route (dashed: what-if), "
        "batch 1 up to what the KV cache holds",
    )
    return rows
