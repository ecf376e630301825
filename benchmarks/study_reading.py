"""The study page's "Reading": short statements, each number computed from the results,
a profile, a model file or the core, each headline chosen by the values it summarises."""

from __future__ import annotations

from memorywall.core import Placement, load_hardware, load_model, plan_deployment, predict
from memorywall.core.hardware import DeviceKind


def placements(model: str, context: int) -> list[dict]:
    """The wafer's two placements for a model larger than one wafer (core)."""
    hw = load_hardware("wse-3")
    rows = []
    for placement in (Placement.RESIDENT, Placement.STREAM):
        deployment = plan_deployment(hw, load_model(model), placement=placement)
        for batch in (1, 64):
            p = predict(deployment, batch=batch, context=context)
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


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole else "n/a"


def _step_lines(breakdown, models, wafer, gpus) -> list[str]:
    def step(model, hw, batch):
        return next(
            b
            for b in breakdown
            if b["model"] == model and b["hardware"] == hw and b["batch"] == batch
        )

    small, gpu = models[0], gpus[0]
    batches = sorted({b["batch"] for b in breakdown})
    lo, hi = batches[0], batches[-1]
    w1, g1 = step(small, wafer, lo), step(small, gpu, lo)
    wn, gn = step(small, wafer, hi), step(small, gpu, hi)
    whw, ghw = load_hardware(wafer), load_hardware(gpu)
    out = [
        f"- **At batch {lo}, {small} is {w1['bound']}-bound on {wafer} and "
        f"{g1['bound']}-bound on {gpu}.** One decode step on {wafer} takes "
        f"{w1['step_s'] * 1e3:.3f} ms, of which per-layer latency is "
        f"{_share(w1['latency_s'], w1['step_s'])}; reading the weights from "
        f"{whw.resident.name.upper()} takes {w1['weights_s'] * 1e6:.1f} us. On {gpu} the "
        f"step takes {g1['step_s'] * 1e3:.2f} ms, {_share(g1['weights_s'], g1['step_s'])} of "
        f"it reading weights from {ghw.resident.name.upper()}.",
    ]
    grow_w, grow_g = wn["step_s"] / w1["step_s"], gn["step_s"] / g1["step_s"]
    cheaper = wafer if grow_w < grow_g else gpu
    out.append(
        f"- **From batch {lo} to {hi} the step grows {grow_w:.2f}x on {wafer} and "
        f"{grow_g:.2f}x on {gpu}: batching costs {cheaper} less.** At batch {hi} the "
        f"{wafer} step is {wn['bound']}-bound (latency {_share(wn['latency_s'], wn['step_s'])}"
        f", compute {_share(wn['compute_s'], wn['step_s'])}); the {gpu} step is "
        f"{gn['bound']}-bound (weights {_share(gn['weights_s'], gn['step_s'])}, KV "
        f"{_share(gn['kv_s'], gn['step_s'])}), its weights read once per step for the "
        "whole batch."
    )
    deep = [b for b in breakdown if b["hardware"] == wafer and b["batch"] == lo]
    multi = max(deep, key=lambda b: b["devices"])
    if multi["devices"] > 1:
        layers = load_model(multi["model"]).n_layers
        lat = multi["latency_s"] / multi["step_s"]
        hops = multi["interconnect_s"] / multi["step_s"]
        out.append(
            f"- **Across {multi['devices']} wafers, per-layer latency is {lat:.0%} of a "
            f"{multi['model']} step and the hops between wafers {hops:.0%}.** Of its "
            f"{multi['step_s'] * 1e3:.2f} ms step the pipeline hops over external I/O take "
            f"{multi['interconnect_s'] * 1e6:.0f} us and per-layer latency over {layers} "
            f"layers {multi['latency_s'] * 1e3:.2f} ms."
        )
    for other in gpus[1:]:
        o1 = step(small, other, lo)
        ohw = load_hardware(other)
        same = ohw.calibration == ghw.calibration
        out.append(
            f"- **{other}'s latency floors come from the `{ohw.calibration}` calibration"
            + (f", the same fit as {gpu}'s.**" if same else ".**")
            + f" For {small} at batch {lo} they are {_share(o1['latency_s'], o1['step_s'])} "
            f"of {other}'s {o1['step_s'] * 1e3:.2f} ms step, which the core calls "
            f"{o1['bound']}-bound."
        )
    return out


def _context_lines(context, placement, model, wafer) -> list[str]:
    out = []
    wafer_ctx = [c for c in context if c["hardware"] == wafer]
    gpu_ctx = [c for c in context if c["hardware"] != wafer]
    if wafer_ctx and gpu_ctx:
        wb1 = next(c for c in wafer_ctx if c["batch"] == 1)
        wb16 = next(c for c in wafer_ctx if c["batch"] == 16)
        best_gpu = max((c for c in gpu_ctx if c["batch"] == 16), key=lambda c: c["longest_context"])
        head = (
            "the wafer runs out of KV cache first"
            if wb16["longest_context"] < best_gpu["longest_context"]
            else "the wafer holds contexts as long as the GPUs"
        )
        out.append(
            f"- **Long context: {head}.** {model} on {wb1['devices']} wafers holds one "
            f"sequence of at most {wb1['longest_context']:,} tokens and 16 of at most "
            f"{wb16['longest_context']:,}, while {best_gpu['hardware']} x{best_gpu['devices']} "
            f"holds 16 of {best_gpu['longest_context']:,}."
        )
    hw = load_hardware(wafer)
    io = min(hw.stream.bandwidth_bytes_per_s, hw.external_io.bandwidth_bytes_per_s)
    res = next(p for p in placement if p["placement"] == "resident" and p["batch"] == 1)
    s1 = next(p for p in placement if p["placement"] == "stream" and p["batch"] == 1)
    s64 = max((p for p in placement if p["placement"] == "stream"), key=lambda p: p["batch"])
    out.append(
        f"- **Streaming {model}'s weights into the wafer is {s1['bound']}-bound.** Resident "
        f"in SRAM on {res['devices']} wafers it decodes at {res['per_user']:,.0f} tok/s per "
        f"user; streamed from {hw.stream.name} over {io / 1e9:,.0f} GB/s (the profile's "
        f"I/O) into {s1['devices']} wafer it manages {s1['per_user']:,.1f} tok/s, and at "
        f"batch {s64['batch']} {s64['total']:,.0f} tok/s in total."
    )
    return out


def _sim_lines(data, models) -> list[str]:
    out = []
    sim = data["simulated"]
    top = max(data["config"]["users"])
    limit = data["config"]["engine"]["max_num_seqs"]
    for model in models:
        rows = [r for r in sim if r["model"] == model and r["max_concurrency"] == top]
        rows = [r for r in rows if r.get("output_throughput")]
        if not rows:
            continue
        per_device = {r["hardware"]: r["output_throughput"] / r["devices"] for r in rows}
        best = max(per_device, key=per_device.get)
        rest = ", ".join(f"{hw} {v:,.0f}" for hw, v in per_device.items() if hw != best)
        out.append(
            f"- **At {top:,} users (at most {limit:,} running, the rest queued), {model} gets "
            f"the most output per device on {best}:** {per_device[best]:,.0f} tok/s per "
            f"device against {rest} (simulated)."
        )
    return out


def _plan_lines(data) -> list[str]:
    out = []
    for model, doc in data["plans"].items():
        held = {hw: b for hw, b in doc["best"].items() if b is not None}
        if not held:
            out.append(f"- **No backend holds {model}'s SLO** in the searched space.")
            continue
        kw = max(held, key=lambda hw: held[hw]["tok_s_per_kw"])
        dev = max(held, key=lambda hw: held[hw]["tok_s_per_device"])
        missing = [hw for hw, b in doc["best"].items() if b is None]
        out.append(
            f"- **Under {model}'s SLO, {kw} gives the most goodput per kW "
            f"({held[kw]['tok_s_per_kw']:,.0f} tok/s per kW, {held[kw]['describe']})"
            + (
                f"; {dev} the most per device ({held[dev]['tok_s_per_device']:,.0f}).**"
                if dev != kw
                else " and per device.**"
            )
            + (f" None of {', '.join(missing)} holds it." if missing else "")
        )
    return out


def _spot_lines(data) -> list[str]:
    out = []
    spots = [
        s for s in data["spot_checks"] if s["live_mean_tpot_ms"] and s["live_modelled_tpot_ms"]
    ]
    if spots:
        gap = max(abs(s["live_mean_tpot_ms"] / s["live_modelled_tpot_ms"] - 1) for s in spots)
        drift = max(abs(s["live_modelled_tpot_ms"] / s["replay_mean_tpot_ms"] - 1) for s in spots)
        out.append(
            f"- **Live, the client's TPOT follows the server's own timeline within {gap:.2%} "
            f"in every spot check; that timeline is up to {drift:.1%} from the replay of its "
            "own arrivals** where the live server's host started steps late."
        )
    kept = [s for s in data["spot_checks"] if not s["suspect"] and s["tpot_error"] is not None]
    if not kept:
        return out
    worst = max(kept, key=lambda s: abs(s["tpot_error"]))
    out.append(
        f"- **Live and replayed agree on TPOT within {abs(worst['tpot_error']):.2%}** over "
        f"the {_count(len(kept), 'spot check')} where neither the client nor the server's "
        f"host fell behind (worst: {worst['model']} on {worst['hardware']} at "
        f"{_count(worst['users'], 'user')})."
    )
    return out


def reading(data, breakdown, context, placement, context_model) -> list[str]:
    models = sorted({b["model"] for b in breakdown}, key=[b["model"] for b in breakdown].index)
    hws = sorted({b["hardware"] for b in breakdown}, key=[b["hardware"] for b in breakdown].index)
    wafer = next(hw for hw in hws if load_hardware(hw).kind is DeviceKind.WAFER)
    gpus = [hw for hw in hws if hw != wafer]
    return [
        *_step_lines(breakdown, models, wafer, gpus),
        *_context_lines(context, placement, context_model, wafer),
        *_sim_lines(data, models),
        *_plan_lines(data),
        *_spot_lines(data),
    ]
