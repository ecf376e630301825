"""A benchmark sweep: for each load level, plan the requests, run them, compute the metrics,
check the client kept up, and put the core's prediction beside what was measured."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from memorywall.loadgen import arrivals, sessions
from memorywall.loadgen.metrics import RunMetrics, Slo, compute_metrics
from memorywall.loadgen.plan import LoadPlan
from memorywall.loadgen.records import (
    MessageTimes,
    RequestRecord,
    RequestSpec,
    TokenTimes,
    write_requests,
)
from memorywall.loadgen.target import Access, Backend, TargetConfig
from memorywall.loadgen.workload import TraceWorkload, Workload

if TYPE_CHECKING:  # the runner (asyncio, process pools) is imported where a level runs
    from memorywall.loadgen.runner import WorkerPool, WorkerResult

# A run whose client fell behind is marked suspect rather than reported as fact.
# Host stalls beyond this share of a level's run mark it suspect (`HostStallWatch`).
MAX_STALLED_FRACTION = 0.05
MAX_CLIENT_CPU_FRACTION = 0.90
MAX_SEND_LAG_P99_S = 0.005
# Against the emulator: measured TTFT this far above the modelled one means queueing
# before the server saw the request (transport, client), a measurement artefact.
MAX_TTFT_GAP_MS = 10.0
MAX_TTFT_GAP_FRACTION = 0.5


@dataclass(frozen=True, kw_only=True)
class ServerFacts:
    """What the target says about itself (emulator) and what the core predicts for it."""

    hardware: str | None = None
    model: str | None = None
    devices: int = 1
    emulated: bool = False


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    target: str  # host:port (gRPC) or base URL (OpenAI backends)
    workload: Workload
    backend: Backend = Backend.MEMORYWALL_GRPC
    model: str | None = None  # OpenAI backends: the model every request names
    num_prompts: int
    concurrency: tuple[int, ...] = ()  # closed-loop sweep
    request_rates: tuple[float, ...] = ()  # open-loop sweep
    burstiness: float = 1.0
    max_concurrency: int | None = None
    duration_s: float | None = None
    warmup: int = 0
    seed: int = 0
    workers: int = 1
    slo: Slo | None = None
    timeout_s: float | None = None
    label: str = "run"
    access: Access = field(default_factory=Access)  # TLS and API key


@dataclass(frozen=True)
class Level:
    """One load level of a sweep."""

    name: str
    concurrency: int | None
    request_rate: float | None


def levels(config: BenchConfig) -> list[Level]:
    if config.request_rates:
        return [Level(f"rate{r:g}", config.max_concurrency, r) for r in config.request_rates]
    if isinstance(config.workload, TraceWorkload) and config.workload.has_arrivals:
        return [Level("trace", config.max_concurrency, None)]
    return [Level(f"c{c}", c, None) for c in config.concurrency]


def plan_level(config: BenchConfig, level: Level) -> LoadPlan:
    """The same requests at every level (one seed); arrivals drawn up front for open loop."""
    rng = np.random.default_rng(config.seed)
    specs = config.workload.specs(rng, config.num_prompts)
    warm_rng = np.random.default_rng(config.seed + 1)
    warmup = (
        [
            RequestSpec(-1 - i, s.prompt_tokens, s.output_tokens)
            for i, s in enumerate(config.workload.specs(warm_rng, config.warmup))
        ]
        if config.warmup
        else []
    )
    open_loop = level.request_rate is not None or level.name == "trace"
    if level.request_rate is not None and sessions.has_sessions(specs):
        specs = sessions.with_session_offsets(specs, level.request_rate, config.burstiness, rng)
    elif level.request_rate is not None:
        offsets = arrivals.gamma(level.request_rate, config.burstiness, len(specs), rng)
        specs = arrivals.with_offsets(specs, offsets)
    return LoadPlan(
        specs=tuple(specs),
        warmup=tuple(warmup),
        concurrency=level.concurrency,
        open_loop=open_loop,
        duration_s=config.duration_s,
        timeout_s=config.timeout_s,
    )


def run_level(
    config: BenchConfig, level: Level, facts: ServerFacts, *, pool: WorkerPool | None = None
) -> tuple[dict, list[RequestRecord]]:
    """Run one level; with `pool` (`bench --ray`) the `workers` run there."""
    # Imported here: `simulate` plans and summarises levels without the runner.
    from memorywall.loadgen.runner import (
        progress_printer,
        run_single,
        run_workers,
        run_workers_on,
    )

    plan = plan_level(config, level)
    show = progress_printer(len(plan.specs), f"{config.label} {level.name}")
    # One salt per level: fresh prompts (no cache hits carried over from the last level),
    # the same shared prefixes in every worker process.
    endpoint = TargetConfig(
        backend=config.backend,
        address=config.target,
        model=config.model,
        prompt_salt=secrets.randbits(63),
        access=config.access,
    )
    stalls = HostStallWatch(config, facts)
    started = time.perf_counter()
    if pool is not None:
        results = run_workers_on(pool, endpoint, plan, config.workers, progress=show)
    elif config.workers > 1:
        results = run_workers(endpoint, plan, config.workers, progress=show)
    else:
        results = [run_single(endpoint, plan, progress=show)]
    show(len(plan.specs))
    records = [r for w in results for r in w.records]
    metrics = compute_metrics(records, slo=config.slo)
    result = summarise(config, level, facts, metrics, results)
    result.update(stalls.report(time.perf_counter() - started, result["suspect"]))
    result.update(prefix_figures(config, records))
    return result, records


def stall_doubt(stalls: int, stalled_s: float, window_s: float) -> str | None:
    """Why a level's figures are the host's, when its stalls exceed the allowed share."""
    if stalled_s <= MAX_STALLED_FRACTION * window_s:
        return None
    return (
        f"the server's host stalled {stalls} times, moving its timeline "
        f"{stalled_s * 1e3:,.0f} ms later in {window_s:.1f} s: this machine could not "
        "keep the emulated pace"
    )


class HostStallWatch:
    """The emulator's own word on whether its host kept the modelled pace over a level.

    A memorywall server that wakes late moves its timeline later rather than deliver
    tokens early (`GetServerInfo.host_stall`); its modelled times then include the
    stall. A level whose stalls add up to more than `MAX_STALLED_FRACTION` of its run is
    marked suspect: the machine, not the emulated hardware, set its figures. Other
    servers (and OpenAI backends) report nothing here.
    """

    def __init__(self, config: BenchConfig, facts: ServerFacts) -> None:
        self._client = None
        self._before = None
        # memorywall.v1 answers on the port (a memorywall gRPC worker of any smg protocol).
        backend = config.backend
        if facts.emulated and (backend is Backend.MEMORYWALL_GRPC or backend.is_smg_worker):
            from memorywall.client import Client, ClientError

            access = config.access
            self._client = Client(
                config.target, timeout_s=10, tls=access.grpc_tls(), api_key=access.api_key
            )
            with contextlib.suppress(ClientError):
                self._before = self._client.server_info().host_stall

    def report(self, window_s: float, suspect: list[str]) -> dict:
        unknown = {"host_stalls": None, "host_stalled_s": None, "host_window_s": None}
        if self._client is None or self._before is None:
            return unknown
        from memorywall.client import ClientError

        try:
            with self._client:
                after = self._client.server_info().host_stall
        except ClientError:  # the server went away mid-level: its requests say so already
            return unknown
        stalls = after.stalls - self._before.stalls
        stalled_s = after.stalled_s - self._before.stalled_s
        if (doubt := stall_doubt(stalls, stalled_s, window_s)) is not None:
            suspect.append(doubt)
        return {"host_stalls": stalls, "host_stalled_s": stalled_s, "host_window_s": window_s}


def summarise(
    config: BenchConfig,
    level: Level,
    facts: ServerFacts,
    metrics: RunMetrics,
    results: list[WorkerResult],
    *,
    simulated: bool = False,
) -> dict:
    """vLLM's result keys, then the run's settings, the client's health and the core's view.

    A simulated level (`memorywall simulate`) has no client and no wall clock: its
    `backend` is "simulated", and `date`, `machine` and `client_cpu_fraction` are None, so
    the same seed gives the same file on every machine.
    """
    out = metrics.as_dict()
    cpu = max(w.cpu_s / w.wall_s for w in results if w.wall_s > 0) if results else None
    suspect = []
    if cpu is not None and cpu > MAX_CLIENT_CPU_FRACTION:
        suspect.append(f"client CPU {cpu:.0%} of a core: the load generator may be the bottleneck")
    lag = out.get("p99_send_lag_ms")
    if lag is not None and lag / 1e3 > MAX_SEND_LAG_P99_S:
        suspect.append(f"p99 send lag {lag:.1f} ms: requests left later than scheduled")
    if metrics.failed:
        suspect.append(f"{metrics.failed} requests failed")
    gap = _ttft_gap_ms(out)
    if (
        gap is not None
        and gap > MAX_TTFT_GAP_MS
        and gap > MAX_TTFT_GAP_FRACTION * out["mean_modelled_ttft_ms"]
    ):
        suspect.append(
            f"mean TTFT {gap:.0f} ms above the server's modelled TTFT: requests queued in "
            "transport or in the client, not on the emulated hardware"
        )
    out.update(
        {
            "label": config.label,
            "level": level.name,
            "target": config.target,
            "backend": "simulated" if simulated else str(config.backend),
            "max_concurrency": level.concurrency,
            "request_rate": level.request_rate,
            "burstiness": config.burstiness if level.request_rate is not None else None,
            "num_prompts": config.num_prompts,
            "workers": config.workers,
            "seed": config.seed,
            "hardware": facts.hardware,
            "model": facts.model,
            "devices": facts.devices,
            "emulated": facts.emulated,
            "simulated": simulated,
            "client_cpu_fraction": cpu,
            # The emulator's host stalls over the level: filled by `run_level` for a
            # memorywall gRPC target, None otherwise (simulated levels have no host).
            "host_stalls": None,
            "host_stalled_s": None,
            "host_window_s": None,
            "suspect": suspect,
            "date": None if simulated else time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": None if simulated else machine(),
        }
    )
    out.update(_overheads(out))
    out.update(predicted(facts, config, level, out))
    return out


def prefix_figures(config: BenchConfig, records: list[RequestRecord]) -> dict:
    """`prefix_hit_rate` for workloads whose prompts share tokens by design (trace hash
    ids, sessions); nothing for the others, whose result files stay as they were."""
    if not sessions.reports_prefix_hits(config.workload):
        return {}
    return {"prefix_hit_rate": sessions.prefix_hit_rate(records)}


def machine() -> str:
    """The host, for result files: where wall-clock figures were taken."""
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def _ttft_gap_ms(out: dict) -> float | None:
    if out.get("mean_ttft_ms") is None or out.get("mean_modelled_ttft_ms") is None:
        return None
    return out["mean_ttft_ms"] - out["mean_modelled_ttft_ms"]


def _overheads(out: dict) -> dict:
    """How far the client's clock is from the server's plan: transport plus client overhead."""
    pairs = {
        "client_overhead_ttft_ms": ("mean_ttft_ms", "mean_modelled_ttft_ms"),
        "client_overhead_tpot_ms": ("mean_tpot_ms", "mean_modelled_tpot_ms"),
    }
    return {
        key: None if out.get(m) is None or out.get(p) is None else out[m] - out[p]
        for key, (m, p) in pairs.items()
    }


def predicted(facts: ServerFacts, config: BenchConfig, level: Level, out: dict) -> dict:
    """The core's steady-state numbers for this load: a decode batch of the users in flight
    at the measured mean context, and the prefill of the mean prompt."""
    empty = {"predicted_tpot_ms": None, "predicted_ttft_ms": None, "predicted_e2el_ms": None}
    if not facts.emulated or facts.hardware is None or facts.model is None:
        return empty
    if not out.get("completed"):
        return empty
    from memorywall.core import load_hardware, load_model, plan_deployment, predict
    from memorywall.errors import MemorywallError

    try:
        deployment = plan_deployment(
            load_hardware(facts.hardware), load_model(facts.model), devices=facts.devices
        )
        prompt = max(1, round(out["total_input_tokens"] / out["completed"]))
        output = max(1, round(out["total_output_tokens"] / out["completed"]))
        in_flight = level.concurrency
        if in_flight is None and out.get("mean_e2el_ms") is not None:
            # Little's law: requests in flight = arrival rate x time in the system.
            in_flight = out["request_throughput"] * out["mean_e2el_ms"] / 1e3
        batch = max(1, round(in_flight or 1))
        p = predict(deployment, batch=batch, context=prompt + output // 2, prompt=prompt)
    except MemorywallError:
        return empty
    assert p.ttft_s is not None, "a prediction given a prompt has a prefill"
    tpot_s = p.decode_step_s / p.tokens_per_decode_step
    return {
        "predicted_tpot_ms": tpot_s * 1e3,
        "predicted_ttft_ms": p.ttft_s * 1e3,
        "predicted_e2el_ms": (p.ttft_s + (output - 1) * tpot_s) * 1e3,
    }


def write_level(
    out_dir: Path,
    result: dict,
    records: list[RequestRecord],
    *,
    token_times: TokenTimes = "jsonl",
    messages: MessageTimes | None = None,
) -> None:
    """A level's result file and per-request file (`records.write_requests`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{result['label']}-{result['level']}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    write_requests(out_dir, stem, records, token_times=token_times, messages=messages)
