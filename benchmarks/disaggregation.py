"""Prefill on GPUs, decode on wafers: the disaggregation study, from one command:

    python -m benchmarks.disaggregation [--out docs/disaggregation.md] [--quick]

Llama 3.1 8B and 70B; prefill on h100-sxm or b200, decode on wse-3; short and long
prompts. Three parts:

1. The link: for each prompt length, the GPU's prefill, the KV transfer over the link
   (each side's external I/O, `core.kv_transfer`) and its share of TTFT, against the
   wafer prefilling the prompt itself.
2. Live through smg at light load: a prefill worker and a decode worker behind smg's PD
   mode (`memorywall fleet`), one streaming chat request at a time; client TTFT against
   prefill + transfer + first decode step from the core, TPOT against the decode model,
   and, for scale, the same requests through smg to one aggregated wafer worker.
3. Simulated at scale (`server/pd/offline.py`): a split fleet sized so its prefill keeps
   up with its decode, against aggregated wse-3 and aggregated GPU fleets of the same
   device count and of the same power, on one open-loop Poisson schedule. Transfers at
   once share the link (each prefill worker's egress, the decode worker's ingress), and
   a prefill worker holds a prompt's KV until it has landed.

Every number is emulated (the hardware is modelled); smg is real.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.disaggregation_live import live_rows
from benchmarks.disaggregation_report import report
from memorywall.core import Batch, PrefillChunk, StepModel, load_hardware, load_model
from memorywall.core import plan_deployment as plan
from memorywall.core.deployment import Deployment
from memorywall.core.kv_transfer import kv_link, kv_transfer
from memorywall.loadgen.arrivals import poisson
from memorywall.loadgen.metrics import compute_metrics
from memorywall.loadgen.prompts import spec_token_ids
from memorywall.loadgen.records import RequestRecord, RequestSpec
from memorywall.server.engine.offline import Timeline
from memorywall.server.engine.scheduler import Request
from memorywall.server.pd.offline import PdFleet, simulate_aggregated, simulate_pd

MODELS = ("llama-3.1-8b", "llama-3.1-70b")
PREFILL_HW = ("h100-sxm", "b200")
DECODE_HW = "wse-3"
SHORT, LONG = 256, 4096
OUTPUT = 128
LINK_PROMPTS = (256, 1024, 4096, 16384, 65536)
MAX_PREFILL_WORKERS = 48
LOAD = 0.7  # offered load, as a fraction of the split fleet's decode capacity
SEED = 0


def deployment(hardware: str, model: str) -> Deployment:
    return plan(load_hardware(hardware), load_model(model))


def prefill_s(d: Deployment, prompt: int, cached: int = 0) -> float:
    return StepModel(d).step_cost(Batch(prefill=[PrefillChunk(prompt - cached, cached)])).time_s


def link_rows() -> list[dict]:
    rows = []
    for model in MODELS:
        wafer = deployment(DECODE_HW, model)
        for hw in PREFILL_HW:
            gpu = deployment(hw, model)
            link = kv_link(gpu, wafer)
            for prompt in LINK_PROMPTS:
                if prompt + OUTPUT > gpu.model.max_context:
                    continue
                p = prefill_s(gpu, prompt)
                t = kv_transfer(gpu, link, prompt)
                rows.append(
                    {
                        "model": model,
                        "prefill_hw": f"{hw} x{gpu.devices}",
                        "link": link.describe(),
                        "prompt": prompt,
                        "gpu_prefill_ms": p * 1e3,
                        "transfer_ms": t.time_s * 1e3,
                        "transfer_share": t.time_s / (p + t.time_s),
                        "kv_mb": t.bytes / 1e6,
                        "wafer_prefill_ms": prefill_s(wafer, prompt) * 1e3,
                    }
                )
    return rows


@dataclass(frozen=True)
class Capacity:
    prefill_req_s: float  # one prefill worker, full token budget
    decode_req_s: float  # one decode worker, as many sequences as its KV holds


def capacity(gpu: Deployment, wafer: Deployment, prompt: int) -> Capacity:
    budget = 8192
    per_step = max(1, budget // prompt)
    tokens = per_step * prompt
    step = StepModel(gpu).step_cost(Batch(prefill=[PrefillChunk(prompt)] * per_step)).time_s
    if prompt > budget:  # chunked: one prompt over several full-budget steps
        step = math.ceil(prompt / budget) * prefill_s(gpu, budget)
        tokens = prompt
    batch = max(1, min(256, wafer.kv_capacity_tokens // (prompt + OUTPUT)))
    context = prompt + OUTPUT // 2
    decode = StepModel(wafer).step_cost(Batch(decode_contexts=[context] * batch)).time_s
    return Capacity(tokens / prompt / step, batch / (OUTPUT * decode))


def schedule(rate_req_s: float, n: int, prompt: int) -> list[tuple[float, Request]]:
    """`n` requests, Poisson at `rate_req_s` (all at once when it is infinite)."""
    rng = np.random.default_rng(SEED)
    offsets = np.zeros(n) if math.isinf(rate_req_s) else poisson(rate_req_s, n, rng)
    out = []
    for i, t in enumerate(offsets):
        spec = RequestSpec(index=i, prompt_tokens=prompt, output_tokens=OUTPUT)
        ids = tuple(spec_token_ids(spec, SEED))
        request = Request(request_id=f"r{i}", prompt_ids=ids, max_tokens=OUTPUT, ignore_eos=True)
        out.append((float(t), request))
    return out


def metrics(arrivals: list[float], timelines: list[Timeline]) -> dict:
    records = []
    for i, (arrival, t) in enumerate(zip(arrivals, timelines, strict=True)):
        r = RequestRecord(
            index=i, prompt_tokens=t.prompt_tokens, output_tokens=OUTPUT, scheduled_ns=None,
            sent_ns=round(arrival * 1e9),
        )  # fmt: skip
        if t.error is not None:
            r.error = type(t.error).__name__
        else:
            r.chunk_ns = [round(x * 1e9) for x in t.group_times_s]
            r.chunk_tokens = list(t.group_tokens)
            r.finished_ns = r.chunk_ns[-1]
            r.usage_completion_tokens = t.completion_tokens
        records.append(r)
    return compute_metrics(records).as_dict()


def fleet_row(
    label: str, devices: int, power_w: float, m: dict, capacity_tok_s: float, **extra
) -> dict:
    return {
        "fleet": label,
        "devices": devices,
        "power_kw": power_w / 1e3,
        "ttft_p50_ms": m["median_ttft_ms"],
        "ttft_p99_ms": m["p99_ttft_ms"],
        "tpot_ms": m["mean_tpot_ms"],
        "failed": m["failed"],
        "tok_s": capacity_tok_s,
        "tok_s_per_device": capacity_tok_s / devices,
        "tok_s_per_kw": capacity_tok_s / (power_w / 1e3),
        **extra,
    }


def saturated_tok_s(arrivals: list[float], timelines: list[Timeline]) -> float:
    """Output tokens per second of a burst: every request at once, first to last token."""
    m = metrics(arrivals, timelines)
    return m["output_throughput"] or 0.0


def burst(n: int, prompt: int) -> tuple[list[float], list[tuple[float, Request]]]:
    requests = schedule(math.inf, n, prompt)
    return [t for t, _ in requests], requests


def sim_case(model: str, hw: str, prompt: int, n: int) -> dict:
    gpu, wafer = deployment(hw, model), deployment(DECODE_HW, model)
    cap = capacity(gpu, wafer, prompt)
    workers = min(MAX_PREFILL_WORKERS, math.ceil(cap.decode_req_s / cap.prefill_req_s))
    fleet = PdFleet(prefill=gpu, prefill_workers=workers, decode=wafer, decode_workers=1)
    # Capacity: a burst of three full decode batches per decode worker.
    batch = max(1, min(256, wafer.kv_capacity_tokens // (prompt + OUTPUT)))
    at, many = burst(3 * batch, prompt)
    split_cap = saturated_tok_s(at, [t.timeline for t in simulate_pd(fleet, many)])
    rate = LOAD * split_cap / OUTPUT
    requests = schedule(rate, n, prompt)
    arrivals = [t for t, _ in requests]
    split = simulate_pd(fleet, requests)
    transfers = [t.transfer for t in split if t.transfer is not None]
    exposed_ms = [1e3 * t.exposed_s for t in transfers]
    rows = [
        fleet_row(
            f"split: {fleet.describe()}",
            fleet.devices,
            fleet.power_w,
            metrics(arrivals, [t.timeline for t in split]),
            split_cap,
            transfer_ms=float(np.mean(exposed_ms)),
            transfer_p99_ms=float(np.percentile(exposed_ms, 99)),
            wait_ms=1e3 * float(np.mean([t.wait_s for t in transfers])),
            waited=sum(t.wait_s > 0 for t in transfers) / len(transfers),
        )
    ]
    wafer_w = wafer.devices * wafer.hardware.tdp_w
    gpu_w = gpu.devices * gpu.hardware.tdp_w
    same_devices = max(1, round(fleet.devices / wafer.devices)), fleet.devices // gpu.devices
    same_power = max(1, round(fleet.power_w / wafer_w)), max(1, int(fleet.power_w // gpu_w))
    # One aggregated worker's capacity (a burst of three full batches); k workers, k times.
    unit = {}
    for d in (wafer, gpu):
        b = max(1, min(256, d.kv_capacity_tokens // (prompt + OUTPUT)))
        at, many = burst(3 * b, prompt)
        unit[d.hardware.name] = saturated_tok_s(at, simulate_aggregated(d, 1, many))
    for what, (wafers, gpus) in (("same devices", same_devices), ("same power", same_power)):
        for d, k, w in ((wafer, wafers, wafer_w), (gpu, gpus, gpu_w)):
            if k < 1:
                continue
            timelines = simulate_aggregated(d, k, requests)
            label = f"{what}: {k} x {d.devices} {d.hardware.name}"
            cap = k * unit[d.hardware.name]
            rows.append(fleet_row(label, k * d.devices, k * w, metrics(arrivals, timelines), cap))
    return {
        "model": model,
        "prefill_hw": hw,
        "prompt": prompt,
        "rate": rate,
        "requests": n,
        "capacity": cap,
        "rows": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="write the Markdown page here")
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--no-live", action="store_true", help="skip the smg runs")
    args = parser.parse_args()
    started = time.perf_counter()
    load_before = os.getloadavg()
    n_sim = 200 if args.quick else 1500
    data = {
        "link": link_rows(),
        "sim": [
            sim_case(model, hw, prompt, n_sim)
            for model in MODELS
            for hw in PREFILL_HW
            for prompt in (SHORT, LONG)
        ],
        "live": [] if args.no_live else live_rows(MODELS, PREFILL_HW, (SHORT, LONG), args.quick),
    }
    data |= {
        "command": "python -m benchmarks.disaggregation"
        + (" --quick" if args.quick else "")
        + (" --no-live" if args.no_live else "")
        + (f" --out {args.out}" if args.out else ""),
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "elapsed_s": time.perf_counter() - started,
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "constants": {"short": SHORT, "long": LONG, "output": OUTPUT, "load": LOAD},
    }
    text = report(data)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
