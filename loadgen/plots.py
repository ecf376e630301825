"""PNG plots of one or more sweeps: latency and per-user speed against load, and the
throughput-interactivity trade-off. Every axis has its unit and plain-number ticks; each
sweep is drawn measured (solid, filled markers) beside the core's prediction (dashed,
hollow markers) where the run has one.

`plain_log_axis` and `level_axis` are the tick rules every plot in the project uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from memorywall.loadgen import rates

Sweep = tuple[str, Sequence[dict]]  # (label, one result dict per load level)
MAX_LEVEL_TICKS = 10


def plain(value: float) -> str:
    """A tick label without powers: 0.5, 8, 1,200, 2.5."""
    if value == 0:
        return "0"
    if abs(value) >= 1:
        return f"{value:,.2f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


_PLAIN = FuncFormatter(lambda v, _pos: plain(v))


def _axis(ax: Axes, which: str):
    return ax.xaxis if which == "x" else ax.yaxis


def plain_log_axis(ax: Axes, which: str, values: Sequence[float | None]) -> None:
    """A log axis ("x" or "y") over `values` with plain-number labels that never crowd.

    Over less than a decade, a few evenly chosen round numbers (matplotlib would label
    every minor tick there, in powers of ten, on top of each other); then 1-2-5 steps up
    to 3 decades on a y axis and 2 on an x axis (its labels are wider); beyond that,
    powers of ten.
    """
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis = _axis(ax, which)
    axis.set_major_formatter(_PLAIN)
    axis.set_minor_formatter(NullFormatter())
    data = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not data:
        return
    lo, hi = min(data), max(data)
    decades = math.log10(hi / lo)
    if decades < 1:
        ticks = _round_ticks(lo, hi)
        if len(ticks) < 2:  # a sliver of a decade: evenly spaced round numbers
            ticks = [t for t in MaxNLocator(nbins=3).tick_values(lo, hi) if lo <= t <= hi]
        axis.set_major_locator(FixedLocator(ticks if len(ticks) >= 2 else [lo, hi]))
    elif decades <= (3.0 if which == "y" else 2.0):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    else:
        axis.set_major_locator(LogLocator(base=10))


def _round_ticks(lo: float, hi: float, most: int = 5) -> list[float]:
    """Round numbers in [lo, hi], about evenly spaced on a log scale, at most `most`."""
    mantissas = (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8)
    powers = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    candidates = sorted(float(f"{m * 10.0**k:.6g}") for k in powers for m in mantissas)
    gap = math.log10(hi / lo) / most
    picked: list[float] = []
    for c in candidates:
        if lo <= c <= hi and (not picked or math.log10(c / picked[-1]) >= gap):
            picked.append(c)
    return picked


def level_axis(ax: Axes, levels: Sequence[float], label: str) -> None:
    """A load axis (users or requests/s) on a base-2 log scale, ticked at the levels run."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(_PLAIN)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ticks = sorted({v for v in levels if v and v > 0})
    if 0 < len(ticks) <= MAX_LEVEL_TICKS:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xlabel(label)


def _load_axis(levels: Sequence[dict]) -> tuple[str, list[float]]:
    if all(r.get("request_rate") is not None for r in levels):
        return "request rate (requests/s)", [r["request_rate"] for r in levels]
    if all(r.get("max_concurrency") is not None for r in levels):
        return "concurrent users", [r["max_concurrency"] for r in levels]
    # Trace replay sets neither: place it by the rate it achieved.
    return "achieved request rate (requests/s)", [r.get("request_throughput") or 0 for r in levels]


def _kind(levels: Sequence[dict]) -> str:
    """What the solid line shows: a client's measurement, or an offline simulation."""
    return "simulated" if any(r.get("simulated") for r in levels) else "measured"


def _draw(ax: Axes, x: Sequence[float], y: Sequence[float | None], label: str, **style) -> list:
    pts = [(a, b) for a, b in zip(x, y, strict=True) if a and b is not None and a > 0 and b > 0]
    if pts:
        ax.plot(*zip(*pts, strict=True), label=label, **style)
    return [b for _, b in pts]


def _pair(
    ax: Axes,
    colour: str,
    label: str,
    levels: Sequence[dict],
    x: Sequence[float],
    measured: Callable[[dict], float | None],
    predicted: Callable[[dict], float | None],
) -> list[float]:
    """One sweep: measured solid, predicted dashed; returns every y drawn."""
    ys = _draw(
        ax,
        x,
        [measured(r) for r in levels],
        f"{label}: {_kind(levels)}",
        color=colour,
        marker="o",
        linestyle="-",
    )
    ys += _draw(
        ax,
        x,
        [predicted(r) for r in levels],
        f"{label}: core prediction",
        color=colour,
        marker="o",
        mfc="none",
        linestyle="--",
    )
    return ys


def _colours(n: int) -> list[str]:
    return [f"C{i % 10}" for i in range(n)]


def _save(fig, path: Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_vs_load(sweeps: Sequence[Sweep], path: Path) -> Path:
    """Mean TTFT and TPOT against the load level, one colour per sweep."""
    fig, (ax_ttft, ax_tpot) = plt.subplots(1, 2, figsize=(11, 4.4))
    xs, ttft, tpot = [], [], []
    axis = "load"
    for (label, levels), colour in zip(sweeps, _colours(len(sweeps)), strict=True):
        axis, x = _load_axis(levels)
        xs += x
        ttft += _pair(
            ax_ttft,
            colour,
            label,
            levels,
            x,
            lambda r: r.get("mean_ttft_ms"),
            lambda r: r.get("predicted_ttft_ms"),
        )
        tpot += _pair(
            ax_tpot,
            colour,
            label,
            levels,
            x,
            lambda r: r.get("mean_tpot_ms"),
            lambda r: r.get("predicted_tpot_ms"),
        )
    for ax, ys, name in ((ax_ttft, ttft, "mean TTFT (ms)"), (ax_tpot, tpot, "mean TPOT (ms)")):
        level_axis(ax, xs, axis)
        plain_log_axis(ax, "y", ys)
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
        if ys:
            ax.legend(fontsize=7)
    return _save(fig, path, "Latency against load")


def per_user_vs_load(sweeps: Sequence[Sweep], path: Path) -> Path:
    """Per-user output tok/s against the load level: what each user sees as load grows."""
    fig, ax = plt.subplots(figsize=(7, 4.6))
    xs, ys = [], []
    axis = "load"
    for (label, levels), colour in zip(sweeps, _colours(len(sweeps)), strict=True):
        axis, x = _load_axis(levels)
        xs += x
        ys += _pair(
            ax,
            colour,
            label,
            levels,
            x,
            lambda r: rates.measured(r).per_user,
            lambda r: rates.predicted(r).per_user,
        )
    level_axis(ax, xs, axis)
    plain_log_axis(ax, "y", ys)
    ax.set_ylabel("output tok/s per user (1 / mean TPOT)")
    ax.grid(True, which="both", alpha=0.3)
    if ys:
        ax.legend(fontsize=7)
    return _save(fig, path, "Per-user speed against load")


def throughput_vs_interactivity(sweeps: Sequence[Sweep], path: Path) -> Path:
    """Output tok/s per device against per-user tok/s: the curve serving engineers trade along."""
    fig, ax = plt.subplots(figsize=(7, 4.8))
    xs, ys = [], []
    for (label, levels), colour in zip(sweeps, _colours(len(sweeps)), strict=True):
        series: tuple[tuple[str, Callable[[dict], rates.Rates], dict[str, Any]], ...] = (
            (_kind(levels), rates.measured, {"marker": "o", "linestyle": "-"}),
            ("core prediction", rates.predicted, {"marker": "o", "mfc": "none", "ls": "--"}),
        )
        for kind, get, style in series:
            pts = [
                (g.per_user, g.total / r.get("devices", 1))
                for r in levels
                if (g := get(r)).per_user and g.total
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), color=colour, label=f"{label}: {kind}", **style)
                xs += [p[0] for p in pts]
                ys += [p[1] for p in pts]
    plain_log_axis(ax, "x", xs)
    plain_log_axis(ax, "y", ys)
    ax.set_xlabel("output tok/s per user (1 / mean TPOT)")
    ax.set_ylabel("output tok/s per device")
    ax.grid(True, which="both", alpha=0.3)
    if ys:
        ax.legend(fontsize=7)
    return _save(fig, path, "Throughput per device against interactivity")
