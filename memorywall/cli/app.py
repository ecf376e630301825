"""The `memorywall` command: predict, hardware, models.

Every error a user can cause prints one line, `memorywall: error: ...`, and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from memorywall.argtypes import (
    fraction,
    nonnegative_int,
    number_list,
    port,
    positive_float,
    positive_int,
)
from memorywall.cli import pd_options, serve_options
from memorywall.core import (
    Placement,
    Precision,
    Speculative,
    builtin_hardware,
    builtin_models,
    load_hardware,
    load_model,
    plan_deployment,
    predict,
)
from memorywall.core.deployment import Deployment
from memorywall.core.predict import Prediction
from memorywall.errors import MemorywallError

if TYPE_CHECKING:
    from memorywall.server.engine.scheduler import EngineConfig

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but every error is one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def add_deployment_arguments(p: argparse.ArgumentParser) -> None:
    """The options that choose hardware, model and layout; shared by predict and serve."""
    p.add_argument("--hardware", required=True, help="built-in name or profile .toml path")
    p.add_argument("--model", required=True, help="built-in name or HF config.json path")
    p.add_argument("--devices", type=positive_int, help="device count (default: fewest that fit)")
    precisions = [x.value for x in Precision]
    p.add_argument("--weight-precision", default="bf16", choices=precisions)
    p.add_argument("--kv-precision", default="bf16", choices=precisions)
    p.add_argument(
        "--placement",
        default="sram",
        choices=["sram", "resident", "stream"],
        help="weights resident in device memory (sram = resident), or streamed over external I/O",
    )
    p.add_argument(
        "--draft-tokens", type=positive_int, help="speculative decoding: drafts per step"
    )
    p.add_argument("--acceptance", type=fraction, default=0.7, help="speculative acceptance rate")
    p.add_argument("--draft-model", help="speculative draft model (default: free drafting)")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The engine's batching options; shared by serve and simulate."""
    p.add_argument("--max-num-seqs", type=positive_int, default=256, help="running batch limit")
    p.add_argument(
        "--max-num-batched-tokens", type=positive_int, default=8192, help="token budget per step"
    )
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="recompute every prompt in full (default: reuse cached KV of shared prefixes)",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    # Imported here: predict/hardware/models do not need the engine.
    from memorywall.server.engine.scheduler import EngineConfig

    return EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
        enable_prefix_caching=args.prefix_caching,
    )


def deployment_from_args(args: argparse.Namespace) -> Deployment:
    speculative = None
    if args.draft_tokens:
        speculative = Speculative(
            draft_tokens=args.draft_tokens,
            acceptance_rate=args.acceptance,
            draft_model=load_model(args.draft_model) if args.draft_model else None,
        )
    elif args.draft_model:
        raise _UsageError("--draft-model needs --draft-tokens")
    return plan_deployment(
        load_hardware(args.hardware),
        load_model(args.model),
        devices=args.devices,
        weight_precision=Precision(args.weight_precision),
        kv_precision=Precision(args.kv_precision),
        placement=Placement.parse(args.placement),
        speculative=speculative,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    # Imported here: predict/hardware/models need neither grpc nor asyncio.
    import asyncio
    import logging

    from memorywall.server.app import ServerConfig, serve_forever

    budget = {"max_messages_per_s": args.max_messages_per_s} if args.max_messages_per_s else {}
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    deployment = deployment_from_args(args)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        grpc=args.grpc,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        tokenizer=args.tokenizer,
        grace_s=args.grace,
        **budget,
        **serve_options.server_options(args),
        **pd_options.server_options(args, deployment),
    )
    try:
        if args.api_servers > 1:
            from memorywall.server.multi.procs import serve_processes

            return serve_processes(
                deployment,
                engine_config_from_args(args),
                config,
                api_servers=args.api_servers,
                ready_file=args.ready_file,
                log_level=args.log_level,
            )
        asyncio.run(
            serve_forever(
                deployment, engine_config_from_args(args), config, ready_file=args.ready_file
            )
        )
    except OSError as e:
        raise _UsageError(str(e)) from None
    return 0


def _cmd_fleet(args: argparse.Namespace) -> int:
    # Imported here: only `fleet` starts processes.
    from memorywall.fleet.runner import load_spec, run

    return run(load_spec(args.spec), args.log_dir, ready_file=args.ready_file)


def _cmd_demo(args: argparse.Namespace) -> int:
    # Imported here: only `demo` starts servers and the load generator.
    from memorywall.demo.runner import DemoConfig, run

    config = DemoConfig(
        hardware=tuple(h for h in args.hardware.split(",") if h),
        model=args.model,
        levels=args.levels,
        prompt_tokens=args.input_len,
        output_tokens=args.output_len,
        out=args.out or Path(time.strftime("memorywall-demo-%Y%m%d-%H%M%S")),
        keep_serving=args.keep_serving,
    )
    return run(config)


def _cmd_bench(args: argparse.Namespace) -> int:
    from memorywall.loadgen.cli import BenchError, run

    try:
        return run(args)
    except BenchError as e:
        raise _UsageError(str(e)) from None


def _cmd_simulate(args: argparse.Namespace) -> int:
    from memorywall.cli.simulate import run
    from memorywall.loadgen.cli import BenchError
    from memorywall.sim.pd import fleet_from_args

    deployment, engine_config = deployment_from_args(args), engine_config_from_args(args)
    try:
        fleet = fleet_from_args(args, deployment, engine_config)
        return run(args, deployment, engine_config, fleet=fleet)
    except BenchError as e:
        raise _UsageError(str(e)) from None


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from memorywall.cli.calibrate import CalibrateError, run

    try:
        return run(args, deployment_from_args(args), engine_config_from_args(args))
    except CalibrateError as e:
        raise _UsageError(str(e)) from None


def _cmd_plan(args: argparse.Namespace) -> int:
    from memorywall.cli.plan import PlanError, run

    try:
        return run(args)
    except PlanError as e:
        raise _UsageError(str(e)) from None


def _compare_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="memorywall bench compare", description="compare saved bench sweeps")
    p.add_argument("paths", nargs="+", type=Path, help="--out folders (or summary.json files)")
    p.add_argument("--out", type=Path, help="write comparison plots here")
    p.add_argument(
        "--label",
        type=lambda text: text.split(","),
        help="names for the sweeps, comma-separated, one per path (default: what each "
        "measured, e.g. 'wse-3 x1 llama-3.1-8b')",
    )
    return p


def _cmd_compare(argv: Sequence[str]) -> int:
    from memorywall.loadgen.compare import CompareError, compare

    args = _compare_parser().parse_args(argv)
    try:
        return compare(args.paths, args.out, args.label)
    except CompareError as e:
        raise _UsageError(str(e)) from None


def _cmd_predict(args: argparse.Namespace) -> int:
    p = predict(
        deployment_from_args(args), batch=args.batch, context=args.context, prompt=args.prompt
    )
    if args.json:
        print(json.dumps(p.as_dict(), indent=2))
    else:
        print(format_prediction(p))
    return 0


def format_prediction(p: Prediction) -> str:
    d = p.decode
    rows = [
        ("deployment", p.deployment.describe()),
        ("decode step", f"{d.time_s * 1e3:.3f} ms  (batch {p.batch}, context {p.context})"),
        ("bound", d.bound.value),
        ("per-user speed", f"{p.tokens_per_s_per_user:,.1f} tok/s"),
        ("total speed", f"{p.tokens_per_s_total:,.1f} tok/s"),
    ]
    if p.prefill is not None:
        rows += [
            (
                "prefill",
                f"{p.prefill.time_s * 1e3:.3f} ms  "
                f"({p.prompt} tokens, {p.prefill.bound.value}-bound)",
            ),
            ("TTFT", f"{p.ttft_s * 1e3:.3f} ms"),
        ]
    rows += [
        ("energy per token", f"{p.energy_j_per_token:.4g} J"),
        ("KV capacity", f"{p.deployment.kv_capacity_tokens:,} tokens"),
        ("", ""),
        ("step breakdown", ""),
        (
            "  memory",
            f"{d.memory_s * 1e3:.4f} ms  "
            f"({d.weight_bytes / 1e9:.2f} GB weights, {d.kv_bytes / 1e9:.3f} GB KV)",
        ),
        ("  weight stream", f"{d.stream_s * 1e3:.4f} ms"),
        ("  compute", f"{d.compute_s * 1e3:.4f} ms  ({d.flops / 1e12:.3f} TFLOP)"),
        ("  latency floors", f"{d.latency_s * 1e3:.4f} ms"),
        ("  interconnect", f"{d.comm_s * 1e3:.4f} ms  ({d.link_bytes / 1e6:.3f} MB)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(f"{h:<{w}}" for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _cmd_hardware(args: argparse.Namespace) -> int:
    rows = []
    for name in builtin_hardware():
        hw = load_hardware(name)
        peaks = ", ".join(f"{p.value} {v / 1e15:g}" for p, v in hw.peak_flops_per_s.items())
        rows.append(
            (
                name,
                hw.kind.value,
                f"{hw.resident.capacity_bytes / 1e9:g} GB {hw.resident.name}",
                f"{hw.resident.bandwidth_bytes_per_s / 1e12:g} TB/s",
                f"{peaks} PF",
                f"{hw.external_io.bandwidth_bytes_per_s / 1e9:g} GB/s",
                f"{hw.tdp_w:g} W",
                hw.description,
            )
        )
    print(
        _table(
            (
                "name",
                "kind",
                "memory",
                "bandwidth",
                "dense peak",
                "external I/O",
                "power",
                "description",
            ),
            rows,
        )
    )
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    rows = []
    for name in builtin_models():
        m = load_model(name)
        kinds = ["MoE" if m.moe else "dense", "MLA" if m.mla else "GQA"]
        if m.n_window_layers:
            kinds.append(f"{m.n_window_layers} windowed layers")
        kv = m.n_layers * m.kv_values_per_token_per_layer() * 2
        rows.append(
            (
                name,
                str(m.n_layers),
                str(m.hidden_size),
                f"{m.n_heads}/{m.n_kv_heads}",
                f"{m.total_params() / 1e9:.1f} B",
                f"{m.active_params_per_token() / 1e9:.1f} B",
                f"{kv:,}",
                f"{m.max_context:,}",
                ", ".join(kinds),
            )
        )
    print(
        _table(
            (
                "name",
                "layers",
                "hidden",
                "q/kv heads",
                "params",
                "active",
                "KV B/token bf16",
                "context",
                "kind",
            ),
            rows,
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memorywall", description="LLM serving emulator: wafer-scale vs GPU.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("predict", help="predict step time, speed, TTFT and energy for a deployment")
    add_deployment_arguments(p)
    p.add_argument("--batch", type=positive_int, default=1, help="sequences decoding together")
    p.add_argument(
        "--context", type=nonnegative_int, default=1024, help="cached tokens per sequence"
    )
    p.add_argument("--prompt", type=positive_int, help="prompt tokens to prefill (gives TTFT)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "serve", help="run the emulated serving engine (gRPC, and OpenAI-compatible HTTP)"
    )
    add_deployment_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=50051, help="gRPC port (0: any free port)")
    p.add_argument(
        "--http-port",
        type=port,
        help="also serve the OpenAI API (/v1/completions, /v1/chat/completions, /metrics) here",
    )
    p.add_argument(
        "--no-grpc", dest="grpc", action="store_false", help="serve HTTP only (needs --http-port)"
    )
    p.add_argument("--metrics-port", type=port, help="serve Prometheus /metrics alone on this port")
    p.add_argument(
        "--tokenizer",
        type=Path,
        help="local Hugging Face tokenizer.json (or its folder) to count HTTP prompt text "
        "(needs the `tokenizers` package; default ~4 characters per token)",
    )
    add_engine_arguments(p)
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed for synthetic tokens")
    p.add_argument(
        "--grace", type=positive_float, default=5.0, help="seconds to drain on SIGINT/SIGTERM"
    )
    p.add_argument(
        "--max-messages-per-s",
        type=positive_float,
        help="message budget ceiling (default 40000); the server groups tokens per message "
        "above it, or below it when the host falls behind",
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        help="once every port is bound, write a JSON file here (pid, addresses, hardware, "
        "model, devices, limits); removed on exit",
    )
    p.add_argument(
        "--api-servers",
        type=positive_int,
        default=1,
        help="front-end processes around one engine process, all on the same ports "
        "(SO_REUSEPORT), like vLLM's --api-server-count (default 1: one process)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve_options.add_arguments(p)
    pd_options.add_arguments(p)
    p.set_defaults(func=_cmd_serve)

    from memorywall.demo import runner as demo

    p = sub.add_parser(
        "demo",
        help="start an emulated wafer and GPU, load both, and show what their users get",
    )
    p.add_argument(
        "--hardware",
        default=",".join(demo.DEFAULT_HARDWARE),
        help="profiles, comma-separated (default: %(default)s)",
    )
    p.add_argument(
        "--model",
        default=demo.DEFAULT_MODEL,
        help="model every server serves (default: %(default)s)",
    )
    p.add_argument(
        "--levels",
        type=number_list(int, low=1),
        default=demo.DEFAULT_LEVELS,
        help=f"closed-loop users per level (default: {','.join(map(str, demo.DEFAULT_LEVELS))})",
    )
    p.add_argument(
        "--input-len",
        type=positive_int,
        default=demo.DEFAULT_PROMPT_TOKENS,
        help="prompt tokens (default: %(default)s)",
    )
    p.add_argument(
        "--output-len",
        type=positive_int,
        default=demo.DEFAULT_OUTPUT_TOKENS,
        help="output tokens per request (default: %(default)s)",
    )
    p.add_argument(
        "--keep-serving",
        action="store_true",
        help="leave the servers up afterwards and print how to point tools at them",
    )
    p.add_argument(
        "--out", type=Path, help="results folder (default: ./memorywall-demo-<date>-<time>)"
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "fleet", help="run several emulated workers from a TOML spec, optionally behind smg"
    )
    p.add_argument("spec", type=Path, help="fleet .toml: [[worker]] tables, optional [gateway]")
    p.add_argument(
        "--log-dir", type=Path, help="write <name>.log per process here (default: a temp dir)"
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        help="once every worker (and the gateway) answers, write a JSON file here: each "
        "worker's addresses and devices, the gateway's URL; removed on exit",
    )
    p.set_defaults(func=_cmd_fleet)

    p = sub.add_parser(
        "bench",
        help="measure TTFT and tokens/s under load (`memorywall bench compare DIR...` to compare)",
    )
    from memorywall.loadgen.options import add_arguments

    add_arguments(p)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "simulate",
        help="the bench workload on the serving engine on a virtual clock: bench's result "
        "files, far faster than real time",
    )
    add_deployment_arguments(p)
    add_engine_arguments(p)
    from memorywall.loadgen.options import add_load_arguments

    add_load_arguments(p)
    from memorywall.sim.pd import add_arguments as add_pd_arguments

    add_pd_arguments(p)
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="levels simulated at once, each in its own process (same results; default 1)",
    )
    p.set_defaults(func=_cmd_simulate, label="sim")

    p = sub.add_parser(
        "calibrate",
        help="fit a hardware profile's efficiencies to your own runs (step times, bench results)",
    )
    add_deployment_arguments(p)
    add_engine_arguments(p)
    from memorywall.cli.calibrate import add_arguments as add_calibrate_arguments

    add_calibrate_arguments(p)
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser(
        "plan",
        help="cheapest deployment per backend that holds a latency SLO (simulated search)",
    )
    from memorywall.cli.plan import add_arguments as add_plan_arguments

    add_plan_arguments(p)
    p.set_defaults(func=_cmd_plan)

    sub.add_parser("hardware", help="list built-in hardware profiles").set_defaults(
        func=_cmd_hardware
    )
    sub.add_parser("models", help="list built-in models").set_defaults(func=_cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:2] == ["bench", "compare"]:
            return _cmd_compare(argv[2:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (_UsageError, MemorywallError) as e:
        print(f"memorywall: error: {e}", file=sys.stderr)
        return EXIT_USAGE
