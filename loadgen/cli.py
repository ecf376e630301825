"""`memorywall bench` and `memorywall bench compare`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from memorywall.loadgen import compare, prefix_workload, sessions
from memorywall.loadgen.bench import BenchConfig, ServerFacts, levels, run_level, write_level
from memorywall.loadgen.metrics import Slo, parse_slo
from memorywall.loadgen.target import Access, Backend
from memorywall.loadgen.workload import (
    SyntheticWorkload,
    TraceWorkload,
    Workload,
    parse_length,
)

if TYPE_CHECKING:  # the runner (asyncio, process pools) loads where a level runs
    from memorywall.loadgen.runner import WorkerPool

DEFAULT_TARGETS = {
    Backend.MEMORYWALL_GRPC: "127.0.0.1:50051",
    Backend.OPENAI_COMPLETIONS: "http://127.0.0.1:8000",  # vLLM's default port
    Backend.OPENAI_CHAT: "http://127.0.0.1:8000",
    Backend.KSERVE_GRPC: "127.0.0.1:8001",  # Triton's default ports
    Backend.KSERVE_HTTP: "http://127.0.0.1:8000",
    Backend.SGLANG_GRPC: "127.0.0.1:50051",
    Backend.VLLM_GRPC: "127.0.0.1:50051",
    Backend.TRTLLM_GRPC: "127.0.0.1:50051",
}
# An OpenAI server counts as the memorywall emulator when its /v1/models entry says so.
EMULATOR_OWNER = "memorywall"


class BenchError(Exception):
    """A problem found before any load is sent; the CLI prints it and exits 2."""


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Validate everything before any load is sent."""
    workload, slo = workload_from_args(args)
    backend = Backend(args.backend)
    target = _target(backend, args.target or DEFAULT_TARGETS[backend])
    if args.model is not None and not backend.names_model:
        raise BenchError(
            f"--model is for the OpenAI backends and the KServe ones; {backend} asks the server"
        )
    return sweep_config(
        args,
        workload,
        slo,
        target=target,
        backend=backend,
        model=args.model,
        workers=args.workers,
        timeout_s=args.timeout,
        access=Access(
            tls=args.tls,
            tls_ca=args.tls_ca,
            api_key=args.api_key,
            otlp_endpoint=_otlp(args.otlp_endpoint),
        ),
    )


def _otlp(endpoint: str | None) -> str | None:
    """The endpoint, once the [otel] extra is known to be installed."""
    if endpoint is not None:
        from importlib.util import find_spec

        try:
            found = find_spec("opentelemetry.sdk") and find_spec(
                "opentelemetry.exporter.otlp.proto.http"
            )
        except ModuleNotFoundError:
            found = None
        if not found:
            raise BenchError(
                "--otlp-endpoint needs OpenTelemetry's SDK and OTLP/HTTP exporter: "
                "pip install 'memorywall[otel]'"
            )
    return endpoint


def workload_from_args(args: argparse.Namespace) -> tuple[Workload, Slo | None]:
    """The workload and SLO of the shared load options (`options.add_load_arguments`)."""
    try:
        workload: Workload
        if args.workload and str(args.workload).startswith(f"{prefix_workload.SCHEME}:"):
            workload = prefix_workload.parse_shared_prefix(
                str(args.workload), parse_length(args.input_len), parse_length(args.output_len)
            )
        elif args.workload and str(args.workload).startswith(f"{sessions.SCHEME}:"):
            workload = sessions.parse_multi_turn(
                str(args.workload), parse_length(args.input_len), parse_length(args.output_len)
            )
        elif args.workload:
            # getattr: `plan` passes a namespace of the options it has (no block size).
            block = getattr(args, "trace_block_size", None)
            workload = TraceWorkload.from_jsonl(
                args.workload, **({} if block is None else {"block_tokens": block})
            )
        else:
            workload = SyntheticWorkload(
                parse_length(args.input_len), parse_length(args.output_len)
            )
        slo = parse_slo(args.slo) if args.slo else None
    except (ValueError, OSError) as e:
        raise BenchError(str(e)) from None
    if args.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {args.warmup}")
    if getattr(args, "trace_block_size", None) is not None and not isinstance(
        workload, TraceWorkload
    ):
        raise BenchError("--trace-block-size is for a JSONL trace --workload (its hash_ids)")
    return workload, slo


def sweep_config(
    args: argparse.Namespace, workload: Workload, slo: Slo | None, **endpoint
) -> BenchConfig:
    """A sweep of the shared load options; `endpoint` names the target and how to reach it."""
    trace_arrivals = isinstance(workload, TraceWorkload) and workload.has_arrivals
    concurrency = args.concurrency or (() if args.request_rate or trace_arrivals else (1,))
    if isinstance(workload, TraceWorkload):
        num = min(args.num_prompts or len(workload), len(workload))
    else:
        num = args.num_prompts or 100
    return BenchConfig(
        workload=workload,
        num_prompts=num,
        concurrency=concurrency,
        request_rates=args.request_rate or (),
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        duration_s=args.duration,
        warmup=args.warmup,
        seed=args.seed,
        slo=slo,
        label=args.label,
        **endpoint,
    )


def _target(backend: Backend, target: str) -> str:
    """A gRPC host:port or a normalised base URL, whichever `backend` needs."""
    if not backend.takes_url:
        if target.startswith(("http://", "https://")):
            raise BenchError(
                f"--target {target} is a URL, but {backend} takes host:port; "
                "for an HTTP server use --backend openai-completions, openai-chat or kserve-http"
            )
        return target
    if "://" not in target:
        raise BenchError(
            f"--backend {backend} takes a URL such as http://{target}, got --target {target}"
        )
    from memorywall.loadgen.openai_target import base_url

    try:
        return base_url(target)
    except ValueError as e:
        raise BenchError(f"--target: {e}") from None


def server_facts(config: BenchConfig) -> ServerFacts:
    """Ask the server what it is; unreachable is an error before any load."""
    if config.backend.is_openai:
        return openai_server_facts(config.target, config.model, config.access)
    if config.backend in (Backend.KSERVE_GRPC, Backend.KSERVE_HTTP):
        from memorywall.loadgen.kserve_facts import KServeUnreachable, kserve_server_facts

        try:
            return kserve_server_facts(config.backend, config.target, config.model, config.access)
        except KServeUnreachable as e:
            raise BenchError(str(e)) from None
    if config.backend.is_smg_worker:
        return smg_worker_facts(config.backend, config.target, config.access)
    return grpc_server_facts(config.target, config.access)


def openai_server_facts(base: str, model: str | None, access: Access | None = None) -> ServerFacts:
    """The served model from `GET /v1/models` (`model`, or the first listed).

    The server is taken for the memorywall emulator only when that model's entry has
    `owned_by: "memorywall"`; its optional `hardware` and `devices` fields then feed the
    core's prediction. Any other server (vLLM says `owned_by: "vllm"`) is not emulated.
    """
    import asyncio

    from memorywall.loadgen.openai_target import EndpointError, fetch_models

    try:
        models = asyncio.run(fetch_models(base, access=access))
    except EndpointError as e:
        raise BenchError(f"cannot use an OpenAI-compatible server at {base}: {e}") from None
    ids = [m["id"] for m in models]
    if model is None:
        entry = models[0]
    elif model in ids:
        entry = models[ids.index(model)]
    else:
        raise BenchError(f"--model {model} is not served at {base}; it serves {', '.join(ids)}")
    if entry.get("owned_by") != EMULATOR_OWNER:
        return ServerFacts(model=entry["id"], emulated=False)
    hardware, devices = entry.get("hardware"), entry.get("devices", 1)
    return ServerFacts(
        hardware=hardware if isinstance(hardware, str) else None,
        model=entry["id"],
        devices=devices if isinstance(devices, int) and devices > 0 else 1,
        emulated=True,
    )


def grpc_server_facts(target: str, access: Access | None = None) -> ServerFacts:
    """Ask a memorywall gRPC server what it emulates."""
    import asyncio

    from memorywall.client import ClientError

    async def ask() -> ServerFacts:
        async with (access or Access()).client(target, timeout_s=5.0) as client:
            if not await client.health():
                raise BenchError(f"server at {target} is not serving")
            info = await client.model_info()
        return ServerFacts(
            hardware=info.hardware, model=info.model, devices=info.devices, emulated=True
        )

    try:
        return asyncio.run(ask())
    except ClientError as e:
        raise BenchError(f"cannot reach a memorywall server at {target} ({e.code.name})") from None


def smg_worker_facts(backend: Backend, target: str, access: Access | None = None) -> ServerFacts:
    """The served model, from the worker service's own GetModelInfo. The worker counts as
    the memorywall emulator (its hardware feeding the core's prediction) only when the
    same port also answers memorywall.v1 (`serve --grpc-services memorywall,vllm`)."""
    import asyncio

    import grpc

    from memorywall.client import ClientError
    from memorywall.loadgen.smg_target import SmgWorkerTarget

    access = access or Access()

    async def ask() -> ServerFacts:
        worker = SmgWorkerTarget(target, backend, timeout_s=5.0, access=access)
        try:
            await worker.connect()
            model = await worker.model_name()
        finally:
            await worker.aclose()
        try:
            async with access.client(target, timeout_s=5.0) as client:
                info = await client.model_info()
        except ClientError:  # another engine, or memorywall.v1 not on this port
            return ServerFacts(model=model, emulated=False)
        return ServerFacts(
            hardware=info.hardware, model=info.model, devices=info.devices, emulated=True
        )

    try:
        return asyncio.run(ask())
    except grpc.aio.AioRpcError as e:
        raise BenchError(
            f"cannot reach a {backend} worker at {target} ({e.code().name}: {e.details()})"
        ) from None


def run(args: argparse.Namespace, *, pool: WorkerPool | None = None) -> int:
    """The sweep `args` asks for; with `pool` (`bench --ray`) its workers run there."""
    config = config_from_args(args)
    facts = server_facts(config)
    if config.backend.names_model:
        config = dataclasses.replace(config, model=facts.model)
    results = []
    for level in levels(config):
        result, records = run_level(config, level, facts, pool=pool)
        results.append(result)
        print(format_result(result), flush=True)
        if args.out:
            write_level(args.out, result, records)
    if args.out:
        write_sweep(args.out, config.label, results, plot=args.plots)
        print(f"wrote {args.out}/")
    return 0


def write_sweep(out: Path, label: str, results: list[dict], *, plot: bool = True) -> None:
    """The sweep's summary and, with `plot`, its plots (each level's files are written as
    it ends); the plots name the sweep as `bench compare` would."""
    (out / compare.SUMMARY).write_text(json.dumps(results, indent=2))
    if not plot:
        return
    from memorywall.loadgen import plots  # matplotlib: half a second to import

    named = label if label != compare.BENCH_DEFAULT_LABEL else compare.describe(results, out)
    sweeps = [(named, results)]
    plots.latency_vs_load(sweeps, out / "latency_vs_load.png")
    plots.throughput_vs_interactivity(sweeps, out / "throughput_vs_interactivity.png")


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.2f} ms"


def _load_label(r: dict) -> str:
    if r["request_rate"]:
        return f"rate {r['request_rate']:g}/s"
    if r["max_concurrency"]:
        return f"concurrency {r['max_concurrency']}"
    return "trace replay"


def format_result(r: dict) -> str:
    """A readable summary of one level, measured beside modelled and predicted."""
    load = _load_label(r)
    server = r["hardware"] or r.get("model") or "server"
    head = f"== {r['label']} · {load} · {server} x{r['devices']}"
    if r.get("simulated"):
        head += " (simulated)"
    elif r["emulated"]:
        head += " (emulated)"
    rows = [
        ("requests", f"{r['completed']} completed, {r['failed']} failed"),
        ("duration", f"{r['duration']:.2f} s" if r["duration"] else "n/a"),
        ("output tok/s", f"{r['output_throughput']:,.1f}" if r["output_throughput"] else "n/a"),
        ("request/s", f"{r['request_throughput']:,.2f}" if r["request_throughput"] else "n/a"),
    ]
    if r.get("request_goodput") is not None:
        rows.append(("goodput req/s", f"{r['request_goodput']:,.2f}"))
    header = ("metric", "mean", "p50", "p99", "modelled", "predicted")
    table = [header]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E")):
        table.append(
            (
                label,
                _ms(r.get(f"mean_{name}_ms")),
                _ms(r.get(f"p50_{name}_ms")),
                _ms(r.get(f"p99_{name}_ms")),
                _ms(r.get(f"mean_modelled_{name}_ms")),
                _ms(r.get(f"predicted_{name}_ms")),
            )
        )
    if r.get("mean_send_lag_ms") is not None:
        table.append(
            (
                "send lag",
                _ms(r["mean_send_lag_ms"]),
                _ms(r["p50_send_lag_ms"]),
                _ms(r["p99_send_lag_ms"]),
                "",
                "",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [head]
    lines += [f"  {k:<14} {v}" for k, v in rows]
    lines += [
        "  "
        + "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in table
    ]
    if r.get("error_counts"):
        lines += [f"  error x{n}: {e}" for e, n in r["error_counts"].items()]
    lines += [f"  SUSPECT: {s}" for s in r["suspect"]]
    return "\n".join(lines)
