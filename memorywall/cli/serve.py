"""`memorywall serve`: the emulated serving engine behind gRPC and OpenAI-compatible HTTP."""

from __future__ import annotations

import argparse
from pathlib import Path

from memorywall.argtypes import (
    nonnegative_int,
    otlp_endpoint,
    port,
    positive_float,
    positive_int,
    stream_interval,
)
from memorywall.cli import pd_options, serve_options
from memorywall.cli.deployment import (
    add_deployment_arguments,
    add_engine_arguments,
    engine_config_from_args,
    names_from_args,
)
from memorywall.cli.usage import Parser, UsageError
from memorywall.core.deployment import Deployment
from memorywall.server.config import LOAD_FORMATS, ServerConfig
from memorywall.server.engine.scheduler import EngineConfig

HELP = "run the emulated serving engine (gRPC, and OpenAI-compatible HTTP)"
_SERVER = ServerConfig()  # its defaults are serve's


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help=HELP)
    add_arguments(p)
    p.set_defaults(func=command)


def build_parser() -> Parser:
    """`memorywall serve`'s options alone: the schema of a worker (a fleet's `[[worker]]`
    tables are checked by parsing them with it)."""
    p = Parser(prog="memorywall serve", description=HELP)
    add_arguments(p)
    return p


def grpc_services(text: str) -> tuple[str, ...]:
    """argparse type for `--grpc-services`."""
    from memorywall.server.grpc_services import parse_services

    try:
        return parse_services(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_deployment_arguments(p)
    p.add_argument("--host", default=_SERVER.host, help=f"address to bind (default {_SERVER.host})")
    p.add_argument("--port", type=port, default=_SERVER.port, help="gRPC port (0: any free port)")
    p.add_argument(
        "--http-port",
        type=port,
        help="also serve the OpenAI API (/v1/completions, /v1/chat/completions, /metrics) here",
    )
    p.add_argument(
        "--no-grpc", dest="grpc", action="store_false", help="serve HTTP only (needs --http-port)"
    )
    p.add_argument(
        "--grpc-services",
        type=grpc_services,
        default=_SERVER.grpc_services,
        metavar="LIST",
        help="worker protocols on the gRPC port, comma-separated: memorywall, sglang, vllm, "
        "trtllm, kserve; one of sglang/vllm/trtllm at most, so a gateway that detects the "
        f"engine by its services sees one (default: {','.join(_SERVER.grpc_services)})",
    )
    p.add_argument("--metrics-port", type=port, help="serve Prometheus /metrics alone on this port")
    p.add_argument(
        "--dcgm-port",
        type=port,
        help="serve an emulated NVIDIA dcgm-exporter (/metrics: per-device power, energy, "
        "utilisation, memory) on this port",
    )
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="serve a live browser dashboard of this worker (tokens/s, TTFT/ITL, batch, KV, "
        "power, energy per token, lag) under /dashboard/ of the HTTP front (needs --http-port)",
    )
    p.add_argument(
        "--otlp-endpoint",
        type=otlp_endpoint,
        help="export one OpenTelemetry trace per request (modelled queue, prefill chunks, "
        "decode, ...) to this OTLP/HTTP collector, e.g. http://127.0.0.1:4318 (needs the "
        "[otel] extra; OTEL_* variables apply)",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        help="local Hugging Face tokenizer.json (or its folder) to count HTTP prompt text "
        "(needs the `tokenizers` package; default ~4 characters per token)",
    )
    add_engine_arguments(p)
    p.add_argument(
        "--load-format",
        choices=LOAD_FORMATS,
        default=_SERVER.load_format,
        help="how the weights load, as vLLM's option: dummy at once; the others (default "
        f"{_SERVER.load_format}) take the core's time for the weights' bytes over each "
        "device's host link, with /health 503 until then",
    )
    p.add_argument(
        "--seed",
        type=nonnegative_int,
        default=EngineConfig.seed,
        help="seed for synthetic tokens",
    )
    p.add_argument(
        "--grace",
        type=positive_float,
        default=_SERVER.grace_s,
        help="seconds to drain on SIGINT/SIGTERM",
    )
    p.add_argument(
        "--max-messages-per-s",
        type=positive_float,
        default=_SERVER.max_messages_per_s,
        help=f"message budget ceiling (default {_SERVER.max_messages_per_s:g}); the server "
        "groups tokens per message above it, or below it when the host falls behind",
    )
    p.add_argument(
        "--stream-interval",
        type=stream_interval,
        default=_SERVER.stream_interval,
        metavar="N|auto",
        help="tokens per streamed message, as in SGLang and vLLM: N sends a stream's first "
        "token alone, then N a message, each when its last token is due (the last may be "
        "shorter); auto (default) sends each token alone while the message budget lasts",
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


def configure(args: argparse.Namespace) -> tuple[Deployment, EngineConfig, ServerConfig]:
    """What `serve` runs, from its options, binding nothing: a bad option or combination is
    a one-line MemorywallError or UsageError (a fleet checks its workers with this too)."""
    if args.api_servers > 1 and args.otlp_endpoint is not None:
        raise UsageError(
            "--otlp-endpoint needs a single process: it does not combine with --api-servers "
            "above 1 yet"
        )
    if args.otlp_endpoint is not None:
        require_otel()
    if args.dashboard and args.http_port is None:
        raise UsageError("--dashboard: it is served on the HTTP front; add --http-port")
    if args.dashboard and args.api_servers > 1:
        raise UsageError(
            "--dashboard needs a single process: it does not combine with --api-servers above 1"
        )
    if args.api_servers > 1 and args.enable_lora:
        raise UsageError("--enable-lora needs a single process: not with --api-servers above 1")
    if args.role != "both" and args.enable_lora:
        raise UsageError(f"--enable-lora: not with --role {args.role} (whole requests only)")
    names = names_from_args(args)
    deployment = names.build()
    config = ServerConfig(
        host=args.host,
        port=args.port,
        grpc=args.grpc,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        dcgm_port=args.dcgm_port,
        dashboard=args.dashboard,
        otlp_endpoint=args.otlp_endpoint,
        tokenizer=args.tokenizer,
        grace_s=args.grace,
        max_messages_per_s=args.max_messages_per_s,
        stream_interval=args.stream_interval,
        grpc_services=args.grpc_services,
        load_format=args.load_format,
        lora=serve_options.lora_config(args, deployment.model),
        **serve_options.server_options(args),
        **pd_options.server_options(args, deployment, names),
    )
    return deployment, engine_config_from_args(args), config


def require_otel() -> None:
    """A one-line error unless the [otel] extra (the SDK and its OTLP/HTTP exporter) is here."""
    from importlib.util import find_spec

    try:
        found = find_spec("opentelemetry.sdk") and find_spec(
            "opentelemetry.exporter.otlp.proto.http"
        )
    except ModuleNotFoundError:
        found = None
    if not found:
        raise UsageError(
            "--otlp-endpoint needs OpenTelemetry's SDK and OTLP/HTTP exporter: "
            "pip install 'memorywall[otel]'"
        )


def command(args: argparse.Namespace) -> int:
    # Imported here: predict/hardware/models need neither grpc nor asyncio.
    import asyncio
    import logging

    from memorywall.server.app import serve_forever

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    deployment, engine, config = configure(args)
    try:
        if args.api_servers > 1:
            from memorywall.server.multi.procs import serve_processes

            return serve_processes(
                deployment,
                engine,
                config,
                api_servers=args.api_servers,
                ready_file=args.ready_file,
                log_level=args.log_level,
            )
        asyncio.run(serve_forever(deployment, engine, config, ready_file=args.ready_file))
    except OSError as e:
        raise UsageError(str(e)) from None
    return 0
