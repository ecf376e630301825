"""What `memorywall plan` prints and writes: a ranked table, JSON, and a Pareto plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt

from memorywall.core import Deployment
from memorywall.core.kv_transfer import LinkKind, kv_link
from memorywall.loadgen.plots import plain, plain_log_axis
from memorywall.loadgen.workload import SyntheticWorkload, Workload
from memorywall.plan.budget import BudgetAnswer, PowerBudget, answers, why_none
from memorywall.plan.planner import (
    Evaluation,
    LoadKind,
    PdCandidate,
    PdSpace,
    PlanResult,
    Status,
    Trial,
)
from memorywall.plan.routes import Colour, route_colours, route_of
from memorywall.plan.space import Candidate

LOAD_UNITS = {LoadKind.RATE: "req/s", LoadKind.USERS: "users"}


def slo_text(result: PlanResult) -> str:
    slo = result.query.slo
    parts = [
        f"{name} <= {bound * 1e3:g} ms"
        for name, bound in (("TTFT", slo.ttft_s), ("TPOT", slo.tpot_s), ("E2E", slo.e2el_s))
        if bound is not None
    ]
    return "p99 " + ", p99 ".join(parts)


def workload_text(w: Workload) -> str:
    if isinstance(w, SyntheticWorkload):
        return f"prompts {w.input} tokens, outputs {w.output} tokens"
    return str(w)


def _per_user(t: Trial) -> float | None:
    return t.result.get("mean_output_tok_s_per_user")


def _fmt(v: float | None, spec: str = ",.0f") -> str:
    return "-" if v is None else f"{v:{spec}}"


def table(result: PlanResult, top: int = 5, budget: PowerBudget | None = None) -> str:
    """The `top` cheapest candidates per backend that hold the SLO, and why others do not;
    with `budget`, each backend's fleet within it below."""
    q = result.query
    unit = LOAD_UNITS[q.load]
    header = ["rank", "deployment", f"max load ({unit})", "goodput tok/s", "tok/s/device"]
    header += ["tok/s/kW", "p99 TTFT ms", "p99 TPOT ms", "tok/s/user"]
    if q.target_rate:
        header.append(f"devices for {q.target_rate:g} req/s")
    rows: list[list[str]] = []
    notes: list[str] = []  # backends with no answer, below the table
    for hw in result.backends():
        ranked = result.ranked(hw)
        if not ranked:
            notes.append(f"{hw}: {_why_none(result, hw)}")
            continue
        for i, ev in enumerate(ranked[:top], 1):
            b = ev.pick
            r = b.result
            row = [
                str(i),
                ev.candidate.describe(),
                plain(b.load),
                _fmt(ev.goodput_tok_s),
                _fmt(ev.tok_s_per_device),
                _fmt(ev.tok_s_per_kw),
                _fmt(r.get("p99_ttft_ms"), ",.1f"),
                _fmt(r.get("p99_tpot_ms"), ",.2f"),
                _fmt(_per_user(b), ",.1f"),
            ]
            if q.target_rate:
                replicas = ev.replicas_for(q.target_rate)
                row.append("-" if replicas is None else f"{replicas * ev.candidate.devices:,}")
            rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines += notes
    if budget is not None:
        lines += ["", budget_table(result, budget)]
    return "\n".join(lines)


def budget_text(budget: PowerBudget) -> str:
    basis = (
        "device TDP alone: no hosts, network or cooling"
        if budget.pue == 1.0
        else f"device TDP x PUE {budget.pue:g}"
    )
    return f"power budget {_watts(budget.watts)} ({basis})"


def _watts(w: float) -> str:
    for unit, scale in (("GW", 1e9), ("MW", 1e6), ("kW", 1e3)):
        if w >= scale:
            return f"{w / scale:,.4g} {unit}"
    return f"{w:,.4g} W"


def budget_table(result: PlanResult, budget: PowerBudget) -> str:
    """Per backend: the copies of its best deployment the budget feeds, and what they serve."""
    users = "users" if result.query.load is LoadKind.USERS else "users (in flight)"
    header = ["backend", "deployment", "copies", "devices", "power", users, "req/s"]
    header += ["tok/s", "goodput tok/s"]
    rows, notes = [], []
    for hw, a in answers(result, budget).items():
        if a is None:
            notes.append(f"{hw}: {why_none(result, budget, hw)}")
            continue
        rows.append(
            [
                hw,
                a.evaluation.candidate.describe(),
                f"{a.deployments:,}",
                f"{a.devices:,}",
                _watts(a.power_w),
                f"{a.users:,.0f}",
                f"{a.requests_s:,.0f}",
                f"{a.tok_s:,.0f}",
                f"{a.goodput_tok_s:,.0f}",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [budget_text(budget) + ":"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines + notes)


def _why_none(result: PlanResult, hw: str) -> str:
    evs = [e for e in result.evaluations if e.candidate.hardware == hw]
    if not evs:
        reasons = sorted({s.reason for s in result.skipped if s.hardware == hw})
        return "nothing fits (" + "; ".join(reasons) + ")" if reasons else "nothing fits"
    return f"no candidate holds the SLO ({len(evs)} tried)"


def summary(result: PlanResult) -> str:
    q = result.query
    simulated = sum(len(e.trials) for e in result.evaluations if e.status is not Status.SAME)
    counts = {s: sum(e.status is s for e in result.evaluations) for s in Status}
    return (
        f"{q.model.name}, {slo_text(result)}; {len(result.evaluations)} candidates "
        f"({counts[Status.HOLDS]} hold somewhere, {counts[Status.UNREACHABLE]} never, "
        f"{counts[Status.PRUNED]} pruned by the core's estimate, {counts[Status.SAME]} same as "
        f"another batch limit), {len(result.skipped)} layouts skipped, "
        f"{simulated} levels simulated"
    )


def _trial(t: Trial) -> dict:
    r = t.result
    return {
        "load": t.load,
        "holds": t.holds,
        "peak_in_flight": t.peak_in_flight,
        "goodput_tok_s": t.goodput_tok_s,
        "output_throughput": r.get("output_throughput"),
        "request_goodput": r.get("request_goodput"),
        "tok_s_per_user": _per_user(t),
        **{k: r.get(k) for k in ("p99_ttft_ms", "p99_tpot_ms", "p99_e2el_ms", "mean_tpot_ms")},
    }


def _pool(d: Deployment) -> dict:
    return {
        "hardware": d.hardware.name,
        "devices": d.devices,
        "tensor_parallel": d.tensor_parallel,
        "pipeline_parallel": d.pipeline_parallel,
        "expert_parallel": d.expert_parallel,
        "weight_precision": d.weight_precision.value,
        "kv_precision": d.kv_precision.value,
        "placement": d.placement.value,
    }


def _layout(c: Candidate | PdCandidate) -> dict:
    """An aggregated candidate's deployment; a split's pools under `pd`, its label as
    `hardware` and both pools' devices as `devices`."""
    if isinstance(c, Candidate):
        return {"kind": "aggregated", **_pool(c.deployment)}
    f = c.fleet
    link = kv_link(f.prefill, f.decode, f.link)
    pd = {
        "prefill": _pool(f.prefill),
        "prefill_workers": f.prefill_workers,
        "decode": _pool(f.decode),
        "decode_workers": f.decode_workers,
        "link": {
            "kind": link.kind.value,
            "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s,
            "latency_s": link.latency_s,
        },
    }
    return {"kind": "pd", "hardware": c.hardware, "devices": c.devices, "pd": pd}


def _evaluation(ev: Evaluation, target_rate: float | None) -> dict:
    c = ev.candidate
    best = ev.best
    replicas = ev.replicas_for(target_rate) if target_rate else None
    return {
        **_layout(c),
        "max_num_seqs": c.engine.max_num_seqs,
        "max_num_batched_tokens": c.engine.max_num_batched_tokens,
        "describe": c.describe(),
        "status": ev.status.value,
        "note": ev.note,
        "core_estimate_tok_s_per_device": ev.estimate_tok_s_per_device,
        "max_load": best.load if best else None,
        "goodput_tok_s": ev.goodput_tok_s,
        "tok_s_per_device": ev.tok_s_per_device,
        "tok_s_per_kw": ev.tok_s_per_kw,
        "replicas_for_target": replicas,
        "devices_for_target": replicas * c.devices if replicas else None,
        "at_max_load": _trial(best) if best else None,
        "trials": [_trial(t) for t in ev.trials],
    }


def _budget_json(result: PlanResult, budget: PowerBudget) -> dict:
    def one(hw: str, a: BudgetAnswer | None) -> dict:
        if a is None:
            return {"answer": None, "why": why_none(result, budget, hw)}
        return {
            "answer": {
                "describe": a.evaluation.candidate.describe(),
                "deployment_w": a.deployment_w,
                "deployments": a.deployments,
                "devices": a.devices,
                "power_w": a.power_w,
                "users": a.users,
                "requests_s": a.requests_s,
                "tok_s": a.tok_s,
                "goodput_tok_s": a.goodput_tok_s,
            }
        }

    return {
        "watts": budget.watts,
        "pue": budget.pue,
        "basis": budget_text(budget),
        "backends": {hw: one(hw, a) for hw, a in answers(result, budget).items()},
    }


def as_json(result: PlanResult, budget: PowerBudget | None = None) -> dict:
    """Everything the plan found; the same seed gives the same document on every machine."""
    q, s = result.query, result.space
    slo = q.slo
    best = {}
    for hw in result.backends():
        ranked = result.ranked(hw)
        best[hw] = _evaluation(ranked[0], q.target_rate) if ranked else None
    return {
        "model": q.model.name,
        "workload": workload_text(q.workload),
        "slo": {"percentile": 99, "ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "e2el_s": slo.e2el_s},
        "load": q.load.value,
        "num_prompts": q.num_prompts,
        "seed": q.seed,
        "burstiness": q.burstiness,
        "target_rate": q.target_rate,
        "space": {
            "hardware": [h.name for h in s.hardware],
            "precisions": [p.value for p in s.precisions],
            "kv_precision": s.kv_precision.value,
            "placements": [p.value for p in s.placements],
            "max_devices": s.max_devices,
            "max_num_seqs": list(s.max_num_seqs),
            "max_num_batched_tokens": s.max_num_batched_tokens,
            "tolerance": s.tolerance,
            "expert_parallel": s.expert_parallel,
            "pd": None if result.pd is None else _pd_space(result.pd),
        },
        "best": best,
        "candidates": [_evaluation(e, q.target_rate) for e in result.evaluations],
        "skipped": [
            {"hardware": k.hardware, "layout": k.layout, "reason": k.reason} for k in result.skipped
        ],
        "power_budget": None if budget is None else _budget_json(result, budget),
    }


def _pd_space(pd: PdSpace) -> dict:
    link = pd.link if isinstance(pd.link, LinkKind) else None
    return {
        "prefill_workers": list(pd.prefill_workers),
        "decode_workers": pd.decode_workers,
        "link": link.value if link else None,
        "link_gbps": None if link else pd.link,
    }


# A built-in profile takes its route's shade (`routes.ROUTES`: the study's families); a
# profile outside the map takes the default cycle, a split colours its own (none of them in
# a route's family, so a split never reads as one route's hardware).
SPLIT_COLOURS = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
ROUTE_COLOURS = route_colours()


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other beats on both per-user and per-device speed, by per-user speed."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def pareto_plot(result: PlanResult, path: Path, budget: PowerBudget | None = None) -> Path:
    """Output tok/s per device against tok/s per user, every simulated level of every
    candidate: filled where the SLO held, hollow where it broke; each backend's frontier
    of held levels as a line (dashed for a disaggregated split), its pick as a star; the
    TPOT bound as a vertical line. With `budget`, a second panel: each backend's goodput
    within the budget."""
    if budget is None:
        fig, ax = plt.subplots(figsize=(8, 5.2))
    else:
        fig, (ax, bax) = plt.subplots(1, 2, figsize=(14, 5.2), gridspec_kw={"width_ratios": [8, 5]})
        _budget_panel(bax, result, budget)
    xs, ys = [], []
    for i, (hw, colour) in enumerate(backend_colours(result).items()):
        split = i >= len(result.space.hardware)
        held: list[tuple[float, float]] = []
        broke: list[tuple[float, float]] = []
        for ev in result.evaluations:
            if ev.candidate.hardware != hw or ev.status is Status.SAME:
                continue
            for t in ev.trials:
                x, y = _per_user(t), t.result.get("output_throughput")
                if x and y:
                    (held if t.holds else broke).append((x, y / ev.candidate.devices))
        styles: tuple[tuple[list[tuple[float, float]], dict[str, Any]], ...] = (
            (held, {}),
            (broke, {"mfc": "none", "alpha": 0.35}),
        )
        for pts, style in styles:
            if pts:
                ax.plot(*zip(*pts, strict=True), "o", ms=3.5, color=colour, **style)
        front = _frontier(held)
        if front:
            line = "--" if split else "-"
            ax.plot(*zip(*front, strict=True), line, color=colour, label=f"{_label(hw)}: SLO held")
        ranked = result.ranked(hw)
        if ranked:
            b = ranked[0].pick
            x = _per_user(b)
            if x is not None:
                y = b.result["output_throughput"] / ranked[0].candidate.devices
                ax.plot(x, y, "*", ms=14, color=colour, mec="black", label=f"{_label(hw)}: pick")
        xs += [p[0] for p in held + broke]
        ys += [p[1] for p in held + broke]
    tpot = result.query.slo.tpot_s
    if tpot:
        ax.axvline(1 / tpot, color="black", ls="--", lw=1)
        ax.text(
            1 / tpot,
            1.0,
            f" TPOT bound: {1 / tpot:,.3g} tok/s per user",
            rotation=90,
            transform=ax.get_xaxis_transform(),
            va="top",
            ha="right",
            fontsize=7,
        )
        xs.append(1 / tpot)
    plain_log_axis(ax, "x", xs)
    plain_log_axis(ax, "y", ys)
    ax.set_xlabel("output tok/s per user (mean over requests)")
    ax.set_ylabel("output tok/s per device")
    ax.grid(True, which="both", alpha=0.3)
    if ys:
        ax.legend(fontsize=7)
    q = result.query
    ax.set_title(
        f"{q.model.name}: {slo_text(result)}\n"
        f"filled: SLO held, hollow: broke ({q.load.value} sweep, simulated)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def backend_colours(result: PlanResult) -> dict[str, str | Colour]:
    """Each backend's colour in the plot: its route's shade, else as SPLIT_COLOURS says."""
    out: dict[str, str | Colour] = {}
    for i, hw in enumerate(result.backends()):
        k = i - len(result.space.hardware)
        known = ROUTE_COLOURS.get(hw)
        if k >= 0:
            out[hw] = SPLIT_COLOURS[k % len(SPLIT_COLOURS)]
        else:
            out[hw] = known[1] if known else f"C{i % 10}"
    return out


def _label(hw: str) -> str:
    """A backend as the legend names it: with its route where the map knows one."""
    route = route_of(hw)
    return f"{hw} ({route})" if route else hw


def _budget_panel(ax: Any, result: PlanResult, budget: PowerBudget) -> None:
    """Goodput of each backend's fleet within the budget, bars labelled with its copies."""
    found = answers(result, budget)
    names = list(found)
    values = [a.goodput_tok_s if a else 0.0 for a in found.values()]
    known = backend_colours(result)
    colours = [known[hw] for hw in names]
    ax.barh(names, values, color=colours)
    for y, a in enumerate(found.values()):
        text = (
            f" {a.deployments:,} x {a.evaluation.candidate.devices} devices, {a.users:,.0f} users"
            if a
            else " none"
        )
        ax.text(values[y], y, text, va="center", fontsize=7)
    ax.invert_yaxis()
    if any(values):
        ax.set_xlim(0, max(values) * 1.6)
    ax.set_xlabel("goodput within the budget (output tok/s at the SLO)")
    ax.set_title(budget_text(budget), fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
