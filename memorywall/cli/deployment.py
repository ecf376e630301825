"""The options that choose a deployment and the engine's batching, and what they build.

Shared by predict, serve, simulate and calibrate.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from memorywall.argtypes import fraction, positive_int
from memorywall.cli.usage import UsageError
from memorywall.core import (
    Placement,
    Precision,
    Speculative,
    load_hardware,
    load_model,
    plan_deployment,
)
from memorywall.core.deployment import Deployment

if TYPE_CHECKING:
    from memorywall.server.engine.scheduler import EngineConfig


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
        raise UsageError("--draft-model needs --draft-tokens")
    return plan_deployment(
        load_hardware(args.hardware),
        load_model(args.model),
        devices=args.devices,
        weight_precision=Precision(args.weight_precision),
        kv_precision=Precision(args.kv_precision),
        placement=Placement.parse(args.placement),
        speculative=speculative,
    )
