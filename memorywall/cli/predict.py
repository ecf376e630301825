"""`memorywall predict`: step time, speed, TTFT and energy for one deployment."""

from __future__ import annotations

import argparse
import json

from memorywall.argtypes import nonnegative_int, positive_int
from memorywall.cli.deployment import add_deployment_arguments, deployment_from_args
from memorywall.core import predict
from memorywall.core.predict import Prediction


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict step time, speed, TTFT and energy for a deployment")
    add_deployment_arguments(p)
    p.add_argument("--batch", type=positive_int, default=1, help="sequences decoding together")
    p.add_argument(
        "--context", type=nonnegative_int, default=1024, help="cached tokens per sequence"
    )
    p.add_argument("--prompt", type=positive_int, help="prompt tokens to prefill (gives TTFT)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
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
    if p.prefill is not None and p.ttft_s is not None:  # both, given a prompt
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
