"""The `memorywall bench` options: argparse only, so building the CLI stays quick."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from memorywall.argtypes import (
    nonnegative_int,
    number_list,
    otlp_endpoint,
    positive_float,
    positive_int,
)

# loadgen.target.Backend
BACKENDS = (
    "memorywall-grpc",
    "openai-completions",
    "openai-chat",
    "kserve-grpc",
    "kserve-http",
    "sglang-grpc",
    "vllm-grpc",
    "trtllm-grpc",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=BACKENDS[0],
        help="memorywall gRPC, an OpenAI-compatible HTTP server (vLLM, SGLang, ...), "
        "KServe v2 / Triton over gRPC (ModelStreamInfer) or HTTP (generate_stream), or a "
        "worker's gRPC service as the smg gateway speaks it (sglang-grpc, vllm-grpc for "
        "`vllm serve --grpc`, trtllm-grpc)",
    )
    p.add_argument(
        "--target",
        help="gRPC: host:port (default 127.0.0.1:50051; kserve-grpc 127.0.0.1:8001); "
        "HTTP: base URL (default http://127.0.0.1:8000)",
    )
    p.add_argument(
        "--model",
        help="OpenAI and KServe backends: model name (default: the first the server lists)",
    )
    add_load_arguments(p)
    p.add_argument("--workers", type=positive_int, default=1, help="load-generating processes")
    p.add_argument("--timeout", type=positive_float, help="per-request deadline in seconds")
    p.add_argument(
        "--otlp-endpoint",
        type=otlp_endpoint,
        help="start each request's OpenTelemetry trace here and send its traceparent, "
        "exporting to this OTLP/HTTP collector, e.g. http://127.0.0.1:4318 (needs the "
        "[otel] extra); a server with --otlp-endpoint continues the trace",
    )
    add_access_arguments(p)


def add_access_arguments(p: argparse.ArgumentParser) -> None:
    """TLS and the API key, for servers started with --tls-cert / --api-key."""
    p.add_argument("--tls", action="store_true", help="gRPC: speak TLS (https URLs always do)")
    p.add_argument("--tls-ca", help="PEM roots that sign the server's certificate (implies --tls)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("MEMORYWALL_API_KEY"),
        help="send 'Authorization: Bearer KEY' (default: $MEMORYWALL_API_KEY)",
    )


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """What to send and how fast, and where results go: bench and simulate share these."""
    load = p.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency", type=number_list(int, low=1), help="closed loop: users, e.g. 1,4,16,64"
    )
    load.add_argument(
        "--request-rate",
        type=number_list(float, low=0, low_inclusive=False),
        help="open loop: requests/s, e.g. 2,8",
    )
    p.add_argument(
        "--burstiness", type=positive_float, default=1.0, help="gamma shape (1: Poisson)"
    )
    p.add_argument(
        "--max-concurrency", type=positive_int, help="open loop: cap on requests in flight"
    )
    p.add_argument(
        "--num-prompts", type=positive_int, help="requests per level (default 100, or the trace)"
    )
    p.add_argument(
        "--duration", type=positive_float, help="stop releasing requests after S seconds"
    )
    p.add_argument(
        "--warmup", type=int, default=1, help="warm-up requests per level (excluded; default 1)"
    )
    p.add_argument("--input-len", default="512", help="N | uniform:N:R | lognormal:N:SIGMA")
    p.add_argument("--output-len", default="128", help="N | uniform:N:R | lognormal:N:SIGMA")
    p.add_argument(
        "--workload",
        type=Path,
        help="JSONL trace: prompt_tokens, output_tokens[, arrival_s]; a bench run's "
        "LABEL-cN.requests.jsonl (replays when the emulator received each request, else "
        "its send times); or "
        "shared-prefix:GROUPS:PREFIX_TOKENS (prompts of a group share their first tokens); "
        "or multi-turn:TURNS:THINK_MS (chat sessions; --input-len: each user message, "
        "--output-len: each answer). A trace's hash_ids (Mooncake) and session_id/delay "
        "rows are replayed as shared blocks and sessions",
    )
    p.add_argument(
        "--trace-block-size",
        type=positive_int,
        help="tokens per hash id of a trace's hash_ids (default 512, Mooncake's)",
    )
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed for lengths and arrivals")
    p.add_argument("--slo", help="goodput bounds, e.g. ttft=500ms,tpot=30ms")
    p.add_argument("--label", default="run", help="name for this sweep in files and plots")
    p.add_argument("--out", type=Path, help="write JSON, per-request JSONL and PNG plots here")
    p.add_argument(
        "--no-plots",
        dest="plots",
        action="store_false",
        help="--out without the PNG plots (nor matplotlib: about a second of CPU)",
    )
