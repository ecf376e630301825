"""The live part of the disaggregation study: split fleets behind smg's PD mode, light load.

For each model and prefill GPU: one prefill worker and one wse-3 decode worker behind
smg (`memorywall fleet`, PD mode), and for reference one aggregated wse-3 worker behind
smg; streaming chat requests one at a time (`memorywall bench`'s closed loop at
concurrency 1). The median client TTFT is set against the core's prefill of the
uncached prompt on the GPU + the KV transfer + the wafer's first decode step; TPOT against
the wafer's batch-1 decode steps over the request's contexts. The aggregated worker's
TTFT over its own modelled prefill is the gateway's overhead on this machine (host stalls
included); every worker's `memorywall:host_stall_seconds` tells how much modelled time a
late-waking host cost each request, first token to last.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from benchmarks._serve import scrape
from memorywall.core import Batch, PrefillChunk, StepModel, load_hardware, load_model
from memorywall.core import plan_deployment as plan
from memorywall.core.kv_transfer import kv_link, kv_transfer
from memorywall.fleet.runner import FleetReady, find_smg, in_background
from memorywall.fleet.spec import FleetSpec, GatewaySpec, WorkerSpec
from memorywall.loadgen.bench import BenchConfig, Level, ServerFacts, run_level
from memorywall.loadgen.records import RequestRecord
from memorywall.loadgen.target import Backend
from memorywall.loadgen.workload import Fixed, SyntheticWorkload

DECODE_HW = "wse-3"
OUTPUT = 64
STALLS = "memorywall:host_stall_seconds"


def pd_fleet(workers: tuple[WorkerSpec, ...]) -> FleetSpec:
    """The workers behind smg (PD mode when they have roles)."""
    return FleetSpec(workers=workers, gateway=GatewaySpec(policy="round_robin", port=0))


def stalled_s(up: FleetReady) -> float:
    """Modelled time every worker lost to host stalls so far (`memorywall:degraded`'s
    counter): the emulator is never faster than the model, so a loaded host shows here."""
    return sum(
        value
        for w in up.workers.values()
        for name, _, value in scrape(w.metrics_url)
        if name == f"{STALLS}_total"
    )


def gateway_url(up: FleetReady) -> str:
    assert up.gateway is not None, "the fleet was started with a gateway"
    return up.gateway.url


def drive(url: str, model: str, prompt: int, n: int, seed: int) -> list[RequestRecord]:
    config = BenchConfig(
        target=url,
        workload=SyntheticWorkload(Fixed(prompt), Fixed(OUTPUT)),
        backend=Backend.OPENAI_CHAT,
        model=model,
        num_prompts=n,
        concurrency=(1,),
        warmup=1,
        seed=seed,
        label=f"{model} {prompt}",
    )
    facts = ServerFacts(hardware=DECODE_HW, model=model, devices=1, emulated=True)
    _, records = run_level(config, Level("c1", 1, None), facts)
    return [r for r in records if r.ok and not r.warmup]


def _measured(records: list[RequestRecord]) -> tuple[list[float], list[float]]:
    """Client TTFT and TPOT of each request, seconds."""
    ttft = [(r.chunk_ns[0] - r.sent_ns) / 1e9 for r in records]
    tpot = [
        (r.chunk_ns[-1] - r.chunk_ns[0]) / 1e9 / (r.completion_tokens - 1)
        for r in records
        if r.completion_tokens > 1
    ]
    return ttft, tpot


def _prefill(r: RequestRecord) -> Batch:
    """The prefill of a request's prompt after what its worker found cached."""
    cached = r.usage_cached_tokens or 0
    return Batch(prefill=[PrefillChunk(r.usage_prompt_tokens - cached, cached)])


def _decode_tpot_s(model_steps: StepModel, prompt: int, tokens: int) -> float:
    """Mean batch-1 decode step over a request's contexts (its first token excluded)."""
    steps = [
        model_steps.step_cost(Batch(decode_contexts=[prompt + k])).time_s for k in range(tokens - 1)
    ]
    return float(np.mean(steps))


def live_rows(
    models: Sequence[str], prefill_hw: Sequence[str], prompts: Sequence[int], quick: bool
) -> list[dict]:
    if find_smg() is None:
        raise SystemExit("smg is not installed (pip install 'memorywall[gateway]')")
    n = 3 if quick else 10
    rows = []
    for model in models:
        wafer = plan(load_hardware(DECODE_HW), load_model(model))
        wafer_steps = StepModel(wafer)
        decode = WorkerSpec(
            name="decode", hardware=DECODE_HW, model=model, role="decode", http_port=0
        )
        aggregated = WorkerSpec(name="wafer", hardware=DECODE_HW, model=model, http_port=0)
        reference: dict[int, dict[str, float]] = {}
        with in_background(pd_fleet((aggregated,)), start_timeout_s=180) as up:
            for prompt in prompts:
                before = stalled_s(up)
                records = drive(gateway_url(up), model, prompt, n, seed=prompt)
                stalls = (stalled_s(up) - before) / (n + 1)  # the warm-up request too
                ttft, tpot = _measured(records)
                modelled = [wafer_steps.step_cost(_prefill(r)).time_s for r in records]
                reference[prompt] = {
                    "gateway_s": float(np.median(ttft) - np.median(modelled)),
                    "tpot_s": float(np.median(tpot)),
                    "stall_s": stalls,
                }
        for hw in prefill_hw:
            gpu = plan(load_hardware(hw), load_model(model))
            gpu_steps = StepModel(gpu)
            link = kv_link(gpu, wafer)
            prefill = WorkerSpec(
                name="prefill", hardware=hw, model=model, role="prefill", http_port=0
            )
            with in_background(pd_fleet((prefill, decode)), start_timeout_s=180) as up:
                for prompt in prompts:
                    before = stalled_s(up)
                    records = drive(gateway_url(up), model, prompt, n, seed=prompt)
                    stalls = (stalled_s(up) - before) / (n + 1)
                    ttft, tpot = _measured(records)
                    parts = []
                    for r in records:
                        tokens = r.usage_prompt_tokens
                        p = gpu_steps.step_cost(_prefill(r)).time_s
                        t = kv_transfer(gpu, link, tokens).exposed_s
                        first = PrefillChunk(1, tokens - 1)
                        s = wafer_steps.step_cost(Batch(prefill=[first])).time_s
                        parts.append((p, t, s, _decode_tpot_s(wafer_steps, tokens, OUTPUT)))
                    p, t, s, model_tpot = (float(np.median(x)) for x in zip(*parts, strict=True))
                    ref = reference[prompt]
                    tokens = float(np.mean([r.usage_prompt_tokens for r in records]))
                    rows.append(
                        {
                            "model": model,
                            "prefill_hw": f"{hw} x{gpu.devices}",
                            "decode_hw": f"{DECODE_HW} x{wafer.devices}",
                            "link": link.describe(),
                            "prompt": prompt,
                            "prompt_tokens": tokens,
                            "requests": len(records),
                            "ttft_ms": 1e3 * float(np.median(ttft)),
                            "prefill_ms": 1e3 * p,
                            "transfer_ms": 1e3 * t,
                            "first_step_ms": 1e3 * s,
                            "modelled_ttft_ms": 1e3 * (p + t + s),
                            "gateway_ms": 1e3 * ref["gateway_s"],
                            "stall_ms": 1e3 * stalls,
                            "reference_stall_ms": 1e3 * ref["stall_s"],
                            "tpot_ms": 1e3 * float(np.median(tpot)),
                            "modelled_tpot_ms": 1e3 * model_tpot,
                            "reference_tpot_ms": 1e3 * ref["tpot_s"],
                        }
                    )
    return rows
