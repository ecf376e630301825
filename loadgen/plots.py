"""PNG plots of one or more sweeps: latency against load, and the interactivity trade-off."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt

Sweep = tuple[str, Sequence[dict]]  # (label, one result dict per load level)


def _load_axis(levels: Sequence[dict]) -> tuple[str, list[float]]:
    if all(r.get("request_rate") is not None for r in levels):
        return "request rate (req/s)", [r["request_rate"] for r in levels]
    if all(r.get("max_concurrency") is not None for r in levels):
        return "concurrency (users)", [r["max_concurrency"] for r in levels]
    # Trace replay sets neither: place it by the rate it achieved.
    return "achieved request rate (req/s)", [r.get("request_throughput") or 0 for r in levels]


def latency_vs_load(sweeps: Sequence[Sweep], path: Path) -> Path:
    """Mean TTFT and TPOT against the load level, one line per sweep."""
    fig, (ax_ttft, ax_tpot) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, levels in sweeps:
        axis, x = _load_axis(levels)
        for ax, key in ((ax_ttft, "mean_ttft_ms"), (ax_tpot, "mean_tpot_ms")):
            pts = [
                (xi, r[key])
                for xi, r in zip(x, levels, strict=True)
                if r.get(key) is not None and xi > 0
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
            ax.set_xlabel(axis)
            ax.set_xscale("log", base=2)
    ax_ttft.set_ylabel("mean TTFT (ms)")
    ax_tpot.set_ylabel("mean TPOT (ms)")
    for ax in (ax_ttft, ax_tpot):
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Latency against load (emulated where the label says so)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_vs_interactivity(sweeps: Sequence[Sweep], path: Path) -> Path:
    """Output tok/s per device against per-user tok/s: the curve serving engineers trade along."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, levels in sweeps:
        pts = [
            (r["mean_output_tok_s_per_user"], r["output_throughput"] / r.get("devices", 1))
            for r in levels
            if r.get("mean_output_tok_s_per_user") is not None
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xlabel("per-user output tok/s (1 / mean TPOT)")
    ax.set_ylabel("output tok/s per device")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Throughput per device against interactivity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
